"""Build glm45-ops: pure Python, plus the CUDA extension ``glm45_ops._C`` when it can be built.

The extension is built from the sources listed in ``csrc/sources.txt`` (the one list CMake reads
too) when torch has CUDA and nvcc is found, for ``TORCH_CUDA_ARCH_LIST`` (default ``9.0a``).
``GLM45_SKIP_CUDA_BUILD=1``, a CPU-only torch, or no torch at build time (pip's build isolation)
give a pure-Python install that still runs the Triton and torch backends. Build with
``pip install --no-build-isolation`` so the build sees the installed torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _say(msg: str) -> None:
    print(f"glm45-ops setup: {msg}", file=sys.stderr)


def read_sources() -> list[str]:
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def gencode_flags(arch_list: str) -> list[str]:
    """``"9.0a;10.0+PTX"`` -> nvcc ``-gencode`` flags (the form nvcc 13 needs for wgmma)."""
    flags = []
    for arch in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX")
        suffix = "a" if num.endswith("a") else ""
        sm = num.removesuffix("a").replace(".", "") + suffix
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    return flags


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
        _say("GLM45_SKIP_CUDA_BUILD=1: pure-Python install")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _say("torch not importable at build time (use --no-build-isolation): pure-Python install")
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        _say(f"torch {torch.__version__} without CUDA or no CUDA toolkit found: pure-Python install")
        return {}
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a")
    include_dirs = [str(ROOT / "csrc"), *cutlass_include_dirs()]
    nvcc = [
        "-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "-DNDEBUG",
        # torch >= 2.14 headers need C++20; no --use_fast_math: the quantizers rely on IEEE division to be bit-exact
        *gencode_flags(arch_list),
    ]
    _say(f"building glm45_ops._C for {arch_list} with CUDA {torch.version.cuda} at {CUDA_HOME}")
    ext = CUDAExtension(
        "glm45_ops._C",
        sources=read_sources(),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": nvcc},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**cuda_extension())
