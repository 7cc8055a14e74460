"""``linear_logprobs``: the LM head fused with ``token_logprobs``, differentiable, never holding
``[T, V]`` logits.

* ``linear_logprobs(hidden, weight, token_ids, temperature=1.0, temperatures=None) ->
  (logprobs, entropy, lse)``: ``x = hidden @ weight^T`` (fp32 accumulation) in tiles; each
  tile updates its rows' online softmax state, so the extra memory is the tiles' (torch:
  ``[CHUNK_T, CHUNK_V]`` fp32 at a time; Triton: a few fp32 per row and V split), not
  ``[T, V]``. The third output ``lse = logsumexp(x / t)`` is what the backward needs to
  recompute the probabilities; it is differentiable too (a z-loss can use it). The Python
  function returns ``(logprobs, entropy)``.
* ``linear_logprobs_backward(grad_logprobs, grad_entropy, grad_lse, hidden, weight, token_ids,
  entropy, lse, temperature=1.0, temperatures=None, need_grad_hidden=True,
  need_grad_weight=True) -> (grad_hidden, grad_weight)``: the registered derivative of
  ``linear_logprobs`` (the registry's autograd hook calls it, on the default backend); it
  recomputes ``x`` chunk by chunk over V, builds the grad-logits of the chunk, and runs the two
  GEMMs (``grad_weight[chunk] = g^T @ hidden``, ``grad_hidden += g @ weight[chunk]``). Autograd
  asks only for the gradients of operands that require one: a frozen LM head (LoRA) costs
  neither the ``[V, H]`` gradient's memory nor its GEMM.

Formulas (forward, gradients, NaN/inf, greedy rows): :mod:`glm45_ops.reference.rollout`.
Backends: torch (the reference) and Triton (``triton_ops/rollout.py``: ``tl.dot`` tiles with
the statistics in the epilogue; wgmma on Hopper).
"""

from __future__ import annotations

import math

import torch

from glm45_ops._registry import ErrorInput, Op, Sample
from glm45_ops.reference import rollout as ref
from glm45_ops.rollout.logprobs import (MAX_VOCAB, check_float, check_ids_and_temperature, check_ids_in_vocab,
                                        check_rows, check_unit_last_stride, check_vocab, compare_rows, row_scale,
                                        temperature_args)
from glm45_ops.testing import calc_diff

__all__ = ["linear_logprobs", "linear_logprobs_backward"]

# Gradient agreement (calc_diff over the finite entries): the Triton backward rounds the
# grad-logits to the operands' dtype before its GEMMs (as Liger's fused linear cross-entropy),
# the reference keeps them in fp32: ~2^-9 relative per entry for 16-bit operands.
GRAD_DIFF_LIMIT = {torch.bfloat16: 1e-4, torch.float16: 1e-5, torch.float32: 1e-9}


def _check(hidden, weight, token_ids, temperature, temperatures):
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden [T, H={hidden.shape[1]}] and weight [V, H={weight.shape[1]}] must share H")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    check_vocab("weight", weight.shape[0])
    check_unit_last_stride("hidden", hidden)
    check_unit_last_stride("weight", weight)
    check_ids_and_temperature(token_ids, temperature, temperatures, hidden.shape[0], "hidden", hidden)
    check_ids_in_vocab(token_ids, weight.shape[0])


def _alloc(hidden, weight, token_ids, temperature, temperatures):
    return tuple(torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device) for _ in range(3))


def _launch(outs, *args):
    from triton_ops import rollout as tr

    tr.linear_logprobs(*args, *outs)


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, 0.0)


def _compare(got, want, args) -> str | None:
    """``compare_rows`` with each row's scale bounded from the operands: ``|x_j| <=
    ||h|| * max ||w_j||`` (Cauchy-Schwarz), plus the GEMM's own rounding (~``sqrt(H)`` ulps of
    that bound between summation orders)."""
    hidden, weight, token_ids, temperature, temperatures = args
    h, w = _finite(hidden.float().cpu()), _finite(weight.float().cpu())
    bound = h.norm(dim=1) * (w.norm(dim=1).max() if w.numel() else 0.0) * (1 + 2 * math.sqrt(h.shape[1]))
    t = ref.row_temperatures(h.shape[0], temperature, temperatures, "cpu")[:, 0]
    return compare_rows(got, want, t, row_scale(bound, t, w.shape[0]), ("logprobs", "entropy", "lse"))


def _operands(t, v, h, dtype, gen, scale=0.3):
    return (torch.randn(t, h, generator=gen).to(dtype), (torch.randn(v, h, generator=gen) * scale).to(dtype),
            torch.randint(0, v, (t,), generator=gen))


