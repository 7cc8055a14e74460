"""Fused QK-Norm + partial NeoX RoPE, and the paged KV-cache write (GLM-4.5 attention's prologue).

Ops (schemas below, defaults there and nowhere else; numerics, NaN/inf, out-of-range positions
and slots: :mod:`glm45_ops.reference.attention_rope`):

* ``qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps=1e-5,
  rotary_dim=64) -> (q_out, k_out)``
* ``qk_norm_rope_(qkv, q_norm_weight, k_norm_weight, positions, cos_sin_cache, num_q_heads,
  num_kv_heads, eps=1e-5, rotary_dim=64) -> ()``: the same, in place on the fused QKV projection.
* ``kv_cache_write(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> ()``
* ``qk_norm_rope_kv_write(q, k, v, q_norm_weight, k_norm_weight, positions, cos_sin_cache,
  k_cache, v_cache, slot_mapping, eps=1e-5, rotary_dim=64, k_scale=None, v_scale=None) ->
  (q_out, k_out)``: ``qk_norm_rope`` and the cache write of its ``k_out`` and ``v``, one kernel.

Backends: the torch reference, Triton (``triton_ops/attention_rope.py``: a program per block of
tokens and head) and CUDA (``csrc/attention/qk_norm_rope.cu``: a group of lanes per token and
head, 16-byte accesses). Without the norm every backend equals the reference bit for bit; with
it, within ``NORM_TOL`` (a kernel's sum of squares and ``1 / sqrt`` round differently from
torch's). ``kv_cache_write`` equals the reference bit for bit, and the fused op's cache holds
exactly the ``k_out`` it returns (or its e4m3 bytes).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from glm45_ops._registry import Op
from glm45_ops.attention import rope_tables as tables
from glm45_ops.reference import attention_rope as ref
from glm45_ops.reference.attention_rope import FP8_DTYPE, NORM_TOL, cos_sin_cache
from glm45_ops.testing import bits_differ

__all__ = ["HEAD_DIMS", "cos_sin_cache", "kv_cache_write", "qk_norm_rope", "qk_norm_rope_", "qk_norm_rope_kv_write"]

HEAD_DIMS = (64, 128)  # what the kernels are built for: GLM-4.5's 128, and 64
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------------------------
# Checks (csrc/attention/qk_norm_rope.cu repeats them, in this order and these words)
# ---------------------------------------------------------------------------------------------

def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")


def _check_unit_last_stride(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {tuple(t.stride())}")


def _check_device(name: str, t: torch.Tensor, ref_name: str, ref_t: torch.Tensor) -> None:
    if t.device != ref_t.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref_t.device}")


def _check_index(name: str, t: torch.Tensor, n: int, like: str, like_t: torch.Tensor) -> None:
    if t.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape [T={n}], got {list(t.shape)}")
    _check_device(name, t, like, like_t)


def _real_cpu(t: torch.Tensor) -> bool:
    """Values can be read without a host sync: a real CPU tensor, not traced."""
    return t.device.type == "cpu" and not is_fake(t) and not torch.compiler.is_compiling()


def _first_bad(values: torch.Tensor, bad: torch.Tensor) -> str | None:
    """"{value} at index {i}" for the first True of ``bad``, or None."""
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0, 0])
    return f"{int(values[i])} at index {i}"


def _check_heads(q: torch.Tensor, k: torch.Tensor) -> None:
    """q ``[T, Hq, D]`` and k ``[T, Hk, D]``: float, same dtype, D in HEAD_DIMS, unit last stride."""
    _check_float("q", q)
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [T, Hq, D], got shape {tuple(q.shape)}")
    t, _, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"q: the head dim D={d} must be 64 or 128")
    if k.dtype != q.dtype:
        raise ValueError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if k.dim() != 3 or k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"k must be [T={t}, Hk, D={d}] (T and D from q), got shape {tuple(k.shape)}")
    _check_unit_last_stride("q", q)
    _check_unit_last_stride("k", k)
    _check_device("k", k, "q", q)


def _check_norm_rope(heads: str, x: torch.Tensor, t: int, d: int, q_norm_weight, k_norm_weight, positions,
                     cache: torch.Tensor, rotary_dim: int) -> None:
    """The norm weights, positions, table and rotary_dim, for heads of dtype ``x.dtype``, T and D."""
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is None:
            continue
        if w.dtype != x.dtype:
            raise ValueError(f"{name} must have {heads}'s dtype {x.dtype}, got {w.dtype}")
        if tuple(w.shape) != (d,):
            raise ValueError(f"{name} must have shape [D={d}], got {list(w.shape)}")
        _check_unit_last_stride(name, w)
        _check_device(name, w, heads, x)
    _check_index("positions", positions, t, heads, x)
    if cache.dtype != torch.float32:
        raise ValueError(f"cos_sin_cache must be float32, got {cache.dtype}")
    if cache.dim() != 2 or cache.shape[0] < 1:
        raise ValueError(f"cos_sin_cache must be 2-D [max_pos >= 1, rotary_dim], got shape {tuple(cache.shape)}")
    _check_unit_last_stride("cos_sin_cache", cache)
    _check_device("cos_sin_cache", cache, heads, x)
    if rotary_dim % 2 or not 2 <= rotary_dim <= d:
        raise ValueError(f"rotary_dim must be even and in [2, D={d}], got {rotary_dim}")
    if cache.shape[1] != rotary_dim:
        raise ValueError(f"cos_sin_cache must have rotary_dim={rotary_dim} columns (cos, then sin), "
                         f"got {cache.shape[1]}")
    if _real_cpu(positions):
        bad = _first_bad(positions, (positions < 0) | (positions >= cache.shape[0]))
        if bad is not None:
            raise ValueError(f"positions must be in [0, max_pos={cache.shape[0]}) (the rows of cos_sin_cache), "
                             f"got {bad} (on the GPU such a token's rotated dims are NaN)")


def _check_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    """k, v ``[T, Hk, D]`` into caches ``[num_pages, page_size, Hk, D]`` (k already checked as heads or not)."""
    _check_float("k", k)
    if k.dim() != 3:
        raise ValueError(f"k must be 3-D [T, Hk, D], got shape {tuple(k.shape)}")
    t, hk, d = k.shape
    if d not in HEAD_DIMS:  # the kernels' head tiles: another D would read and write past each head
        raise ValueError(f"k: the head dim D={d} must be 64 or 128")
    if v.dtype != k.dtype:
        raise ValueError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    _check_unit_last_stride("k", k)
    _check_unit_last_stride("v", v)
    _check_device("v", v, "k", k)
    if k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != (hk, d):
        raise ValueError(f"k_cache must be 4-D [num_pages, page_size, Hk={hk}, D={d}], "
                         f"got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if k_cache.dtype not in (k.dtype, FP8_DTYPE):
        raise ValueError(f"k_cache must be k's dtype {k.dtype} or torch.float8_e4m3fn, got {k_cache.dtype}")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache must have k_cache's dtype {k_cache.dtype}, got {v_cache.dtype}")
    _check_unit_last_stride("k_cache", k_cache)
    _check_unit_last_stride("v_cache", v_cache)
    _check_device("k_cache", k_cache, "k", k)
    _check_device("v_cache", v_cache, "k", k)
    _check_index("slot_mapping", slot_mapping, t, "k", k)
    fp8 = k_cache.dtype == FP8_DTYPE
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if fp8 and s is None:
            raise ValueError(f"{name} is required with float8_e4m3fn caches (fp32 per-head scales [Hk])")
        if not fp8 and s is not None:
            raise ValueError(f"{name} is only for float8_e4m3fn caches, the caches are {k_cache.dtype}")
        if s is None:
            continue
        if s.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {s.dtype}")
        if tuple(s.shape) != (hk,):
            raise ValueError(f"{name} must have shape [Hk={hk}] (a per-tensor scale: scale.expand({hk})), "
                             f"got {list(s.shape)}")
        _check_device(name, s, "k", k)
    if _real_cpu(slot_mapping):
        slots = k_cache.shape[0] * k_cache.shape[1]
        bad = _first_bad(slot_mapping, slot_mapping >= slots)
        if bad is not None:
            raise ValueError(f"slot_mapping must be < num_pages * page_size = {slots} (negative skips a token), "
                             f"got {bad} (on the GPU such a token is skipped)")


# ---------------------------------------------------------------------------------------------
# Comparison: bit for bit without the norm, NORM_TOL with it
# ---------------------------------------------------------------------------------------------

def heads_differ(got: torch.Tensor, want: torch.Tensor, normed: bool) -> str | None:
    """None if ``got`` agrees with the reference ``want`` ``[T, H, D]``: bit for bit when not
    ``normed``, else NaN and inf where the reference has them and every other element within
    ``NORM_TOL[dtype] * eps(dtype) * max |want|`` of its (token, head)."""
    if not normed or got.shape != want.shape or got.dtype != want.dtype:
        return bits_differ(got, want)
    g, w = got.detach().cpu().float(), want.detach().cpu().float()
    if not torch.equal(g.isnan(), w.isnan()):
        return f"NaN at {int((g.isnan() != w.isnan()).sum())} elements where the reference differs"
    inf = w.isinf() | g.isinf()
    if not torch.equal(g[inf], w[inf]):
        return "the infinities differ from the reference's"
    finite = ~(inf | w.isnan())
    w0, g0 = torch.where(finite, w, 0.0), torch.where(finite, g, 0.0)
    tol = NORM_TOL[got.dtype] * torch.finfo(got.dtype).eps * w0.abs().amax(-1, keepdim=True)
    bad = (g0 - w0).abs() > tol
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0, 0])
        return (f"{int(bad.sum())} of {g.numel()} elements off by more than {NORM_TOL[got.dtype]} eps x their "
                f"head's max |out| "
                f"(first at flat index {i}: {g.flatten()[i].item()!r} vs {w.flatten()[i].item()!r})")
    return None


def _compare_at(qw_index: int):
    """``compare`` for ops returning ``(q_out, k_out)``, their norm weights at ``args[qw_index:+2]``.
    The fused op's ``(q_out, k_out, k_cache, v_cache)`` (outputs, then the mutated caches, as the
    contract passes them) also holds its caches to the rule of what they store: the k cache is
    ``k_out`` (quantized for e4m3 caches: within one e4m3 step of the reference's when k is
    normed, as a value within tolerance may round to the neighbouring step), v bit for bit."""
    def compare(got, want, args):
        for name, g, w, weight in zip(("q_out", "k_out"), got, want, args[qw_index:qw_index + 2]):
            why = heads_differ(g, w, weight is not None)
            if why:
                return f"{name}: {why}"
        if len(got) == 4:
            k_normed = args[qw_index + 1] is not None
            why = (_e4m3_step_differs(got[2], want[2]) if k_normed and got[2].dtype == FP8_DTYPE
                   else heads_differ(got[2], want[2], k_normed)) or bits_differ(got[3], want[3])
            if why:
                return f"caches: {why}"
        return None

    return compare


def _e4m3_step_differs(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None if the e4m3 ``got`` equals ``want`` or is one representable step from it (NaN where
    the reference has NaN)."""
    g, w = got.detach().cpu().float(), want.detach().cpu().float()
    if not torch.equal(g.isnan(), w.isnan()):
        return "NaN where the reference differs"
    ok = ~w.isnan()
    step = torch.exp2(torch.floor(torch.log2(w[ok].abs().clamp(min=2.0**-6))) - 3)  # e4m3: 3 mantissa bits
    bad = (g[ok] - w[ok]).abs() > step
    return f"{int(bad.sum())} e4m3 values more than one step from the reference" if bool(bad.any()) else None


