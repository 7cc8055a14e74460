"""MTP speculative verification: which draft tokens the target model accepts, and what it emits.

GLM-4.5's MTP layer drafts ``S`` tokens per request, the target model scores all ``S + 1``
positions in one pass, and these ops decide, every decode step, what is accepted. Ops (schemas
below), every backend exactly equal to ``glm45_ops.reference.speculative`` (the definition,
including NaN/inf, the fixed-point inverse CDF that makes the sampled draw bit-identical
everywhere, and empty batches):

* ``verify_greedy(draft_ids, target_logits) -> (out_ids, num_accepted)``
* ``verify_sampling(draft_ids, target_probs, uniform, draft_probs=None) -> (out_ids, num_accepted)``

Both take their arguments in the schema's order: the raw ops, the Python functions below, the
reference and every kernel. ``draft_probs`` is optional, so it comes last (FlashInfer's
``chain_speculative_sampling`` puts it first: pass it by keyword when porting), and
``torch.ops.glm45.verify_sampling.default(draft_ids, target_probs, uniform)`` verifies a one-hot
("target only") draft. The Python ``verify_sampling`` also draws ``uniform`` when not given it.
``probs_from_logits(logits, temperature, top_k, top_p)`` makes the target and draft
distributions (batched, per-row parameters, no host sync).

**Ids outside the vocabulary.** A draft id outside ``[0, V)`` is defined as a token of zero
probability under both models: it is rejected and never read (the kernels mask the gather).
Checking the range is a reduction whose answer lives on the device; reading it would be a host
sync, which CUDA-graph capture forbids and which stalls every decode step. So the check raises
``ValueError`` only where it costs nothing: for real CPU tensors. On CUDA (and under
``torch.compile`` tracing or fake tensors) such ids follow the definition above. The same holds
for uniforms outside ``[0, 1)``: not checked, the draw stays in range.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from glm45_ops._registry import ErrorInput, Op, Sample
from glm45_ops.reference import speculative as ref
from glm45_ops.reference.speculative import MAX_VOCAB

__all__ = ["verify_greedy", "verify_sampling", "probs_from_logits", "MAX_VOCAB"]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ID_DTYPES = (torch.int32, torch.int64)
_DTYPE_NAMES = {_FLOAT_DTYPES: "bfloat16, float16 or float32", _ID_DTYPES: "int32 or int64", (torch.float32,): "float32"}


def _check_tensor(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], ndim: int, dims: str) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {_DTYPE_NAMES[dtypes]}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {dims}, got shape {tuple(t.shape)}")


def _check_rows(name: str, t: torch.Tensor, b: int, rows: int, v: int | None, what: str) -> None:
    """``t`` must have shape ``[B, rows(, V)]``; the message says where B, rows and V come from."""
    want = (b, rows) if v is None else (b, rows, v)
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must have shape {list(want)} ({what}), got {list(t.shape)}")


def _check_vocab_rows(name: str, t: torch.Tensor) -> int:
    v = t.shape[-1]
    if not 1 <= v <= MAX_VOCAB:
        raise ValueError(f"{name}: the vocabulary V={v} must be in [1, {MAX_VOCAB}] (int64 fixed-point CDF)")
    if v > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {tuple(t.stride())}")
    return v


def _same_device(**tensors: torch.Tensor | None) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}")


def _check_ids_in_vocab(draft_ids: torch.Tensor, v: int) -> None:
    """Raise for ids outside [0, V) where that costs no host sync: real CPU tensors only."""
    if draft_ids.device.type != "cpu" or is_fake(draft_ids) or torch.compiler.is_compiling():
        return
    bad = (draft_ids < 0) | (draft_ids >= v)
    if bool(bad.any()):
        i = bad.flatten().nonzero()[0, 0].item()
        raise ValueError(
            f"draft_ids must lie in [0, V={v}); found {draft_ids.flatten()[i].item()} at flat index {i} "
            "(on CUDA such ids are not checked, they are rejected; see glm45_ops.speculative)"
        )


def _alloc_out(draft_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, s = draft_ids.shape
    out_ids = torch.empty((b, s + 1), dtype=torch.int32, device=draft_ids.device)
    num_accepted = torch.empty((b,), dtype=torch.int32, device=draft_ids.device)
    return out_ids, num_accepted


# ---------------------------------------------------------------------------------------------
# verify_greedy
# ---------------------------------------------------------------------------------------------

def _check_greedy(draft_ids, target_logits):
    _check_tensor("draft_ids", draft_ids, _ID_DTYPES, 2, "[B, S]")
    _check_tensor("target_logits", target_logits, _FLOAT_DTYPES, 3, "[B, S+1, V]")
    _same_device(draft_ids=draft_ids, target_logits=target_logits)
    b, s = draft_ids.shape
    v = _check_vocab_rows("target_logits", target_logits)
    _check_rows("target_logits", target_logits, b, s + 1, v, "B and S+1 from draft_ids [B, S]")
    _check_ids_in_vocab(draft_ids, v)


def _alloc_greedy(draft_ids, target_logits):
    return _alloc_out(draft_ids)


def _greedy_launch(outs, draft_ids, target_logits):
    from triton_ops import speculative as ts

    ts.verify_greedy(draft_ids, target_logits, *outs)


def _greedy_inputs(b, s, v, dtype, gen, device, ids_dtype=torch.int64):
    """Logits with a tie at the top of every other request (lowest id wins) and drafts that
    follow the target's argmax for 0..S positions (request r mismatches at position r % (S+1))."""
    logits = torch.randn(b, s + 1, v, generator=gen, device=gen.device)
    top = logits.amax(-1) + 1.0
    logits[::2, :, v // 3] = top[::2]
    logits[::2, :, v // 2] = top[::2]
    logits = logits.to(dtype)
    draft = ref._row_argmax(logits)[:, :s].clone()
    for r in range(b):
        if r % (s + 1) < s:
            draft[r, r % (s + 1)] = (draft[r, r % (s + 1)] + 1) % v
    return draft.to(ids_dtype).to(device), logits.to(device)


def _greedy_samples(device, gen):
    pitched = torch.randn(3, 4, 70, generator=gen, device=gen.device).to(device)[:, :, 5:66]
    specials = torch.randn(6, 3, 40, generator=gen, device=gen.device)
    specials[0, 0, [3, 30]] = float("nan")  # NaN is the largest value: the first NaN wins
    specials[1] = -float("inf")  # an all -inf row: every id ties, id 0
    specials[2, 0] = -1.0
    specials[2, 0, 20] = -0.0
    specials[2, 0, 10] = 0.0  # +0 at 10 and -0 at 20 tie: id 10
    specials[3, 1, [5, 9]] = float("inf")
    specials[4, :, 7] = float("nan")
    spec_ids = ref._row_argmax(specials)[:, :2].clone()
    spec_ids[0, 0] = 30  # the second NaN is not the argmax: rejected
    return [
        Sample(_greedy_inputs(5, 3, 37, torch.float32, gen, device)),
        Sample(_greedy_inputs(4, 2, 50, torch.bfloat16, gen, device, torch.int32), note="ties, int32 ids"),
        Sample(_greedy_inputs(3, 1, 33, torch.float16, gen, device)),
        Sample((_greedy_inputs(3, 3, 61, torch.float32, gen, device)[0], pitched), note="row-strided logits"),
        Sample(_greedy_inputs(3, 0, 20, torch.float32, gen, device), tag="empty", note="S = 0: only the bonus"),
        Sample(_greedy_inputs(0, 2, 20, torch.bfloat16, gen, device), tag="empty", note="B = 0"),
        Sample((spec_ids.to(device), specials.to(device)), tag="nonfinite"),
        Sample((spec_ids.to(torch.int32).to(device), specials.to(torch.bfloat16).to(device)), tag="nonfinite"),
    ]


def _greedy_errors(device):
    ids = torch.zeros(3, 2, dtype=torch.int64, device=device)
    logits = torch.randn(3, 3, 50, device=device)
    return [
        ErrorInput((ids.float(), logits), match="draft_ids must be int32 or int64"),
        ErrorInput((ids[0], logits), match=r"draft_ids must be 2-D \[B, S\]"),
        ErrorInput((ids, logits.double()), match="target_logits must be bfloat16, float16 or float32"),
        ErrorInput((ids, logits[0]), match=r"target_logits must be 3-D \[B, S\+1, V\]"),
        ErrorInput((ids, logits[:, :2]), match=r"target_logits must have shape \[3, 3, 50\]"),
        ErrorInput((ids[:2], logits), match=r"target_logits must have shape \[2, 3, 50\]"),
        ErrorInput((ids, logits[..., :0]), match="target_logits: the vocabulary V=0"),
        ErrorInput((ids, logits.transpose(0, 2).contiguous().transpose(0, 2)), match="contiguous in its last dim"),
        ErrorInput((ids, logits.to("meta")), match=f"target_logits is on meta but draft_ids is on {device}"),
        ErrorInput(("ids", logits), exc=TypeError, match="draft_ids must be torch.Tensor", raw=False),
    ]


_greedy_op = Op(
    "verify_greedy",
    "(Tensor draft_ids, Tensor target_logits) -> (Tensor, Tensor)",
    check=_check_greedy,
    alloc=_alloc_greedy,
    torch_impl=ref.verify_greedy_ref,
    triton_launch=_greedy_launch,
    samples=_greedy_samples,
    errors=_greedy_errors,
)

verify_greedy = _greedy_op.api(
    """Greedy verification: accept draft ``i`` while it equals the target's argmax at ``i``.

    ``draft_ids`` int32/int64 ``[B, S]``, ``target_logits`` bf16/fp16/fp32 ``[B, S+1, V]`` (unit
    last stride) -> ``out_ids`` int32 ``[B, S+1]`` (the accepted drafts, then the target's argmax
    at the first mismatch or the bonus position ``S``, then ``-1``) and ``num_accepted`` int32
    ``[B]``. The argmax is fused (never materialised); ties go to the lowest id, NaN counts as
    the largest value (:mod:`glm45_ops.reference.speculative`).
    """
)


# ---------------------------------------------------------------------------------------------
# verify_sampling
# ---------------------------------------------------------------------------------------------

def _check_sampling(draft_ids, target_probs, uniform, draft_probs):
    _check_tensor("draft_ids", draft_ids, _ID_DTYPES, 2, "[B, S]")
    _check_tensor("target_probs", target_probs, _FLOAT_DTYPES, 3, "[B, S+1, V]")
    _check_tensor("uniform", uniform, (torch.float32,), 2, "[B, S+1]")
    if draft_probs is not None:
        _check_tensor("draft_probs", draft_probs, _FLOAT_DTYPES, 3, "[B, S, V]")
        if draft_probs.dtype != target_probs.dtype:
            raise ValueError(f"draft_probs ({draft_probs.dtype}) and target_probs ({target_probs.dtype}) must share a dtype")
    _same_device(draft_ids=draft_ids, target_probs=target_probs, uniform=uniform, draft_probs=draft_probs)
    b, s = draft_ids.shape
    v = _check_vocab_rows("target_probs", target_probs)
    _check_rows("target_probs", target_probs, b, s + 1, v, "B and S+1 from draft_ids [B, S]")
    if draft_probs is not None:
        _check_vocab_rows("draft_probs", draft_probs)
        _check_rows("draft_probs", draft_probs, b, s, v, "B, S from draft_ids and V from target_probs")
    _check_rows("uniform", uniform, b, s + 1, None, "one uniform per draft position plus one for the final draw")
    _check_ids_in_vocab(draft_ids, v)


def _alloc_sampling(draft_ids, target_probs, uniform, draft_probs):
    return _alloc_out(draft_ids)


def _sampling_launch(outs, draft_ids, target_probs, uniform, draft_probs):
    from triton_ops import speculative as ts

    ts.verify_sampling(draft_ids, target_probs, uniform, draft_probs, *outs)


def _sampling_inputs(b, s, v, gen, device, with_draft=True, dtype=torch.float32):
    """Peaky draft and target distributions (some ids of probability 0), drafts sampled from the
    draft, the target's mass half on the drafts in every other request (so accept counts spread
    over 0..S), and uniforms including 0 and the largest fp32 below 1."""
    def probs(*shape):
        logits = torch.randn(shape, generator=gen, device=gen.device) * 3.0
        logits[torch.rand(shape, generator=gen, device=gen.device) < 0.3] = -float("inf")
        return torch.softmax(logits, dim=-1)

    q, p = probs(b, s + 1, v), probs(b, s, v)
    draft = torch.multinomial(p.reshape(-1, v), 1, generator=gen).reshape(b, s)
    planted = torch.zeros(b, s, v, device=gen.device).scatter(-1, draft[..., None], 1.0)
    q[::2, :s] = 0.5 * q[::2, :s] + 0.5 * planted[::2]
    u = torch.rand(b, s + 1, generator=gen, device=gen.device)
    u[:1, s] = 0.0
    u[1:2, s] = 1.0 - 2.0**-24
    return draft.to(device), q.to(dtype).to(device), u.to(device), (p.to(dtype).to(device) if with_draft else None)


def _sampling_samples(device, gen):
    ids, q, u, p = _sampling_inputs(4, 2, 40, gen, device)
    x = ids.tolist()
    # rows whose residual has no mass: p == q (the draw falls back to q), an all-zero target
    # row (nothing to draw: V - 1); and a one-hot target the drafts follow (always accepted)
    zp, zq, zids = p.clone(), q.clone(), ids.clone()
    zq[0, :2] = zp[0]
    zq[1, 0] = zp[1, 0] = 0.0
    zq[2] = 0.0
    zq[2, :, 11] = 1.0
    zids[2] = 11
    # NaN and inf: a NaN on either side of u * p < q rejects, a +inf q accepts; in the draw a
    # NaN weighs 0 and +inf weighs as 1
    nq, np_ = q.clone(), p.clone()
    nq[0, 0, x[0][0]] = float("nan")
    np_[1, 0, x[1][0]] = float("nan")
    nq[2, 0, x[2][0]] = float("inf")
    nq[2, 1, 3] = float("inf")
    nq[3, 0] = float("nan")
    np_[3, 0, 5] = float("inf")
    pitched = torch.zeros(4, 2, 45, device=device)
    pitched[..., 2:42] = p
    return [
        Sample((ids, q, u, p)),
        Sample((ids, q, u), note="one-hot draft"),
        Sample(_sampling_inputs(5, 3, 33, gen, device, dtype=torch.bfloat16)),
        Sample(_sampling_inputs(3, 1, 20, gen, device, with_draft=False, dtype=torch.float16)),
        Sample((ids.to(torch.int32), q, u, pitched[..., 2:42]), note="row-strided draft_probs, int32 ids"),
        Sample((zids, zq, u, zp), note="zero-mass rows"),
        Sample((zids, zq, u), note="zero-mass rows, one-hot draft"),
        Sample((ids[:, :0], q[:, :1], u[:, :1]), tag="empty", note="S = 0: only the bonus"),
        Sample((ids[:0], q[:0], u[:0], p[:0]), tag="empty", note="B = 0"),
        Sample((ids, nq, u, np_), tag="nonfinite"),
        Sample((ids, nq, u), tag="nonfinite"),
    ]


def _sampling_errors(device):
    ids, q, u, p = _sampling_inputs(3, 2, 50, torch.Generator().manual_seed(0), device)
    return [
        ErrorInput((ids.float(), q, u, p), match="draft_ids must be int32 or int64"),
        ErrorInput((ids, q.double(), u, p), match="target_probs must be bfloat16, float16 or float32"),
        ErrorInput((ids, q, u, p.double()), match="draft_probs must be bfloat16, float16 or float32"),
        ErrorInput((ids, q, u, p.bfloat16()), match="must share a dtype"),
        ErrorInput((ids, q, u.double(), p), match="uniform must be float32"),
        ErrorInput((ids, q, u[0], p), match=r"uniform must be 2-D \[B, S\+1\]"),
        ErrorInput((ids, q[:, :2], u, p), match=r"target_probs must have shape \[3, 3, 50\]"),
        ErrorInput((ids, q, u, p[..., :-1]), match=r"draft_probs must have shape \[3, 2, 50\]"),
        ErrorInput((ids, q, u, p[:, :1]), match=r"draft_probs must have shape \[3, 2, 50\]"),
        ErrorInput((ids, q, u[:, :2], p), match=r"uniform must have shape \[3, 3\]"),
        ErrorInput((ids, q[..., :0], u), match="target_probs: the vocabulary V=0"),
        ErrorInput((ids, q.transpose(0, 2).contiguous().transpose(0, 2), u), match="contiguous in its last dim"),
        ErrorInput((ids, q, u.to("meta"), p), match=f"uniform is on meta but draft_ids is on {device}"),
        ErrorInput((ids, q, u, "p"), exc=TypeError, match="draft_probs must be torch.Tensor or None", raw=False),
    ]


_sampling_op = Op(
    "verify_sampling",
    "(Tensor draft_ids, Tensor target_probs, Tensor uniform, Tensor? draft_probs=None) -> (Tensor, Tensor)",
    check=_check_sampling,
    alloc=_alloc_sampling,
    torch_impl=ref.verify_sampling_ref,
    triton_launch=_sampling_launch,
    samples=_sampling_samples,
    errors=_sampling_errors,
)


_SAMPLING_DEFAULTS = {a.name: a.default for a in _sampling_op.args}  # the schema's, for the wrapper's signature


def verify_sampling(
    draft_ids: torch.Tensor,
    target_probs: torch.Tensor,
    uniform: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = _SAMPLING_DEFAULTS["draft_probs"],
    *,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection-sampling (chain) verification; the emitted tokens follow the target exactly.

    ``draft_ids`` int32/int64 ``[B, S]``, ``target_probs`` ``[B, S+1, V]`` (bf16/fp16/fp32,
    already tempered / top-k / top-p renormalised, e.g. by :func:`probs_from_logits`),
    ``uniform`` fp32 ``[B, S+1]`` in [0, 1): ``uniform[:, i]`` decides draft ``i``,
    ``uniform[:, S]`` drives the final inverse-CDF draw; ``draft_probs`` ``[B, S, V]`` in
    ``target_probs``' dtype, or None for a greedy, one-hot draft ("target only"): the schema's
    order, not FlashInfer's (module docstring). Returns ``out_ids`` int32
    ``[B, S+1]`` (accepted drafts, the emitted token, then ``-1``) and ``num_accepted`` int32
    ``[B]``. Passing ``uniform`` makes the call deterministic and CUDA-graph safe; without it,
    the uniforms are drawn on ``target_probs``'s device from ``generator`` (no host sync).
    """
    if uniform is None:
        b, s = draft_ids.shape
        uniform = torch.rand((b, s + 1), generator=generator, device=target_probs.device, dtype=torch.float32)
    return _sampling_op(draft_ids, target_probs, uniform, draft_probs, backend=backend)


# ---------------------------------------------------------------------------------------------
# probs_from_logits (pure torch: a handful of batched ops, no kernel of its own)
# ---------------------------------------------------------------------------------------------

def _check_param(name: str, x, logits: torch.Tensor, integer: bool) -> None:
    kind = "an int or an integer tensor" if integer else "a number or a tensor"
    if isinstance(x, torch.Tensor):
        if x.dtype.is_complex or x.dtype == torch.bool or (integer and x.is_floating_point()):
            raise ValueError(f"{name} must be {kind}, got a {x.dtype} tensor")
        if x.device != logits.device:
            raise ValueError(f"{name} is on {x.device} but logits is on {logits.device}")
        lead = logits.shape[:-1]
        try:
            fits = torch.broadcast_shapes(x.shape, lead) == lead  # to it, not merely with it
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{name} of shape {list(x.shape)} must broadcast to logits.shape[:-1] = {list(lead)}")
    elif isinstance(x, bool) or not isinstance(x, int if integer else (int, float)):
        raise TypeError(f"{name} must be {kind}, got {type(x).__name__}")
    elif math.isnan(x):
        raise ValueError(f"{name} must not be NaN (in a tensor, a NaN entry gives its row NaN probabilities)")


def probs_from_logits(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Sampling distributions from logits: softmax(logits / temperature), then top-k, then top-p.

    ``logits`` bf16/fp16/fp32 ``[..., V]`` -> fp32 ``[..., V]``. Each parameter is a number or a
    tensor broadcastable to ``logits.shape[:-1]`` (per-request values for ``[B, S+1, V]`` logits
    are ``[B, 1]``); ``top_k`` is an int or an integer tensor. ``temperature <= 0`` is greedy
    (one-hot at the argmax); any positive temperature, however small, is a softmax that stays
    finite; ``top_k <= 0`` and ``top_p >= 1`` disable those filters. A NaN number is refused; a
    NaN entry of a tensor ``temperature`` or ``top_p`` gives its row NaN probabilities (checking
    would cost a host sync). Formula, and what NaN/inf logits give, in
    :func:`glm45_ops.reference.speculative.probs_from_logits_ref`. Batched torch ops only: no host
    sync and no data-dependent shapes, so it runs inside CUDA graphs and ``torch.compile``.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits must be bfloat16, float16 or float32, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    for name, x in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        _check_param(name, x, logits, integer=name == "top_k")
    return ref.probs_from_logits_ref(logits, temperature, top_k, top_p)


OPS: Sequence[Op] = (_greedy_op, _sampling_op)