def _nonfinite(gen):
    """NaN in a hidden row; +inf in a weight row (each row's logit there is +inf or -inf: a NaN
    row or a masked token); NaN, +inf and 0 temperatures."""
    h, w, ids = _operands(6, 96, 16, torch.float32, gen)
    h[1, 3] = float("nan")
    w[40, 5] = float("inf")
    ids[2] = 40
    return h, w, ids, torch.tensor([1.0, 1.0, 0.8, float("nan"), float("inf"), 0.0])


def _samples(device, gen):
    d = lambda *ts: tuple(t.to(device) for t in ts)  # noqa: E731
    h16, w16, ids16 = _operands(6, 130, 16, torch.float16, gen)
    w16[70] = w16[3]  # tied logits: greedy rows take the lower id
    ids16[2] = 3
    temps = torch.tensor([0.7, 1.0, 0.0, 1.3, -1.0, float("inf")])
    hs, ws, ids_s = _operands(5, 200, 64, torch.bfloat16, gen)
    h_nf, w_nf, ids_nf, t_nf = _nonfinite(gen)
    return [
        Sample(d(*_operands(5, 300, 32, torch.bfloat16, gen))),
        Sample((*d(*_operands(4, 1000, 48, torch.float32, gen)), 0.7), note="V not a tile multiple"),
        Sample((*d(h16, w16, ids16.to(torch.int32)), 1.0, temps.to(device)), note="per-row temperatures, ties"),
        Sample(d(hs[:, :40], ws[:, 8:48], ids_s), note="row-strided hidden and weight"),
        Sample((*d(*_operands(3, 64, 16, torch.bfloat16, gen)), 0.0), note="greedy"),
        Sample(d(torch.empty(0, 32, dtype=torch.bfloat16), torch.randn(50, 32).bfloat16(),
                 torch.empty(0, dtype=torch.int64)), tag="empty"),
        Sample(d(torch.empty(4, 0), torch.empty(50, 0), torch.randint(0, 50, (4,), generator=gen)), tag="empty",
               note="H=0: uniform"),
        Sample((*d(h_nf, w_nf, ids_nf), 1.0, t_nf.to(device)), tag="nonfinite"),
    ]


def _errors(device):
    h = torch.randn(4, 32, device=device)
    w = torch.randn(64, 32, device=device)
    ids = torch.zeros(4, dtype=torch.int64, device=device)
    return [
        ErrorInput((h.int(), w, ids), match="hidden must be bfloat16, float16 or float32, got torch.int32"),
        ErrorInput((h, w.double(), ids), match="weight must be bfloat16, float16 or float32, got torch.float64"),
        ErrorInput((h[0], w, ids), match=r"hidden must be 2-D \[T, H\], got shape \(32,\)"),
        ErrorInput((h, w[None], ids), match=r"weight must be 2-D \[V, H\], got shape \(1, 64, 32\)"),
        ErrorInput((h, w.bfloat16(), ids), match="hidden and weight must have the same dtype"),
        ErrorInput((h, w[:, :16], ids), match=r"hidden \[T, H=32\] and weight \[V, H=16\] must share H"),
        ErrorInput((h, w.to("meta"), ids), match=f"weight is on meta but hidden is on {device}"),
        ErrorInput((h, w[:0], ids), match=rf"weight: the vocabulary V=0 must be in \[1, {MAX_VOCAB}\]"),
        ErrorInput((torch.randn(32, 4, device=device).t(), w, ids), match="hidden must be contiguous in its last dim"),
        ErrorInput((h, torch.randn(32, 64, device=device).t(), ids), match="weight must be contiguous in its last dim"),
        ErrorInput((h, w, ids[:2]), match=r"token_ids must have shape \[4\] \(\[T\] from hidden\), got \[2\]"),
        ErrorInput((h, w, ids, float("nan")), match="temperature must not be NaN"),
        ErrorInput((h, w, ids, 2.0, torch.ones(4, device=device)), match="temperature must be 1.0"),
        ErrorInput((h, w, ids + 64), match=r"token_ids must lie in \[0, V=64\)", fake=False),
        ErrorInput((h, w, ids, 1.0, 1), exc=TypeError, match="temperatures must be torch.Tensor or None", raw=False),
    ]


# ---------------------------------------------------------------------------------------------
# The backward op
# ---------------------------------------------------------------------------------------------

_GRAD_NAMES = ("grad_logprobs", "grad_entropy", "grad_lse", "entropy", "lse")


