"""GLM-4.5 model presets: the one place their numbers live (the model code and benchmarks use it).

Field names follow transformers' ``Glm4MoeConfig`` so a checkpoint's ``config.json`` maps onto
them directly. Sources: the released GLM-4.5 / GLM-4.5-Air configs, slime launch scripts and the
Megatron-Bridge provider (KNOWLEDGE.md §4). ``small`` is a GLM-shaped toy for CPU runs: every
linear-layer dimension a multiple of 128 so the FP8 block paths are exercised, and tiny enough for the
Triton interpreter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden_size: int
    num_hidden_layers: int
    first_k_dense_replace: int  # the first k layers use a dense MLP, the rest MoE
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP
    moe_intermediate_size: int  # per expert (routed and shared)
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    use_qk_norm: bool
    attention_bias: bool  # q, k, v biases; o_proj never has one
    partial_rotary_factor: float
    rope_theta: float
    rms_norm_eps: float
    vocab_size: int
    num_nextn_predict_layers: int  # MTP layers, stored as model.layers.{num_hidden_layers + i}

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


GLM_4_5 = ModelConfig(
    name="glm-4.5",
    hidden_size=5120,
    num_hidden_layers=92,
    first_k_dense_replace=3,
    num_attention_heads=96,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=12288,
    moe_intermediate_size=1536,
    n_routed_experts=160,
    num_experts_per_tok=8,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    use_qk_norm=True,
    attention_bias=True,
    partial_rotary_factor=0.5,
    rope_theta=1e6,
    rms_norm_eps=1e-5,
    vocab_size=151552,
    num_nextn_predict_layers=1,
)

# The variants differ from GLM-4.5 only where listed.
GLM_4_5_AIR = dataclasses.replace(
    GLM_4_5,
    name="glm-4.5-air",
    hidden_size=4096,
    num_hidden_layers=46,
    first_k_dense_replace=1,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    n_routed_experts=128,
    routed_scaling_factor=1.0,
    use_qk_norm=False,
)

SMALL = dataclasses.replace(  # CPU-sized, same structure
    GLM_4_5,
    name="small",
    hidden_size=512,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=1024,
    moe_intermediate_size=256,
    n_routed_experts=8,
    num_experts_per_tok=2,
    vocab_size=1024,
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (GLM_4_5, GLM_4_5_AIR, SMALL)}


def preset(name: str) -> ModelConfig:
    """The preset called ``name`` (``glm-4.5``, ``glm-4.5-air``, ``small``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
