"""Triton FP8 block-wise quantizers and dequantizer (definition: glm45_ops/reference/quant.py).

Bit-exact with the reference: fp32 math, IEEE divisions (``div_rn``; Triton's plain ``/`` on
fp32 lowers to the approximate ``div.full.f32``), UE8M0 from the fp32 bits, and a saturating
RTNE cast to e4m3 (rounded on the fp32 grid first under the interpreter, whose own cast is not
exact; on the GPU ``cvt.rn.satfinite`` already is).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_ops import CompileSpec, interpreting
from triton_ops._common import ceil_pow2, e4m3_bits, round_to_e4m3_grid, to_out_dtype


# Default GPU launch configs (the launchers and COMPILE_SPECS share them). A 128x128 block in
# registers needs 16 warps to stay at 128 registers a thread (8 warps: 225, one CTA per SM).
_PTGQ_ELEMS_PER_PROGRAM, _PTGQ_WARPS = 2048, 4
_PBQ_WARPS = 16
_DEQUANT_TILE, _DEQUANT_WARPS = (32, 128), 4


@triton.jit
def _amax_key(x):
    """|x| with +-inf as 0 and NaN as +inf: its max is the reference's finite amax, or +inf when
    the block holds a NaN (one reduction serves both, which keeps the 128x128 block in registers)."""
    ax = tl.abs(x)
    return tl.where(x != x, float("inf"), tl.where(ax == float("inf"), 0.0, ax))


@triton.jit
def _scale_from_amax(amax_key, eps, UE8M0: tl.constexpr):
    """The block's scale from the max of ``_amax_key``: NaN when the block holds a NaN."""
    scale = tl.math.div_rn(tl.maximum(amax_key, eps), 448.0)
    if UE8M0:
        scale = ceil_pow2(scale)
    return tl.where(amax_key == float("inf"), float("nan"), scale)


@triton.jit
def _to_e4m3_grid(x, scale, ROUND_ON_GRID: tl.constexpr):
    """fp32 x / scale, clamped to +-448 and (under the interpreter) rounded onto the e4m3 grid.
    min/max drop NaN (PTX max.f32 returns the other operand), so NaN is put back afterwards."""
    q = tl.math.div_rn(x, scale)
    y = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if ROUND_ON_GRID:
        y = round_to_e4m3_grid(y)
    return tl.where(q != q, q, y)


