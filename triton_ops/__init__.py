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

Interpreter versions (the GPU path is unaffected by all of this): the tests pass with triton
3.8 and 3.9, and with 3.6 under numpy < 2.4. Triton 3.6's interpreter converts loop bounds with
``int()`` of a 1-element array, which numpy >= 2.4 rejects (triton-lang/triton#9171; 3.8 has the
fix), so :func:`triton_usable` refuses the interpreter there and the Triton CPU tests skip. Two
version differences are handled in the kernels: from 3.9 on, the interpreter's loads and stores
reject non-boolean masks (``_common.as_mask``), and 3.6 lowers float ``-x`` to ``0 - x``, which
loses the sign of zero (``_common.round_to_e4m3_grid`` multiplies by -1 instead).
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


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def interpreter_defect() -> str | None:
    """Why this install's Triton interpreter cannot run our kernels, or None when it can."""
    if not HAVE_TRITON:
        return None
    import numpy

    if _major_minor(triton.__version__) < (3, 8) and _major_minor(numpy.__version__) >= (2, 4):
        return (f"the interpreter of triton {triton.__version__} fails under numpy {numpy.__version__} "
                "(int() of 1-element arrays, triton-lang/triton#9171): use triton >= 3.8 or numpy < 2.4")
    return None


def triton_usable(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device`` in this process."""
    if not HAVE_TRITON:
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and interpreting() and interpreter_defect() is None
