"""Tensor-parallel shards of block-FP8 expert weights, with their checkpoint scales.

GLM-4.5's expert intermediate (1536) over 8 GPUs is 192 per rank, GLM-4.5-Air's (1408) 176: shard
boundaries fall inside the 128 x 128 scale blocks, which is why vLLM refuses block-FP8 there
("192 is not divisible by block_n = 128"). Requantizing each shard would change the weights.
Instead each shard keeps the checkpoint's values and scales:

* ``w13`` (gate rows then up rows, each sliced to the shard): its scales are expanded to one
  per row, ``[E, 2I_r, ceil(H/128)]``, each row keeping its block's scale (exact: a copy).
* ``w2`` (sliced along I, its K dim): the scale blocks the shard's columns fall in,
  ``[E, ceil(H/128), ceil((I_r + i_offset)/128)]``, with ``i_offset`` = how far into its block the
  shard's first column sits; ``fused_moe(..., i_offset=i_offset)`` aligns its K slices (and the
  1 x 128 groups of the intermediate) with those blocks.

So ``dequant(shard) == shard of dequant(full)`` bit for bit, and the ranks' outputs sum to the
unsharded layer up to the intermediate's own 1 x 128 quantization, which each rank does for its
own columns, as any tensor-parallel FP8 MoE must.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from glm45_ops.reference import cdiv
from glm45_ops.reference.moe import QUANT_GROUP


class ExpertShard(NamedTuple):
    """One rank's FP8 experts: pass ``w13, w2, w13_scale=..., w2_scale=..., i_offset=...`` to
    :func:`glm45_ops.moe.fused_moe`."""

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    i_offset: int


def shard_fp8_experts(
    w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, tp_size: int, rank: int
) -> ExpertShard:
    """Rank ``rank``'s slice of block-FP8 experts ``w13`` e4m3 ``[E, 2I, H]`` (scales
    ``[E, ceil(2I/128), ceil(H/128)]``) and ``w2`` e4m3 ``[E, H, I]`` (scales
    ``[E, ceil(H/128), ceil(I/128)]``) over ``tp_size`` ranks along I (module docstring)."""
    e, two_i, h = w13.shape
    inter = two_i // 2
    if not isinstance(tp_size, int) or tp_size < 1 or inter % tp_size:
        raise ValueError(f"tp_size must be a positive int dividing I={inter}, got {tp_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < tp_size:
        raise ValueError(f"rank must be in [0, {tp_size}), got {rank!r}")
    width = inter // tp_size
    if width % 16:
        raise ValueError(f"the shard width I/tp_size = {width} must be a multiple of 16 (fused_moe's I)")
    want13 = (e, cdiv(two_i, QUANT_GROUP), cdiv(h, QUANT_GROUP))
    want2 = (e, cdiv(h, QUANT_GROUP), cdiv(inter, QUANT_GROUP))
    if tuple(w13_scale.shape) != want13 or tuple(w2_scale.shape) != want2:
        raise ValueError(f"w13_scale and w2_scale must be the block grids {want13} and {want2}, "
                         f"got {tuple(w13_scale.shape)} and {tuple(w2_scale.shape)}")
    first = rank * width
    cols = torch.arange(first, first + width, device=w13.device)
    rows = torch.cat([cols, cols + inter])  # the shard's gate rows, then its up rows, in w13
    shard_w13 = w13[:, rows].contiguous()
    shard_s13 = w13_scale[:, rows // QUANT_GROUP].contiguous()
    i_offset = first % QUANT_GROUP
    blocks = slice(first // QUANT_GROUP, cdiv(first + width, QUANT_GROUP))
    shard_w2 = w2[:, :, first:first + width].contiguous()
    shard_s2 = w2_scale[:, :, blocks].contiguous()
    return ExpertShard(shard_w13, shard_s13, shard_w2, shard_s2, i_offset)