@triton.jit
def _per_token_group_quant_fp8_kernel(
    x_ptr, q_ptr, s_ptr,
    n_groups, groups_per_row, K,
    x_row_stride, q_row_stride, s_row_stride, s_col_stride,
    eps,
    GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
    UE8M0: tl.constexpr, ROUND_ON_GRID: tl.constexpr,
):
    # One program quantizes BLOCK_G consecutive groups (flattened over rows), so short rows
    # and long rows fill programs alike. The last group of a row may be partial (col < K).
    gid = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = gid < n_groups
    row = gid // groups_per_row
    gcol = gid % groups_per_row
    cols = tl.arange(0, BLOCK_K)
    col = gcol[:, None] * GROUP + cols[None, :]
    mask = gmask[:, None] & (cols < GROUP)[None, :] & (col < K)
    x = tl.load(x_ptr + row[:, None] * x_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(tl.max(_amax_key(x), axis=1), eps, UE8M0)
    y = _to_e4m3_grid(x, scale[:, None], ROUND_ON_GRID)
    tl.store(q_ptr + row[:, None] * q_row_stride + col, e4m3_bits(y, ROUND_ON_GRID), mask=mask)
    tl.store(s_ptr + row * s_row_stride + gcol * s_col_stride, scale, mask=gmask)


@triton.jit
def _per_block_quant_fp8_kernel(
    w_ptr, q_ptr, s_ptr,
    N, K, n_blocks, k_blocks,
    w_e_stride, w_n_stride, q_e_stride, q_n_stride, s_e_stride, s_n_stride,
    eps,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, UE8M0: tl.constexpr, ROUND_ON_GRID: tl.constexpr,
):
    # One program per BLOCK x BLOCK block (held as BLOCK_P x BLOCK_P, the next power of two):
    # one read of w, one write of w_q, one scale. A 1-D grid, so no grid dim limit applies.
    pid = tl.program_id(0).to(tl.int64)
    pid_k = pid % k_blocks
    pid_n = (pid // k_blocks) % n_blocks
    pid_e = pid // (k_blocks * n_blocks)
    local = tl.arange(0, BLOCK_P)
    rows = pid_n * BLOCK + local
    cols = pid_k * BLOCK + local
    in_block = local < BLOCK
    mask = (in_block & (rows < N))[:, None] & (in_block & (cols < K))[None, :]
    w = tl.load(w_ptr + pid_e * w_e_stride + rows[:, None] * w_n_stride + cols[None, :], mask=mask, other=0.0)
    w = w.to(tl.float32)
    # max is exact, so the reduction order cannot change the result
    scale = _scale_from_amax(tl.max(tl.max(_amax_key(w), axis=1), axis=0), eps, UE8M0)
    y = _to_e4m3_grid(w, scale, ROUND_ON_GRID)
    tl.store(q_ptr + pid_e * q_e_stride + rows[:, None] * q_n_stride + cols[None, :], e4m3_bits(y, ROUND_ON_GRID), mask=mask)
    tl.store(s_ptr + pid_e * s_e_stride + pid_n * s_n_stride + pid_k, scale)


@triton.jit
def _dequant_fp8_kernel(
    q_ptr, s_ptr, o_ptr,
    R, C, r_tiles, c_tiles,
    q_b_stride, q_r_stride, s_b_stride, s_r_stride, s_c_stride, o_b_stride, o_r_stride,
    BM: tl.constexpr, BN: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr,
    ROUND_ON_GRID: tl.constexpr,
):
    # q_ptr points at the e4m3 bytes as uint8 (a bitcast on the GPU): the interpreter decodes the
    # NaN bytes 0x7f/0xff as +-480, so they are recognised from the bits there.
    pid = tl.program_id(0).to(tl.int64)
    pid_c = pid % c_tiles
    pid_r = (pid // c_tiles) % r_tiles
    pid_b = pid // (c_tiles * r_tiles)
    rows = pid_r * TILE_R + tl.arange(0, TILE_R)
    cols = pid_c * TILE_C + tl.arange(0, TILE_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    bits = tl.load(q_ptr + pid_b * q_b_stride + rows[:, None] * q_r_stride + cols[None, :], mask=mask, other=0)
    q = bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    if ROUND_ON_GRID:
        q = tl.where((bits & 0x7F) == 0x7F, float("nan"), q)
    s_offs = pid_b * s_b_stride + (rows // BM)[:, None] * s_r_stride + (cols // BN)[None, :] * s_c_stride
    s = tl.load(s_ptr + s_offs, mask=mask, other=0.0)
    out = q * s
    tl.store(o_ptr + pid_b * o_b_stride + rows[:, None] * o_r_stride + cols[None, :], to_out_dtype(out, o_ptr.dtype.element_ty, ROUND_ON_GRID), mask=mask)


def per_token_group_quant_fp8(
    x: torch.Tensor, x_q: torch.Tensor, scale: torch.Tensor, group_size: int, eps: float, scale_ue8m0: bool
) -> None:
    """Fill ``x_q`` ``[M, K]`` and ``scale`` ``[M, ceil(K/g)]`` (any strides) from ``x`` ``[M, K]`` (unit last stride)."""
    m, k = x.shape
    groups_per_row = triton.cdiv(k, group_size)
    n_groups = m * groups_per_row
    if n_groups == 0:
        return
    block_k = triton.next_power_of_2(group_size)
    # ~2K elements per program on the GPU; under the interpreter, as few programs as possible
    block_g = max(1, _PTGQ_ELEMS_PER_PROGRAM // block_k) if not interpreting() else triton.next_power_of_2(max(1, n_groups // 4))
    block_g = min(block_g, triton.next_power_of_2(n_groups))
    grid = (triton.cdiv(n_groups, block_g),)
    _per_token_group_quant_fp8_kernel[grid](
        x, x_q.view(torch.uint8), scale, n_groups, groups_per_row, k,
        x.stride(0), x_q.stride(0), scale.stride(0), scale.stride(1), eps,
        GROUP=group_size, BLOCK_K=block_k, BLOCK_G=block_g,
        UE8M0=scale_ue8m0, ROUND_ON_GRID=interpreting(), num_warps=_PTGQ_WARPS,
    )


def per_block_quant_fp8(
    w: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, block_size: int, eps: float, scale_ue8m0: bool
) -> None:
    """Fill ``w_q`` ``[E, N, K]`` and ``scale`` ``[E, ceil(N/b), ceil(K/b)]`` from ``w`` ``[E, N, K]``."""
    e, n, k = w.shape
    if w.numel() == 0:
        return
    n_blocks, k_blocks = triton.cdiv(n, block_size), triton.cdiv(k, block_size)
    _per_block_quant_fp8_kernel[(e * n_blocks * k_blocks,)](
        w, w_q.view(torch.uint8), scale, n, k, n_blocks, k_blocks,
        w.stride(0), w.stride(1), w_q.stride(0), w_q.stride(1), scale.stride(0), scale.stride(1), eps,
        BLOCK=block_size, BLOCK_P=triton.next_power_of_2(block_size), UE8M0=scale_ue8m0,
        ROUND_ON_GRID=interpreting(), num_warps=_PBQ_WARPS,
    )


def dequant_fp8(x_q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, block_m: int, block_n: int) -> None:
    """Fill ``out`` ``[B, R, C]`` with ``x_q * scale`` (``scale`` ``[B, ceil(R/bm), ceil(C/bn)]``, any strides)."""
    b, r, c = x_q.shape
    if x_q.numel() == 0:
        return
    tile_r, tile_c = _DEQUANT_TILE if not interpreting() else (triton.next_power_of_2(r), triton.next_power_of_2(c))
    r_tiles, c_tiles = triton.cdiv(r, tile_r), triton.cdiv(c, tile_c)
    _dequant_fp8_kernel[(b * r_tiles * c_tiles,)](
        x_q.view(torch.uint8), scale, out, r, c, r_tiles, c_tiles,
        x_q.stride(0), x_q.stride(1), scale.stride(0), scale.stride(1), scale.stride(2),
        out.stride(0), out.stride(1),
        BM=block_m, BN=block_n, TILE_R=tile_r, TILE_C=tile_c, ROUND_ON_GRID=interpreting(), num_warps=_DEQUANT_WARPS,
    )


# ---------------------------------------------------------------------------------------------
# Default GPU configurations, for `glm45-bench compile-report` (format: triton_ops/__init__.py)
# ---------------------------------------------------------------------------------------------
# Strides and sizes are i32: the JIT passes ints below 2**31 as i32, which covers every GLM-4.5
# weight (the kernels widen program ids to int64 themselves before multiplying by strides).

_TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _ptgq_spec(dtype: torch.dtype, ue8m0: bool, column_major: bool) -> CompileSpec:
    # Row-major scales have a unit column stride, column-major a unit row stride: the JIT
    # specializes the 1 to a constant, and so do we.
    unit, strided = ("s_row_stride", "s_col_stride") if column_major else ("s_col_stride", "s_row_stride")
    sig = {"x_ptr": f"*{_TL[dtype]}", "q_ptr": "*u8", "s_ptr": "*fp32", "n_groups": "i32",
           "groups_per_row": "i32", "K": "i32", "x_row_stride": "i32", "q_row_stride": "i32", "s_row_stride": "i32",
           "s_col_stride": "i32", "eps": "fp32", "GROUP": "constexpr", "BLOCK_K": "constexpr",
           "BLOCK_G": "constexpr", "UE8M0": "constexpr", "ROUND_ON_GRID": "constexpr"}
    sig[unit] = "constexpr"
    return CompileSpec(
        label=f"{_TL[dtype]}{' ue8m0' if ue8m0 else ''}{' col-major' if column_major else ''}",
        kernel=_per_token_group_quant_fp8_kernel,
        signature=sig,
        constexprs={unit: 1, "GROUP": 128, "BLOCK_K": 128, "BLOCK_G": _PTGQ_ELEMS_PER_PROGRAM // 128, "UE8M0": ue8m0,
                    "ROUND_ON_GRID": False},
        options={"num_warps": _PTGQ_WARPS},
        aligned=("K", "x_row_stride", "q_row_stride", strided),
    )


def _pbq_spec(dtype: torch.dtype, ue8m0: bool) -> CompileSpec:
    strides = ("w_e_stride", "w_n_stride", "q_e_stride", "q_n_stride", "s_e_stride", "s_n_stride")
    return CompileSpec(
        label=f"{_TL[dtype]}{' ue8m0' if ue8m0 else ''}",
        kernel=_per_block_quant_fp8_kernel,
        signature={"w_ptr": f"*{_TL[dtype]}", "q_ptr": "*u8", "s_ptr": "*fp32", "N": "i32", "K": "i32",
                   "n_blocks": "i32", "k_blocks": "i32", **{s: "i32" for s in strides},
                   "eps": "fp32", "BLOCK": "constexpr", "BLOCK_P": "constexpr", "UE8M0": "constexpr",
                   "ROUND_ON_GRID": "constexpr"},
        constexprs={"BLOCK": 128, "BLOCK_P": 128, "UE8M0": ue8m0, "ROUND_ON_GRID": False},
        options={"num_warps": _PBQ_WARPS},
        aligned=("K", "w_n_stride", "q_n_stride"),
    )


def _dequant_spec(block_m: int, block_n: int) -> CompileSpec:
    return CompileSpec(
        label=f"{block_m}x{block_n} -> bf16",
        kernel=_dequant_fp8_kernel,
        signature={"q_ptr": "*u8", "s_ptr": "*fp32", "o_ptr": "*bf16", "R": "i32", "C": "i32",
                   "r_tiles": "i32", "c_tiles": "i32",
                   "q_b_stride": "i32", "q_r_stride": "i32", "s_b_stride": "i32", "s_r_stride": "i32",
                   "s_c_stride": "constexpr", "o_b_stride": "i32", "o_r_stride": "i32",
                   "BM": "constexpr", "BN": "constexpr", "TILE_R": "constexpr", "TILE_C": "constexpr",
                   "ROUND_ON_GRID": "constexpr"},
        constexprs={"s_c_stride": 1, "BM": block_m, "BN": block_n, "TILE_R": _DEQUANT_TILE[0], "TILE_C": _DEQUANT_TILE[1],
                    "ROUND_ON_GRID": False},
        options={"num_warps": _DEQUANT_WARPS},
        aligned=("C", "q_r_stride", "o_r_stride"),
    )


COMPILE_SPECS = [
    *(_ptgq_spec(dt, ue8m0, False) for dt in _TL for ue8m0 in (False, True)),
    _ptgq_spec(torch.bfloat16, True, True),
    *(_pbq_spec(dt, ue8m0) for dt in _TL for ue8m0 in (False, True)),
    _dequant_spec(1, 128),
    _dequant_spec(128, 128),
]
