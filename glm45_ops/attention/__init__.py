"""Attention for GLM-4.5: fused QK-Norm + partial RoPE (+ paged KV-cache write), and GQA flash
attention over packed (varlen) and paged KV, as ``torch.ops.glm45.*``.

GLM-4.5 has 96 query heads over 8 KV heads (a group of 12, also 12 per GPU at TP8), head dim 128,
per-head RMSNorm on q and k before a NeoX RoPE over the first 64 dims (theta 1e6). Each submodule
defines its ops; this package re-exports their public functions.
"""

from __future__ import annotations

from glm45_ops.attention.flash import attention_paged, attention_varlen, merge_attn_states
from glm45_ops.attention.rope import cos_sin_cache, kv_cache_write, qk_norm_rope, qk_norm_rope_, qk_norm_rope_kv_write

__all__ = ["attention_paged", "attention_varlen", "cos_sin_cache", "kv_cache_write", "merge_attn_states",
           "qk_norm_rope", "qk_norm_rope_", "qk_norm_rope_kv_write"]
