"""Triton kernels and their launchers, one module per family (no torch.library here).

Launchers take validated tensors and allocated outputs from ``glm45_ops``; on CPU tensors they
run under the Triton interpreter (``TRITON_INTERPRET=1``, set before triton is imported).

Each family module also lists its kernels' default GPU configurations as ``COMPILE_SPECS``, a
list of :class:`CompileSpec`. ``glm45-bench compile-report`` compiles every one for sm_90a
(no GPU needed) and reports registers, spills, shared memory, wgmma and IEEE division::

    COMPILE_SPECS = [
        CompileSpec(
            label="bf16 ue8m0",                       # what distinguishes this configuration
            kernel=_my_kernel,                        # the @triton.jit function
            signature={"x_ptr": "*bf16", "n": "i32", "eps": "fp32", "BLOCK": "constexpr"},
            constexprs={"BLOCK": 128},                # values of every "constexpr" entry
            options={"num_warps": 4, "num_stages": 3},
            aligned=("x_row_stride",),                # int args the launcher sees as multiples of 16
        ),
    ]

``signature`` names every kernel argument in order: pointers as ``*bf16``, ``*fp16``, ``*fp32``,
``*fp8e4nv``, ``*i32``...; scalars ``i32``, ``i64``, ``fp32``; ``constexpr`` for constexpr
arguments *and* for int arguments the launcher passes as 1 (Triton's JIT specializes those to
constants, so compile them that way). Pointers are assumed 16-byte aligned and the ``aligned``
ints divisible by 16, as the JIT specializes them for typical calls; this decides vectorization.
Match what the launcher passes on the GPU (``interpreting()`` False), at the shapes that matter.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

try:  # triton is a runtime dependency, but a broken install must not break `import glm45_ops`
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only on machines without triton
    HAVE_TRITON = False


class CompileSpec(NamedTuple):
    """One default GPU configuration of a Triton kernel (see the module docstring)."""

    label: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any]
    aligned: tuple[str, ...] = ()


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