def _compare_inplace(got, want, args):
    """``qk_norm_rope_``: its mutated ``qkv`` (the contract's ``(qkv,)``) split into q, k, v: q and
    k under ``qk_norm_rope``'s rule, v untouched bit for bit."""
    hq, hk = args[5], args[6]
    (gq, gk, gv), (wq, wk, wv) = ref.split_qkv(got[0], hq, hk), ref.split_qkv(want[0], hq, hk)
    for name, g, w, weight in (("q", gq, wq, args[1]), ("k", gk, wk, args[2])):
        why = heads_differ(g, w, weight is not None)
        if why:
            return f"qkv's {name}: {why}"
    why = bits_differ(gv, wv)
    return f"qkv's v: {why}" if why else None


# ---------------------------------------------------------------------------------------------
# qk_norm_rope
# ---------------------------------------------------------------------------------------------

def _check_qnr(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps, rotary_dim):
    _check_heads(q, k)
    _check_norm_rope("q", q, q.shape[0], q.shape[2], q_norm_weight, k_norm_weight, positions, cos_sin_cache,
                     rotary_dim)


def _alloc_qnr(q, k, *_):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)


def _launch_qnr(outs, q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps, rotary_dim):
    from triton_ops import attention_rope as tr

    tr.qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps, rotary_dim, *outs)


