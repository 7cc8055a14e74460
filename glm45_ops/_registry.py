"""The one mechanism: define a ``glm45::`` op, attach its implementations, choose a backend.

An :class:`Op` owns its **signature**: the schema string is parsed once
(``torch._C.parse_schema``) and every call is bound against it, so each default is written once,
in the schema, and ``check``, ``alloc``, the fake and every implementation receive the bound
arguments positionally, in schema order, with no defaults of their own.

Overloads of each op (all defined from the one schema string):

* ``torch.ops.glm45.<name>.default``: what other frameworks call ("auto"). On CUDA tensors the
  C++ kernel takes the ``CUDA`` key when ``glm45_ops._C`` registered one
  (``TORCH_LIBRARY_IMPL(glm45, CUDA, m)``), skipping Python entirely; otherwise (CPU, or no C++
  kernel) the Python composite resolves ``use_backend`` / ``$GLM45_BACKEND`` / "auto": CPU
  tensors run the torch reference, CUDA tensors the ``cuda`` implementation, else Triton.
* ``torch.ops.glm45.<name>.torch``, ``.triton`` and ``.cuda``: one backend, forced. They are real
  overloads, so a forced backend is a node of its own in a ``torch.compile`` graph (a
  thread-local set around a call inside a compiled region would be traced away), and forcing
  ``triton`` on CUDA tensors works even where the C++ kernel owns the default's CUDA key.
* ``Meta`` (every overload): ``check``, then the fake (``alloc`` unless given).

The Python API (``op(*args, backend=None, **kwargs)``, or the function :meth:`Op.api` makes)
binds and type-checks the arguments (``TypeError`` naming the argument), runs ``check``
(``ValueError`` naming it), then calls ``.default`` for "auto" or the forced backend's overload.
So the same bad input raises the same exception on every backend, eagerly and under
``torch.compile``. A backend that was asked for and is unavailable raises ``RuntimeError``.

Outputs: ``alloc(*args)`` returns an op's outputs, empty, with their final shapes, dtypes and
strides. It is the fake, and the buffer the launchers (``triton_launch``) fill; the torch
reference's results are copied into it when their strides differ, so every backend returns the
same layout. Mutation is declared in the schema (``Tensor(a!) cache``) and named again in
``mutates_args`` (checked to agree). ``autograd=(backward, setup_context)`` registers a
derivative for every overload (``torch.library.register_autograd``); an op without one raises
on backward on every backend (rather than the torch backend differentiating its reference and
the others silently giving no gradient).

Contract data: ``samples(device, gen)`` returns :class:`Sample` inputs (tagged ``"empty"`` and
``"nonfinite"`` where they test those), ``errors(device)`` :class:`ErrorInput` bad inputs, and
``compare(out, ref, args)`` the rule backends are held to against the torch reference (None:
bit-exact, NaN matching NaN); for an op that mutates arguments, ``out`` and ``ref`` are the
outputs followed by the mutated arguments (schema order). ``tests/test_contract.py`` runs every
registered op through them.

No family knowledge lives here.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

NAMESPACE = "glm45"
BACKENDS = ("auto", "cuda", "triton", "torch")
CONCRETE_BACKENDS = ("torch", "triton", "cuda")
_ENV = "GLM45_BACKEND"

_local = threading.local()
_OPS: dict[str, "Op"] = {}
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # kept alive: its destructor deregisters
_alloc_hook: Callable[[Any], None] | None = None  # testing: poison every allocated output


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
    """Thread-local default backend for every op called inside the block: the Python API, and the
    raw ``.default`` overloads wherever no C++ kernel owns the device's dispatch key. Under
    ``torch.compile``, enter it around the compiled call (it is read when tracing)."""
    _check_backend(name)
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous


@contextlib.contextmanager
def alloc_hook(hook: Callable[[Any], None] | None) -> Iterator[None]:
    """Call ``hook(outputs)`` on every output :meth:`Op.alloc` makes for a kernel inside the block
    (``glm45_ops.testing.poisoned_outputs`` fills them with garbage)."""
    global _alloc_hook
    previous, _alloc_hook = _alloc_hook, hook
    try:
        yield
    finally:
        _alloc_hook = previous


@dataclass
class Sample:
    """One input of an op for the contract tests: ``op(*args, **kwargs)``.

    ``tag``: ``""`` (ordinary), ``"empty"`` (a zero-size tensor somewhere) or ``"nonfinite"``
    (NaN/inf in the inputs, with the outputs the reference docstring defines)."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    tag: str = ""
    note: str = ""


