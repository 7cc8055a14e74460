"""What the tests and ``glm45-bench --refcheck`` share: one metric, one equality, one poison.

* :func:`calc_diff`: DeepGEMM's similarity ``1 - 2 sum(xy) / sum(x^2 + y^2)`` (0 when equal;
  DeepGEMM holds FP8 GEMMs to < 1e-3), in float64.
* :func:`bits_differ` / :func:`assert_bit_equal`: equality of bit patterns, where any NaN matches
  any NaN (a NaN's sign and payload are not part of any op's contract) and ``-0.0 != 0.0``.
* :func:`outputs_differ`: the same over an op's (nested) outputs, or the op's own ``compare``.
* :func:`poison` / :func:`poisoned_outputs`: outputs the ops allocate start as garbage (NaN for
  floats, the e4m3 NaN byte, ``12345`` for ints), on every backend: the registry's alloc hook for
  the Python backends, and the CUDA caching allocator's free blocks for the C++ kernels, which
  allocate their outputs themselves.
* :func:`one_thread`: torch on one CPU thread (tiny ops on a shared 2-core box run faster).
* :func:`cuda_kernel_differs`: whether an op's C++ kernel refuses bad input as its Python check
  does (same exception type, same message), checked without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any, Iterator

import torch

from glm45_ops import _registry

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity metric in float64: 0 when ``x == y``, ~1e-5 for a good FP8 GEMM."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum().item()
    return 0.0 if denom == 0 else 1 - 2 * (x * y).sum().item() / denom


def bits_differ(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None if ``got`` equals ``want`` bit for bit (NaN matching NaN; strides may differ), else why."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)}"
    g, w = got.detach().cpu(), want.detach().cpu()
    if g.dtype == torch.bool:
        g, w = g.to(torch.uint8), w.to(torch.uint8)
    same = g.contiguous().view(_INT_VIEW[g.element_size()]) == w.contiguous().view(_INT_VIEW[w.element_size()])
    if g.is_floating_point():
        nan_g, nan_w = torch.isnan(g.float()), torch.isnan(w.float())
        same = (same & ~nan_g & ~nan_w) | (nan_g & nan_w)
    bad = int((~same).sum())
    if bad:
        i = int((~same).flatten().nonzero()[0, 0])
        return (f"{bad} of {g.numel()} elements differ (first at flat index {i}: "
                f"{g.flatten()[i].item()!r} vs {w.flatten()[i].item()!r})")
    return None


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    why = bits_differ(got, want)
    assert why is None, f"{what}: {why}"


def _leaves(x: Any) -> list:
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _leaves(item)]
    return [x]


def with_mutated(op: "_registry.Op", outs: Any, args: tuple) -> Any:
    """What a backend is held to: ``outs``, and for an op that mutates arguments, the outputs
    followed by those arguments (schema order; ``args`` bound by ``op.bind``), which is what its
    ``compare`` receives."""
    if not op.mutates_args:
        return outs
    return (*(o for o in _leaves(outs) if o is not None), *(v for a, v in zip(op.args, args) if a.mutated))


def outputs_differ(got: Any, want: Any, op: "_registry.Op | None" = None, args: tuple = ()) -> str | None:
    """None if ``got`` agrees with the reference outputs ``want``: by ``op.compare`` when the op
    has one (a tolerance its docstring justifies), else bit for bit, output by output."""
    if op is not None and op.compare is not None:
        return op.compare(got, want, args)
    gs, ws = _leaves(got), _leaves(want)
    if len(gs) != len(ws):
        return f"{len(gs)} outputs, reference has {len(ws)}"
    for i, (g, w) in enumerate(zip(gs, ws)):
        if isinstance(g, torch.Tensor) and isinstance(w, torch.Tensor):
            why = bits_differ(g, w)
        else:
            why = None if g == w else f"{g!r} vs {w!r}"
        if why:
            return f"output {i}: {why}"
    return None


def poison(t: Any) -> Any:
    """Fill a tensor (or every tensor of a tuple) with garbage its kernel must overwrite."""
    for x in _leaves(t):
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            continue
        if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            x.view(torch.uint8).fill_(0x7F)  # NaN in e4m3fn, and a large value in e5m2
        elif x.is_floating_point():
            x.fill_(float("nan"))
        elif x.dtype == torch.bool:
            x.fill_(True)
        else:
            x.fill_(12345)
    return t


def poison_cuda_cache(nbytes: int) -> None:
    """Leave ``nbytes`` of 0x7F garbage in the CUDA caching allocator's free blocks, so outputs a
    C++ kernel allocates right after start as garbage, not zeros."""
    if torch.cuda.is_available() and nbytes > 0:
        torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(0x7F)


@contextlib.contextmanager
def poisoned_outputs(cuda_bytes: int = 1 << 24) -> Iterator[None]:
    """Every output an op allocates inside the block starts as garbage (see the module docstring)."""
    poison_cuda_cache(cuda_bytes)
    with _registry.alloc_hook(poison):
        yield


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cuda_kernel_differs(op: "_registry.Op", args: tuple, kwargs: dict | None = None) -> str | None:
    """None if ``op``'s C++ kernel (``op.has_cuda_kernel()``) answers CPU-tensor ``args`` as its
    Python ``check`` does, else why. Called through the CUDA dispatch key, the kernel runs every
    host check before its device check: where Python raises, it must raise the same exception
    type with the same message; where Python accepts, it may only raise its device error."""
    bound = op.bind(args, kwargs or {})
    try:
        op.check(*bound)
        want = None
    except Exception as e:  # noqa: BLE001 - the type is compared
        want = e
    try:
        op.overload.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *bound)
        return "the C++ kernel ran on CPU tensors"
    except Exception as e:  # noqa: BLE001 - the type is compared
        got = e
    if want is None:
        device_errors = {f"{a.name} must be a CUDA tensor for the cuda backend, got device cpu"
                         for a in op.args if "Tensor" in a.type}
        if isinstance(got, ValueError) and str(got) in device_errors:
            return None
        return f"Python accepts; C++ raised {type(got).__name__}: {got}"
    if type(got) is type(want) and str(got) == str(want):
        return None
    return f"C++ raised {type(got).__name__}: {got}\nPython raised {type(want).__name__}: {want}"


def check_sm90a_refusal(source: Path, gencode: str, refused: bool) -> None:
    """Preprocesses the CUTLASS unit ``source`` (``csrc/<family>/<unit>.cu``, including from
    ``csrc/``) for nvcc's ``gencode``: it must stop at its "needs sm_90a, not sm_90" #error exactly
    when ``refused``. Preprocessing shows it in seconds, not the minutes and 8 GB of a build.
    Skips the calling test without nvcc, nvidia-cutlass or torch's C++ headers."""
    import pytest  # here: the package itself does not need pytest

    home = os.environ.get("CUDA_HOME")
    exe = str(Path(home) / "bin" / "nvcc") if home and (Path(home) / "bin" / "nvcc").exists() else shutil.which("nvcc")
    try:
        import cutlass_library
        from torch.utils.cpp_extension import include_paths
    except ImportError as e:
        pytest.skip(f"needs nvidia-cutlass and torch's C++ headers: {e}")
    if exe is None:
        pytest.skip("no nvcc")
    cutlass = Path(cutlass_library.__file__).parent / "source"
    incs = [*include_paths(device_type="cuda"), str(source.parents[1]), str(cutlass / "include"),
            str(cutlass / "tools" / "util" / "include"), sysconfig.get_paths()["include"]]
    cmd = [exe, "-E", "-x", "cu", "-std=c++20", "--expt-relaxed-constexpr", f"-gencode={gencode}",
           *(f"-I{i}" for i in incs), str(source), "-o", os.devnull]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if refused:
        assert run.returncode != 0 and "needs sm_90a, not sm_90" in run.stderr, run.stderr[-2000:]
    else:
        assert run.returncode == 0, run.stderr[-2000:]
