"""The registry itself: binding against the schema, backend choice, forced-backend overloads,
declared mutation and autograd (on two private ops defined here: no family has them yet, the
KV-cache write and the differentiable log-prob will), the device guard and the interpreter gate."""

from __future__ import annotations

import pytest
import torch

import glm45_ops
from conftest import cpu_backends
from glm45_ops import _registry, quant
from glm45_ops._registry import ErrorInput, Op, Sample


def _axpy_check(y, x, alpha):
    if y.shape != x.shape:
        raise ValueError(f"x must have y's shape {tuple(y.shape)}, got {tuple(x.shape)}")


def _axpy_torch(y, x, alpha):
    y.add_(x, alpha=alpha)


# y += alpha * x, in place: the shape of a KV-cache write (mutates an input, returns nothing)
AXPY = Op(
    "_registry_selftest_axpy_",
    "(Tensor(a!) y, Tensor x, float alpha=1.0) -> ()",
    check=_axpy_check,
    fake=lambda y, x, alpha: None,
    torch_impl=_axpy_torch,
    mutates_args=("y",),
    samples=lambda device, gen: [Sample((torch.zeros(3, device=device), torch.randn(3, generator=gen).to(device)))],
    errors=lambda device: [ErrorInput((torch.zeros(3), torch.zeros(2)), match="x must have y's shape")],
)


def _cube_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * 3 * x * x, None


def _cube_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


# x**3 with a registered derivative (and a useless scale argument: backward returns None for it)
CUBE = Op(
    "_registry_selftest_cube",
    "(Tensor x, int unused=0) -> Tensor",
    check=lambda x, unused: None,
    alloc=lambda x, unused: torch.empty_like(x),
    torch_impl=lambda x, unused: x * x * x,
    triton_impl=lambda x, unused: x * x * x,
    autograd=(_cube_backward, _cube_setup),
)


def test_private_ops_are_not_listed():
    assert "_registry_selftest_axpy_" not in glm45_ops.registered_ops()
    assert "_registry_selftest_axpy_" in glm45_ops.registered_ops(include_private=True)


# ---------------------------------------------------------------------------------------------
# Binding
# ---------------------------------------------------------------------------------------------

def test_bind_fills_schema_defaults_and_names_bad_arguments():
    op = glm45_ops.registered_ops()["dequant_fp8"]
    q, s = torch.zeros(2, 256, dtype=torch.float8_e4m3fn), torch.ones(2, 2)
    assert op.bind((q, s), {}) == (q, s, 1, 128, torch.bfloat16)
    assert op.bind((q, s), {"out_dtype": torch.float32})[-1] is torch.float32
    with pytest.raises(TypeError, match="missing required argument 'scale'"):
        op.bind((q,), {})
    with pytest.raises(TypeError, match="unexpected keyword argument 'block'"):
        op.bind((q, s), {"block": 3})
    with pytest.raises(TypeError, match="multiple values for argument 'block_m'"):
        op.bind((q, s, 1), {"block_m": 1})
    with pytest.raises(TypeError, match="takes 5 positional arguments"):
        op.bind((q, s, 1, 128, torch.float32, 0), {})
    with pytest.raises(TypeError, match="block_m must be int, got bool"):
        op.bind((q, s, True), {})
    with pytest.raises(TypeError, match="block_m must be int, got float"):
        op.bind((q, s, 1.0), {})


def test_non_tensor_raises_type_error_on_every_backend():
    """Under "auto" the dispatcher used to raise RuntimeError for a non-tensor argument."""
    for backend in (None, "auto", *cpu_backends()):
        with pytest.raises(TypeError, match="x must be torch.Tensor, got list"):
            quant.per_token_group_quant_fp8([1.0] * 128, backend=backend)


def test_mutates_args_must_match_the_schema():
    with pytest.raises(TypeError, match="must name exactly the arguments the schema marks"):
        Op("_registry_selftest_bad", "(Tensor(a!) y) -> ()", check=lambda y: None, fake=lambda y: None,
           torch_impl=lambda y: None)
    assert "_registry_selftest_bad" not in glm45_ops.registered_ops(include_private=True)


def test_public_function_signature_comes_from_the_schema():
    import inspect

    sig = inspect.signature(quant.dequant_fp8)
    assert list(sig.parameters) == ["x_q", "scale", "block_m", "block_n", "out_dtype", "backend"]
    assert sig.parameters["out_dtype"].default is torch.bfloat16 and sig.parameters["block_n"].default == 128
    assert quant.dequant_fp8.__name__ == "dequant_fp8" and "undo" in quant.dequant_fp8.__doc__