def _check_bwd(grad_logprobs, grad_entropy, grad_lse, hidden, weight, token_ids, entropy, lse, temperature,
               temperatures, need_grad_hidden, need_grad_weight):
    _check(hidden, weight, token_ids, temperature, temperatures)
    for name, x in zip(_GRAD_NAMES, (grad_logprobs, grad_entropy, grad_lse, entropy, lse)):
        if x.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {x.dtype}")
        check_rows(name, x, hidden.shape[0], "hidden", hidden)


def _alloc_bwd(grad_logprobs, grad_entropy, grad_lse, hidden, weight, token_ids, entropy, lse, temperature,
               temperatures, need_grad_hidden, need_grad_weight):
    h = hidden.shape[1]
    return (torch.empty((hidden.shape[0] if need_grad_hidden else 0, h), dtype=hidden.dtype, device=hidden.device),
            torch.empty((weight.shape[0] if need_grad_weight else 0, h), dtype=weight.dtype, device=weight.device))


def _launch_bwd(outs, *args):
    from triton_ops import rollout as tr

    tr.linear_logprobs_backward(*args, *outs)


def compare_grads(got, want, dtype: torch.dtype) -> str | None:
    """(grad_hidden, grad_weight) against the reference's: the same NaN and infinities, and the
    finite entries' ``calc_diff`` below ``GRAD_DIFF_LIMIT`` of the operands' ``dtype``."""
    for name, g, w in zip(("grad_hidden", "grad_weight"), got, want):
        g, w = g.detach().cpu().double(), w.detach().cpu().double()
        if g.shape != w.shape:
            return f"{name}: shape {list(g.shape)} vs reference {list(w.shape)}"
        finite = torch.isfinite(w)
        if not (torch.equal(g.isnan(), w.isnan()) and torch.equal(g[~finite & ~w.isnan()], w[~finite & ~w.isnan()])):
            return f"{name}: NaN/inf at different places than the reference"
        diff = calc_diff(g[finite], w[finite])
        if diff > GRAD_DIFF_LIMIT[dtype]:
            return f"{name}: calc_diff {diff:.3g} > {GRAD_DIFF_LIMIT[dtype]:g}"
    return None


def _compare_bwd(got, want, args) -> str | None:
    return compare_grads(got, want, args[3].dtype)


def _bwd_sample(h, w, ids, gen, temperature=1.0, temperatures=None, need=(True, True)):
    _, ent, lse = ref.linear_logprobs_ref(h, w, ids, temperature, temperatures)
    grads = tuple(torch.randn(h.shape[0], generator=gen) for _ in range(3))
    return (*grads, h, w, ids, ent, lse, temperature, temperatures, *need)


def _bwd_samples(device, gen):
    def to(args):
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)

    h16, w16, ids16 = _operands(6, 130, 16, torch.float16, gen)
    h_nf, w_nf, ids_nf, t_nf = _nonfinite(gen)
    h_s, w_s, ids_s = _operands(5, 100, 48, torch.bfloat16, gen)
    return [
        Sample(to(_bwd_sample(*_operands(5, 300, 32, torch.bfloat16, gen), gen))),
        Sample(to(_bwd_sample(*_operands(4, 1000, 48, torch.float32, gen), gen, 0.7)), note="fp32"),
        Sample(to(_bwd_sample(h16, w16, ids16, gen, 1.0, torch.tensor([0.7, 1.0, 0.0, 1.3, -1.0, float("inf")]))),
               note="per-row temperatures with greedy rows"),
        Sample(to(_bwd_sample(h_s[:, :40], w_s[:, 8:48], ids_s, gen)), note="row-strided operands"),
        Sample(to(_bwd_sample(*_operands(4, 300, 32, torch.bfloat16, gen), gen, need=(True, False))),
               note="frozen weight: grad_weight [0, H]"),
        Sample(to(_bwd_sample(*_operands(4, 300, 32, torch.bfloat16, gen), gen, 0.8, need=(False, True))),
               note="frozen hidden: grad_hidden [0, H]"),
        Sample(to(_bwd_sample(torch.empty(0, 32), torch.randn(50, 32, generator=gen), torch.empty(0, dtype=torch.int64),
                              gen)), tag="empty", note="T=0: grad_weight is zero"),
        Sample(to(_bwd_sample(h_nf, w_nf, ids_nf, gen, 1.0, t_nf)), tag="nonfinite"),
    ]


