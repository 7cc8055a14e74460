"""The one mechanism: define a ``glm45::`` op, attach its implementations, choose a backend.

Every op is a ``torch.library.custom_op`` whose schema is written once, in its family module.
Dispatch keys:

* ``CompositeExplicitAutograd`` (so CPU, and CUDA when no C++ kernel exists): :meth:`Op._dispatch`,
  which resolves the backend (``use_backend`` / ``GLM45_BACKEND`` / ``"auto"``) and runs the
  torch reference or the Triton kernel.
* ``CUDA``: the C++ kernel when ``glm45_ops._C`` registers one with
  ``TORCH_LIBRARY_IMPL(glm45, CUDA, m)``; a backend-key kernel takes precedence over the composite
  one, so hot ops skip Python entirely. An op whose CUDA backend is vendor-library calls through
  torch (cuBLAS with fused epilogues, say) passes it as ``cuda_impl``, a Python function that
  serves the ``cuda`` backend when no C++ kernel is registered.
* ``Meta``: the fake, after the same argument checks as every other path.

``backend="auto"`` picks: CPU tensors -> ``torch``; CUDA tensors -> ``cuda`` if a C++ kernel is
registered or a ``cuda_impl`` given, else ``triton``. Every backend of an op is held to the same
numerics (bit-exact where the op's docstring says so), so "auto" never changes results. A backend
that was asked for and is unavailable raises instead of falling back.

No family knowledge lives here.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator

import torch

NAMESPACE = "glm45"
BACKENDS = ("auto", "cuda", "triton", "torch")
_ENV = "GLM45_BACKEND"

_local = threading.local()
_OPS: dict[str, "Op"] = {}


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def default_backend() -> str:
    """The backend used when none is given: ``use_backend`` override, else ``$GLM45_BACKEND``."""
    override = getattr(_local, "backend", None)
    if override is not None:
        return override
    return _check_backend(os.environ.get(_ENV, "auto").strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Thread-local default backend for every op called inside the block (ops and Python API)."""
    _check_backend(name)
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous


def _first_tensor(args) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            t = _first_tensor(a)
            if t is not None:
                return t
    return None


class Op:
    """One ``torch.ops.glm45.<name>`` op with its per-backend implementations.

    ``check(*args, **kwargs)`` validates arguments (raising ``ValueError`` naming the argument) and
    runs before every implementation, the fake included, so bad input fails the same way eagerly
    and under ``torch.compile``. ``torch_impl``/``triton_impl`` take the op's arguments (with the
    schema's defaults) and return its outputs; ``fake`` returns empty outputs of the right
    shape, dtype and strides. ``cuda_impl`` (optional, same signature) is the ``cuda`` backend
    on CUDA tensors when ``glm45_ops._C`` has no kernel for this op.
    """

    def __init__(
        self,
        name: str,
        schema: str,
        *,
        torch_impl: Callable,
        fake: Callable,
        check: Callable,
        triton_impl: Callable | None = None,
        cuda_impl: Callable | None = None,
    ) -> None:
        if name in _OPS:
            raise RuntimeError(f"op {NAMESPACE}::{name} is defined twice")
        self.name = name
        self.qualname = f"{NAMESPACE}::{name}"
        self.check = check
        self.impls: dict[str, Callable] = {"torch": torch_impl}
        if triton_impl is not None:
            self.impls["triton"] = triton_impl
        if cuda_impl is not None:
            self.impls["cuda"] = cuda_impl
        self._custom_op = torch.library.custom_op(
            self.qualname, self._dispatch, mutates_args=(), schema=schema
        )

        def _fake(*args, **kwargs):
            check(*args, **kwargs)
            return fake(*args, **kwargs)

        self._custom_op.register_fake(_fake)
        _OPS[name] = self

    @property
    def overload(self) -> torch._ops.OpOverload:
        """``torch.ops.glm45.<name>.default``: what other frameworks call."""
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default

    def has_cuda_kernel(self) -> bool:
        """Whether ``glm45_ops._C`` registered a C++ kernel for this op's CUDA key."""
        return torch._C._dispatch_has_kernel_for_dispatch_key(self.qualname, "CUDA")

    def backends(self, device: torch.device) -> list[str]:
        """The concrete backends that can run this op on ``device`` in this process."""
        from triton_ops import triton_usable

        out = ["torch"]
        if "triton" in self.impls and triton_usable(device):
            out.append("triton")
        if device.type == "cuda" and (self.has_cuda_kernel() or "cuda" in self.impls):
            out.append("cuda")
        return out

    def resolve(self, backend: str, device: torch.device) -> str:
        """Map ``backend`` (maybe "auto") to a concrete backend for ``device``, or raise."""
        _check_backend(backend)
        if backend == "auto":
            if device.type != "cuda":
                return "torch"
            if self.has_cuda_kernel() or "cuda" in self.impls:
                return "cuda"
            return "triton" if "triton" in self.backends(device) else "torch"
        if backend not in self.backends(device):
            raise RuntimeError(self._unavailable(backend, device))
        return backend

    def _unavailable(self, backend: str, device: torch.device) -> str:
        from triton_ops import interpreter_defect, interpreting

        defect = interpreter_defect() if device.type == "cpu" and interpreting() else None
        why = {
            "cuda": "it needs CUDA tensors"
            + ("" if "cuda" in self.impls else " and the glm45_ops._C extension built with this op's kernel"),
            "triton": (defect or "it needs triton, and CUDA tensors or TRITON_INTERPRET=1 for CPU tensors")
            if "triton" in self.impls
            else "this op has no Triton kernel",
        }.get(backend, "")
        return f"{self.qualname}: backend {backend!r} is unavailable on {device}: {why}"

    def _dispatch(self, *args, **kwargs):
        # Runs for every device without a backend-specific kernel (the C++ CUDA kernel, when
        # built, takes the CUDA key before this is reached).
        self.check(*args, **kwargs)
        t = _first_tensor(args)
        device = t.device if t is not None else torch.device("cpu")
        backend = self.resolve(default_backend(), device)
        if backend == "cuda" and "cuda" not in self.impls:
            # only reachable when the C++ kernel was registered after tracing
            raise RuntimeError(self._unavailable("cuda", device))
        return self.impls[backend](*args, **kwargs)

    def __call__(self, *args, backend: str | None = None, **kwargs):
        """The Python API's entry: ``"auto"`` goes through the dispatcher (traceable by
        ``torch.compile``); a forced backend calls that implementation directly (eager: tests
        and benchmarks), after the same checks."""
        backend = _check_backend(backend or default_backend())
        if backend == "auto":
            return self.overload(*args, **kwargs)
        t = _first_tensor(args)
        device = t.device if t is not None else torch.device("cpu")
        concrete = self.resolve(backend, device)
        if concrete == "cuda" and self.has_cuda_kernel():
            return self.overload(*args, **kwargs)
        self.check(*args, **kwargs)
        return self.impls[concrete](*args, **kwargs)


def registered_ops() -> dict[str, Op]:
    """Every op defined so far, by name."""
    return dict(_OPS)
