"""Benchmark case modules: every module in this package is a family, named by its file.

Each module exposes ``cases(ctx: BenchContext) -> list[Case]`` (see ``glm45_ops/bench/case.py``).
The families the CLI offers are the modules that exist, found without importing them, so a
family appears when its case module lands. One whose module fails to import is reported by the
CLI, never fatal, so one broken family cannot take the others down.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

# In the order a forward pass meets them; families not listed here follow alphabetically.
_ORDER = ("quant", "gemm", "moe", "attention", "speculative", "muon")


def _discover() -> dict[str, str]:
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
    return {n: f"{__name__}.{n}" for n in names}


FAMILIES: dict[str, str] = _discover()  # family -> module path


def load(family: str) -> ModuleType:
    """Import the case module of ``family``; raises ``KeyError`` for an unknown family and
    whatever the import raises for a broken one."""
    return importlib.import_module(FAMILIES[family])
