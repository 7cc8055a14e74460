"""Grouped GEMMs over expert-contiguous rows (DeepGEMM's "contiguous" layout), FP8 block-scaled
and BF16: the numerical definitions.

    out[m, n] = sum_k a[m, k] a_scale[m, k // 128] b[g, n, k] b_scale[g, n // 128, k // 128]
    for offsets[g] <= m < offsets[g + 1]

``a`` e4m3 ``[M_total, K]`` holds the rows of every group one after another (the permuted
(token, slot) pairs of a MoE layer, ``moe_align_block_size``'s order), ``expert_offsets`` int32
``[G + 1]`` is nondecreasing within ``[0, M_total]``, so group ``g`` is the rows
``[offsets[g], offsets[g + 1])`` and multiplies expert ``g``'s weight ``b[g]`` (``[N, K]``, 128 x 128
blocks). Each group is exactly :func:`glm45_ops.reference.gemm.fp8_block_gemm_ref` on its rows
(K any positive multiple of 16, partial last K block, NaN/inf as defined there, per row and
column of that group). Empty groups cost nothing and produce nothing.

**Rows outside every group** (``[0, offsets[0])`` and ``[offsets[G], M_total)``: padding, e.g.
the unused tail of a statically sized buffer) are **zero** in the output, whatever ``a`` holds
there: the kernels never read them.
"""

from __future__ import annotations

import torch

from glm45_ops.reference.gemm import fp8_block_gemm_ref


def grouped_fp8_block_gemm_ref(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    expert_offsets: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``a`` e4m3 ``[M_total, K]``, ``a_scale`` fp32 ``[M_total, ceil(K/128)]``, ``b`` e4m3
    ``[G, N, K]``, ``b_scale`` fp32 ``[G, ceil(N/128), ceil(K/128)]``, ``expert_offsets`` int32
    ``[G + 1]`` -> ``out_dtype`` ``[M_total, N]``: one dense reference GEMM per group, zeros
    elsewhere. Reads the offsets on the host (a loop over experts: the CPU path)."""
    out = torch.zeros((a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)
    bounds = expert_offsets.tolist()
    for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            out[lo:hi] = fp8_block_gemm_ref(a[lo:hi], a_scale[lo:hi], b[g], b_scale[g], out_dtype)
    return out


def grouped_bf16_gemm_ref(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """The BF16 version: ``a`` bf16 ``[M_total, K]``, ``b`` bf16 ``[G, N, K]``, ``expert_offsets``
    as above -> bf16 ``[M_total, N]``, ``out[m] = a[m] @ b[g]^T`` in fp32 (the bf16 values are
    exact there), rounded once into bf16; zero outside every group. NaN and inf propagate as IEEE
    arithmetic does, so which outputs they make non-finite is part of the contract (each output
    reads only its row of ``a`` and its row of ``b[g]``), whether as NaN or inf is not (summation
    order)."""
    out = torch.zeros((a.shape[0], b.shape[1]), dtype=torch.bfloat16, device=a.device)
    bounds = expert_offsets.tolist()
    for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            out[lo:hi] = (a[lo:hi].float() @ b[g].float().t()).to(torch.bfloat16)
    return out
