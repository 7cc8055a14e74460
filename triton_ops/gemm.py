"""Triton FP8 block-scaled GEMM (definition: glm45_ops/reference/gemm.py).

    out[m, n] = sum_k a[m,k] a_scale[m, k//128] b[n,k] b_scale[n//128, k//128]

DeepGEMM's promotion: for each 128-wide K slice, one fp8 ``tl.dot`` (wgmma on Hopper) into a
fresh fp32 partial, then ``acc += partial * a_scale[:, None] * b_scale[None, :]`` on the CUDA cores.
The scale is applied per slice, never folded into the fp8 operands, so UE8M0 and fp32 scales are
the same code. Programs run in grouped order (``GROUP_M`` row tiles share a column tile band) so
a band of ``b`` stays in L2 while the row tiles sweep it.

K is any multiple of 16: the full slices run unmasked, then a partial last slice (K = 192, 176 at
GLM-4.5's TP8 expert widths) is loaded with its columns past K as zeros and promoted with its own
block's scales. On sm_90 the whole 128-K ``tl.dot`` accumulates at the tensor cores' ~14 bits
(Triton's default ``max_num_imprecise_acc``); the fp32 promotion between slices is what bounds
the error (``glm45_ops.gemm.error_bound``).

Both ``a_scale`` layouts (row-major and MN-major) are read through their strides; MN-major loads a
tile's ``BLOCK_M`` scales as one coalesced vector.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from triton_ops import CompileSpec, interpreting
from triton_ops._common import to_out_dtype

BLOCK_K = 128  # = the scale granularity along K: one promotion per K block


@triton.jit
def _promote_slice(acc, a_ptrs, b_ptrs, a_s_ptrs, b_s_ptrs, mask_a, mask_b, mask_m, mask_n, DECODE_NAN: tl.constexpr):
    """``acc`` plus one K slice: an fp8 ``tl.dot`` into a fresh fp32 partial, times its scales."""
    a = tl.load(a_ptrs, mask=mask_a, other=0.0)
    b = tl.load(b_ptrs, mask=mask_b, other=0.0)
    a_s = tl.load(a_s_ptrs, mask=mask_m, other=0.0)
    b_s = tl.load(b_s_ptrs, mask=mask_n, other=0.0)
    if DECODE_NAN:
        # the interpreter decodes the e4m3 NaN byte (0x7f/0xff) as +-480: carry it into the
        # row's or column's scale instead, which makes the same outputs NaN as the GPU's dot does
        a_nan = tl.max(((a.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F).to(tl.int32), axis=1)
        b_nan = tl.max(((b.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F).to(tl.int32), axis=0)
        a_s = tl.where(a_nan != 0, float("nan"), a_s)
        b_s = tl.where(b_nan != 0, float("nan"), b_s)
    partial = tl.dot(a, b, out_dtype=tl.float32)
    return acc + partial * a_s[:, None] * b_s[None, :]


@triton.jit
def _promote_k(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptrs, K, stride_ask, stride_bsk, offs_k, mask_m, mask_n,
               BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, DECODE_NAN: tl.constexpr):
    """``acc`` plus the whole K loop of one tile (the dense and the grouped FP8 kernels'): the full
    K slices without a K mask (the hot loop), then the partial last slice, if any, with its columns
    past K loaded as zeros: still one promotion per scale block."""
    full = K // BLOCK_K
    for kb in tl.range(0, full, num_stages=NUM_STAGES):
        acc = _promote_slice(acc, a_ptrs, b_ptrs, as_ptrs + kb * stride_ask, bs_ptrs + kb * stride_bsk,
                             mask_m[:, None], mask_n[None, :], mask_m, mask_n, DECODE_NAN)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    tail = K - full * BLOCK_K
    if tail > 0:
        acc = _promote_slice(acc, a_ptrs, b_ptrs, as_ptrs + full * stride_ask, bs_ptrs + full * stride_bsk,
                             mask_m[:, None] & (offs_k < tail)[None, :], (offs_k < tail)[:, None] & mask_n[None, :],
                             mask_m, mask_n, DECODE_NAN)
    return acc


@triton.jit
def _fp8_block_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr,
    M, N, K,
    stride_am, stride_bn, stride_asm, stride_ask, stride_bsn, stride_bsk, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr, ROUND_ON_GRID: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M consecutive row tiles walk the same column tiles together
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] view of b^T
    as_ptrs = as_ptr + offs_m * stride_asm
    bs_ptrs = bs_ptr + (offs_n // BLOCK_K) * stride_bsn

    acc = _promote_k(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptrs, b_ptrs, as_ptrs, bs_ptrs, K,
                     stride_ask, stride_bsk, offs_k, mask_m, mask_n, BLOCK_K, NUM_STAGES, ROUND_ON_GRID)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, to_out_dtype(acc, c_ptr.dtype.element_ty, ROUND_ON_GRID), mask=mask_m[:, None] & mask_n[None, :])


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    group_m: int
    num_warps: int
    num_stages: int


# (largest M of the bucket, config), first match wins. A FIRST GUESS pending H200 tuning for the
# GLM-4.5 shapes (N 5120..24576, K 5120/12288), reasoned from the hardware, not measured:
# * M <= 64 (decode) is bound by the weight read: BLOCK_M 64 is wgmma's smallest tile, BLOCK_N 64
#   gives >= 80 programs even at N = 5120, and deep pipelining keeps HBM busy.
# * mid M: 64 x 128 tiles, 4 warps (one warpgroup), vLLM's default block-FP8 shape.
# * large M: 128 x 128, 8 warps; the per-slice fp32 partial doubles the accumulator registers
#   (64 + 64 per thread), which is why BLOCK_N stops at 128 (256 spills).
CONFIGS: tuple[tuple[int, GemmConfig], ...] = (
    (64, GemmConfig(64, 64, 1, 4, 6)),
    (512, GemmConfig(64, 128, 8, 4, 4)),
    (1 << 62, GemmConfig(128, 128, 8, 8, 4)),
)


def pick_config(m: int, n: int) -> GemmConfig:
    """The config for an ``[M, K] x [N, K]`` problem (under the interpreter: one or a few programs)."""
    if interpreting():
        # interpreter cost is per program: cover the problem with as few tiles as possible
        bm = min(triton.next_power_of_2(max(m, 16)), 256)
        bn = min(triton.next_power_of_2(max(n, 16)), 256)
        return GemmConfig(bm, bn, 1, 4, 1)
    return next(cfg for top, cfg in CONFIGS if m <= top)


def fp8_block_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out: torch.Tensor
) -> None:
    """Fill ``out`` ``[M, N]`` (unit last stride) from e4m3 ``a`` ``[M, K]``, ``b`` ``[N, K]`` (unit last
    strides, K a multiple of 16), fp32 ``a_scale`` ``[M, ceil(K/128)]`` and ``b_scale``
    ``[ceil(N/128), ceil(K/128)]`` (any strides). M >= 1: the registry launches nothing for
    an empty output."""
    m, k = a.shape
    n = b.shape[0]
    cfg = pick_config(m, n)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _fp8_block_gemm_kernel[grid](
        a, a_scale, b, b_scale, out, m, n, k,
        a.stride(0), b.stride(0), a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=BLOCK_K, GROUP_M=cfg.group_m,
        NUM_STAGES=cfg.num_stages, ROUND_ON_GRID=interpreting(), num_warps=cfg.num_warps,
    )


# ---------------------------------------------------------------------------------------------
# Default GPU configurations, for `glm45-bench compile-report` (format: triton_ops/__init__.py)
# ---------------------------------------------------------------------------------------------
# As the JIT sees a GLM-4.5 call: N, K and the operand row strides multiples of 16; the unit
# stride of each scale tensor specialized to a constant (MN-major a_scale: its M stride;
# row-major: its K stride; b_scale: its K stride); ints below 2**31 as i32.

_TL = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def _gemm_spec(cfg: GemmConfig, bucket: str, out_dtype: torch.dtype, layout: str) -> CompileSpec:
    unit_a, other_a = ("stride_asm", "stride_ask") if layout == "mn" else ("stride_ask", "stride_asm")
    sig = {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv", "bs_ptr": "*fp32",
           "c_ptr": f"*{_TL[out_dtype]}", "M": "i32", "N": "i32", "K": "i32",
           "stride_am": "i32", "stride_bn": "i32", "stride_asm": "i32", "stride_ask": "i32",
           "stride_bsn": "i32", "stride_bsk": "constexpr", "stride_cm": "i32",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr",
           "NUM_STAGES": "constexpr", "ROUND_ON_GRID": "constexpr"}
    sig[unit_a] = "constexpr"
    return CompileSpec(
        label=f"{bucket} {cfg.block_m}x{cfg.block_n} -> {_TL[out_dtype]}, a_scale {layout}",
        kernel=_fp8_block_gemm_kernel,
        signature=sig,
        constexprs={unit_a: 1, "stride_bsk": 1, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": BLOCK_K,
                    "GROUP_M": cfg.group_m, "NUM_STAGES": cfg.num_stages, "ROUND_ON_GRID": False},
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        aligned=("N", "K", "stride_am", "stride_bn", "stride_cm", *((other_a,) if layout == "mn" else ())),
    )


_BUCKETS = ("M<=64", "M<=512", "M>512")
COMPILE_SPECS = [
    *(_gemm_spec(cfg, bucket, torch.bfloat16, "mn") for bucket, (_, cfg) in zip(_BUCKETS, CONFIGS)),
    _gemm_spec(CONFIGS[-1][1], _BUCKETS[-1], torch.bfloat16, "row"),
    _gemm_spec(CONFIGS[-1][1], _BUCKETS[-1], torch.float32, "mn"),
]
