"""The GLM-4.5 reference model, assembled from ``glm45_ops`` ops (see :mod:`.modeling`).

* :class:`Glm45Config`: presets ``glm-4.5``, ``glm-4.5-air``, ``tiny``; ``from_hf_config``.
* :class:`Glm45ForCausalLM`: ``forward`` (logits), ``extend`` (paged incremental forward),
  ``generate`` (plain or MTP-speculative), ``score``, ``quantize_fp8_``, ``load_weights``,
  ``from_pretrained`` (HF safetensors, BF16 or FP8).
* ``glm45-generate``: the command-line demo and end-to-end benchmark (:func:`.generate.main`).
"""

from __future__ import annotations

from glm45_ops.model.config import Glm45Config
from glm45_ops.model.modeling import Glm45ForCausalLM, PagedKVCache

__all__ = ["Glm45Config", "Glm45ForCausalLM", "PagedKVCache"]
