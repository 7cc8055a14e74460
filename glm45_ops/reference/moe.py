"""MoE token permutation and the fused expert MLP: the numerical definitions.

**moe_align_block_size** (the ``moe_align_block_size`` of vLLM / SGLang, defined so every backend
is bit-exact): ``topk_ids`` int ``[T, k]`` -> a permutation of the ``T*k`` (token, slot) pairs
into expert-contiguous segments, each padded to a multiple of ``block_size``::

    flat i = t*k + j, expert e_i = topk_ids[t, j]; ids outside [0, E) are left out (-1 marks a
    slot computed elsewhere, expert parallelism's other ranks; the ops refuse any other id
    outside [0, E) on CPU tensors and, unchecked on the GPU, leave it out like -1)
    count_e  = #{i : e_i == e};  padded_e = ceil(count_e / block_size) * block_size
    start_e  = padded_0 + ... + padded_{e-1}
    sorted_ids[start_e + r] = the r-th smallest i with e_i == e       (stable: ascending i)
    sorted_ids[other positions] = T*k                                   (the padding sentinel)
    block_expert[b] = e for b*block_size in [start_e, start_e + padded_e), -1 past the end
    num_padded = sum_e padded_e

Outputs have static shapes (``P = T*k + E*(block_size-1)`` rounded up to ``block_size``), so the
permutation runs on the device with no host sync and a decode step can be captured in a CUDA
graph. An expert without tokens gets no block, so the GEMMs never read its weights.

**fused_moe** (GLM-4.5 / DeepSeek-V3 routed experts, SwiGLU)::

    [g; u] = w13[e] @ x[t]                (fp32 accumulation; rows [0, I) gate, [I, 2I) up)
    h      = round_x(silu(g) * u)         (fp32, rounded once into x's dtype: the stored
                                           intermediate; FP8: quantized 1 x 128 instead)
    y_tj   = w2[e] @ h                     (fp32 accumulation)
    out[t] = round_x(sum_j w[t, j] * y_tj) (fp32, j = 0..k-1 in order, one rounding)

with ``e = topk_ids[t, j]``; ids outside ``[0, E)`` contribute nothing (-1 is the one such id the
op accepts on CPU tensors: a slot computed elsewhere, expert parallelism).
FP8 (``w13_scale``/``w2_scale`` given): weights are e4m3 in 128 x 128 blocks (scale grids
``[E, ceil(2I/128), ceil(H/128)]`` and ``[E, ceil(H/128), ceil(I/128)]``), ``x`` and ``h`` are
quantized 1 x 128 per token with ``per_token_group_quant_fp8`` (eps 1e-4), and the GEMMs are the
dequantized products (``fp8_block_gemm``'s definition).

Tensor-parallel shards of block-FP8 experts (``glm45_ops.moe.shard``) keep the checkpoint's
scales, whose blocks need not start at the shard's first intermediate column: ``w13_scale`` may
then hold one scale per row, ``[E, 2I, ceil(H/128)]``, and ``i_offset`` (0..127) says how far into
its 128-block the shard's first column sits. ``w2_scale`` is ``[E, ceil(H/128),
ceil((I + i_offset)/128)]``: the blocks the shard's columns fall in, and ``h`` is quantized in
1 x 128 groups aligned with them (the first group holds ``128 - i_offset`` columns), i.e. as if
``i_offset`` zero columns preceded it. Kernels sum in other orders: they agree
within fp32 accumulation error plus one rounding of ``h`` (see ``glm45_ops.moe.fused``).
NaN in ``x``, a weight or a used weight/scale reaches the rows it touches; an empty ``x`` gives
an empty output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm45_ops.reference import cdiv
from glm45_ops.reference.quant import dequant_fp8_ref, per_token_group_quant_fp8_ref

QUANT_GROUP = 128  # activations are quantized 1 x 128, weights 128 x 128 (DeepSeek-V3)


def padded_size(num_pairs: int, num_experts: int, block_size: int) -> int:
    """The static length of ``sorted_ids``: every pair plus the worst-case padding, in blocks."""
    worst = num_pairs + num_experts * (block_size - 1)
    return cdiv(worst, block_size) * block_size


def moe_align_block_size_ref(
    topk_ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk_ids`` int32/int64 ``[T, k]`` -> (``sorted_ids`` int32 ``[P]``, ``block_expert``
    int32 ``[P / block_size]``, ``num_padded`` int32 ``[1]``), as the module docstring defines."""
    device = topk_ids.device
    n = topk_ids.numel()
    p = padded_size(n, num_experts, block_size)
    ids = topk_ids.reshape(-1).long()
    valid = (ids >= 0) & (ids < num_experts)
    key = torch.where(valid, ids, torch.full_like(ids, num_experts))
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    start = torch.cumsum(padded, 0) - padded
    first = torch.cumsum(counts, 0) - counts  # where each expert's run starts in sorted order
    order = torch.argsort(key, stable=True)
    e_sorted = key[order]
    keep = e_sorted < num_experts
    rank = torch.arange(n, device=device) - first[e_sorted.clamp(max=num_experts - 1)]
    dest = start[e_sorted.clamp(max=num_experts - 1)] + rank
    sorted_ids = torch.full((p,), n, dtype=torch.int32, device=device)
    sorted_ids[dest[keep]] = order[keep].to(torch.int32)
    blocks = torch.arange(p // block_size, device=device) * block_size
    end = start + padded
    owner = torch.searchsorted(end, blocks, right=True)
    block_expert = torch.where(owner < num_experts, owner, torch.full_like(owner, -1)).to(torch.int32)
    num_padded = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids, block_expert, num_padded


def _shift(t: torch.Tensor, offset: int) -> torch.Tensor:
    """``offset`` zero columns in front of ``t`` (aligns a shard's columns with its scale blocks)."""
    return torch.nn.functional.pad(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t, (offset, 0)).view(t.dtype)


def _w13(w13: torch.Tensor, scale: torch.Tensor | None, e: int) -> torch.Tensor:
    if scale is None:
        return w13[e].float()
    rows = 1 if scale.shape[1] == w13.shape[1] != cdiv(w13.shape[1], QUANT_GROUP) else QUANT_GROUP
    return dequant_fp8_ref(w13[e], scale[e], rows, QUANT_GROUP, torch.float32)


def _w2(w2: torch.Tensor, scale: torch.Tensor | None, e: int, i_offset: int) -> torch.Tensor:
    if scale is None:
        return w2[e].float()
    return dequant_fp8_ref(_shift(w2[e], i_offset), scale[e], QUANT_GROUP, QUANT_GROUP, torch.float32)[:, i_offset:]


def _activation(x: torch.Tensor, fp8: bool, offset: int = 0) -> torch.Tensor:
    """What the GEMM reads: ``x`` itself (BF16 path), or its 1 x 128 FP8 quantization (groups
    aligned ``offset`` columns early), dequantized."""
    if not fp8:
        return x.float()
    q, s = per_token_group_quant_fp8_ref(_shift(x, offset), QUANT_GROUP, 1e-4, False)
    return dequant_fp8_ref(q, s, 1, QUANT_GROUP, torch.float32)[:, offset:]


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    i_offset: int,
) -> torch.Tensor:
    """``x`` ``[T, H]``, ``w13`` ``[E, 2I, H]``, ``w2`` ``[E, H, I]``, ``topk_weights`` fp32
    ``[T, k]``, ``topk_ids`` int ``[T, k]`` -> ``[T, H]`` in x's dtype: a loop over the experts
    that received tokens (module docstring)."""
    t, h = x.shape
    k = topk_ids.shape[1]
    e_count, two_i, _ = w13.shape
    inter = two_i // 2
    fp8 = w13_scale is not None
    a = _activation(x, fp8)
    y = torch.zeros((t, k, h), dtype=torch.float32, device=x.device)
    for e in torch.unique(topk_ids).tolist():  # the reference may sync: it is the definition
        if not 0 <= e < e_count:
            continue
        rows, slots = (topk_ids == e).nonzero(as_tuple=True)
        gu = a[rows] @ _w13(w13, w13_scale, e).t()
        act = (F.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype)
        y[rows, slots] = _activation(act, fp8, i_offset) @ _w2(w2, w2_scale, e, i_offset).t()
    out = torch.zeros((t, h), dtype=torch.float32, device=x.device)
    for j in range(k):  # fixed order: the definition's sum
        out += topk_weights[:, j : j + 1].float() * y[:, j]
    return out.to(x.dtype)