# ---------------------------------------------------------------------------------------------
# Mutation and autograd
# ---------------------------------------------------------------------------------------------

def test_declared_mutation_eager_opcheck_and_compile(gen):
    y, x = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    want = torch.add(y, x, alpha=2.5)
    AXPY(y, x, 2.5)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.library.opcheck(AXPY.overload, (torch.randn(5), torch.randn(5), 0.5))
    torch.library.opcheck(AXPY.overload_for("torch"), (torch.randn(5), torch.randn(5), 0.5))

    torch._dynamo.reset()

    def f(y, x):
        AXPY(y, x, 3.0)
        return y * 2

    y1, y2 = torch.randn(4, generator=gen), None
    y2 = y1.clone()
    x = torch.randn(4, generator=gen)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(y1, x)
    torch.testing.assert_close(out, f(y2, x), rtol=0, atol=0)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # the compiled graph wrote y in place too


@pytest.mark.parametrize("backend", ["auto", *cpu_backends()])
def test_autograd_formula_on_every_overload(gen, backend):
    x = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    y = CUBE(x, backend=backend)
    y.sum().backward()
    torch.testing.assert_close(x.grad, 3 * x.detach() ** 2)
    torch.autograd.gradcheck(lambda t: CUBE(t, backend=backend), (x.detach().requires_grad_(),))
    torch.library.opcheck(CUBE.overload_for(backend), (torch.randn(3, requires_grad=True),))


# ---------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------

def test_dispatch_and_backend_choice(monkeypatch):
    op = glm45_ops.registered_ops()["per_token_group_quant_fp8"]
    cpu = torch.device("cpu")
    assert op.resolve("auto", cpu) == "torch"
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        quant.per_token_group_quant_fp8(torch.ones(1, 128), backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        torch.ops.glm45.per_token_group_quant_fp8.cuda(torch.ones(1, 128))
    with pytest.raises(ValueError, match="backend must be one of"):
        quant.per_token_group_quant_fp8(torch.ones(1, 128), backend="fast")
    monkeypatch.setenv("GLM45_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        glm45_ops.default_backend()
    monkeypatch.setenv("GLM45_BACKEND", "auto")
    if "triton" in cpu_backends():
        calls = []
        orig = op.impls["triton"]
        monkeypatch.setitem(op.impls, "triton", lambda *a: calls.append(1) or orig(*a))
        with glm45_ops.use_backend("triton"):  # reaches the raw default overload on CPU too
            torch.ops.glm45.per_token_group_quant_fp8(torch.ones(2, 128))
        torch.ops.glm45.per_token_group_quant_fp8.triton(torch.ones(2, 128))
        quant.per_token_group_quant_fp8(torch.ones(2, 128), backend="triton")
        quant.per_token_group_quant_fp8(torch.ones(2, 128))  # auto on CPU: torch
        assert calls == [1, 1, 1]


def test_device_guard_targets_the_tensors_gpu():
    """Triton launches go to the tensors' GPU, not the current one (no GPU needed to check the
    guard the dispatcher enters)."""
    guard = _registry._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_registry._device_guard(torch.device("cpu")), torch.cuda.device)


def test_broken_interpreter_is_refused_with_its_reason(monkeypatch):
    """Triton 3.6's interpreter fails under numpy >= 2.4: on CPU the triton backend is then
    unavailable (its tests skip) and the error says why; under numpy 2.3 it runs."""
    import numpy
    import triton

    import triton_ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    assert not triton_ops.triton_usable(torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"'triton' is unavailable on cpu: the interpreter of triton 3\.6\.0 fails"):
        quant.per_token_group_quant_fp8(torch.ones(1, 128), backend="triton")
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert triton_ops.triton_usable(torch.device("cpu"))
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    assert triton_ops.triton_usable(torch.device("cpu"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_without_derivative_raises_on_backward_on_every_backend(gen, backend):
    """The same answer from every backend: before, the torch backend differentiated through its
    reference while Triton silently left x.grad None."""
    from glm45_ops.rollout import token_logprobs

    if backend not in glm45_ops.registered_ops()["token_logprobs"].backends(torch.device("cpu")):
        pytest.skip(f"{backend} unavailable here")
    logits = torch.randn(3, 50, generator=gen, requires_grad=True)
    logprobs, _ = token_logprobs(logits, torch.tensor([1, 2, 3]), backend=backend)
    with pytest.raises(RuntimeError, match="glm45::token_logprobs has no derivative"):
        logprobs.sum().backward()
    assert logits.grad is None
