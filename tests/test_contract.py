"""The op contract, generated from the registry: every registered op x every backend here.

Each op declares its sample inputs, bad inputs and comparison rule once (``samples``, ``errors``,
``compare`` on its :class:`glm45_ops._registry.Op`); these tests run them all, for the ops that
exist today and for every op a new family registers:

* the tables exist, with empty and non-finite samples;
* backend agreement with the torch reference on every sample (bit-exact unless the op's
  ``compare`` says otherwise), outputs poisoned first, in ``alloc``'s layout on every backend;
  each run on its own copy of the inputs, and for an op that mutates arguments the mutated
  arguments compared after the outputs;
* empty and NaN/inf samples, reported on their own;
* ``torch.library.opcheck`` of the default and the forced-backend overloads;
* ``torch.compile(fullgraph=True)`` through the Python API under "auto" and each forced backend,
  both as ``backend=`` and as ``use_backend``;
* the bad-input table through the Python API on each backend, the raw op and FakeTensorMode;
* the public function's signature agrees with the schema, and the raw op runs with only its
  required arguments (every optional argument has a schema default).

Compilation uses the ``aot_eager`` backend: it traces through Dynamo, the fakes and AOTAutograd,
which is what a custom op must survive; inductor's codegen adds seconds per op and nothing about
our ops (tests/quant and tests/gemm compile one composition each with inductor).
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import glm45_ops
from conftest import device_backends
from glm45_ops._registry import CONCRETE_BACKENDS, registered_ops
from glm45_ops.testing import outputs_differ, poison_cuda_cache, poisoned_outputs, with_mutated

OPS = registered_ops()
NAMES = sorted(OPS)
PAIRS = device_backends()
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# test_schema calls allclose on outputs, and CPU torch has no fp8 arithmetic (KNOWLEDGE.md §2)
OPCHECK_NO_SCHEMA = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _samples(name: str, device: str, tag: str | None = ""):
    op = OPS[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    return [s for s in op.samples(torch.device(device), gen) if tag is None or s.tag == tag]


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, dict):
        return _tensors(list(x.values()))
    return []


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _layout(outs):
    return [(tuple(t.shape), t.dtype, t.stride() if t.numel() > 1 else None) for t in _tensors(outs)]


def _fresh(x, device: str, memo: dict):
    """``x`` with every tensor copied onto ``device``; views of one storage stay views of one
    copy (e.g. k and v caches in one buffer), so an op that mutates its arguments runs on its own
    copy with the sample's aliasing."""
    if isinstance(x, torch.Tensor):
        st = x.untyped_storage()
        key = (st.device, st.data_ptr())
        if key not in memo:
            copy = st.clone()
            memo[key] = copy.cpu() if torch.device(device).type == "cpu" else copy.cuda(torch.device(device))
        return torch.empty(0, dtype=x.dtype, device=device).set_(memo[key], x.storage_offset(), x.shape, x.stride())
    if isinstance(x, (list, tuple)):
        return type(x)(_fresh(v, device, memo) for v in x)
    if isinstance(x, dict):
        return {k: _fresh(v, device, memo) for k, v in x.items()}
    return x


def _agree(name: str, device: str, backend: str, sample) -> None:
    op = OPS[name]
    memo: dict = {}
    ref_args, ref_kwargs = _fresh(sample.args, "cpu", memo), _fresh(sample.kwargs, "cpu", memo)
    want = op(*ref_args, backend="torch", **ref_kwargs)
    memo = {}
    args, kwargs = _fresh(sample.args, device, memo), _fresh(sample.kwargs, device, memo)
    poison_cuda_cache(1 << 24)
    with poisoned_outputs():
        got = op(*args, backend=backend, **kwargs)
    what = f"{name} [{device}/{backend}] {sample.tag or 'sample'} {sample.note}"
    got_all = with_mutated(op, got, op.bind(args, kwargs))
    want_all = with_mutated(op, want, op.bind(ref_args, ref_kwargs))
    why = outputs_differ(_to(got_all, "cpu"), want_all, op, _to(op.bind(args, kwargs), "cpu"))
    assert why is None, f"{what}: {why}"
    alloc = op.alloc(*op.bind(args, kwargs)) if op.alloc_fn is not None else None
    if alloc is not None:
        assert _layout(got) == _layout(alloc), f"{what}: outputs not in alloc's layout"


