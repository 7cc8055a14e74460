"""Triton QK-Norm + partial NeoX RoPE (+ paged KV-cache write) kernels (definition:
glm45_ops/reference/attention_rope.py).

One program per (block of tokens, head): q heads, then k heads, then (with the cache write) v
heads, so one launch serves q, k and v. A head's ``D`` values are loaded once, as three
disjoint tiles (the first and second rotary halves and the pass-through dims, each padded to a
power of two), so each element of q and k is read once and written once, and the rotation pairs
element ``i`` with ``i + R/2`` in registers whatever ``R``. The norm sums squares in fp32 and
takes an IEEE ``1 / sqrt`` (``div_rn``, ``sqrt_rn``); the rope is separate fp32 multiplies and
adds: launched with ``enable_fp_fusion=False`` so no multiply-add is contracted (the reference
rounds each product), and rounded once to the dtype (on the fp32 grid first under the
interpreter, whose fp32 -> bf16 cast truncates). FP8 caches get ``x / scale`` clamped and
rounded as the FP8 quantizers do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_ops import CompileSpec, interpreting
from triton_ops._common import e4m3_bits, to_out_dtype
from triton_ops.quant import _to_e4m3_grid

_WARPS = 4
_GPU_BLOCK_T = 16  # tokens per program on the GPU: 16 x 128 bf16 = 4 KB of one head per program


@triton.jit
def _cache_store(x, t, tm, cols, cmask, slot_ptr, slot_s, num_slots, page_size, c_ptr, c_sp, c_so, c_sh, hh,
                 sc_ptr, sc_s, FP8: tl.constexpr, ROUND_ON_GRID: tl.constexpr):
    """Store the dtype tile ``x`` ``[BLOCK_T, n]`` (columns ``cols`` of kv head ``hh``) at each
    token's slot; negative or out-of-range slots write nothing. FP8: ``e4m3(clamp(x / scale))``
    into the cache viewed as bytes."""
    slot = tl.load(slot_ptr + t * slot_s, mask=tm, other=-1).to(tl.int64)
    ok = tm & (slot >= 0) & (slot < num_slots)
    slot = tl.where(ok, slot, 0)
    base = (slot // page_size) * c_sp + (slot % page_size) * c_so + hh * c_sh
    if FP8:
        scale = tl.load(sc_ptr + hh * sc_s)
        x = e4m3_bits(_to_e4m3_grid(x.to(tl.float32), scale, ROUND_ON_GRID), ROUND_ON_GRID)
    tl.store(c_ptr + base[:, None] + cols[None, :], x, mask=ok[:, None] & cmask[None, :])


@triton.jit
def _head_to_cache(src, src_st, src_sh, hh, t, tm, slot_ptr, slot_s, num_slots, page_size, c_ptr, c_sp, c_so, c_sh,
                   sc_ptr, sc_s, D: tl.constexpr, FP8: tl.constexpr, ROUND_ON_GRID: tl.constexpr):
    """Copy (or quantize) kv head ``hh`` of ``BLOCK_T`` tokens into its cache."""
    d = tl.arange(0, D)
    x = tl.load(src + hh * src_sh + t[:, None] * src_st + d[None, :], mask=tm[:, None], other=0.0)
    _cache_store(x, t, tm, d, d < D, slot_ptr, slot_s, num_slots, page_size, c_ptr, c_sp, c_so, c_sh, hh,
                 sc_ptr, sc_s, FP8, ROUND_ON_GRID)


@triton.jit
def _norm_rope_head(src, src_st, w_ptr, t, tm, c, s, eps,
                    HAS_W: tl.constexpr, D: tl.constexpr, R: tl.constexpr, HALF_P: tl.constexpr,
                    PASS_P: tl.constexpr, ROUND_ON_GRID: tl.constexpr):
    """One head of ``BLOCK_T`` tokens -> its outputs as three dtype tiles: rotated first half,
    rotated second half, pass-through."""
    HALF: tl.constexpr = R // 2
    DT: tl.constexpr = src.dtype.element_ty
    i = tl.arange(0, HALF_P)
    ip = tl.arange(0, PASS_P)
    m1 = tm[:, None] & (i < HALF)[None, :]
    mp = tm[:, None] & (ip < D - R)[None, :]
    row = src + t[:, None] * src_st
    y1 = tl.load(row + i[None, :], mask=m1, other=0.0).to(tl.float32)
    y2 = tl.load(row + HALF + i[None, :], mask=m1, other=0.0).to(tl.float32)
    yp = tl.load(row + R + ip[None, :], mask=mp, other=0.0).to(tl.float32)
    if HAS_W:
        INV_D: tl.constexpr = 1.0 / D  # exact: D is 64 or 128, so this is torch's mean's sum / D
        ss = tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1) + tl.sum(yp * yp, axis=1)
        rstd = tl.math.div_rn(tl.full(ss.shape, 1.0, tl.float32), tl.sqrt_rn(ss * INV_D + eps))[:, None]
        w1 = tl.load(w_ptr + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        wp = tl.load(w_ptr + R + ip, mask=ip < D - R, other=0.0).to(tl.float32)[None, :]
        # HF: dt(x * rstd), then one dt multiply by the weight (exact in fp32, rounded once)
        y1 = to_out_dtype(to_out_dtype(y1 * rstd, DT, ROUND_ON_GRID).to(tl.float32) * w1, DT, ROUND_ON_GRID)
        y2 = to_out_dtype(to_out_dtype(y2 * rstd, DT, ROUND_ON_GRID).to(tl.float32) * w2, DT, ROUND_ON_GRID)
        yp = to_out_dtype(to_out_dtype(yp * rstd, DT, ROUND_ON_GRID).to(tl.float32) * wp, DT, ROUND_ON_GRID)
        y1 = y1.to(tl.float32)
        y2 = y2.to(tl.float32)
    o1 = to_out_dtype(y1 * c - y2 * s, DT, ROUND_ON_GRID)
    o2 = to_out_dtype(y2 * c + y1 * s, DT, ROUND_ON_GRID)
    return o1, o2, yp.to(DT)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, pos_ptr, cs_ptr, qo_ptr, ko_ptr,
    kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
    T, Hq, Hk, max_pos, eps,
    q_st, q_sh, k_st, k_sh, v_st, v_sh, qo_st, qo_sh, ko_st, ko_sh, pos_s, cs_st,
    slot_s, num_slots, page_size, kc_sp, kc_so, kc_sh, vc_sp, vc_so, vc_sh, ks_s, vs_s,
    D: tl.constexpr, R: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
    WRITE_CACHE: tl.constexpr, FP8: tl.constexpr,
    BLOCK_T: tl.constexpr, HALF_P: tl.constexpr, PASS_P: tl.constexpr, ROUND_ON_GRID: tl.constexpr,
):
    HALF: tl.constexpr = R // 2
    h = tl.program_id(1)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    i = tl.arange(0, HALF_P)
    ip = tl.arange(0, PASS_P)
    if h < Hq + Hk:
        # cos and sin rows, NaN for positions outside [0, max_pos) (no host sync to refuse them)
        pos = tl.load(pos_ptr + t * pos_s, mask=tm, other=0).to(tl.int64)
        valid = (pos >= 0) & (pos < max_pos)
        cmask = (tm & valid)[:, None] & (i < HALF)[None, :]
        cs_row = cs_ptr + tl.where(valid, pos, 0)[:, None] * cs_st
        c = tl.load(cs_row + i[None, :], mask=cmask, other=float("nan"))
        s = tl.load(cs_row + HALF + i[None, :], mask=cmask, other=float("nan"))
        if h < Hq:
            o1, o2, op = _norm_rope_head(q_ptr + h * q_sh, q_st, qw_ptr, t, tm, c, s, eps,
                                         HAS_QW, D, R, HALF_P, PASS_P, ROUND_ON_GRID)
            out = qo_ptr + h * qo_sh + t[:, None] * qo_st
        else:
            hh = h - Hq
            o1, o2, op = _norm_rope_head(k_ptr + hh * k_sh, k_st, kw_ptr, t, tm, c, s, eps,
                                         HAS_KW, D, R, HALF_P, PASS_P, ROUND_ON_GRID)
            out = ko_ptr + hh * ko_sh + t[:, None] * ko_st
            if WRITE_CACHE:  # the rounded k_out values, as kv_cache_write would store them
                _cache_store(o1, t, tm, i, i < HALF, slot_ptr, slot_s, num_slots, page_size,
                             kc_ptr, kc_sp, kc_so, kc_sh, hh, ks_ptr, ks_s, FP8, ROUND_ON_GRID)
                _cache_store(o2, t, tm, HALF + i, i < HALF, slot_ptr, slot_s, num_slots, page_size,
                             kc_ptr, kc_sp, kc_so, kc_sh, hh, ks_ptr, ks_s, FP8, ROUND_ON_GRID)
                _cache_store(op, t, tm, R + ip, ip < D - R, slot_ptr, slot_s, num_slots, page_size,
                             kc_ptr, kc_sp, kc_so, kc_sh, hh, ks_ptr, ks_s, FP8, ROUND_ON_GRID)
        m1 = tm[:, None] & (i < HALF)[None, :]
        tl.store(out + i[None, :], o1, mask=m1)
        tl.store(out + HALF + i[None, :], o2, mask=m1)
        tl.store(out + R + ip[None, :], op, mask=tm[:, None] & (ip < D - R)[None, :])
    elif WRITE_CACHE:  # a v head: straight to its cache
        _head_to_cache(v_ptr, v_st, v_sh, h - Hq - Hk, t, tm, slot_ptr, slot_s, num_slots, page_size,
                       vc_ptr, vc_sp, vc_so, vc_sh, vs_ptr, vs_s, D, FP8, ROUND_ON_GRID)


@triton.jit
def _kv_cache_write_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
    T, Hk, k_st, k_sh, v_st, v_sh,
    slot_s, num_slots, page_size, kc_sp, kc_so, kc_sh, vc_sp, vc_so, vc_sh, ks_s, vs_s,
    D: tl.constexpr, FP8: tl.constexpr, BLOCK_T: tl.constexpr, ROUND_ON_GRID: tl.constexpr,
):
    # one program per (block of tokens, head): k heads, then v heads
    h = tl.program_id(1)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    if h < Hk:
        _head_to_cache(k_ptr, k_st, k_sh, h, t, tm, slot_ptr, slot_s, num_slots, page_size,
                       kc_ptr, kc_sp, kc_so, kc_sh, ks_ptr, ks_s, D, FP8, ROUND_ON_GRID)
    else:
        _head_to_cache(v_ptr, v_st, v_sh, h - Hk, t, tm, slot_ptr, slot_s, num_slots, page_size,
                       vc_ptr, vc_sp, vc_so, vc_sh, vs_ptr, vs_s, D, FP8, ROUND_ON_GRID)


def _block_t(t: int) -> int:
    # interpreter cost is per program: few, large programs there
    return min(64 if interpreting() else _GPU_BLOCK_T, triton.next_power_of_2(max(t, 1)))


def _cache_args(k_cache, v_cache, slot_mapping, k_scale, v_scale) -> tuple[tuple, tuple, bool]:
    """(pointers, scalars, fp8) of the cache write: e4m3 caches as bytes; absent scales as a
    dummy pointer (never read)."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    kc, vc = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if fp8 else (k_cache, v_cache)
    ks = k_scale if fp8 else slot_mapping
    vs = v_scale if fp8 else slot_mapping
    num_pages, page_size = k_cache.shape[:2]
    scalars = (slot_mapping.stride(0), num_pages * page_size, page_size, *k_cache.stride()[:3], *v_cache.stride()[:3],
               ks.stride(0), vs.stride(0))
    return (kc, vc, slot_mapping, ks, vs), scalars, fp8


def qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps, rotary_dim, q_out, k_out,
                 cache=None) -> None:
    """Fill ``q_out`` ``[T, Hq, D]`` and ``k_out`` ``[T, Hk, D]`` (any strides, unit last; may
    be ``q`` and ``k`` themselves: each program reads its tile before writing it). ``cache`` =
    ``(v, k_cache, v_cache, slot_mapping, k_scale, v_scale)`` also writes ``k_out`` and ``v``
    into the paged caches."""
    t, hq, d = q.shape
    hk = k.shape[1]
    if t == 0 or hq + hk == 0:
        return
    if cache is None:
        v, ptrs, scalars, fp8, heads = q, (q, q, positions, q, q), (0,) * 11, False, hq + hk
    else:
        v, *kv = cache
        ptrs, scalars, fp8 = _cache_args(*kv)
        heads = hq + 2 * hk
    block_t = _block_t(t)
    half = rotary_dim // 2
    _qk_norm_rope_kernel[(triton.cdiv(t, block_t), heads)](
        q, k, v, q if q_norm_weight is None else q_norm_weight, k if k_norm_weight is None else k_norm_weight,
        positions, cos_sin_cache, q_out, k_out, *ptrs,
        t, hq, hk, cos_sin_cache.shape[0], eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), positions.stride(0),
        cos_sin_cache.stride(0), *scalars,
        D=d, R=rotary_dim, HAS_QW=q_norm_weight is not None, HAS_KW=k_norm_weight is not None,
        WRITE_CACHE=cache is not None, FP8=fp8, BLOCK_T=block_t, HALF_P=triton.next_power_of_2(half),
        PASS_P=triton.next_power_of_2(max(d - rotary_dim, 1)), ROUND_ON_GRID=interpreting(),
        num_warps=_WARPS, enable_fp_fusion=False,
    )


