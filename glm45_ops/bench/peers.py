"""Which peer libraries this process can import (listed by the CLI and recorded in the JSON).

Case modules call the peers themselves; this only reports what was found, with versions, so a
results file says what "faster than the best peer" was measured against.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

# module -> distribution name (for the version)
PEERS = {
    "flashinfer": "flashinfer-python",
    "deep_gemm": "deep_gemm",
    "vllm": "vllm",
    "sgl_kernel": "sgl-kernel",
}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def find_peers() -> dict[str, str]:
    """``{module: "found <version>" | "not installed" | "import failed: ..."}``.

    PyPI's ``deep-gemm`` is an sdist without its kernels, so deep_gemm counts as found only when
    it imports (a source install with its compiled extension)."""
    found: dict[str, str] = {}
    for module, dist in PEERS.items():
        if importlib.util.find_spec(module) is None:
            found[module] = "not installed"
            continue
        try:
            importlib.import_module(module)
        except Exception as e:  # a peer broken in this environment is a finding, not a crash
            found[module] = f"import failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            continue
        found[module] = f"found {_version(dist)}"
    return found
