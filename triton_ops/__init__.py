"""Triton kernels and their launchers, one module per family (no torch.library here).

Launchers take validated tensors and allocated outputs from ``glm45_ops``; on CPU tensors they
run under the Triton interpreter (``TRITON_INTERPRET=1``, set before triton is imported).
"""

from __future__ import annotations

import os

import torch

try:  # triton is a runtime dependency, but a broken install must not break `import glm45_ops`
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only on machines without triton
    HAVE_TRITON = False


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (decided when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_usable(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device`` in this process."""
    if not HAVE_TRITON:
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and interpreting()
