"""Mixture-of-Experts for GLM-4.5 (160 experts, top-8, 1 shared expert) and GLM-4.5-Air (128).

One family in three modules, each readable in a sitting:

* :mod:`glm45_ops.moe.routing`: ``moe_route``, sigmoid scores with DeepSeek-V3's group-limited
  top-k on bias-corrected scores, any expert count up to 512;
  ``route`` runs the fp32 router GEMM first.
* :mod:`glm45_ops.moe.permute`: ``moe_align_block_size``, the device-side permutation of
  (token, slot) pairs into expert-contiguous, block-padded segments (no host sync).
* :mod:`glm45_ops.moe.fused`: ``fused_moe``, the routed experts' SwiGLU MLP, BF16 or FP8 blocks.
* :mod:`glm45_ops.moe.grouped_moe`: ``fused_moe_grouped``, the same through the grouped GEMM ops
  (CUTLASS on ``cuda``): the prefill-sized path, pending the H200's verdict.
* :mod:`glm45_ops.moe.shard`: tensor-parallel shards of block-FP8 experts that keep the
  checkpoint's scales (shard boundaries inside scale blocks: GLM-4.5's 192, Air's 176).
* :mod:`glm45_ops.moe.layer`: the ``MoE`` module (fp32 router, routed and shared experts, BF16 or
  FP8, HF checkpoints) and the shared expert, fused as expert E or run as a dense SwiGLU.
* :mod:`glm45_ops.moe.ep`: expert parallelism over a ``torch.distributed`` group.
"""

from __future__ import annotations

from glm45_ops.moe.ep import ep_fused_moe, local_experts
from glm45_ops.moe.fused import fused_moe
from glm45_ops.moe.grouped_moe import expert_offsets, fused_moe_grouped
from glm45_ops.moe.grouped import grouped_bf16_gemm, grouped_fp8_block_gemm
from glm45_ops.moe.layer import MoE, append_shared_routing, fuse_shared_expert, shared_expert, split_shared_expert
from glm45_ops.moe.permute import moe_align_block_size
from glm45_ops.moe.routing import moe_route, route
from glm45_ops.moe.shard import ExpertShard, shard_fp8_experts

__all__ = [
    "ExpertShard", "MoE", "append_shared_routing", "ep_fused_moe", "expert_offsets", "fuse_shared_expert", "fused_moe",
    "fused_moe_grouped", "grouped_bf16_gemm", "grouped_fp8_block_gemm", "local_experts", "moe_align_block_size", "moe_route", "route",
    "shard_fp8_experts", "shared_expert", "split_shared_expert",
]
