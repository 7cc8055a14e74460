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

from glm45_ops.moe.fused import DIM_ALIGN
from glm45_ops.reference import cdiv
from glm45_ops.reference.moe import QUANT_GROUP
from glm45_ops.reference.quant import FP8_DTYPE


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
    ``[E, ceil(H/128), ceil(I/128)]``) over ``tp_size`` ranks along I (module docstring), each
    shard a multiple of 16 wide. Bad arguments raise ValueError (TypeError for a wrong type)
    naming the argument."""
    tensors = {"w13": w13, "w13_scale": w13_scale, "w2": w2, "w2_scale": w2_scale}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        want = FP8_DTYPE if name in ("w13", "w2") else torch.float32
        if t.dtype != want:
            raise ValueError(f"{name} must be {want} (a block-FP8 checkpoint's), got {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [E, ...], got shape {tuple(t.shape)}")
        if t.device != w13.device:
            raise ValueError(f"{name} is on {t.device} but w13 is on {w13.device}")
    e, two_i, h = w13.shape
    inter = two_i // 2
    if two_i % 2 or two_i == 0 or tuple(w2.shape) != (e, h, inter):
        raise ValueError(f"w13 must be [E, 2I, H] and w2 [E, H, I] with the same E, H and I > 0, "
                         f"got {tuple(w13.shape)} and {tuple(w2.shape)}")
    for name, v in (("tp_size", tp_size), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be int, got {type(v).__name__}")
    if tp_size < 1 or inter % tp_size or (inter // tp_size) % DIM_ALIGN:
        raise ValueError(f"tp_size must be a positive divisor of I={inter} leaving shards a multiple of "
                         f"{DIM_ALIGN} wide (fused_moe's I), got {tp_size}")
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank must be in [0, tp_size={tp_size}), got {rank}")
    width = inter // tp_size
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
