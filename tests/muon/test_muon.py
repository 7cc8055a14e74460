"""Muon: Newton-Schulz against torch.optim.Muon's routine and a float64 iteration, Triton kernels
under the interpreter, the optimizer against torch.optim.Muon (bf16 included), expert stacks,
param groups, state_dict, distributed (gloo, 2 and 4 processes, FSDP2). opcheck, torch.compile
of the op (under each forced backend), the bad-input table, empty and non-finite samples are the generic contract tests
(tests/test_contract.py, tables in glm45_ops/muon.py)."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

from conftest import cpu_backends, device_backends, run_processes
from glm45_ops import muon
from glm45_ops.reference.muon import PRESETS, newton_schulz_ref, ns_schedule
from glm45_ops.testing import assert_bit_equal, one_thread, poison

KJ = PRESETS["kellerjordan"].coefficients[0]
BACKENDS = device_backends()
# Small shapes: the Triton interpreter costs ~0.1 s per launch here, 15 launches per NS.
SHAPES = [(64, 64), (40, 96), (96, 40), (100, 300), (3, 40, 56)]

# Backends vs the reference: the op's own rule (muon.NS_ATOL per entry, muon.NS_REL in
# Frobenius norm; justified where they are defined). "At least as accurate as torch's routine":
# the same arithmetic up to rounding noise, which moves the Frobenius-relative error against
# float64 (~1.5%) by well under 1% of itself.
ACCURACY_SLACK = 1.01


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny bf16 matmuls: on a shared 2-core box torch's thread pool turns 0.1 ms into 10 ms per
    call under contention. One thread keeps this file fast (and its workers: see _dist_worker)."""
    with one_thread():
        yield


def ns_ref(G: torch.Tensor, steps: int = 5, coefficients=None, **kwargs) -> torch.Tensor:
    """The reference with torch.optim.Muon's eps and the schedule's own norm scale."""
    return newton_schulz_ref(G, steps, coefficients, 1e-7, None, **kwargs)


def assert_close_to_ref(got: torch.Tensor, ref: torch.Tensor) -> None:
    why = muon._ns_op.compare(got.cpu(), ref, ())
    assert why is None, why


def rel_err(x: torch.Tensor, want: torch.Tensor) -> float:
    return ((x.double().cpu() - want.double().cpu()).norm() / want.double().cpu().norm()).item()


def torch_routine(G: torch.Tensor) -> torch.Tensor:
    """torch.optim.Muon's own bf16 NS (KellerJordan, 5 steps), one matrix at a time (on copies:
    it normalises a bf16 input in place)."""
    out = [torch_ns(g.clone(), KJ, 5, 1e-7).float() for g in G.reshape(-1, *G.shape[-2:])]
    return torch.stack(out).reshape(G.shape)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 64), (40, 96), (96, 40), (100, 300), (300, 100), (1, 7)])
@pytest.mark.parametrize("coefficients", [None, (3.0, -3.2, 1.2)])
def test_reference_is_torch_muon_routine(gen, shape, coefficients):
    """For 2-D G and one triple, the reference is torch.optim.Muon's routine bit for bit."""
    G = torch.randn(shape, generator=gen)
    want = torch_ns(G, coefficients or KJ, 5, 1e-7)
    got = muon.newton_schulz(G, 5, coefficients, backend="torch")
    assert got.dtype == G.dtype and got.shape == G.shape and got.is_contiguous()
    torch.testing.assert_close(got, want.float(), rtol=0, atol=0)


def test_reference_batched_is_a_loop_over_matrices(gen):
    G = torch.randn(2, 3, 30, 20, generator=gen)
    loop = torch.stack([ns_ref(g) for g in G.reshape(-1, 30, 20)]).reshape(G.shape)
    torch.testing.assert_close(ns_ref(G), loop, rtol=0, atol=0)