_qnr_op = Op(
    "qk_norm_rope",
    "(Tensor q, Tensor k, Tensor? q_norm_weight, Tensor? k_norm_weight, Tensor positions, Tensor cos_sin_cache, "
    "float eps=1e-5, int rotary_dim=64) -> (Tensor, Tensor)",
    check=_check_qnr,
    alloc=_alloc_qnr,
    torch_impl=ref.qk_norm_rope_ref,
    triton_launch=_launch_qnr,
    compare=_compare_at(2),
    samples=tables.qk_norm_rope_samples,
    errors=tables.qk_norm_rope_errors,
)

qk_norm_rope = _qnr_op.api(
    """Per-head RMSNorm of q and k, then NeoX RoPE on their first ``rotary_dim`` dims (GLM-4.5).

    ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` bf16/fp16/fp32, D 64 or 128, any strides with a
    unit last one (views into the fused QKV projection work); ``q_norm_weight`` /
    ``k_norm_weight`` ``[D]`` in their dtype, or None to skip that norm (GLM-4.5-Air);
    ``positions`` int32/int64 ``[T]``; ``cos_sin_cache`` fp32 ``[max_pos, rotary_dim]`` =
    ``cat(cos, sin)`` (:func:`cos_sin_cache` builds HF's) -> new contiguous ``(q_out, k_out)``.
    HF ``Glm4MoeRMSNorm`` numerics; rotation in fp32, rounded once. Definition:
    :mod:`glm45_ops.reference.attention_rope`.
    """
)


