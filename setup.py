"""Build glm45-ops: pure Python, plus the CUDA extension ``glm45_ops._C`` when it can be built.

The extension is built from the sources listed in ``csrc/sources.txt`` (the one list CMake reads
too) when torch has CUDA and nvcc is found, for ``TORCH_CUDA_ARCH_LIST`` (default ``9.0a``; a
plain ``9.0`` is built as ``9.0a``, see ``resolve_arch_list``). ``GLM45_SKIP_CUDA_BUILD=1``, a
CPU-only torch, or no torch at build time (pip's build isolation) give a pure-Python install that
still runs the Triton and torch backends. Build with ``pip install --no-build-isolation`` so the
build sees the installed torch. MANIFEST.in puts every build input in the sdist, whether or not
the machine that made it had torch.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# One TORCH_CUDA_ARCH_LIST entry: 9.0, 9.0a (arch-specific), 10.0f (family), each optionally +PTX.
_ARCH = re.compile(r"(?P<num>\d+\.\d+)(?P<suffix>[af]?)(?P<ptx>\+PTX)?")


def _say(msg: str) -> None:
    print(f"glm45-ops setup: {msg}", file=sys.stderr)


def read_sources() -> list[str]:
    listing = ROOT / "csrc" / "sources.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} is missing: this source tree or sdist is incomplete")
    lines = listing.read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def resolve_arch_list(arch_list: str) -> tuple[list[str], list[str]]:
    """``TORCH_CUDA_ARCH_LIST`` -> (the archs to build, the entries that were changed).

    ``9.0`` (and ``9.0+PTX``, common in container images) is built as ``9.0a``: CUTLASS compiles
    the body of its sm90 TMA/wgmma kernels only for the arch-specific target, so a plain sm_90
    build gives an FP8 GEMM that prints a message and returns, leaving its output uninitialised,
    on the very GPU the runtime check accepts. ``9.0a`` code runs on every sm_90 GPU, so nothing
    a ``9.0`` build could run on is lost. Named archs (``Hopper``) are refused: say the number.
    """
    archs: list[str] = []
    changed: list[str] = []
    for entry in re.split(r"[;,\s]+", arch_list.strip()):
        if not entry:
            continue
        m = _ARCH.fullmatch(entry)
        if m is None:
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST: {entry!r} is not an arch like 9.0a, 9.0+PTX or 10.0f "
                f"(in {arch_list!r})"
            )
        if m["num"] == "9.0" and not m["suffix"]:
            changed.append(entry)
            entry = "9.0a" + (m["ptx"] or "")
        if entry not in archs:
            archs.append(entry)
    if not archs:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST: no arch in {arch_list!r}")
    return archs, changed


def gencode_flags(archs: list[str]) -> list[str]:
    """``["9.0a", "10.0+PTX"]`` -> nvcc ``-gencode`` flags (the form nvcc 13 needs for wgmma)."""
    flags: list[str] = []
    for arch in archs:
        m = _ARCH.fullmatch(arch)
        if m is None:
            raise ValueError(f"gencode_flags: {arch!r} is not an arch like 9.0a (use resolve_arch_list)")
        sm = m["num"].replace(".", "") + m["suffix"]
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if m["ptx"]:
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    return list(dict.fromkeys(flags))


def cutlass_include_dirs() -> list[str]:
    """CUTLASS/CuTe headers from the ``nvidia-cutlass`` wheel (no submodule, no download)."""
    try:
        import cutlass_library
    except ImportError:
        _say("nvidia-cutlass not installed: CUTLASS kernels cannot build (pip install nvidia-cutlass)")
        return []
    base = Path(cutlass_library.__file__).parent / "source"
    return [str(base / "include"), str(base / "tools" / "util" / "include")]


def cuda_extension() -> dict:
    if os.environ.get("GLM45_SKIP_CUDA_BUILD", "0") == "1":
        _say("GLM45_SKIP_CUDA_BUILD=1: no CUDA extension, pure-Python install")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        # Harmless for an sdist (MANIFEST.in lists csrc/); an install needs --no-build-isolation.
        _say("torch not importable here (pip's build isolation?): no CUDA extension, pure-Python install")
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        _say(f"torch {torch.__version__} without CUDA or no CUDA toolkit found: pure-Python install")
        return {}
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a")
    archs, changed = resolve_arch_list(requested)
    include_dirs = [str(ROOT / "csrc"), *cutlass_include_dirs()]
    nvcc = [
        "-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "-DNDEBUG",
        # torch >= 2.14 headers need C++20; no --use_fast_math: the quantizers rely on IEEE division to be bit-exact
        # (torch adds no arch flags of its own once these -gencode flags are present)
        *gencode_flags(archs),
    ]
    mapped = (
        f" (TORCH_CUDA_ARCH_LIST={requested}: 9.0 mapped to 9.0a, since CUTLASS's sm90 kernels "
        "compile to an empty body without the arch-specific target)"
        if changed else ""
    )
    _say(f"building glm45_ops._C for {';'.join(archs)}{mapped} with CUDA {torch.version.cuda} at {CUDA_HOME}")
    ext = CUDAExtension(
        "glm45_ops._C",
        sources=read_sources(),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": nvcc},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


# setuptools runs this file as __main__; tests/test_install.py imports it for the functions above.
if __name__ == "__main__":
    setup(**cuda_extension())
