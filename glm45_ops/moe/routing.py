"""MoE routing: ``moe_route``, GLM-4.5's sigmoid router with DeepSeek-V3's group-limited top-k.

``moe_route(router_logits, correction_bias=None, top_k=8, n_group=1, topk_group=1,
renormalize=True, routed_scaling_factor=1.0) -> (topk_weights, topk_ids)``: every backend
exactly equal to ``glm45_ops.reference.moe_routing`` (the definition: ties to the lower id, NaN
ranked lowest, the output order and the weights' summation order). Any expert count up to 512,
powers of two or not (GLM-4.5's 160, Air's 128, DeepSeek-V3's 256 in 8 groups), ``top_k <= 16``.
Backends: the torch reference (vectorised, the CPU path), Triton (``triton_ops/moe_routing.py``: a
block of tokens per program) and CUDA (``csrc/moe/routing.cu``: a warp per token).

``route(hidden, router_weight, ...)`` computes the logits first (the fp32 router GEMM, as HF's
``Glm4MoeTopkRouter``), then routes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from glm45_ops._registry import ErrorInput, Op, Sample
from glm45_ops.reference import moe_routing as ref
from glm45_ops.reference.moe_routing import MAX_EXPERTS, MAX_TOP_K

__all__ = ["moe_route", "route", "MAX_EXPERTS", "MAX_TOP_K"]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check(router_logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor):
    if router_logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"router_logits must be bfloat16, float16 or float32, got {router_logits.dtype}")
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be 2-D [T, E], got shape {tuple(router_logits.shape)}")
    e = router_logits.shape[1]
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"router_logits: the expert count E={e} must be in [1, {MAX_EXPERTS}]")
    if correction_bias is not None:
        if correction_bias.dtype != torch.float32:
            raise ValueError(f"correction_bias must be float32, got {correction_bias.dtype}")
        if tuple(correction_bias.shape) != (e,):
            raise ValueError(f"correction_bias must have shape [{e}] (E from router_logits), "
                             f"got {list(correction_bias.shape)}")
        if correction_bias.device != router_logits.device:
            raise ValueError(f"correction_bias is on {correction_bias.device} but router_logits is on "
                             f"{router_logits.device}")
    if not 1 <= top_k <= min(MAX_TOP_K, e):
        raise ValueError(f"top_k must be in [1, {min(MAX_TOP_K, e)}] (at most {MAX_TOP_K} and E={e}), got {top_k}")
    if n_group < 1 or e % n_group:
        raise ValueError(f"n_group must be a positive divisor of E={e}, got {n_group}")
    if n_group > 1 and e // n_group < 2:
        raise ValueError(f"n_group={n_group} leaves {e // n_group} expert per group; a group's score "
                         "sums its top 2, so groups need at least 2")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if topk_group * (e // n_group) < top_k:
        raise ValueError(f"topk_group={topk_group} groups of {e // n_group} experts hold fewer than "
                         f"top_k={top_k} experts")


def _alloc(router_logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor):
    t = router_logits.shape[0]
    weights = torch.empty((t, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=router_logits.device)
    return weights, ids


def _launch(outs, *args):
    from triton_ops import moe_routing as tr

    tr.moe_route(*args, *outs)


def _logits(shape, dtype, gen, device, std=2.0):
    return (torch.randn(shape, generator=gen, device=gen.device) * std).to(dtype).to(device)


def _bias(e, gen, device):
    return (torch.randn(e, generator=gen, device=gen.device) * 0.1).to(device)


def _tied(t, e, gen, device, dtype):
    """Logits drawn from 4 values, so most experts tie (and whole groups tie)."""
    pick = torch.randint(0, 4, (t, e), generator=gen, device=gen.device)
    return torch.tensor([-1.0, 0.0, 0.5, 2.0])[pick.cpu()].to(dtype).to(device)


def _nonfinite(gen, device):
    x = _logits((6, 16), torch.float32, gen, device)
    x[0, 3] = float("nan")  # one NaN expert ranks last
    x[1] = float("nan")  # all NaN: ids 0..k-1, NaN weights
    x[2, [1, 5]] = float("inf")  # score 1: chosen first, lower id first
    x[3, [0, 2, 9]] = -float("inf")
    x[4, :8] = float("nan")  # a NaN group
    x[5] = -float("inf")  # every score 0: ids 0..k-1, 0 / 1e-20 = 0
    return x


def _samples(device, gen):
    bias = _bias(256, gen, device)
    glm_bias = _bias(160, gen, device)
    nf_bias = _bias(16, gen, device)
    nf_bias[7] = float("inf")
    nf_bias[12] = float("nan")
    strided = _logits((5, 300), torch.bfloat16, gen, device)[:, 20:148]
    return [
        Sample((_logits((7, 16), torch.float32, gen, device), None, 4)),
        Sample((_logits((5, 16), torch.bfloat16, gen, device), bias[:16], 4, 4, 2), note="4 groups of 4"),
        Sample((_logits((9, 128), torch.bfloat16, gen, device), bias[:128], 8), note="GLM-4.5-Air"),
        Sample((_logits((9, 160), torch.bfloat16, gen, device), glm_bias, 8, 1, 1, True, 2.5), note="GLM-4.5"),
        Sample((_logits((6, 160), torch.float32, gen, device), glm_bias, 8, 8, 3), note="160 in 8 groups of 20"),
        Sample((_logits((6, 256), torch.bfloat16, gen, device), bias, 8, 8, 4, True, 2.5), note="DeepSeek-V3"),
        Sample((_logits((4, 256), torch.float16, gen, device), None, 16, 1, 1, False), note="k=16, no renorm"),
        Sample((_logits((3, 37), torch.float32, gen, device), None, 5), note="E=37 (padded to 64)"),
        Sample((_logits((2, 512), torch.bfloat16, gen, device), None, 16, 16, 4), note="E=512 in 16 groups, k=16"),
        Sample((strided, bias[::2], 8), note="row-strided logits, strided bias"),
        Sample((_logits((16, 6), torch.float32, gen, device).t(), bias[:16], 3, 2, 2), note="column-major logits"),
        Sample((_tied(6, 160, gen, device, torch.bfloat16), None, 8, 8, 2), note="ties"),
        Sample((_tied(6, 128, gen, device, torch.float32), bias[:128].round(decimals=1), 8), note="ties with bias"),
        Sample((_logits((0, 160), torch.bfloat16, gen, device), glm_bias, 8), tag="empty"),
        Sample((_nonfinite(gen, device), None, 4, 4, 2), tag="nonfinite"),
        Sample((_nonfinite(gen, device), nf_bias, 6, 2, 1, True, 2.5), tag="nonfinite"),
    ]


def _errors(device):
    x = torch.randn(4, 16, device=device)
    bias = torch.zeros(16, device=device)
    return [
        ErrorInput((x.double(),), match="router_logits must be bfloat16, float16 or float32"),
        ErrorInput((x[0],), match=r"router_logits must be 2-D \[T, E\]"),
        ErrorInput((x[:, :0],), match="the expert count E=0"),
        ErrorInput((torch.zeros(2, 513, device=device),), match="the expert count E=513"),
        ErrorInput((x, bias.bfloat16()), match="correction_bias must be float32"),
        ErrorInput((x, bias[:8]), match=r"correction_bias must have shape \[16\]"),
        ErrorInput((x, bias.to("meta")), match=f"correction_bias is on meta but router_logits is on {device}"),
        ErrorInput((x, bias, 0), match=r"top_k must be in \[1, 16\]"),
        ErrorInput((x, bias, 17), match=r"top_k must be in \[1, 16\]"),
        ErrorInput((x[:, :6], None, 7), match=r"top_k must be in \[1, 6\]"),
        ErrorInput((x, bias, 4, 3), match="n_group must be a positive divisor of E=16"),
        ErrorInput((x, bias, 4, 0), match="n_group must be a positive divisor"),
        ErrorInput((x, bias, 4, 16, 4), match="leaves 1 expert per group"),
        ErrorInput((x, bias, 4, 4, 0), match=r"topk_group must be in \[1, n_group=4\]"),
        ErrorInput((x, bias, 4, 4, 5), match=r"topk_group must be in \[1, n_group=4\]"),
        ErrorInput((x, bias, 9, 4, 2), match="hold fewer than top_k=9"),
        ErrorInput(("x",), exc=TypeError, match="router_logits must be torch.Tensor", raw=False),
        ErrorInput((x, bias, 4.0), exc=TypeError, match="top_k must be int", raw=False),
    ]


_op = Op(
    "moe_route",
    "(Tensor router_logits, Tensor? correction_bias=None, int top_k=8, int n_group=1, int topk_group=1, "
    "bool renormalize=True, float routed_scaling_factor=1.0) -> (Tensor, Tensor)",
    check=_check,
    alloc=_alloc,
    torch_impl=ref.moe_route_ref,
    triton_launch=_launch,
    samples=_samples,
    errors=_errors,
)

moe_route = _op.api(
    """Route tokens to experts: sigmoid scores, group-limited top-k on the bias-corrected scores.

    ``router_logits`` bf16/fp16/fp32 ``[T, E]`` (any strides), ``correction_bias`` fp32 ``[E]``
    or None -> ``topk_weights`` fp32 ``[T, top_k]`` (the unbiased sigmoid scores at the chosen
    experts, divided by their sum + 1e-20 when ``renormalize``, times ``routed_scaling_factor``)
    and ``topk_ids`` int32 ``[T, top_k]`` (best first; ties to the lower id). ``n_group > 1``
    keeps only the ``topk_group`` groups with the highest sum of their two best biased scores
    (DeepSeek-V3). GLM-4.5: ``top_k=8, routed_scaling_factor=2.5`` with its ``e_score_correction_bias``.
    Exact definition, NaN included: :mod:`glm45_ops.reference.moe_routing`.
    """
)


_DEFAULTS = {a.name: a.default for a in _op.args}  # the schema's, for route's signature


def route(
    hidden: torch.Tensor,
    router_weight: torch.Tensor,
    correction_bias: torch.Tensor | None = _DEFAULTS["correction_bias"],
    top_k: int = _DEFAULTS["top_k"],
    n_group: int = _DEFAULTS["n_group"],
    topk_group: int = _DEFAULTS["topk_group"],
    renormalize: bool = _DEFAULTS["renormalize"],
    routed_scaling_factor: float = _DEFAULTS["routed_scaling_factor"],
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_route`` on ``hidden.float() @ router_weight.T``: ``hidden`` bf16/fp16/fp32 ``[T, H]``,
    ``router_weight`` fp32 ``[E, H]`` on hidden's device (the router linear runs in fp32, as HF
    GLM-4.5's). Bad arguments raise TypeError (not a tensor) or ValueError, naming them."""
    for name, t in (("hidden", hidden), ("router_weight", router_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden must be bfloat16, float16 or float32, got {hidden.dtype}")
    if router_weight.dtype != torch.float32:
        raise ValueError(f"router_weight must be float32, got {router_weight.dtype}")
    for name, t, shape in (("hidden", hidden, "[T, H]"), ("router_weight", router_weight, "[E, H]")):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D {shape}, got shape {tuple(t.shape)}")
    if hidden.shape[1] != router_weight.shape[1]:
        raise ValueError(f"hidden [T, H={hidden.shape[1]}] and router_weight [E, H={router_weight.shape[1]}] "
                         "must share H")
    if router_weight.device != hidden.device:
        raise ValueError(f"router_weight is on {router_weight.device} but hidden is on {hidden.device}")
    logits = torch.nn.functional.linear(hidden.float(), router_weight)
    return _op(logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor,
               backend=backend)


OPS: Sequence[Op] = (_op,)
