"""MTP speculative verification: which draft tokens the target model accepts, and what it emits.

GLM-4.5's MTP layer drafts ``S`` tokens per request, the target model scores all ``S + 1``
positions in one pass, and these ops decide, every decode step, what is accepted. Ops (schemas
below), every backend exactly equal to ``glm45_ops.reference.speculative`` (the definition,
including the fixed-point inverse CDF that makes the sampled draw bit-identical everywhere):

* ``verify_greedy(draft_ids, target_logits) -> (out_ids, num_accepted)``
* ``verify_sampling(draft_probs?, draft_ids, target_probs, uniform) -> (out_ids, num_accepted)``

``probs_from_logits(logits, temperature, top_k, top_p)`` makes the target and draft
distributions (batched, per-row parameters, no host sync).

**Ids outside the vocabulary.** A draft id outside ``[0, V)`` is defined as a token of zero
probability under both models: it is rejected and never read (the kernels mask the gather).
Checking the range is a reduction whose answer lives on the device; reading it would be a host
sync, which CUDA-graph capture forbids and which stalls every decode step. So the check raises
``ValueError`` only where it costs nothing: for real CPU tensors. On CUDA (and under
``torch.compile`` tracing) such ids follow the definition above. The same holds for uniforms
outside ``[0, 1)``: not checked, the draw stays in range.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from glm45_ops._registry import Op
from glm45_ops.reference import speculative as ref
from glm45_ops.reference.speculative import MAX_VOCAB

__all__ = ["verify_greedy", "verify_sampling", "probs_from_logits", "MAX_VOCAB"]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ID_DTYPES = (torch.int32, torch.int64)
_DTYPE_NAMES = {_FLOAT_DTYPES: "bfloat16, float16 or float32", _ID_DTYPES: "int32 or int64", (torch.float32,): "float32"}


def _check_tensor(name: str, t, dtypes: tuple[torch.dtype, ...], ndim: int, dims: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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


def _greedy_triton(draft_ids, target_logits):
    from triton_ops import speculative as ts

    out_ids, num_accepted = _alloc_out(draft_ids)
    ts.verify_greedy(draft_ids, target_logits, out_ids, num_accepted)
    return out_ids, num_accepted


def _greedy_fake(draft_ids, target_logits):
    return _alloc_out(draft_ids)


_greedy_op = Op(
    "verify_greedy",
    "(Tensor draft_ids, Tensor target_logits) -> (Tensor, Tensor)",
    torch_impl=ref.verify_greedy_ref,
    triton_impl=_greedy_triton,
    fake=_greedy_fake,
    check=_check_greedy,
)


def verify_greedy(
    draft_ids: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: accept draft ``i`` while it equals the target's argmax at ``i``.

    ``draft_ids`` int32/int64 ``[B, S]``, ``target_logits`` bf16/fp16/fp32 ``[B, S+1, V]`` (unit
    last stride) -> ``out_ids`` int32 ``[B, S+1]`` (the accepted drafts, then the target's argmax
    at the first mismatch or the bonus position ``S``, then ``-1``) and ``num_accepted`` int32
    ``[B]``. The argmax is fused (never materialised); ties go to the lowest id.
    """
    return _greedy_op(draft_ids, target_logits, backend=backend)


# ---------------------------------------------------------------------------------------------
# verify_sampling
# ---------------------------------------------------------------------------------------------

def _check_sampling(draft_probs, draft_ids, target_probs, uniform):
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


def _sampling_triton(draft_probs, draft_ids, target_probs, uniform):
    from triton_ops import speculative as ts

    out_ids, num_accepted = _alloc_out(draft_ids)
    ts.verify_sampling(draft_probs, draft_ids, target_probs, uniform, out_ids, num_accepted)
    return out_ids, num_accepted


def _sampling_fake(draft_probs, draft_ids, target_probs, uniform):
    return _alloc_out(draft_ids)


_sampling_op = Op(
    "verify_sampling",
    "(Tensor? draft_probs, Tensor draft_ids, Tensor target_probs, Tensor uniform) -> (Tensor, Tensor)",
    torch_impl=ref.verify_sampling_ref,
    triton_impl=_sampling_triton,
    fake=_sampling_fake,
    check=_check_sampling,
)


def verify_sampling(
    draft_probs: torch.Tensor | None,
    draft_ids: torch.Tensor,
    target_probs: torch.Tensor,
    uniform: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection-sampling (chain) verification; the emitted tokens follow the target exactly.

    ``draft_probs`` ``[B, S, V]`` or None (a greedy, one-hot draft: "target only"),
    ``draft_ids`` int32/int64 ``[B, S]``, ``target_probs`` ``[B, S+1, V]`` (bf16/fp16/fp32, the
    same dtype as ``draft_probs``, already tempered / top-k / top-p renormalised, e.g. by
    :func:`probs_from_logits`), ``uniform`` fp32 ``[B, S+1]`` in [0, 1): ``uniform[:, i]`` decides
    draft ``i``, ``uniform[:, S]`` drives the final inverse-CDF draw. Returns ``out_ids`` int32
    ``[B, S+1]`` (accepted drafts, the emitted token, then ``-1``) and ``num_accepted`` int32
    ``[B]``. Passing ``uniform`` makes the call deterministic and CUDA-graph safe; without it,
    the uniforms are drawn on ``target_probs``'s device from ``generator`` (no host sync).
    """
    if uniform is None:
        b, s = draft_ids.shape
        uniform = torch.rand((b, s + 1), generator=generator, device=target_probs.device, dtype=torch.float32)
    return _sampling_op(draft_probs, draft_ids, target_probs, uniform, backend=backend)


# ---------------------------------------------------------------------------------------------
# probs_from_logits (pure torch: a handful of batched ops, no kernel of its own)
# ---------------------------------------------------------------------------------------------

def _check_param(name: str, x, logits: torch.Tensor) -> None:
    if isinstance(x, torch.Tensor):
        if x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must be a real tensor, got {x.dtype}")
        if x.device != logits.device:
            raise ValueError(f"{name} is on {x.device} but logits is on {logits.device}")
        try:
            torch.broadcast_shapes(x.shape, logits.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {list(x.shape)} must broadcast to logits.shape[:-1] = {list(logits.shape[:-1])}"
            ) from None
    elif isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(x).__name__}")


def probs_from_logits(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Sampling distributions from logits: softmax(logits / temperature), then top-k, then top-p.

    ``logits`` bf16/fp16/fp32 ``[..., V]`` -> fp32 ``[..., V]``. Each parameter is a number or a
    tensor broadcastable to ``logits.shape[:-1]`` (per-request values for ``[B, S+1, V]`` logits
    are ``[B, 1]``). ``temperature <= 0`` is greedy (one-hot at the argmax), ``top_k <= 0`` and
    ``top_p >= 1`` disable those filters. Formula in
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
        _check_param(name, x, logits)
    return ref.probs_from_logits_ref(logits, temperature, top_k, top_p)


OPS: Sequence[Op] = (_greedy_op, _sampling_op)