def _skip_unavailable(name: str, device: str, backend: str) -> None:
    if backend not in OPS[name].backends(torch.device(device)):
        pytest.skip(OPS[name].why_unavailable(backend, torch.device(device)))


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_op_declares_its_tables(name):
    op = OPS[name]
    assert op.samples is not None and op.errors is not None, f"{name}: give samples= and errors= (see _registry.Op)"
    tags = [s.tag for s in _samples(name, "cpu", None)]
    assert set(tags) <= {"", "empty", "nonfinite"}, tags
    for tag in ("", "empty", "nonfinite"):
        assert tag in tags, f"{name}: no sample tagged {tag!r}"
    assert op.errors(torch.device("cpu")), f"{name}: the error table is empty"


def test_every_family_module_is_imported_by_the_package():
    """A family that defines ops is imported by ``import glm45_ops`` (so torch.ops.glm45.* exist)."""
    assert {op.family for op in OPS.values()} <= set(glm45_ops.__all__)


# ---------------------------------------------------------------------------------------------
# Backend agreement, empty and non-finite inputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", ["", "empty", "nonfinite"], ids=["samples", "empty", "nonfinite"])
@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("name", NAMES)
def test_backends_agree_with_the_reference(name, device, backend, tag):
    _skip_unavailable(name, device, backend)
    for sample in _samples(name, device, tag):
        _agree(name, device, backend, sample)


# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", [(d, b) for d, b in PAIRS] + [(d, "auto") for d in sorted({d for d, _ in PAIRS})])
@pytest.mark.parametrize("name", NAMES)
def test_opcheck(name, device, backend):
    op = OPS[name]
    if backend != "auto":
        _skip_unavailable(name, device, backend)
    samples = _samples(name, device, "")[:1] + _samples(name, device, "empty")[:1]
    with glm45_ops.use_backend(backend):
        for s in samples:
            args = op.bind(s.args, s.kwargs)
            fp8 = any(t.dtype in FP8 for t in _tensors(args) + _tensors(op(*args)))
            utils = OPCHECK_NO_SCHEMA if fp8 and device == "cpu" else None
            kwargs = {} if utils is None else {"test_utils": utils}
            torch.library.opcheck(op.overload_for(backend), args, **kwargs)


