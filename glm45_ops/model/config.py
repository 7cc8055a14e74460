"""``Glm45Config``: the reference model's configuration, its presets and ``config.json`` parsing.

The shape fields are :class:`glm45_ops.config.ModelConfig`'s (named as transformers'
``Glm4MoeConfig``); this adds what only a runnable model needs (context length, tied embeddings,
token ids). Presets: ``glm-4.5`` and ``glm-4.5-air`` (KNOWLEDGE.md §4) and ``tiny``, a random-weight
toy that runs anywhere: every weight dimension a multiple of 128 so the FP8 block paths (and the
fused q/k/v and gate/up scale grids) are exercised, and small enough for the Triton interpreter.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from glm45_ops.config import GLM_4_5, GLM_4_5_AIR, ModelConfig

__all__ = ["Glm45Config"]


@dataclass(frozen=True)
class Glm45Config(ModelConfig):
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the rest pass through): 64 of 128 for GLM-4.5."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def preset(cls, name: str) -> "Glm45Config":
        """``glm-4.5``, ``glm-4.5-air`` or ``tiny``."""
        try:
            return _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}") from None

    @classmethod
    def from_hf_config(cls, config: str | os.PathLike | Mapping[str, Any]) -> "Glm45Config":
        """From a checkpoint's ``config.json`` (a path to the file or its directory, or the parsed
        dict, or a transformers ``Glm4MoeConfig``).

        Both layouts are accepted: transformers >= 5's ``rope_parameters: {rope_theta,
        partial_rotary_factor}``, and the released checkpoints' top-level ``rope_theta`` /
        ``partial_rotary_factor``; the MTP layer count is ``num_nextn_predict_layers`` (released)
        or ``num_mtp_layers`` (transformers 5). A missing required field raises ValueError naming it.
        """
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                config = json.load(f)
        c = dict(config)
        rope = dict(c.get("rope_parameters") or {})
        if (rope.get("rope_type") or "default") != "default":
            raise ValueError(f"rope_parameters.rope_type must be 'default' (plain RoPE), got {rope['rope_type']!r}")

        def get(name: str, *alts: str, default: Any = _REQUIRED) -> Any:
            for key in (name, *alts):
                if c.get(key) is not None:
                    return c[key]
                if rope.get(key) is not None:
                    return rope[key]
            if default is _REQUIRED:
                raise ValueError(f"config lacks {name!r}")
            return default

        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        eos = get("eos_token_id", default=None)
        return cls(
            name=str(get("_name_or_path", "name_or_path", default="") or "hf"),
            hidden_size=hidden,
            num_hidden_layers=get("num_hidden_layers"),
            first_k_dense_replace=get("first_k_dense_replace", default=0),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", default=heads),
            head_dim=get("head_dim", default=hidden // heads),
            intermediate_size=get("intermediate_size"),
            moe_intermediate_size=get("moe_intermediate_size"),
            n_routed_experts=get("n_routed_experts", "num_local_experts"),
            num_experts_per_tok=get("num_experts_per_tok"),
            n_shared_experts=get("n_shared_experts", default=0),
            n_group=get("n_group", default=1),
            topk_group=get("topk_group", default=1),
            norm_topk_prob=bool(get("norm_topk_prob", default=True)),
            routed_scaling_factor=float(get("routed_scaling_factor", default=1.0)),
            use_qk_norm=bool(get("use_qk_norm", default=False)),
            attention_bias=bool(get("attention_bias", default=False)),
            partial_rotary_factor=float(get("partial_rotary_factor", default=1.0)),
            rope_theta=float(get("rope_theta", default=10000.0)),
            rms_norm_eps=float(get("rms_norm_eps", default=1e-5)),
            vocab_size=get("vocab_size"),
            num_nextn_predict_layers=get("num_nextn_predict_layers", "num_mtp_layers", default=0),
            max_position_embeddings=get("max_position_embeddings", default=131072),
            tie_word_embeddings=bool(get("tie_word_embeddings", default=False)),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=get("pad_token_id", default=None),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` of a transformers ``Glm4MoeForCausalLM`` with these shapes (the
        released checkpoints' top-level layout, which :meth:`from_hf_config` and transformers both read)."""
        d = dataclasses.asdict(self)
        d.pop("name")
        d["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d.update(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", hidden_act="silu")
        return d


_REQUIRED = object()

_PRESETS: dict[str, Glm45Config] = {
    "glm-4.5": Glm45Config(**dataclasses.asdict(GLM_4_5), eos_token_id=(151329, 151336, 151338),
                           pad_token_id=151329),
    "glm-4.5-air": Glm45Config(**dataclasses.asdict(GLM_4_5_AIR), eos_token_id=(151329, 151336, 151338),
                               pad_token_id=151329),
    # GLM-4.5's structure (QK-Norm, partial rotary 0.5, factor 2.5, a dense first layer, MTP) at toy size.
    "tiny": Glm45Config(**{**dataclasses.asdict(GLM_4_5), **dict(
        name="tiny", hidden_size=256, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=8,
        num_experts_per_tok=2, vocab_size=512)}, max_position_embeddings=4096),
}
