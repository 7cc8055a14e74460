"""Triton grouped GEMMs over expert-contiguous rows, FP8 block-scaled and BF16 (definitions:
glm45_ops/reference/moe_grouped.py).

    out[m, n] = sum_k a[m,k] a_scale[m, k//128] b[g,n,k] b_scale[g, n//128, k//128],
    offsets[g] <= m < offsets[g+1]; zero for rows outside every group

Each program reads the ``G + 1`` offsets on the device (no host sync, CUDA-graph safe): a group
of ``M_g`` rows has ``ceil(M_g / BLOCK_M)`` row tiles, numbered group after group by an inclusive
``tl.cumsum`` of those counts, and program ``pid_m`` takes tile ``pid_m`` (its group is the
number of groups whose tiles all come before it). Groups need not be aligned to ``BLOCK_M``, so
the grid has ``ceil(M_total / BLOCK_M) + G`` GEMM row tiles, an upper bound on the true count;
programs past the last tile return. A further ``ceil(M_total / BLOCK_M)`` programs zero the rows
outside every group, which the GEMM tiles never write. Each group's bounds are clamped into
``[0, M_total]`` (``lo = clamp(offsets[g])``, ``hi = clamp(offsets[g+1])`` but at least ``lo``), as
the CUDA kernel does, so bad device offsets cannot address outside the tensors (the rows they
compute are then unspecified).

Within an FP8 tile, the K loop is the dense kernel's (``triton_ops.gemm._promote_k``): one fp8
``tl.dot`` per 128-wide K slice into a fresh fp32 partial, promoted with ``a_scale * b_scale``,
a partial last slice loaded with its columns past K as zeros. The BF16 kernel accumulates its
bf16 ``tl.dot`` s in fp32 directly, K masked in every slice.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from triton_ops import CompileSpec, interpreting
from triton_ops._common import to_out_dtype
from triton_ops.gemm import _promote_k

BLOCK_K = 128  # = the scale granularity along K: one promotion per K block
BF16_BLOCK_K = 64  # bf16: 128-byte K rows per tile, as the FP8 kernel's 128 e4m3 values


@triton.jit
def _pick(values, gs, g):
    """``values[g]`` of a ``[BLOCK_G]`` vector, as a scalar."""
    return tl.sum(tl.where(gs == g, values, 0), axis=0)


@triton.jit
def _group_tile(off_ptr, M, G, pid_m, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """``(valid, g, first_row, end_row)`` of GEMM row tile ``pid_m``: tiles are numbered group
    after group (``ceil(M_g / BLOCK_M)`` each); ``valid`` is False past the last one."""
    gs = tl.arange(0, BLOCK_G)
    in_g = gs < G
    lo = tl.minimum(tl.maximum(tl.load(off_ptr + gs, mask=in_g, other=0), 0), M)
    hi = tl.minimum(tl.maximum(tl.load(off_ptr + gs + 1, mask=in_g, other=0), lo), M)
    tiles = tl.where(in_g, tl.cdiv(hi - lo, BLOCK_M), 0)
    ends = tl.cumsum(tiles, axis=0)  # one past each group's last tile
    g = tl.sum((ends <= pid_m).to(tl.int32), axis=0)
    row0 = _pick(lo, gs, g) + (pid_m - _pick(ends - tiles, gs, g)) * BLOCK_M
    return pid_m < tl.max(ends, axis=0), g, row0, _pick(hi, gs, g)


@triton.jit
def _program_tile(M, N, G, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(pid_m, gemm_tiles, offs_n, mask_n)`` of this program: row tiles ``pid_m < gemm_tiles``
    are GEMM tiles (``_tile_operands``), the others zero rows (``_zero_outside``)."""
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, tl.cdiv(M, BLOCK_M) + G, offs_n, offs_n < N


@triton.jit
def _tile_operands(a_ptr, b_ptr, off_ptr, M, G, pid_m, offs_n, stride_am, stride_bg, stride_bn,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    """``(valid, g, offs_m, mask_m, offs_k, a_ptrs, b_ptrs)`` of GEMM row tile ``pid_m``: its group,
    rows, and the first K slice of a ``[BLOCK_M, BLOCK_K]`` and of the ``[BLOCK_K, BLOCK_N]`` view
    of ``b[g]^T`` (meaningless where ``valid`` is False: past the last tile)."""
    valid, g, row0, row_end = _group_tile(off_ptr, M, G, pid_m, BLOCK_M, BLOCK_G)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + g.to(tl.int64) * stride_bg + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
    return valid, g, offs_m, offs_m < row_end, offs_k, a_ptrs, b_ptrs


@triton.jit
def _zero_outside(off_ptr, c_ptr, M, G, tile, offs_n, mask_n, stride_cm, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Zero row tile ``tile``'s rows outside every group (before offsets[0], from offsets[G])."""
    first = tl.minimum(tl.maximum(tl.load(off_ptr), 0), M)
    last = tl.minimum(tl.maximum(tl.load(off_ptr + G), first), M)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    outside = ((offs_m < first) | (offs_m >= last)) & (offs_m < M)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty),
             mask=outside[:, None] & mask_n[None, :])


