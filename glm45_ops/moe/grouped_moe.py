"""``fused_moe_grouped``: ``fused_moe`` built from the grouped GEMM ops over DeepGEMM's contiguous
layout, the prefill-sized alternative to the fused Triton kernels.

Five steps, all on the device with static shapes (no host sync, CUDA-graph safe):

1. ``moe_align_block_size(topk_ids, E, 1)`` puts the ``T*k`` (token, slot) pairs in expert order
   (ascending within each expert; ids outside ``[0, E)`` last, outside every group), and a
   bincount gives the groups' offsets.
2. The gate-up GEMM over the gathered rows: ``grouped_fp8_block_gemm`` (x quantized 1 x 128 once
   per token, its rows and scales gathered) or ``grouped_bf16_gemm``.
3. SwiGLU in fp32, rounded once into x's dtype; for FP8, quantized 1 x 128.
4. The down GEMM, the same way.
5. The combine: each row, times its routing weight, goes to its pair's own row of an fp32
   ``[T*k, H]`` buffer, and one sum over k makes the output (deterministic, no atomics).

With ``backend="cuda"`` the GEMMs are CUTLASS's sm90 PtrArray grouped kernels. ``fused_moe``'s
own backends stay the fused Triton kernels until an H200 run (``glm45-bench moe``, peer "grouped
GEMMs") shows where this path is faster: then it becomes ``fused_moe``'s prefill path.
Tensor-parallel shards with ``i_offset`` or per-row scales are not supported here (the grouped
GEMMs take 128 x 128 block scales only), nor fp16/fp32 activations (the grouped GEMMs are BF16
and FP8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm45_ops.moe.fused import _fused_op
from glm45_ops.moe.grouped import grouped_bf16_gemm, grouped_fp8_block_gemm
from glm45_ops.moe.permute import moe_align_block_size
from glm45_ops.quant import per_token_group_quant_fp8
from glm45_ops.reference import cdiv
from glm45_ops.reference.moe import QUANT_GROUP

__all__ = ["expert_offsets", "fused_moe_grouped"]


def _check(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale) -> None:
    _fused_op.check(*_fused_op.bind((x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale), {}))
    if x.dtype != torch.bfloat16:
        raise ValueError(f"x must be bfloat16 (the grouped GEMMs are BF16 and FP8), got {x.dtype}")
    if w13_scale is not None and w13_scale.shape[1] != cdiv(w13.shape[1], QUANT_GROUP):
        raise ValueError("w13_scale must hold 128 x 128 block scales [E, ceil(2I/128), ceil(H/128)] here "
                         f"(one scale per row, a tensor-parallel shard's, needs fused_moe), got {tuple(w13_scale.shape)}")


def expert_offsets(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int32 ``[E + 1]`` start of each expert's rows in the contiguous layout (the grouped GEMMs'
    ``expert_offsets``): cumulative counts of ``topk_ids``, ids outside ``[0, E)`` left out. On
    the device, no host sync."""
    ids = topk_ids.reshape(-1).long()
    valid = (ids >= 0) & (ids < num_experts)
    # scatter_add_, not bincount: CUDA's bincount reads the ids' max on the host to size its output
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device).scatter_add_(
        0, torch.where(valid, ids, num_experts), torch.ones_like(ids))[:num_experts]
    return torch.cat((counts.new_zeros(1), counts.cumsum(0))).to(torch.int32)


def fused_moe_grouped(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`glm45_ops.moe.fused_moe` (same arguments but ``i_offset``, same definition) through
    permutation, two grouped GEMMs and a combine (module docstring). ``x`` bf16; ``backend`` goes
    to every op (``cuda``: CUTLASS grouped GEMMs). Agrees with ``fused_moe`` under its own rule."""
    _check(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    t, h = x.shape
    k, e, inter = topk_ids.shape[1], w13.shape[0], w2.shape[2]
    n = t * k
    if n == 0:
        return torch.zeros_like(x)
    fp8 = w13_scale is not None
    pair = moe_align_block_size(topk_ids, e, 1, backend=backend)[0].long()  # [n]; n marks a left-out pair
    offsets = expert_offsets(topk_ids, e)
    src = pair.clamp(max=n - 1)  # rows past the groups read some pair; the GEMMs give them zeros
    token = src // k
    if fp8:
        x_q, x_s = per_token_group_quant_fp8(x, QUANT_GROUP, backend=backend)
        gu = grouped_fp8_block_gemm(x_q[token], x_s[token], w13, w13_scale, offsets, torch.float32, backend=backend)
    else:
        gu = grouped_bf16_gemm(x[token], w13, offsets, backend=backend).float()
    mid = (F.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype)
    if fp8:
        m_q, m_s = per_token_group_quant_fp8(mid, QUANT_GROUP, backend=backend)
        y = grouped_fp8_block_gemm(m_q, m_s, w2, w2_scale, offsets, torch.float32, backend=backend)
    else:
        y = grouped_bf16_gemm(mid, w2, offsets, backend=backend).float()
    weight = torch.where(pair < n, topk_weights.reshape(-1)[src], 0.0)
    # One row per pair, plus a dump row n for the left-out ones (several may land there).
    out = torch.zeros(n + 1, h, dtype=torch.float32, device=x.device).index_copy_(0, pair, y * weight[:, None])
    return out[:n].view(t, k, h).sum(1).to(x.dtype)