@dataclass
class ErrorInput:
    """A bad input and the exception it must raise, on every backend and through the raw op.

    ``raw=False`` where the raw ``torch.ops`` call cannot raise our exception because the
    dispatcher rejects the argument's type first (a string for a tensor, say); ``fake=False``
    where the check needs values a fake tensor does not have (ids out of range on a CPU tensor)."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    exc: type = ValueError
    match: str = ""
    raw: bool = True
    fake: bool = True


# ---------------------------------------------------------------------------------------------
# Schema binding
# ---------------------------------------------------------------------------------------------

def _dtype_codes() -> dict[int, torch.dtype]:
    """ScalarType defaults parse to c10 codes: map them back to torch dtypes."""
    codes = {}
    for name in ("uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bool",
                 "bfloat16", "float8_e4m3fn", "float8_e5m2"):
        schema = torch._C.parse_schema(f"_probe::f(ScalarType d={name}) -> ()")
        codes[schema.arguments[0].default_value] = getattr(torch, name)
    return codes


_DTYPE_CODES = _dtype_codes()
_PY_TYPES = {"Tensor": "torch.Tensor", "int": "int", "SymInt": "int", "float": "float", "bool": "bool",
             "ScalarType": "torch.dtype", "str": "str"}


def _type_ok(value: Any, jit_type: str) -> bool:
    """Whether ``value`` fits a schema type, written as ``FunctionSchema`` argument ``real_type``s
    print (``Tensor``, ``Optional[ScalarType]``, ``List[float]``)."""
    if jit_type.startswith("Optional["):
        return value is None or _type_ok(value, jit_type[9:-1])
    if jit_type.startswith("List["):
        return isinstance(value, (list, tuple)) and all(_type_ok(v, jit_type[5:-1]) for v in value)
    if jit_type == "Tensor":
        return isinstance(value, torch.Tensor)
    if jit_type in ("int", "SymInt"):
        return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)
    if jit_type == "float":
        return isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)
    if jit_type == "bool":
        return isinstance(value, (bool, torch.SymBool))
    if jit_type == "ScalarType":
        return isinstance(value, torch.dtype)
    if jit_type == "str":
        return isinstance(value, str)
    return True  # a type we do not model: the dispatcher checks it


def _describe(jit_type: str) -> str:
    if jit_type.startswith("Optional["):
        return _describe(jit_type[9:-1]) + " or None"
    if jit_type.startswith("List["):
        return f"a list of {_describe(jit_type[5:-1])}"
    return _PY_TYPES.get(jit_type, jit_type)


@dataclass(frozen=True)
class _Arg:
    name: str
    type: str  # e.g. "Tensor", "Optional[List[float]]", "ScalarType"
    default: Any
    has_default: bool
    kwarg_only: bool
    mutated: bool


def _parse(name: str, schema: str) -> tuple[list[_Arg], int]:
    parsed = torch._C.parse_schema(f"{NAMESPACE}::{name}{schema}")
    args = []
    for a in parsed.arguments:
        default = a.default_value
        jit = str(a.real_type)
        if a.has_default_value() and "ScalarType" in jit and isinstance(default, int):
            default = _DTYPE_CODES[default]
        mutated = bool(a.alias_info and a.alias_info.is_write)
        args.append(_Arg(a.name, jit, default, a.has_default_value(), a.kwarg_only, mutated))
    return args, len(parsed.returns)


def _no_setup(ctx, inputs, output) -> None:
    """setup_context of an op without a derivative: nothing to save."""


class Op:
    """One ``torch.ops.glm45.<name>`` op with its per-backend implementations (module docstring).

    Every callable below takes the op's arguments bound positionally in schema order:

    * ``check(*args)``: raise ``ValueError`` naming the argument (types are already checked);
      runs before every implementation, the fake included.
    * ``alloc(*args)``: the outputs, empty (their shapes, dtypes, strides, device).
    * ``torch_impl(*args)``: the reference; returns the outputs.
    * ``triton_launch(outs, *args)``: fills ``alloc``'s outputs; or ``triton_impl(*args)``
      returning them (an implementation that composes several launches).
    * ``cuda_impl(*args)``: a Python ``cuda`` backend (vendor libraries through torch), used on
      CUDA tensors when ``glm45_ops._C`` has no kernel for this op.
    * ``fake(*args)``: defaults to ``alloc``.
    """

    def __init__(
        self,
        name: str,
        schema: str,
        *,
        check: Callable,
        torch_impl: Callable,
        alloc: Callable | None = None,
        fake: Callable | None = None,
        triton_launch: Callable | None = None,
        triton_impl: Callable | None = None,
        cuda_impl: Callable | None = None,
        mutates_args: tuple[str, ...] = (),
        autograd: tuple[Callable, Callable] | None = None,
        compare: Callable | None = None,
        samples: Callable | None = None,
        errors: Callable | None = None,
    ) -> None:
        if name in _OPS:
            raise RuntimeError(f"op {NAMESPACE}::{name} is defined twice")
        if fake is None and alloc is None:
            raise TypeError(f"op {name}: give alloc (the outputs, empty) or fake")
        if triton_launch is not None and (alloc is None or triton_impl is not None):
            raise TypeError(f"op {name}: triton_launch fills alloc's outputs: give alloc, and not triton_impl too")
        self.name = name
        self.qualname = f"{NAMESPACE}::{name}"
        # glm45_ops.<family> or a module of the package glm45_ops.<family>/
        module = sys._getframe(1).f_globals.get("__name__", "").split(".")
        self.family = module[1] if len(module) > 1 and module[0] == "glm45_ops" else module[-1]
        self.schema = schema
        self.args, self.num_returns = _parse(name, schema)
        self._positional = [a for a in self.args if not a.kwarg_only]
        declared = {a.name for a in self.args if a.mutated}
        if declared != set(mutates_args):
            raise TypeError(f"op {name}: mutates_args {sorted(mutates_args)} must name exactly the "
                            f"arguments the schema marks (a!): {sorted(declared)}")
        self.mutates_args = tuple(mutates_args)
        self._check = check
        self.alloc_fn = alloc
        self.fake_fn = fake or alloc
        self.impls: dict[str, Callable] = {"torch": torch_impl}
        if triton_launch is not None:
            self.impls["triton"] = self._launcher(triton_launch)
        elif triton_impl is not None:
            self.impls["triton"] = triton_impl
        if cuda_impl is not None:
            self.impls["cuda"] = cuda_impl
        self.compare = compare
        self.samples = samples
        self.errors = errors

        overloads = ["", *(f".{b}" for b in CONCRETE_BACKENDS)]
        for ov in overloads:
            _LIB.define(f"{name}{ov}{schema}")
            _LIB.impl(f"{name}{ov}", self._composite(ov[1:] or None), "CompositeExplicitAutograd")
            torch.library.register_fake(f"{self.qualname}{ov}", self._fake, lib=_LIB)
            if autograd is not None:
                backward, setup_context = autograd
                torch.library.register_autograd(f"{self.qualname}{ov}", backward,
                                                setup_context=setup_context, lib=_LIB)
            elif not mutates_args:
                # Without this, the torch backend would differentiate through its reference and
                # the others would silently give no gradient: every backend raises instead.
                torch.library.register_autograd(f"{self.qualname}{ov}", self._no_derivative,
                                                setup_context=_no_setup, lib=_LIB)
        _OPS[name] = self

    def _no_derivative(self, ctx, *grads):
        raise RuntimeError(f"{self.qualname} has no derivative: backward through it is not defined "
                           "(detach its inputs, or use an op that declares one)")

    # -- the signature ------------------------------------------------------------------------

    def bind(self, args: tuple, kwargs: dict) -> tuple:
        """All arguments in schema order, defaults filled in; ``TypeError`` for a missing,
        unknown or wrongly typed argument, naming it."""
        if len(args) > len(self._positional):
            raise TypeError(f"{self.name}() takes {len(self._positional)} positional arguments, got {len(args)}")
        values = dict(zip((a.name for a in self._positional), args))
        for key, value in kwargs.items():
            if key in values:
                raise TypeError(f"{self.name}() got multiple values for argument {key!r}")
            if not any(a.name == key for a in self.args):
                raise TypeError(f"{self.name}() got an unexpected keyword argument {key!r}")
            values[key] = value
        bound = []
        for a in self.args:
            if a.name in values:
                v = values[a.name]
            elif a.has_default:
                v = a.default
            else:
                raise TypeError(f"{self.name}() missing required argument {a.name!r}")
            if not _type_ok(v, a.type):
                raise TypeError(f"{a.name} must be {_describe(a.type)}, got {type(v).__name__}")
            bound.append(v)
        return tuple(bound)

    def check(self, *args) -> None:
        """``check`` on bound arguments (see the class docstring)."""
        self._check(*args)

    def alloc(self, *args):
        """The op's outputs for bound ``args``, empty (the fake, and the launchers' buffers)."""
        return self.fake_fn(*args)

    def api(self, doc: str) -> Callable:
        """The public Python function: the schema's signature plus ``*, backend=None``."""
        op = self

        def fn(*args, backend: str | None = None, **kwargs):
            return op(*args, backend=backend, **kwargs)

        params = []
        for a in self.args:
            kind = inspect.Parameter.KEYWORD_ONLY if a.kwarg_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
            default = a.default if a.has_default else inspect.Parameter.empty
            params.append(inspect.Parameter(a.name, kind, default=default))
        params.append(inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None))
        fn.__signature__ = inspect.Signature(params)
        fn.__name__ = fn.__qualname__ = self.name
        fn.__doc__ = doc
        fn.__module__ = sys._getframe(1).f_globals.get("__name__", __name__)
        return fn

    # -- overloads and backends ---------------------------------------------------------------

    @property
    def overload(self) -> torch._ops.OpOverload:
        """``torch.ops.glm45.<name>.default``: what other frameworks call."""
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default

    def overload_for(self, backend: str) -> torch._ops.OpOverload:
        """The overload for ``backend``: ``.default`` for "auto", else ``.torch|.triton|.cuda``."""
        _check_backend(backend)
        packet = getattr(getattr(torch.ops, NAMESPACE), self.name)
        return packet.default if backend == "auto" else getattr(packet, backend)

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
            raise RuntimeError(self.why_unavailable(backend, device))
        return backend

    def why_unavailable(self, backend: str, device: torch.device) -> str:
        """The message a request for an unavailable ``backend`` raises with."""
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

    # -- calls --------------------------------------------------------------------------------

    def __call__(self, *args, backend: str | None = None, **kwargs):
        """The Python API: bind, check, then the overload of ``backend`` (default: the
        thread-local / environment default, read here, at trace time under torch.compile)."""
        bound = self.bind(args, kwargs)
        if not torch.compiler.is_compiling():  # compiled: the fake runs check while tracing
            self._check(*bound)
        backend = _check_backend(backend or default_backend())
        if backend != "auto":
            device = _device_of(bound)
            if backend not in self.backends(device):
                raise RuntimeError(self.why_unavailable(backend, device))
        return self.overload_for(backend)(*bound)

    def _fake(self, *args, **kwargs):
        args = self.bind(args, kwargs)  # the dispatcher leaves out trailing defaults
        self._check(*args)
        return self.fake_fn(*args)

    def _launcher(self, launch: Callable) -> Callable:
        def run(*args):
            outs = self.alloc_fn(*args)
            tensors = [t for t in (outs if isinstance(outs, tuple) else (outs,)) if isinstance(t, torch.Tensor)]
            if tensors and not self.mutates_args and all(t.numel() == 0 for t in tensors):
                return outs  # nothing to write: no launch (kernels need not handle empty grids)
            if _alloc_hook is not None:
                _alloc_hook(outs)
            launch(outs, *args)
            return outs

        return run

    def _composite(self, forced: str | None) -> Callable:
        """The Python kernel of overload ``forced`` (None: the default, which resolves)."""

        def kernel(*args, **kwargs):
            args = self.bind(args, kwargs)  # the dispatcher leaves out trailing defaults
            self._check(*args)
            device = _device_of(args)
            if forced is None:
                backend = self.resolve(default_backend(), device)
            elif forced in self.backends(device):
                backend = forced
            else:
                raise RuntimeError(self.why_unavailable(forced, device))
            if backend == "cuda" and "cuda" not in self.impls:
                if forced is None:  # the C++ kernel was registered after this call was traced
                    raise RuntimeError(self.why_unavailable("cuda", device))
                return self.overload(*args)  # the C++ kernel owns the default's CUDA key
            with _device_guard(device):
                outs = self.impls[backend](*args)
            if backend == "torch" and self.alloc_fn is not None:
                outs = _into_layout(outs, self.alloc_fn(*args))
            return outs

        return kernel


def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor):
                    return t.device
    return torch.device("cpu")


def _device_guard(device: torch.device):
    """Kernels launch on the tensors' GPU, not the current one."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _into_layout(outs, like):
    """The reference's results in ``alloc``'s layout (copied only where strides differ)."""
    if isinstance(outs, torch.Tensor):
        if outs.shape != like.shape or outs.dtype != like.dtype:
            raise AssertionError(f"reference output {outs.dtype}{list(outs.shape)} vs alloc {like.dtype}{list(like.shape)}")
        return outs if outs.stride() == like.stride() or outs.numel() <= 1 else like.copy_(outs)
    if outs is None:
        return None
    return tuple(_into_layout(o, lk) for o, lk in zip(outs, like, strict=True))


def registered_ops(include_private: bool = False) -> dict[str, Op]:
    """Every op defined so far, by name (names starting with ``_`` are the registry's own test
    ops, left out unless asked for)."""
    return {n: op for n, op in _OPS.items() if include_private or not n.startswith("_")}
