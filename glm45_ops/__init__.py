"""glm45-ops: kernels for GLM-4.5-class MoE models, as ``torch.ops.glm45.*``.

Importing never fails for lack of a GPU, a driver or the CUDA extension: ops then run on their
Triton or torch backends (see :mod:`glm45_ops._registry`).
"""

from __future__ import annotations

from glm45_ops._registry import BACKENDS, default_backend, registered_ops, use_backend
from glm45_ops import quant  # noqa: F401  (defines the glm45:: quant ops)
from glm45_ops import gemm  # noqa: F401  (defines the glm45:: gemm ops)
from glm45_ops import muon  # noqa: F401  (defines the glm45:: muon ops)
from glm45_ops import speculative  # noqa: F401  (defines the glm45:: speculative ops)
from glm45_ops import moe  # noqa: F401  (defines the glm45:: moe ops)
from glm45_ops import attention  # noqa: F401  (defines the glm45:: attention ops)
from glm45_ops import rollout  # noqa: F401  (defines the glm45:: rollout ops)
from glm45_ops._extension import extension_error, extension_loaded
from glm45_ops._info import info

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "attention",
    "default_backend",
    "extension_error",
    "extension_loaded",
    "gemm",
    "info",
    "moe",
    "muon",
    "quant",
    "registered_ops",
    "rollout",
    "speculative",
    "use_backend",
]
