"""linear_logprobs: forward against float64 unfused math (``log_softmax(hidden @ weight^T / t)``),
gradients of any weighted sum of logprobs, entropy (and the raw op's lse) against float64
autograd, gradcheck, opcheck with inputs that require grad, torch.compile through the backward,
and memory: neither the torch reference nor the Triton path ever allocates ``[T, V]``."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import glm45_ops
from conftest import cpu_backends
from glm45_ops.reference import rollout as ref
from glm45_ops.rollout import linear_logprobs
from glm45_ops.testing import calc_diff

OP = glm45_ops.registered_ops()["linear_logprobs"]


def operands(t, v, h, dtype, gen, scale=0.5):
    hidden = torch.randn(t, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * scale / math.sqrt(h) * 4).to(dtype)
    return hidden, weight, torch.randint(0, v, (t,), generator=gen)


def oracle(hidden, weight, ids, t):
    """float64 unfused (logprobs, entropy, lse) of softmax(hidden @ weight^T / t), differentiable."""
    z = (hidden.double() @ weight.double().t()) / t.double()[:, None]
    logp = z.log_softmax(dim=-1)
    p = logp.exp()
    return logp.gather(1, ids[:, None])[:, 0], -(p * logp).sum(dim=-1), z.logsumexp(dim=-1)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("v", [1000, 4099])
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per-row"])
def test_forward_against_float64(backend, dtype, v, per_row, gen):
    """Within the op's own comparison rule (compare_rows: a few ulps of each row's |x|/t scale,
    greedy rows exact), against the exact oracle."""
    hidden, weight, ids = operands(6, v, 32, dtype, gen)
    t = torch.rand(6, generator=gen) + 0.4 if per_row else torch.full((6,), 0.8)
    temp = t if per_row else 0.8
    got = OP(hidden, weight, ids, **({"temperatures": t} if per_row else {"temperature": temp}), backend=backend)
    want = tuple(o.float() for o in oracle(hidden, weight, ids, t))
    why = OP.compare(got, want, OP.bind((hidden, weight, ids), {"temperatures": t} if per_row else {"temperature": temp}))
    assert why is None, why
    lp, ent = linear_logprobs(hidden, weight, ids, temp, backend=backend)
    assert torch.equal(lp, got[0]) and torch.equal(ent, got[1])


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("triton", marks=pytest.mark.slow),  # ~600 V tiles per program in the interpreter
])
def test_glm45_vocabulary(backend, gen):
    if backend not in cpu_backends():
        pytest.skip("no Triton interpreter here")
    hidden, weight, ids = operands(3, 151552, 16, torch.bfloat16, gen)
    t = torch.tensor([1.0, 0.7, 1.0])
    got = OP(hidden, weight, ids, temperatures=t, backend=backend)
    want = tuple(o.float() for o in oracle(hidden, weight, ids, t))
    why = OP.compare(got, want, (hidden, weight, ids, 1.0, t))
    assert why is None, why


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------

def _grads(fn, hidden, weight):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    fn(h, w).backward()
    return h.grad, w.grad


def _count_triton_backward(monkeypatch) -> list:
    from triton_ops import rollout as tr

    calls = []
    real = tr.linear_logprobs_backward
    monkeypatch.setattr(tr, "linear_logprobs_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per-row"])
def test_gradients_against_float64_autograd(backend, dtype, per_row, gen, monkeypatch):
    """d/d(hidden, weight) of sum(a * logprobs + b * entropy + c * lse), random per-token a, b, c
    (a policy-gradient loss, an entropy bonus, a z-loss), against float64 autograd through the
    unfused math. The backward runs on the default backend (use_backend around it)."""
    t_rows, v, h = 7, 1000, 32
    hidden, weight, ids = operands(t_rows, v, h, dtype, gen)
    t = torch.rand(t_rows, generator=gen) + 0.4 if per_row else torch.full((t_rows,), 0.9)
    kw = {"temperatures": t} if per_row else {"temperature": 0.9}
    a, b, c = (torch.randn(t_rows, generator=gen) for _ in range(3))
    calls = _count_triton_backward(monkeypatch)

    def ours(hh, ww):
        lp, ent, lse = OP(hh, ww, ids, **kw, backend=backend)
        return (a * lp + b * ent + c * lse).sum()

    def unfused(hh, ww):
        lp, ent, lse = oracle(hh, ww, ids, t)
        return (a.double() * lp + b.double() * ent + c.double() * lse).sum()

    with glm45_ops.use_backend(backend):
        got = _grads(ours, hidden, weight)
    assert len(calls) == (backend == "triton")
    want = _grads(unfused, hidden.double(), weight.double())
    for g, w_, name in zip(got, want, ("hidden", "weight")):
        assert g.dtype == dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(g.double(), w_, rtol=1e-4, atol=1e-5 * w_.abs().max().item(), msg=name)
        else:  # bf16 gradients (and, on Triton, bf16 grad-logits): 2^-9 relative per entry
            assert calc_diff(g, w_) < 1e-4, (name, calc_diff(g, w_))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("trained", ["hidden", "weight"])
def test_one_operand_requires_grad(backend, trained, gen, monkeypatch):
    """A frozen LM head (only hidden requires grad, as with LoRA) or a frozen trunk (only
    weight): the backward op is asked for that gradient alone (the other is never computed:
    [0, H]), which matches float64 autograd; the other operand gets no .grad."""
    from glm45_ops.rollout import linear

    hidden, weight, ids = operands(6, 500, 24, torch.float32, gen)
    t = torch.rand(6, generator=gen) + 0.4
    coef = torch.randn(6, generator=gen)
    h, w = hidden.clone(), weight.clone()
    leaf = (h if trained == "hidden" else w).requires_grad_()
    results = []
    real = linear._bwd_op
    monkeypatch.setattr(linear, "_bwd_op", lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    with glm45_ops.use_backend(backend):
        lp, ent = linear_logprobs(h, w, ids, t, backend=backend)
        (coef * lp + 0.1 * ent).sum().backward()
    (grad_h, grad_w), = results
    assert (grad_w if trained == "hidden" else grad_h).shape == (0, 24)
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp64, ent64, _ = oracle(hd, wd, ids, t)
    (coef.double() * lp64 + 0.1 * ent64).sum().backward()
    want = hd.grad if trained == "hidden" else wd.grad
    torch.testing.assert_close(leaf.grad.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    assert (w if trained == "hidden" else h).grad is None


def test_gradcheck():
    """torch.autograd.gradcheck of (logprobs, entropy) w.r.t. both operands. The op computes in
    fp32 (it takes no float64), so the finite differences use a large step and tolerance."""
    gen = torch.Generator().manual_seed(3)
    hidden, weight, ids = operands(3, 24, 8, torch.float32, gen)
    t = torch.tensor([0.9, 1.3, 0.6])
    assert torch.autograd.gradcheck(
        lambda h, w: linear_logprobs(h, w, ids, t), (hidden.requires_grad_(), weight.requires_grad_()),
        eps=1e-2, atol=2e-3, rtol=2e-2, fast_mode=True,
    )


@pytest.mark.parametrize("backend", cpu_backends())
def test_greedy_rows_have_no_gradient_and_frozen_weight(backend, gen):
    hidden, weight, ids = operands(5, 300, 16, torch.float32, gen)
    t = torch.tensor([1.0, 0.0, 0.8, -1.0, 1.2])
    h = hidden.clone().requires_grad_()
    with glm45_ops.use_backend(backend):
        lp, ent = linear_logprobs(h, weight, ids, t, backend=backend)
        (lp.sum() + ent.sum()).backward()
    assert h.grad[[1, 3]].abs().max() == 0 and h.grad[[0, 2, 4]].abs().min() > 0
    keep = [0, 2, 4]
    h2 = hidden[keep].clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    lp2, ent2 = linear_logprobs(h2, w2, ids[keep], t[keep])
    (lp2.sum() + ent2.sum()).backward()
    torch.testing.assert_close(h.grad[keep], h2.grad)


def test_opcheck_with_autograd(gen):
    """opcheck (schema, autograd registration, fake, AOT dispatch incl. the backward) with
    inputs that require grad, on every overload that runs here."""
    hidden, weight, ids = operands(4, 64, 16, torch.float32, gen)
    args = (hidden.requires_grad_(), weight.requires_grad_(), ids, 1.0, torch.tensor([1.0, 0.5, 0.0, 2.0]))
    for backend in ("auto", *cpu_backends()):
        with glm45_ops.use_backend(backend):
            torch.library.opcheck(OP.overload_for(backend), args)


def test_torch_compile_forward_and_backward(gen):
    hidden, weight, ids = operands(5, 200, 16, torch.bfloat16, gen)
    coef = torch.randn(5, generator=gen)

    def loss(h, w):
        lp, ent = linear_logprobs(h, w, ids, 0.7)
        return (coef * lp).sum() + 0.01 * ent.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got, want = _grads(compiled, hidden, weight), _grads(loss, hidden, weight)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ---------------------------------------------------------------------------------------------
# Memory: no [T, V] allocation on the torch and Triton paths
# ---------------------------------------------------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that aten ops allocate inside the block: the peak of those alive at
    once, and the largest. A storage counts until the last tensor viewing it dies, so views and
    in-place results never hide memory; storages the inputs brought in are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._views: dict[int, list[int]] = {}  # storage data_ptr -> [tensors alive, nbytes]

    def _release(self, key: int) -> None:
        entry = self._views[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._views[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if key not in self._views:
                if key in inputs or nbytes == 0:
                    continue  # a view of (or in place on) memory from outside the block
                self._views[key] = [0, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, nbytes)
            self._views[key][0] += 1
            weakref.finalize(t, self._release, key)
        return out


MEM_T, MEM_V, MEM_H, CHUNK_T, CHUNK = 64, 16384, 8, 32, 512
FULL_LOGITS = MEM_T * MEM_V * 4  # fp32 [T, V]: 4 MB
WEIGHT_SIZED = MEM_V * MEM_H * 4  # grad_weight, an output: FULL_LOGITS / 8


@pytest.fixture
def mem_inputs(gen):
    hidden, weight, ids = operands(MEM_T, MEM_V, MEM_H, torch.float32, gen)
    _, ent, lse = ref.linear_logprobs_ref(hidden, weight, ids, 1.0, None)
    return hidden, weight, ids, ent, lse


def test_the_tracker_sees_unfused_logits(mem_inputs):
    """The control: the unfused math under the same tracker allocates [T, V] (and more)."""
    hidden, weight, ids, *_ = mem_inputs
    with torch.no_grad(), LiveBytes() as mem:
        oracle(hidden.float(), weight.float(), ids, torch.ones(MEM_T))
    assert mem.largest >= FULL_LOGITS and mem.peak >= 2 * FULL_LOGITS


def _paths():
    paths = ["torch"]
    if "triton" in cpu_backends():
        paths.append("triton")
    return paths


@pytest.mark.parametrize("path", _paths())
def test_forward_never_allocates_full_logits(path, mem_inputs):
    """Forward with [32, 512] reference tiles (Triton: its own tiles; it allocates only the
    per-row partial states): the peak of live allocations stays a small fraction of [T, V]."""
    hidden, weight, ids, *_ = mem_inputs
    outs = OP.alloc(hidden, weight, ids, 1.0, None)
    with torch.no_grad(), LiveBytes() as mem:
        if path == "torch":
            ref.linear_logprobs_ref(hidden, weight, ids, 1.0, None, chunk_t=CHUNK_T, chunk_v=CHUNK)
        else:
            from triton_ops import rollout as tr

            tr.linear_logprobs(hidden, weight, ids, 1.0, None, *outs)
    # torch: ~6 fp32 temporaries of a [16, 128] tile, hidden in fp32, one weight chunk in fp32
    assert mem.peak < FULL_LOGITS / 8, (mem.peak, FULL_LOGITS)
    assert mem.largest < FULL_LOGITS / 32, (mem.largest, FULL_LOGITS)


@pytest.mark.parametrize("path", _paths())
def test_backward_never_allocates_full_logits(path, mem_inputs, gen):
    """Backward in [32, 512] reference tiles (Triton: [T, 512] chunks): grad-logits of one
    tile, the fp32 accumulators of grad_hidden ([T, H]) and of one chunk of grad_weight, and the
    outputs (grad_weight is [V, H], the weight's own size, the largest)."""
    hidden, weight, ids, ent, lse = mem_inputs
    grads = tuple(torch.randn(MEM_T, generator=gen) for _ in range(3))
    args = (*grads, hidden, weight, ids, ent, lse, 1.0, None, True, True)
    with torch.no_grad(), LiveBytes() as mem:
        if path == "torch":
            ref.linear_logprobs_backward_ref(*args, chunk_t=CHUNK_T, chunk_v=CHUNK)
        else:
            from triton_ops import rollout as tr

            gh, gw = torch.empty_like(hidden), torch.empty_like(weight)
            tr.linear_logprobs_backward(*args, gh, gw, chunk_v=CHUNK)
    outputs = (MEM_T + MEM_V) * MEM_H * 4
    assert mem.peak < outputs + FULL_LOGITS / 4, (mem.peak, FULL_LOGITS)
    assert mem.largest <= WEIGHT_SIZED, (mem.largest, FULL_LOGITS)


# ---------------------------------------------------------------------------------------------
# GPU: GLM-4.5's LM head
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_glm45_head_agrees_and_stays_small():
    """Triton on an H200 at V = 151552, H = 5120: forward within the op's rule of the torch
    reference, gradients within GRAD_DIFF_LIMIT, and the forward's extra memory (beyond inputs
    and outputs) under the issue's 5% of the fp32 logits."""
    from glm45_ops.rollout.linear import compare_grads

    gen = torch.Generator(device="cuda").manual_seed(0)
    t_rows, v, h = 2048, 151552, 5120
    hidden = torch.randn(t_rows, h, generator=gen, device="cuda").bfloat16()
    weight = (torch.randn(v, h, generator=gen, device="cuda") * h ** -0.5).bfloat16()
    ids = torch.randint(0, v, (t_rows,), generator=gen, device="cuda")
    temps = torch.rand(t_rows, generator=gen, device="cuda") + 0.5
    want = OP(hidden, weight, ids, temperatures=temps, backend="torch")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = OP(hidden, weight, ids, temperatures=temps, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - 3 * t_rows * 4
    assert extra <= 0.05 * t_rows * v * 4, extra
    why = OP.compare(tuple(g.cpu() for g in got), tuple(w.cpu() for w in want),
                     (hidden.cpu(), weight.cpu(), ids.cpu(), 1.0, temps.cpu()))
    assert why is None, why
    coef = torch.randn(t_rows, generator=gen, device="cuda")
    grads = {}
    for backend in ("torch", "triton"):
        hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with glm45_ops.use_backend(backend):
            lp, ent = linear_logprobs(hh, ww, ids, temps, backend=backend)
            grads[backend] = torch.autograd.grad((coef * lp).sum() + 0.01 * ent.sum(), (hh, ww))
    why = compare_grads(grads["triton"], grads["torch"], torch.bfloat16)
    assert why is None, why