def _bwd_errors(device):
    h = torch.randn(4, 32, device=device)
    w = torch.randn(64, 32, device=device)
    ids = torch.zeros(4, dtype=torch.int64, device=device)
    v = torch.zeros(4, device=device)
    return [
        ErrorInput((v, v, v, h, w.half(), ids, v, v), match="hidden and weight must have the same dtype"),
        ErrorInput((v.double(), v, v, h, w, ids, v, v), match="grad_logprobs must be float32, got torch.float64"),
        ErrorInput((v, v, v[:3], h, w, ids, v, v), match=r"grad_lse must have shape \[4\] \(\[T\] from hidden\)"),
        ErrorInput((v, v, v, h, w, ids, v.to("meta"), v), match=f"entropy is on meta but hidden is on {device}"),
        ErrorInput((v, v, v, h, w, ids, v, v, float("nan")), match="temperature must not be NaN"),
        ErrorInput((v, v, v, h, w, ids, v), exc=TypeError, match="missing required argument 'lse'", raw=False),
    ]


_bwd_op = Op(
    "linear_logprobs_backward",
    "(Tensor grad_logprobs, Tensor grad_entropy, Tensor grad_lse, Tensor hidden, Tensor weight, Tensor token_ids, "
    "Tensor entropy, Tensor lse, float temperature=1.0, Tensor? temperatures=None, bool need_grad_hidden=True, "
    "bool need_grad_weight=True) -> (Tensor, Tensor)",
    check=_check_bwd,
    alloc=_alloc_bwd,
    torch_impl=ref.linear_logprobs_backward_ref,
    triton_launch=_launch_bwd,
    compare=_compare_bwd,
    samples=_bwd_samples,
    errors=_bwd_errors,
)

linear_logprobs_backward = _bwd_op.api(
    """Gradients of ``linear_logprobs`` w.r.t. ``hidden`` and ``weight`` (module docstring).

    ``grad_logprobs``, ``grad_entropy``, ``grad_lse`` fp32 ``[T]`` (upstream gradients of the three
    outputs), the forward's inputs, and its ``entropy`` and ``lse`` outputs -> (``grad_hidden``
    ``[T, H]``, ``grad_weight`` ``[V, H]``) in the operands' dtype, contiguous; a gradient whose
    ``need_grad_*`` is False is not computed and comes back empty, ``[0, H]``. The logits are
    recomputed chunk by chunk (never ``[T, V]``); greedy rows (``t <= 0``) contribute nothing.
    """
)


# ---------------------------------------------------------------------------------------------
# The forward op, with its derivative
# ---------------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    hidden, weight, token_ids, temperature, temperatures = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, token_ids, temperatures, entropy, lse)
    ctx.temperature = temperature


def _backward(ctx, grad_logprobs, grad_entropy, grad_lse):
    hidden, weight, token_ids, temperatures, entropy, lse = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[:2]
    grad_hidden, grad_weight = _bwd_op(grad_logprobs, grad_entropy, grad_lse, hidden, weight, token_ids, entropy, lse,
                                       ctx.temperature, temperatures, need_h, need_w)
    # temperatures get no gradient (a constant of the rollout)
    return grad_hidden if need_h else None, grad_weight if need_w else None, None, None, None


_op = Op(
    "linear_logprobs",
    "(Tensor hidden, Tensor weight, Tensor token_ids, float temperature=1.0, Tensor? temperatures=None) "
    "-> (Tensor, Tensor, Tensor)",
    check=_check,
    alloc=_alloc,
    torch_impl=ref.linear_logprobs_ref,
    triton_launch=_launch,
    autograd=(_backward, _setup_context),
    compare=_compare,
    samples=_samples,
    errors=_errors,
)

_DEFAULTS = {a.name: a.default for a in _op.args}  # the schema's, for the wrapper's signature


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float | torch.Tensor = _DEFAULTS["temperature"],
    temperatures: torch.Tensor | None = _DEFAULTS["temperatures"],
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs(hidden @ weight.T, token_ids, temperature)`` without the ``[T, V]`` logits.

    ``hidden`` ``[T, H]`` and ``weight`` ``[V, H]`` (the LM head), bf16/fp16/fp32 alike, unit
    last strides -> (``logprobs``, ``entropy``) fp32 ``[T]``, differentiable w.r.t. ``hidden`` and
    ``weight`` (a policy-gradient loss ``sum(coef * logprobs)``, an entropy bonus; a per-row
    ``temperature`` tensor gets no gradient, even if it requires one). The logits
    are ``hidden @ weight^T`` accumulated in fp32; ``temperature`` (a number or an fp32 ``[T]``
    tensor) and every edge value are as in :func:`token_logprobs`. The raw op
    ``torch.ops.glm45.linear_logprobs`` also returns ``lse = logsumexp(logits / t)`` (fp32 ``[T]``,
    differentiable); ``temperatures`` is the schema's form of a per-row temperature, accepted here too.
    """
    n = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() == 2 else None
    logprobs, entropy, _ = _op(hidden, weight, token_ids, **temperature_args(temperature, temperatures, n),
                               backend=backend)
    return logprobs, entropy


OPS = (_op, _bwd_op)