def test_reference_converges_to_the_polar_factor(gen):
    """In float64 with enough steps the iteration drives singular values into KellerJordan's band
    (~[0.7, 1.2]) and Polar Express's tighter one, with U V^T's singular vectors."""
    G = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(G, full_matrices=False)
    for name, lo, hi in (("kellerjordan", 0.6, 1.25), ("polar_express", 0.85, 1.15)):
        X = ns_ref(G.float(), 8, name, compute_dtype=torch.float64).double()
        sv = torch.linalg.svdvals(X)
        assert lo < sv.min() and sv.max() < hi, (name, sv)
        # X = U f(S) V^T: projecting onto G's singular vectors leaves a diagonal
        d = u.T @ X @ vh.T
        assert (d - torch.diag(torch.diagonal(d))).abs().max() < 1e-6


def test_schedules_and_presets():
    assert ns_schedule(None, 3) == ([KJ] * 3, 1.0)
    pe = PRESETS["polar_express"]
    assert ns_schedule("polar_express", 5) == (list(pe.coefficients), 1.02)
    assert ns_schedule("polar_express", 7)[0][5:] == [pe.coefficients[-1]] * 2  # last one repeats
    assert ns_schedule("polar_express", 2)[0] == list(pe.coefficients[:2])
    assert ns_schedule([(1, 2, 3), (4, 5, 6)], 3)[0] == [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0), (4.0, 5.0, 6.0)]
    assert ns_schedule([1, 2, 3, 4, 5, 6], 2)[0] == [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)]
    for bad in ("newton", [1.0, 2.0], [(1, 2), (3, 4)], [], [(1, 2, 3), 4], [(1, 2, float("inf"))]):
        with pytest.raises(ValueError, match="coefficients"):
            ns_schedule(bad, 5)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        ns_schedule(None, 0)


