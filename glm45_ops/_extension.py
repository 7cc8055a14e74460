"""Loads ``glm45_ops._C`` (the CUDA/CUTLASS kernels) after the Python schemas exist.

The extension only adds ``TORCH_LIBRARY_IMPL(glm45, CUDA, m)`` kernels for schemas defined in
the family modules. Missing it is normal on CPU-only installs; it is reported by ``info()`` and,
where a GPU is present, with a warning, never by an import error.
"""

from __future__ import annotations

import os
import warnings

_error: str | None = None

if os.environ.get("GLM45_BACKEND", "").strip().lower() in ("triton", "torch"):
    _error = "not loaded: GLM45_BACKEND selects a Python backend for the whole process"
else:
    try:
        import importlib.util

        if importlib.util.find_spec("glm45_ops._C") is None:
            raise ImportError("glm45_ops._C is not built (CPU-only torch or GLM45_SKIP_CUDA_BUILD=1)")
        from glm45_ops import _C  # noqa: F401
    except (ImportError, OSError) as e:
        _error = str(e)
        import torch

        if torch.cuda.is_available():
            warnings.warn(
                f"glm45_ops._C did not load ({_error}); CUDA ops fall back to Triton", stacklevel=2
            )


def extension_loaded() -> bool:
    """Whether the CUDA extension is loaded in this process."""
    return _error is None


def extension_error() -> str | None:
    """Why the extension is not loaded, or None."""
    return _error
