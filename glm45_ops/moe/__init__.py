"""Mixture-of-Experts for GLM-4.5 (160 experts, top-8, 1 shared expert) and GLM-4.5-Air (128).

One family in three modules, each readable in a sitting:

* :mod:`glm45_ops.moe.routing`: ``moe_route``, sigmoid scores with DeepSeek-V3's group-limited
  top-k on bias-corrected scores, any expert count up to 512;
  ``route`` runs the fp32 router GEMM first.
* :mod:`glm45_ops.moe.permute`: ``moe_align_block_size``, the device-side permutation of
  (token, slot) pairs into expert-contiguous, block-padded segments (no host sync).
* :mod:`glm45_ops.moe.fused`: ``fused_moe``, the routed experts' SwiGLU MLP, BF16 or FP8 blocks.
"""

from __future__ import annotations

from glm45_ops.moe.fused import fused_moe
from glm45_ops.moe.permute import moe_align_block_size
from glm45_ops.moe.routing import moe_route, route

__all__ = ["fused_moe", "moe_align_block_size", "moe_route", "route"]