def kv_cache_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    """Write ``k`` and ``v`` ``[T, Hk, D]`` into the paged caches (reference: ``kv_cache_write_ref``)."""
    t, hk, d = k.shape
    if t == 0 or hk == 0:
        return
    ptrs, scalars, fp8 = _cache_args(k_cache, v_cache, slot_mapping, k_scale, v_scale)
    block_t = _block_t(t)
    _kv_cache_write_kernel[(triton.cdiv(t, block_t), 2 * hk)](
        k, v, *ptrs, t, hk, k.stride(0), k.stride(1), v.stride(0), v.stride(1), *scalars,
        D=d, FP8=fp8, BLOCK_T=block_t, ROUND_ON_GRID=interpreting(), num_warps=_WARPS,
    )


# ---------------------------------------------------------------------------------------------
# Default GPU configurations, for `glm45-bench compile-report` (format: triton_ops/__init__.py)
# ---------------------------------------------------------------------------------------------
# GLM-4.5 TP8 shapes: D = 128, R = 64, heads and rows of the fused QKV projection (strides are
# multiples of 16 elements), unit position / slot / scale strides, int64 positions, int32 slots.

_TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_ROPE_STRIDES = ("q_st", "q_sh", "k_st", "k_sh", "v_st", "v_sh", "qo_st", "qo_sh", "ko_st", "ko_sh")
_CACHE_STRIDES = ("kc_sp", "kc_so", "kc_sh", "vc_sp", "vc_so", "vc_sh")
_OPTIONS = {"num_warps": _WARPS, "enable_fp_fusion": False}


