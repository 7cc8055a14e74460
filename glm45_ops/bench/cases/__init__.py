"""Registry of benchmark case modules: family name -> module path, imported lazily.

Each module exposes ``cases(ctx: BenchContext) -> list[Case]`` (see ``glm45_ops/bench/case.py``).
A family whose module is missing or fails to import is reported by the CLI, never fatal, so one
broken family cannot take the others down. Add a family by adding its line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES: dict[str, str] = {
    "quant": "glm45_ops.bench.cases.quant",
    "gemm": "glm45_ops.bench.cases.gemm",
    "moe": "glm45_ops.bench.cases.moe",
    "attention": "glm45_ops.bench.cases.attention",
    "speculative": "glm45_ops.bench.cases.speculative",
    "muon": "glm45_ops.bench.cases.muon",
}


def load(family: str) -> ModuleType:
    """Import the case module of ``family``; raises ``KeyError`` for an unknown family and
    whatever the import raises for a broken one."""
    return importlib.import_module(FAMILIES[family])