# ---------------------------------------------------------------------------------------------
# qk_norm_rope_ (in place on the fused QKV projection)
# ---------------------------------------------------------------------------------------------

def _check_qnr_inplace(qkv, q_norm_weight, k_norm_weight, positions, cos_sin_cache, num_q_heads, num_kv_heads, eps,
                       rotary_dim):
    _check_float("qkv", qkv)
    if qkv.dim() != 2:
        raise ValueError(f"qkv must be 2-D [T, (Hq + 2 * Hk) * D], got shape {tuple(qkv.shape)}")
    if num_q_heads < 1 or num_kv_heads < 1:
        raise ValueError(f"num_q_heads and num_kv_heads must be >= 1, got {num_q_heads} and {num_kv_heads}")
    heads = num_q_heads + 2 * num_kv_heads
    width = qkv.shape[1]
    if width % heads or width // heads not in HEAD_DIMS:
        raise ValueError(f"qkv must have (num_q_heads + 2 * num_kv_heads) * D = {heads} * D columns with D 64 or "
                         f"128, got {width}")
    _check_unit_last_stride("qkv", qkv)
    _check_norm_rope("qkv", qkv, qkv.shape[0], width // heads, q_norm_weight, k_norm_weight, positions,
                     cos_sin_cache, rotary_dim)


def _triton_qnr_inplace(qkv, q_norm_weight, k_norm_weight, positions, cos_sin_cache, num_q_heads, num_kv_heads, eps,
                        rotary_dim):
    from triton_ops import attention_rope as tr

    q, k, _ = ref.split_qkv(qkv, num_q_heads, num_kv_heads)
    tr.qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps, rotary_dim, q, k)


_qnr_inplace_op = Op(
    "qk_norm_rope_",
    "(Tensor(a!) qkv, Tensor? q_norm_weight, Tensor? k_norm_weight, Tensor positions, Tensor cos_sin_cache, "
    "int num_q_heads, int num_kv_heads, float eps=1e-5, int rotary_dim=64) -> ()",
    check=_check_qnr_inplace,
    fake=lambda *args: None,
    torch_impl=ref.qk_norm_rope_inplace_ref,
    triton_impl=_triton_qnr_inplace,
    mutates_args=("qkv",),
    compare=_compare_inplace,
    samples=tables.qk_norm_rope_inplace_samples,
    errors=tables.qk_norm_rope_inplace_errors,
)

