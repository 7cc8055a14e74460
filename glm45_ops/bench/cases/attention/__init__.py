"""Benchmark cases of the attention family: the union of its submodules' ``cases(ctx)``.

The submodules (one per op group: the fused QK-Norm/RoPE/cache write, the flash attention
kernels) are found without being listed here, so each can land on its own.
"""

from __future__ import annotations

import importlib
import pkgutil

from glm45_ops.bench.case import BenchContext, Case


def cases(ctx: BenchContext) -> list[Case]:
    out: list[Case] = []
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not m.name.startswith("_"):
            out += importlib.import_module(f"{__name__}.{m.name}").cases(ctx)
    return out