def test_polar_express_scales_the_norm_by_1_02(gen):
    G = torch.randn(20, 30, generator=gen)
    ones = [(1.0, 0.0, 0.0)]  # X -> X: the output is the normalised input
    X = muon.newton_schulz(G, 1, ones, norm_scale=1.02)
    assert abs(X.double().norm().item() - 1 / 1.02) < 4e-3
    explicit = muon.newton_schulz(G, 5, list(PRESETS["polar_express"].coefficients), norm_scale=1.02)
    torch.testing.assert_close(muon.newton_schulz(G, 5, "polar_express"), explicit, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Backends: accuracy against float64, agreement with the reference
# ---------------------------------------------------------------------------------------------

def _backend_ns(device, backend):
    """NS through one backend; "cublas" runs the cuda backend's cuBLAS-through-torch path on the
    CPU (the same library calls, so its buffer handling is tested without a GPU)."""
    if backend == "cublas":
        return lambda G, *a: muon._ns_cublas(G, *a)
    return lambda G, *a: muon._ns_op(G, *a, backend=backend)


NS_BACKENDS = BACKENDS + [("cpu", "cublas")]


@pytest.mark.parametrize("device,backend", NS_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_at_least_as_accurate_as_torch_muon(gen, device, backend, shape):
    G = torch.randn(shape, generator=gen)
    flat = [v for t in [KJ] * 5 for v in t]
    exact = ns_ref(G, compute_dtype=torch.float64)
    got = _backend_ns(device, backend)(G.to(device), 5, flat, 1e-7, 1.0)
    assert got.shape == G.shape and got.dtype == G.dtype and got.is_contiguous()
    assert rel_err(got, exact) <= ACCURACY_SLACK * rel_err(torch_routine(G), exact)
    assert_close_to_ref(got, ns_ref(G))


@pytest.mark.parametrize("device,backend", NS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtypes_layouts_and_polar_express(gen, device, backend, dtype):
    """Non-contiguous, 4-D, every input dtype, Polar Express (a schedule torch's routine cannot
    run: its accuracy yardstick is the reference, which is torch's arithmetic)."""
    G = torch.randn(1, 2, 20, 36, generator=gen).to(dtype).transpose(-1, -2)  # tall view of wide data
    triples, scale = ns_schedule("polar_express", 5)
    flat = [v for t in triples for v in t]
    got = _backend_ns(device, backend)(G.to(device), 5, flat, 1e-7, scale)
    ref = ns_ref(G, 5, "polar_express")
    assert got.dtype == dtype and got.shape == G.shape and got.is_contiguous()
    exact = ns_ref(G, 5, "polar_express", compute_dtype=torch.float64)
    assert rel_err(got, exact) <= ACCURACY_SLACK * rel_err(ref, exact)
    assert_close_to_ref(got, ref)


def test_cublas_path_on_the_op_samples():
    """The cuda backend's cuBLAS-through-torch loop, run on the CPU over the op's contract samples
    (zero, NaN, inf, empty, views, schedules): the contract tests cannot reach it without a GPU."""
    for sample in muon._ns_op.samples(torch.device("cpu"), torch.Generator().manual_seed(0)):
        args = muon._ns_op.bind(sample.args, sample.kwargs)
        got = muon._ns_cublas(*args)
        assert got.is_contiguous()
        why = muon._ns_op.compare(got, newton_schulz_ref(*args), args)
        assert why is None, f"{sample.tag} {sample.note}: {why}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(2, 1536, 5120), (5120, 1536), (8192, 8192)])
def test_gpu_glm_shapes(backend, shape):
    """GLM-4.5 expert matrices and Flash-Muon's 8192^2: as accurate as torch's routine on the
    same GPU against float64, and close to the reference (many tiles, full-size K loops)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    G = torch.randn(shape, generator=gen, device="cuda").bfloat16()
    got = muon.newton_schulz(G, backend=backend)
    exact = ns_ref(G, compute_dtype=torch.float64)
    assert rel_err(got, exact) <= ACCURACY_SLACK * rel_err(torch_routine(G), exact)
    assert rel_err(got, muon.newton_schulz(G, backend="torch")) < muon.NS_REL


def _poison(shape):
    return poison(torch.empty(shape, dtype=torch.bfloat16))


@pytest.mark.parametrize("m,k", [(70, 45), (32, 200), (5, 9)])
def test_triton_sym_gram_kernel(gen, monkeypatch, m, k):
    """Upper tiles computed, lower ones mirrored: every element written (NaN poison), the result
    exactly symmetric, equal to a fp32-accumulated product rounded once (to 1 ulp: order).
    One matrix per launch: batches beyond CUDA's grid.y limit go in chunks."""
    if "triton" not in cpu_backends():
        pytest.skip("needs TRITON_INTERPRET=1")
    from triton_ops import muon as tm

    monkeypatch.setattr(tm, "MAX_GRID_BATCH", 1)
    x = torch.randn(2, m, k, generator=gen).bfloat16()
    c = x[:, :, :m] + x[:, :, :m].mT if k >= m else None
    for alpha, beta in ((1.0, 0.0), (2.0315, -4.775)):
        out = _poison((2, m, m))
        tm.sym_gram(x, out, alpha, c if beta else None, beta)
        want = alpha * (x.float() @ x.float().mT) + (beta * c.float() if beta else 0.0)
        assert torch.equal(out, out.mT)
        torch.testing.assert_close(out.float(), want.bfloat16().float(), rtol=2**-7, atol=1e-5)
        if c is None:
            break


@pytest.mark.parametrize("m,n", [(70, 45), (33, 150)])
def test_triton_ns_update_kernel(gen, monkeypatch, m, n):
    if "triton" not in cpu_backends():
        pytest.skip("needs TRITON_INTERPRET=1")
    from triton_ops import muon as tm

    monkeypatch.setattr(tm, "MAX_GRID_BATCH", 1)
    x = torch.randn(2, m, n, generator=gen).bfloat16()
    b = torch.randn(2, m, m, generator=gen).bfloat16()
    out = _poison((2, m, n))
    tm.ns_update(b, x, out, 3.4445)
    want = (3.4445 * x.float() + b.float() @ x.float()).bfloat16().float()
    torch.testing.assert_close(out.float(), want, rtol=2**-7, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------

SHAPES_2D = [(24, 40), (40, 24), (32, 32)]


def _params_and_grads(gen, shapes, steps):
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    return params, grads


def _run(opt_cls, params0, grads, **kwargs):
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = opt_cls(params, **kwargs)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw", "spectral_unclamped"])
def test_optimizer_matches_torch_muon(gen, nesterov, weight_decay, adjust_lr_fn):
    params0, grads = _params_and_grads(gen, SHAPES_2D, 3)
    kwargs = dict(lr=0.02, weight_decay=weight_decay, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    try:
        want, _ = _run(torch.optim.Muon, params0, grads, **kwargs)
    except ValueError:
        pytest.skip(f"this torch's Muon lacks adjust_lr_fn={adjust_lr_fn!r}")
    got, _ = _run(muon.Muon, params0, grads, **kwargs, backend="torch")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("nesterov", [True, False])
def test_optimizer_bf16_params(gen, nesterov):
    """bf16 parameters: torch.optim.Muon's steps bit for bit with Nesterov, tall matrices
    included (their update is added as a transposed view, as torch's is: CPU ``bf16.add_``
    rounds a strided operand differently, which used to cost 1 ulp from the first steps on).
    Without Nesterov torch normalises the momentum buffer in place (its NS divides
    ``buf.bfloat16()``, which is ``buf``), which we do not."""
    params0, grads = _params_and_grads(gen, SHAPES_2D + [(64, 16)], 4)
    params0 = [p.bfloat16() for p in params0]
    grads = [[g.bfloat16() for g in gs] for gs in grads]
    kwargs = dict(lr=0.02, nesterov=nesterov)
    got, opt = _run(muon.Muon, params0, grads, **kwargs)
    if nesterov:
        want, _ = _run(torch.optim.Muon, params0, grads, **kwargs)
        for g, w in zip(got, want):
            assert_bit_equal(g, w, f"bf16 {tuple(g.shape)}")
    buf = torch.zeros_like(grads[0][0])
    for gs in grads:
        buf.lerp_(gs[0], 1 - 0.95)
    torch.testing.assert_close(opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"], buf, rtol=0, atol=0)


def test_optimizer_triton_backend_close_to_torch(gen):
    if "triton" not in cpu_backends():
        pytest.skip("needs TRITON_INTERPRET=1")
    params0, grads = _params_and_grads(gen, [(24, 40)], 2)
    want, _ = _run(torch.optim.Muon, params0, grads, lr=0.02)
    got, _ = _run(muon.Muon, params0, grads, lr=0.02, backend="triton")
    # per step: lr * adjust * (NS difference <= NS_ATOL)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=2 * 0.02 * muon.NS_ATOL)


@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_expert_stack_equals_per_expert_loop(gen, adjust_lr_fn):
    """[E, out, in] in one batched call == E separate 2-D params, lr scaled from (out, in)."""
    E, shape = 4, (40, 24)
    params0, grads = _params_and_grads(gen, [(E, *shape)], 3)
    got, _ = _run(muon.Muon, params0, grads, lr=0.02, adjust_lr_fn=adjust_lr_fn)
    split_params = list(params0[0].unbind(0))
    split_grads = [list(gs[0].unbind(0)) for gs in grads]
    want, _ = _run(muon.Muon, split_params, split_grads, lr=0.02, adjust_lr_fn=adjust_lr_fn)
    torch.testing.assert_close(got[0], torch.stack(want), rtol=0, atol=0)
    # and the 2-D ones are torch.optim.Muon's
    torch_want, _ = _run(torch.optim.Muon, split_params, split_grads, lr=0.02, adjust_lr_fn=adjust_lr_fn)
    torch.testing.assert_close(torch.stack(want), torch.stack(torch_want), rtol=0, atol=0)


def test_state_dict_round_trip(gen):
    params0, grads = _params_and_grads(gen, [(24, 40), (3, 16, 8)], 4)
    kwargs = dict(lr=0.02, ns_coefficients="polar_express", adjust_lr_fn="match_rms_adamw")
    straight, _ = _run(muon.Muon, params0, grads, **kwargs)

    half, opt = _run(muon.Muon, params0, grads[:2], **kwargs)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    params = [torch.nn.Parameter(p.clone()) for p in half]
    opt2 = muon.Muon(params, **kwargs)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.param_groups[0]["ns_coefficients"] == "polar_express"
    for gs in grads[2:]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt2.step()
    for p, w in zip(params, straight):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=0)


def test_params_without_grad_and_closure(gen):
    a, b = torch.nn.Parameter(torch.randn(8, 8, generator=gen)), torch.nn.Parameter(torch.randn(8, 4, generator=gen))
    b0 = b.detach().clone()
    opt = muon.Muon([a, b], lr=0.1)
    a.grad = torch.randn(8, 8, generator=gen)
    assert opt.step(lambda: 3.0) == 3.0
    assert torch.equal(b.detach(), b0) and "momentum_buffer" not in opt.state[b]


def test_optimizer_bad_input():
    with pytest.raises(ValueError, match="give it to AdamW"):
        muon.Muon([torch.nn.Parameter(torch.randn(5))])
    with pytest.raises(ValueError, match="give it to AdamW"):
        muon.Muon([torch.nn.Parameter(torch.randn(2, 2, 2, 2))])
    with pytest.raises(ValueError, match="complex"):
        muon.Muon([torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="adjust_lr_fn must be one of"):
        muon.Muon([torch.nn.Parameter(torch.randn(4, 4))], adjust_lr_fn="rms")
    with pytest.raises(ValueError, match="coefficients"):
        muon.Muon([torch.nn.Parameter(torch.randn(4, 4))], ns_coefficients=(1.0, 2.0))
    for kw in (dict(lr=-1.0), dict(momentum=-0.1), dict(weight_decay=-1.0), dict(eps=0.0), dict(ns_steps=0)):
        with pytest.raises(ValueError, match=next(iter(kw)).removeprefix("ns_")):
            muon.Muon([torch.nn.Parameter(torch.randn(4, 4))], **kw)
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = muon.Muon([p])
    p.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_add_param_group_refuses_what_step_cannot_do(gen):
    """A later group goes through the constructor's checks, before anything changes: a 1-D
    parameter used to be accepted and fail only in step(), after its momentum had moved."""
    w = torch.nn.Parameter(torch.randn(8, 4, generator=gen))
    opt = muon.Muon([w], lr=0.02)
    bias = torch.nn.Parameter(torch.randn(8, generator=gen))
    for group, match in (
        ({"params": [bias]}, "give it to AdamW"),
        ({"params": bias}, "give it to AdamW"),
        ({"params": (p for p in [w.detach().clone().requires_grad_(), bias])}, "give it to AdamW"),
        ({"params": [torch.nn.Parameter(torch.randn(2, 2, 2, 2))]}, "give it to AdamW"),
        ({"params": [torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))]}, "complex"),
        ({"params": [torch.nn.Parameter(torch.randn(4, 4))], "adjust_lr_fn": "rms"}, "adjust_lr_fn must be one of"),
        ({"params": [torch.nn.Parameter(torch.randn(4, 4))], "lr": -1.0}, "lr must be >= 0"),
        ({"params": [torch.nn.Parameter(torch.randn(4, 4))], "ns_coefficients": "fast"}, "unknown preset"),
    ):
        with pytest.raises(ValueError, match=match):
            opt.add_param_group(group)
    assert len(opt.param_groups) == 1 and list(opt.state) == []
    bias.grad, w.grad = torch.randn(8, generator=gen), torch.randn(8, 4, generator=gen)
    opt.step()  # the refused parameter was never taken in
    assert list(opt.state) == [w]
    # a good later group, with options of its own, steps as its own optimizer would
    v = torch.nn.Parameter(torch.randn(3, 6, 5, generator=gen))
    v0, g = v.detach().clone(), torch.randn(3, 6, 5, generator=gen)
    opt.add_param_group({"params": v, "lr": 0.1, "adjust_lr_fn": "match_rms_adamw"})
    v.grad = g.clone()
    opt.step()
    want, _ = _run(muon.Muon, [v0], [[g]], lr=0.1, adjust_lr_fn="match_rms_adamw")
    assert_bit_equal(v.detach(), want[0], "later group")


# ---------------------------------------------------------------------------------------------
# Distributed: work division over gloo equals the single-process optimizer
# ---------------------------------------------------------------------------------------------

def test_plan_is_balanced_and_covers_everything():
    shapes = [torch.Size(s) for s in [(12288, 5120), (5120, 12288), (160, 1536, 5120), (160, 1536, 5120),
                                       (160, 5120, 1536), (1024, 5120), (5, 7, 3)]]
    for world in (1, 2, 3, 4, 7, 8):
        plan = muon._plan(shapes, world)
        seen = sorted((i, e) for units in plan for i, e0, e1 in units for e in range(e0, e1))
        assert seen == [(i, e) for i, s in enumerate(shapes) for e in range(s[0] if len(s) == 3 else 1)]
        load = [sum((e1 - e0) * muon._ns_flops(shapes[i]) for i, e0, e1 in units) for units in plan]
        biggest = max(muon._ns_flops(s) for s in shapes)
        assert max(load) - sum(load) / world <= biggest
        for units in plan:  # one range per stack per rank
            assert len({i for i, _, _ in units}) == len(units)


DIST_TIMEOUT_S = 90


def _dist_worker(rank, world, init_file, params0, grads, kwargs, want, fsdp):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        # replicated parameters (DDP-style): the default group divides the NS work, then an
        # explicit process_group of half the ranks does (every half on its own)
        done = torch.zeros((), dtype=torch.int64)  # matrices this rank orthogonalised
        ns = muon.newton_schulz
        muon.newton_schulz = lambda G, *a, **k: done.add_(G[..., 0, 0].numel()) and ns(G, *a, **k)
        got, _ = _run(muon.Muon, params0, grads, **kwargs)
        muon.newton_schulz = ns
        total = done.clone()
        dist.all_reduce(total)
        n_matrices = len(grads) * sum(p[..., 0, 0].numel() for p in params0)
        assert total.item() == n_matrices and done.item() < n_matrices  # divided, not repeated
        halves = [dist.new_group(list(range(h, h + world // 2))) for h in (0, world // 2)]
        got_half, _ = _run(muon.Muon, params0, grads, **kwargs, process_group=halves[2 * rank // world])
        for g, gh, w in zip(got, got_half, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
            torch.testing.assert_close(gh, w, rtol=0, atol=0)
        if not fsdp:
            return
        # FSDP2: DTensor parameters sharded on dim 0 (unevenly: 5 experts), gathered and re-sharded
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        module = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in params0])
        fully_shard(module, mesh=mesh)
        opt = muon.Muon(list(module.parameters()), **kwargs)
        for gs in grads:
            for p, g in zip(module.parameters(), gs):
                p.grad = distribute_tensor(g.clone(), mesh, p.placements)
            opt.step()
        for p, w in zip(module.parameters(), want):
            assert p.placements == p.grad.placements
            torch.testing.assert_close(p.full_tensor().detach(), w, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


# FSDP2 in one world size only: importing it costs each process ~2 s of CPU
@pytest.mark.parametrize("world,fsdp", [(2, True), (4, False)])
def test_distributed_equals_single_process(gen, tmp_path, world, fsdp):
    params0, grads = _params_and_grads(gen, [(24, 40), (5, 16, 24), (40, 24), (8, 8)], 2)
    kwargs = dict(lr=0.02, adjust_lr_fn="match_rms_adamw")
    want, _ = _run(muon.Muon, params0, grads, **kwargs)
    run_processes(_dist_worker, world, (world, str(tmp_path / "init"), params0, grads, kwargs, want, fsdp),
                  DIST_TIMEOUT_S, "distributed Muon")


# ---------------------------------------------------------------------------------------------
# The Python wrapper: dispatch, the coefficient forms only it takes
# ---------------------------------------------------------------------------------------------

def test_cuda_backend_is_the_cublas_path():
    from glm45_ops import _registry

    op = _registry.registered_ops()["newton_schulz"]
    assert op.impls["cuda"] is muon._ns_cublas
    cpu = torch.device("cpu")
    assert op.resolve("auto", cpu) == "torch" and "cuda" not in op.backends(cpu)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable on cpu: it needs CUDA tensors$"):
        muon.newton_schulz(torch.randn(4, 4), backend="cuda")
    if torch.cuda.is_available():
        assert op.resolve("auto", torch.device("cuda")) == "cuda"


def test_wrapper_bad_coefficients():
    """Preset names and nested triples are the wrapper's (the op's table has the rest)."""
    G = torch.randn(4, 6)
    for bad, match in (("fast", "unknown preset 'fast'"), ([(1.0, 2.0)], "every per-step entry must be a triple"),
                       ([(3.0, -3.2, float("nan"))], "coefficients must be finite")):
        with pytest.raises(ValueError, match=match):
            muon.newton_schulz(G, 5, bad)
    assert muon.newton_schulz(G, 5, "polar_express", norm_scale=1.0).shape == G.shape