qk_norm_rope_ = _qnr_inplace_op.api(
    """``qk_norm_rope`` in place on the fused QKV projection ``qkv`` ``[T, (Hq + 2 Hk) * D]``
    (columns q, k, v; any row stride, unit last stride): its q and k columns are replaced by
    ``q_out`` and ``k_out``, v is untouched. ``D`` is the width over ``num_q_heads + 2 *
    num_kv_heads``. Same numerics as ``qk_norm_rope``, bit for bit.
    """
)


# ---------------------------------------------------------------------------------------------
# kv_cache_write
# ---------------------------------------------------------------------------------------------

def _triton_kv_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    from triton_ops import attention_rope as tr

    tr.kv_cache_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


_kv_op = Op(
    "kv_cache_write",
    "(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, Tensor? k_scale=None, "
    "Tensor? v_scale=None) -> ()",
    check=_check_kv,
    fake=lambda *args: None,
    torch_impl=ref.kv_cache_write_ref,
    triton_impl=_triton_kv_write,
    mutates_args=("k_cache", "v_cache"),
    samples=tables.kv_cache_write_samples,
    errors=tables.kv_cache_write_errors,
)

kv_cache_write = _kv_op.api(
    """Write ``k`` and ``v`` ``[T, Hk, D]`` (any float dtype, D 64 or 128, any strides with a unit
    last one) into the paged caches ``k_cache`` / ``v_cache`` ``[num_pages, page_size, Hk, D]``
    at ``slot_mapping`` int32/int64 ``[T]`` (``slot = page * page_size + offset``), in place and
    without a host sync (CUDA-graph safe). A negative slot skips its token. The caches have k's
    dtype (a copy), or are ``float8_e4m3fn`` with fp32 per-head scales ``k_scale`` / ``v_scale``
    ``[Hk]`` (any stride: ``s.expand(Hk)`` for one scale): ``e4m3(clamp(x / scale, -448, 448))``.
    """
)


# ---------------------------------------------------------------------------------------------
# qk_norm_rope_kv_write
# ---------------------------------------------------------------------------------------------

def _check_fused(q, k, v, q_norm_weight, k_norm_weight, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, eps,
                 rotary_dim, k_scale, v_scale):
    _check_qnr(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps, rotary_dim)
    _check_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def _launch_fused(outs, q, k, v, q_norm_weight, k_norm_weight, positions, cos_sin_cache, k_cache, v_cache,
                  slot_mapping, eps, rotary_dim, k_scale, v_scale):
    from triton_ops import attention_rope as tr

    tr.qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps, rotary_dim, *outs,
                    cache=(v, k_cache, v_cache, slot_mapping, k_scale, v_scale))


_fused_op = Op(
    "qk_norm_rope_kv_write",
    "(Tensor q, Tensor k, Tensor v, Tensor? q_norm_weight, Tensor? k_norm_weight, Tensor positions, "
    "Tensor cos_sin_cache, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, float eps=1e-5, "
    "int rotary_dim=64, Tensor? k_scale=None, Tensor? v_scale=None) -> (Tensor, Tensor)",
    check=_check_fused,
    alloc=lambda q, k, *_: _alloc_qnr(q, k),
    torch_impl=ref.qk_norm_rope_kv_write_ref,
    triton_launch=_launch_fused,
    mutates_args=("k_cache", "v_cache"),
    compare=_compare_at(3),
    samples=tables.qk_norm_rope_kv_write_samples,
    errors=tables.qk_norm_rope_kv_write_errors,
)

qk_norm_rope_kv_write = _fused_op.api(
    """``qk_norm_rope(q, k, ...)``, then ``kv_cache_write(k_out, v, ...)``, in one kernel: returns
    ``(q_out, k_out)`` and writes the rotated k and v into the paged caches (optionally FP8 with
    per-head scales). Arguments as the two ops'; v ``[T, Hk, D]`` has k's shape and dtype. The
    cache holds exactly the returned ``k_out`` (or its e4m3 quantization).
    """
)


OPS: Sequence[Op] = (_qnr_op, _qnr_inplace_op, _kv_op, _fused_op)