@triton.jit
def _grouped_fp8_block_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, off_ptr, c_ptr,
    M, N, K, G,
    stride_am, stride_bg, stride_bn, stride_asm, stride_ask, stride_bsg, stride_bsn, stride_bsk, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
    NUM_STAGES: tl.constexpr, ROUND_ON_GRID: tl.constexpr,
):
    pid_m, gemm_tiles, offs_n, mask_n = _program_tile(M, N, G, BLOCK_M, BLOCK_N)
    if pid_m < gemm_tiles:
        valid, g, offs_m, mask_m, offs_k, a_ptrs, b_ptrs = _tile_operands(
            a_ptr, b_ptr, off_ptr, M, G, pid_m, offs_n, stride_am, stride_bg, stride_bn, BLOCK_M, BLOCK_K, BLOCK_G)
        if valid:
            as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
            bs_ptrs = bs_ptr + g.to(tl.int64) * stride_bsg + (offs_n // BLOCK_K) * stride_bsn
            acc = _promote_k(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptrs, b_ptrs, as_ptrs, bs_ptrs, K,
                             stride_ask, stride_bsk, offs_k, mask_m, mask_n, BLOCK_K, NUM_STAGES, ROUND_ON_GRID)
            c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
            tl.store(c_ptrs, to_out_dtype(acc, c_ptr.dtype.element_ty, ROUND_ON_GRID),
                     mask=mask_m[:, None] & mask_n[None, :])
    else:
        _zero_outside(off_ptr, c_ptr, M, G, pid_m - gemm_tiles, offs_n, mask_n, stride_cm, BLOCK_M, BLOCK_N)


@triton.jit
def _grouped_bf16_gemm_kernel(
    a_ptr, b_ptr, off_ptr, c_ptr,
    M, N, K, G,
    stride_am, stride_bg, stride_bn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
    NUM_STAGES: tl.constexpr, ROUND_ON_GRID: tl.constexpr,
):
    pid_m, gemm_tiles, offs_n, mask_n = _program_tile(M, N, G, BLOCK_M, BLOCK_N)
    if pid_m < gemm_tiles:
        valid, g, offs_m, mask_m, offs_k, a_ptrs, b_ptrs = _tile_operands(
            a_ptr, b_ptr, off_ptr, M, G, pid_m, offs_n, stride_am, stride_bg, stride_bn, BLOCK_M, BLOCK_K, BLOCK_G)
        if valid:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
                in_k = (k0 + offs_k) < K
                a = tl.load(a_ptrs, mask=mask_m[:, None] & in_k[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=in_k[:, None] & mask_n[None, :], other=0.0)
                if ROUND_ON_GRID:  # the interpreter's bf16 tl.dot multiplies raw bits: fp32 is exact there
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
            c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
            tl.store(c_ptrs, to_out_dtype(acc, c_ptr.dtype.element_ty, ROUND_ON_GRID),
                     mask=mask_m[:, None] & mask_n[None, :])
    else:
        _zero_outside(off_ptr, c_ptr, M, G, pid_m - gemm_tiles, offs_n, mask_n, stride_cm, BLOCK_M, BLOCK_N)


class GroupedConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# A FIRST GUESS pending H200 tuning: the dense GEMM's mid-M tile (64 x 128, one warpgroup).
# GLM-4.5 at T = 4096 tokens gives ~205 rows per expert (160 experts, top-8), so BLOCK_M 64 wastes
# at most one partial tile per group where 128 would waste twice as many rows.
GPU_CONFIG = GroupedConfig(64, 128, 4, 4)


def pick_config(m: int, n: int) -> GroupedConfig:
    """The tile for ``M_total`` rows and N columns (under the interpreter, where the cost is per
    program: few, large tiles)."""
    if interpreting():
        return GroupedConfig(min(triton.next_power_of_2(max(m, 16)), 64),
                             min(triton.next_power_of_2(max(n, 16)), 256), 4, 1)
    return GPU_CONFIG


def _block_g(groups: int) -> int:
    return max(triton.next_power_of_2(groups), 16)


def grouped_fp8_block_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    expert_offsets: torch.Tensor, out: torch.Tensor,
) -> None:
    """Fill ``out`` ``[M_total, N]`` (unit last stride) from e4m3 ``a`` ``[M_total, K]`` and ``b``
    ``[G, N, K]`` (unit last strides, K a multiple of 16), fp32 ``a_scale``
    ``[M_total, ceil(K/128)]`` and ``b_scale`` ``[G, ceil(N/128), ceil(K/128)]`` (any strides)
    and int32 ``expert_offsets`` ``[G + 1]`` (read on the device). M_total >= 1."""
    m, k = a.shape
    groups, n = b.shape[:2]
    cfg = pick_config(m, n)
    row_tiles = triton.cdiv(m, cfg.block_m)
    grid = (2 * row_tiles + groups, triton.cdiv(n, cfg.block_n))
    _grouped_fp8_block_gemm_kernel[grid](
        a, a_scale, b, b_scale, expert_offsets, out, m, n, k, groups,
        a.stride(0), b.stride(0), b.stride(1), a_scale.stride(0), a_scale.stride(1),
        b_scale.stride(0), b_scale.stride(1), b_scale.stride(2), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=BLOCK_K, BLOCK_G=_block_g(groups),
        NUM_STAGES=cfg.num_stages, ROUND_ON_GRID=interpreting(), num_warps=cfg.num_warps,
    )


def grouped_bf16_gemm(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor, out: torch.Tensor) -> None:
    """Fill ``out`` ``[M_total, N]`` (unit last stride) from bf16 ``a`` ``[M_total, K]`` and ``b``
    ``[G, N, K]`` (unit last strides) and int32 ``expert_offsets`` ``[G + 1]`` (read on the
    device). M_total >= 1."""
    m, k = a.shape
    groups, n = b.shape[:2]
    cfg = pick_config(m, n)
    row_tiles = triton.cdiv(m, cfg.block_m)
    grid = (2 * row_tiles + groups, triton.cdiv(n, cfg.block_n))
    _grouped_bf16_gemm_kernel[grid](
        a, b, expert_offsets, out, m, n, k, groups, a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=BF16_BLOCK_K, BLOCK_G=_block_g(groups),
        NUM_STAGES=cfg.num_stages, ROUND_ON_GRID=interpreting(), num_warps=cfg.num_warps,
    )


# ---------------------------------------------------------------------------------------------
# Default GPU configurations, for `glm45-bench compile-report` (format: triton_ops/__init__.py)
# ---------------------------------------------------------------------------------------------
# As the JIT sees a GLM-4.5 call (G = 160 experts): N, K and the operand row strides multiples of
# 16, a_scale MN-major as the quantizer writes it (unit M stride), b_scale contiguous.

_TL = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(out_dtype: torch.dtype, groups: int) -> CompileSpec:
    cfg = GPU_CONFIG
    sig = {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv", "bs_ptr": "*fp32", "off_ptr": "*i32",
           "c_ptr": f"*{_TL[out_dtype]}", "M": "i32", "N": "i32", "K": "i32", "G": "i32",
           "stride_am": "i32", "stride_bg": "i32", "stride_bn": "i32", "stride_asm": "constexpr",
           "stride_ask": "i32", "stride_bsg": "i32", "stride_bsn": "i32", "stride_bsk": "constexpr",
           "stride_cm": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
           "BLOCK_G": "constexpr", "NUM_STAGES": "constexpr", "ROUND_ON_GRID": "constexpr"}
    return CompileSpec(
        label=f"G={groups} {cfg.block_m}x{cfg.block_n} -> {_TL[out_dtype]}",
        kernel=_grouped_fp8_block_gemm_kernel,
        signature=sig,
        constexprs={"stride_asm": 1, "stride_bsk": 1, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                    "BLOCK_K": BLOCK_K, "BLOCK_G": _block_g(groups), "NUM_STAGES": cfg.num_stages,
                    "ROUND_ON_GRID": False},
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        aligned=("N", "K", "stride_am", "stride_bg", "stride_bn", "stride_ask", "stride_cm"),
    )


def _bf16_spec(groups: int) -> CompileSpec:
    cfg = GPU_CONFIG
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "off_ptr": "*i32", "c_ptr": "*bf16", "M": "i32", "N": "i32",
           "K": "i32", "G": "i32", "stride_am": "i32", "stride_bg": "i32", "stride_bn": "i32", "stride_cm": "i32",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_G": "constexpr",
           "NUM_STAGES": "constexpr", "ROUND_ON_GRID": "constexpr"}
    return CompileSpec(
        label=f"bf16 G={groups} {cfg.block_m}x{cfg.block_n}x{BF16_BLOCK_K}",
        kernel=_grouped_bf16_gemm_kernel,
        signature=sig,
        constexprs={"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": BF16_BLOCK_K,
                    "BLOCK_G": _block_g(groups), "NUM_STAGES": cfg.num_stages, "ROUND_ON_GRID": False},
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        aligned=("N", "K", "stride_am", "stride_bg", "stride_bn", "stride_cm"),
    )


COMPILE_SPECS = [_spec(torch.bfloat16, 160), _spec(torch.float32, 160), _bf16_spec(160)]