def _rope_spec(label: str, dtype: torch.dtype, norm: bool, cache: torch.dtype | None) -> CompileSpec:
    dt = _TL[dtype]
    cache_ty = "*u8" if cache == torch.float8_e4m3fn else f"*{dt}"
    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "qw_ptr": f"*{dt}", "kw_ptr": f"*{dt}",
           "pos_ptr": "*i64", "cs_ptr": "*fp32", "qo_ptr": f"*{dt}", "ko_ptr": f"*{dt}", "kc_ptr": cache_ty,
           "vc_ptr": cache_ty, "slot_ptr": "*i32", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
           "T": "i32", "Hq": "i32", "Hk": "i32", "max_pos": "i32", "eps": "fp32",
           **{s: "i32" for s in _ROPE_STRIDES}, "pos_s": "constexpr", "cs_st": "i32",
           "slot_s": "constexpr", "num_slots": "i32", "page_size": "i32", **{s: "i32" for s in _CACHE_STRIDES},
           "ks_s": "constexpr", "vs_s": "constexpr",
           **{c: "constexpr" for c in ("D", "R", "HAS_QW", "HAS_KW", "WRITE_CACHE", "FP8", "BLOCK_T", "HALF_P",
                                       "PASS_P", "ROUND_ON_GRID")}}
    return CompileSpec(
        label=label,
        kernel=_qk_norm_rope_kernel,
        signature=sig,
        constexprs={"pos_s": 1, "slot_s": 1, "ks_s": 1, "vs_s": 1, "D": 128, "R": 64, "HAS_QW": norm, "HAS_KW": norm,
                    "WRITE_CACHE": cache is not None, "FP8": cache == torch.float8_e4m3fn, "BLOCK_T": _GPU_BLOCK_T,
                    "HALF_P": 32, "PASS_P": 64, "ROUND_ON_GRID": False},
        options=_OPTIONS,
        aligned=(*_ROPE_STRIDES, "cs_st", "page_size", *_CACHE_STRIDES),
    )