@pytest.mark.parametrize("how", ["argument", "use_backend"])
@pytest.mark.parametrize("device,backend", [(d, b) for d, b in PAIRS] + [(d, "auto") for d in sorted({d for d, _ in PAIRS})])
@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_fullgraph(name, device, backend, how):
    """The Python API traces into one graph with the chosen backend's overload (a forced
    backend used to call its launcher directly, which Dynamo cannot trace), and compiled ==
    eager."""
    op = OPS[name]
    if backend != "auto":
        _skip_unavailable(name, device, backend)
    if how == "use_backend" and backend == "auto":
        pytest.skip("same as argument")
    sample = _samples(name, device, "")[0]
    torch._dynamo.reset()
    args, kwargs = _fresh(sample.args, device, memo := {}), _fresh(sample.kwargs, device, memo)

    if how == "argument":
        def fn(*a):
            return op(*a, backend=backend, **kwargs)
    else:
        def fn(*a):
            return op(*a, **kwargs)

    seen = []

    def record_then_aot_eager(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(fn, fullgraph=True, backend=record_then_aot_eager, dynamic=False)
    with glm45_ops.use_backend(backend if how == "use_backend" else "auto"):
        got = compiled(*args)
    assert op.overload_for(backend) in seen, f"the graph calls {seen}, not {op.overload_for(backend)}"
    eager_args, eager_kwargs = _fresh(sample.args, device, memo := {}), _fresh(sample.kwargs, device, memo)
    want = op(*eager_args, backend=backend, **eager_kwargs)
    got, want = with_mutated(op, got, op.bind(args, kwargs)), with_mutated(op, want, op.bind(eager_args, eager_kwargs))
    why = outputs_differ(_to(got, "cpu"), _to(want, "cpu"), op, _to(op.bind(args, kwargs), "cpu"))
    assert why is None, why


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def _raises(exc: type, match: str, fn, what: str) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is what is tested
        assert isinstance(e, exc), f"{what}: raised {type(e).__name__}: {e}, want {exc.__name__}"
        assert re.search(match, str(e)), f"{what}: message {str(e)!r} does not match {match!r}"
        return
    pytest.fail(f"{what}: did not raise {exc.__name__} matching {match!r}")


@pytest.mark.parametrize("device,backend", PAIRS + [(d, "auto") for d in sorted({d for d, _ in PAIRS})])
@pytest.mark.parametrize("name", NAMES)
def test_bad_input_through_the_api(name, device, backend):
    """The same exception type and message for the same bad input on every backend."""
    op = OPS[name]
    if backend != "auto":
        _skip_unavailable(name, device, backend)
    for e in op.errors(torch.device(device)):
        _raises(e.exc, e.match, lambda: op(*e.args, backend=backend, **e.kwargs), f"{name} {backend} {e.match}")


@pytest.mark.parametrize("device", sorted({d for d, _ in PAIRS}))
@pytest.mark.parametrize("name", NAMES)
def test_bad_input_through_the_raw_op_and_fake(name, device):
    """Frameworks call torch.ops.glm45.* directly: the same errors, eagerly (every overload that
    runs here) and under FakeTensorMode (torch.compile's tracing)."""
    op = OPS[name]
    overloads = ["auto", *(b for b in CONCRETE_BACKENDS if b in op.backends(torch.device(device)))]
    for e in op.errors(torch.device(device)):
        if not e.raw:
            continue
        for b in overloads:
            _raises(e.exc, e.match, lambda: op.overload_for(b)(*e.args, **e.kwargs), f"{name}.{b} {e.match}")
        if e.fake:
            with FakeTensorMode(allow_non_fake_inputs=True):
                _raises(e.exc, e.match, lambda: op.overload(*e.args, **e.kwargs), f"{name} fake {e.match}")


# ---------------------------------------------------------------------------------------------
# The signature
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_public_function_matches_the_schema(name):
    """The family module's public function takes the schema's arguments with the schema's
    defaults (a default restated by hand can drift), plus ``backend``."""
    op = OPS[name]
    fn = getattr(importlib.import_module(f"glm45_ops.{op.family}"), name)
    params = inspect.signature(fn).parameters
    assert "backend" in params and params["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    for a in op.args:
        if a.name not in params:
            continue  # a wrapper may compute an argument (newton_schulz's flattened coefficients)
        p = params[a.name]
        if a.has_default and p.default is not inspect.Parameter.empty:
            assert p.default == a.default or (p.default is None and a.default is None), \
                f"{name}({a.name}={p.default!r}) but the schema says {a.default!r}"


@pytest.mark.parametrize("name", NAMES)
def test_raw_op_needs_only_its_required_arguments(name):
    """``torch.ops.glm45.<op>.default`` with only the arguments that have no schema default
    (``dequant_fp8.default(q, s)`` and ``fp8_block_gemm.default(a, a_s, b, b_s)`` used to fail)."""
    op = OPS[name]
    sample = _samples(name, "cpu", "")[0]
    def with_defaults(bound):
        return tuple(a.default if a.has_default else v for a, v in zip(op.args, bound))

    raw = op.bind(_fresh(sample.args, "cpu", memo := {}), _fresh(sample.kwargs, "cpu", memo))
    got = op.overload(*(v for a, v in zip(op.args, raw) if not a.has_default))
    api = with_defaults(op.bind(_fresh(sample.args, "cpu", memo := {}), _fresh(sample.kwargs, "cpu", memo)))
    want = op(*api)
    why = outputs_differ(with_mutated(op, got, with_defaults(raw)), with_mutated(op, want, api), op, api)
    assert why is None, why