def _kv_spec(label: str, dtype: torch.dtype, cache: torch.dtype) -> CompileSpec:
    dt = _TL[dtype]
    cache_ty = "*u8" if cache == torch.float8_e4m3fn else f"*{dt}"
    strides = ("k_st", "k_sh", "v_st", "v_sh")
    return CompileSpec(
        label=label,
        kernel=_kv_cache_write_kernel,
        signature={"k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "kc_ptr": cache_ty, "vc_ptr": cache_ty, "slot_ptr": "*i32",
                   "ks_ptr": "*fp32", "vs_ptr": "*fp32", "T": "i32", "Hk": "i32", **{s: "i32" for s in strides},
                   "slot_s": "constexpr", "num_slots": "i32", "page_size": "i32",
                   **{s: "i32" for s in _CACHE_STRIDES}, "ks_s": "constexpr", "vs_s": "constexpr",
                   "D": "constexpr", "FP8": "constexpr", "BLOCK_T": "constexpr", "ROUND_ON_GRID": "constexpr"},
        constexprs={"slot_s": 1, "ks_s": 1, "vs_s": 1, "D": 128, "FP8": cache == torch.float8_e4m3fn,
                    "BLOCK_T": _GPU_BLOCK_T, "ROUND_ON_GRID": False},
        options={"num_warps": _WARPS},
        aligned=(*strides, "page_size", *_CACHE_STRIDES),
    )


COMPILE_SPECS = [
    _rope_spec("qk_norm_rope bf16 D=128 R=64", torch.bfloat16, True, None),
    _rope_spec("qk_norm_rope bf16 no norm (Air)", torch.bfloat16, False, None),
    _rope_spec("qk_norm_rope fp32 D=128 R=64", torch.float32, True, None),
    _rope_spec("qk_norm_rope_kv_write bf16 -> bf16 cache", torch.bfloat16, True, torch.bfloat16),
    _rope_spec("qk_norm_rope_kv_write bf16 -> fp8 cache", torch.bfloat16, True, torch.float8_e4m3fn),
    _kv_spec("kv_cache_write bf16 -> bf16 cache", torch.bfloat16, torch.bfloat16),
    _kv_spec("kv_cache_write bf16 -> fp8 cache", torch.bfloat16, torch.float8_e4m3fn),
]
