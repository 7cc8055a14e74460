"""MoE routing (``moe_route``): every backend against an independent per-token Python oracle
(ids as sets and in order, weights bit for bit), ties, NaN, the GLM-4.5 and Air presets, the
DeepSeek-V3 grouping, T = 0, awkward sizes, the sigmoid over every bf16 and fp16 value, ``route``'s
fp32 router GEMM, the benchmark cases; on a GPU, prefill-sized batches and CUDA graphs.
opcheck, torch.compile, the bad-input tables, empty and non-finite samples and backend agreement
are the generic contract tests (tests/test_contract.py, tables in glm45_ops/moe/routing.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import cpu_backends, device_backends
from glm45_ops import moe
from glm45_ops.config import GLM_4_5, GLM_4_5_AIR
from glm45_ops.reference import moe_routing as ref
from glm45_ops.testing import cuda_kernel_differs, outputs_differ, poisoned_outputs

BACKENDS = device_backends()
GPU_BACKENDS = [p for p in BACKENDS if p[0] == "cuda" and p[1] != "torch"]
F32 = np.float32


def _sigmoid(x: float) -> F32:
    """The definition's sigmoid with Python's libm: float64, then rounded to fp32."""
    if math.isnan(x):
        return F32("nan")
    if abs(x) < ref.SIGMOID_LINEAR_BELOW:
        return F32(0.5 + 0.25 * x)
    e = math.exp(-x) if -x < 709 else math.inf
    return F32(1.0 / (1.0 + e))


def _rank(v: F32, i: int) -> tuple:
    """Sort key, best first: value descending (NaN last, -0 == +0), then the lower index."""
    return (1, 0.0, i) if np.isnan(v) else (0, -float(v) + 0.0, i)


def oracle(logits, bias, top_k, n_group, topk_group, renormalize, factor):
    """One token at a time in Python/numpy scalars: (weights [T, k] fp32, ids [T, k] int32)."""
    t, e = logits.shape
    ws, ids = [], []
    for row in logits.float().tolist():
        s = [_sigmoid(x) for x in row]
        b = [s[i] + (F32(0) if bias is None else F32(bias[i])) for i in range(e)]
        allowed = set(range(e))
        if n_group > 1:
            size = e // n_group
            scores = []
            for g in range(n_group):
                members = sorted(range(g * size, (g + 1) * size), key=lambda i: _rank(b[i], i))
                scores.append(b[members[0]] + b[members[1]])
            kept = sorted(range(n_group), key=lambda g: _rank(scores[g], g))[:topk_group]
            allowed = {i for g in kept for i in range(g * size, (g + 1) * size)}
        chosen = sorted(allowed, key=lambda i: _rank(b[i], i))[:top_k]
        w = [s[i] for i in chosen]
        if renormalize:
            total = w[0]
            for x in w[1:]:
                total = F32(total + x)
            w = [F32(x / F32(total + F32(ref.RENORM_EPS))) for x in w]
        ws.append([F32(x * F32(factor)) for x in w])
        ids.append(chosen)
    return (torch.tensor(np.array(ws, dtype=F32).reshape(t, top_k)),
            torch.tensor(ids, dtype=torch.int32).reshape(t, top_k))


def check_against_oracle(device, backend, logits, bias=None, *args):
    bias_d = None if bias is None else bias.to(device)
    with poisoned_outputs():
        got = moe.moe_route(logits.to(device), bias_d, *args, backend=backend)
    bound = moe.routing._op.bind((logits, bias, *args), {})
    want = oracle(*bound)
    assert [set(r) for r in got[1].cpu().tolist()] == [set(r) for r in want[1].tolist()], "chosen experts"
    why = outputs_differ(tuple(x.cpu() for x in got), want)
    assert why is None, why
    return got


# E in {16, 128, 160, 256}, with and without groups: (E, top_k, n_group, topk_group)
CONFIGS = [(16, 4, 1, 1), (16, 4, 4, 2), (128, 8, 1, 1), (128, 8, 8, 4), (160, 8, 1, 1), (160, 8, 8, 3),
           (160, 8, 20, 4), (256, 8, 8, 4), (256, 16, 1, 1)]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("e,top_k,n_group,topk_group", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_against_oracle(device, backend, e, top_k, n_group, topk_group, dtype, gen):
    logits = (torch.randn(13, e, generator=gen) * 2).to(dtype)
    bias = torch.randn(e, generator=gen) * 0.1
    check_against_oracle(device, backend, logits, bias, top_k, n_group, topk_group, True, 2.5)
    check_against_oracle(device, backend, logits, None, top_k, n_group, topk_group, False, 1.0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("t,e,top_k,n_group,topk_group", [
    (1, 1, 1, 1, 1), (65, 7, 7, 1, 1), (5, 33, 5, 3, 2), (3, 129, 16, 1, 1), (4, 161, 8, 7, 2), (2, 257, 9, 1, 1),
    (3, 500, 16, 10, 3), (6, 512, 16, 16, 4), (2, 512, 2, 256, 1)])
def test_awkward_sizes(device, backend, t, e, top_k, n_group, topk_group, gen):
    """Expert counts around the 32-lane and power-of-two boundaries, one token to 65, group sizes 2 to 50."""
    logits = torch.randn(t, e, generator=gen).bfloat16()
    bias = torch.randn(e, generator=gen) * 0.1
    check_against_oracle(device, backend, logits, bias, top_k, n_group, topk_group, True, 2.5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ties_go_to_lower_ids(device, backend, gen):
    # every expert equal: ids 0..k-1; equal groups: the lowest groups
    flat = torch.zeros(3, 160, dtype=torch.bfloat16)
    _, ids = check_against_oracle(device, backend, flat, None, 8)
    assert ids.cpu().tolist() == [list(range(8))] * 3
    _, ids = check_against_oracle(device, backend, flat, None, 8, 8, 2)
    assert ids.cpu().tolist() == [list(range(8))] * 3
    # a tie between two groups' scores (the same two scores in groups 5 and 2): group 2 wins
    x = torch.full((1, 160), -4.0)
    x[0, [100, 101, 40, 45]] = torch.tensor([1.0, 0.5, 0.5, 1.0])
    _, ids = check_against_oracle(device, backend, x, None, 8, 8, 1)
    assert ids[0, :2].tolist() == [45, 40] and set(ids[0].tolist()) <= set(range(40, 60))
    # a bias that makes distinct scores tie: ids 7 and 3 with equal biased scores, id 3 first
    x = torch.zeros(1, 16)
    x[0, 7] = 1.0
    bias = torch.zeros(16)
    bias[3] = float(torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)).float()) - 0.5
    _, ids = check_against_oracle(device, backend, x, bias, 2)
    assert ids.tolist() == [[3, 7]]
    # many ties with repeated values
    rep = torch.tensor([-1.0, 0.0, 2.0])[torch.randint(0, 3, (9, 256), generator=gen)]
    check_against_oracle(device, backend, rep.bfloat16(), None, 8, 8, 4, True, 2.5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nonfinite(device, backend, gen):
    x = torch.randn(5, 32, generator=gen)
    x[0, [4, 9]] = float("nan")
    x[1] = float("nan")
    x[2, [3, 30]] = float("inf")
    x[3, :] = -float("inf")
    x[4, :16] = float("nan")
    bias = torch.randn(32, generator=gen) * 0.1
    bias[20] = -float("inf")
    w, ids = check_against_oracle(device, backend, x, bias, 8, 4, 2, True, 1.0)
    assert not {4, 9} & set(ids[0].tolist())  # NaN experts rank last
    assert ids[1].tolist() == list(range(8)) and w[1].isnan().all()
    check_against_oracle(device, backend, x, bias, 8, 1, 1, False, 2.5)
    _, ids = check_against_oracle(device, backend, x, None, 8)
    assert ids[2, :2].tolist() == [3, 30]  # +inf logits: score 1, the lower id first


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("cfg", [GLM_4_5, GLM_4_5_AIR], ids=lambda c: c.name)
def test_model_presets(device, backend, cfg, gen):
    e = cfg.n_routed_experts
    logits = torch.randn(33, e, generator=gen).bfloat16()
    bias = torch.randn(e, generator=gen) * 0.05
    w, ids = check_against_oracle(device, backend, logits, bias, cfg.num_experts_per_tok, cfg.n_group,
                                  cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
    assert w.shape == ids.shape == (33, cfg.num_experts_per_tok)
    sums = w.double().sum(-1).cpu()
    torch.testing.assert_close(sums, torch.full_like(sums, cfg.routed_scaling_factor), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty(device, backend):
    w, ids = moe.moe_route(torch.empty(0, 160, device=device), None, 8, backend=backend)
    assert w.shape == ids.shape == (0, 8) and w.dtype == torch.float32 and ids.dtype == torch.int32


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sigmoid_every_16_bit_value(device, backend, dtype):
    """The definition's sigmoid on every backend equals Python's libm for all 65,536 values."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 16)
    w, ids = moe.moe_route(x.to(device), None, 16, renormalize=False, backend=backend)
    got = torch.empty_like(w).scatter_(1, ids.long(), w).cpu()
    want = torch.tensor([[_sigmoid(v) for v in row] for row in x.float().tolist()], dtype=torch.float32)
    assert outputs_differ(got, want) is None
    assert outputs_differ(got, ref.sigmoid_scores(x)) is None


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_route_from_hidden(device, backend, gen):
    hidden = torch.randn(6, 64, generator=gen).bfloat16().to(device)
    weight = (torch.randn(160, 64, generator=gen) * 0.1).to(device)
    bias = (torch.randn(160, generator=gen) * 0.1).to(device)
    got = moe.route(hidden, weight, bias, 8, routed_scaling_factor=2.5, backend=backend)
    logits = hidden.float() @ weight.T
    assert outputs_differ(got, moe.moe_route(logits, bias, 8, routed_scaling_factor=2.5, backend=backend)) is None
    with pytest.raises(ValueError, match="router_weight must be float32"):
        moe.route(hidden, weight.bfloat16())
    with pytest.raises(ValueError, match="must share H"):
        moe.route(hidden, weight[:, :32])


def test_route_bad_input(gen):
    """``route``'s own arguments, named (it used to cast any hidden with ``.float()``, and a
    router weight on another device failed inside the GEMM)."""
    hidden = torch.randn(6, 64, generator=gen).bfloat16()
    weight = torch.randn(16, 64, generator=gen) * 0.1
    for args, exc, match in [
        ((hidden.double(), weight), ValueError, "hidden must be bfloat16, float16 or float32, got torch.float64"),
        ((hidden.to(torch.int32), weight), ValueError, "hidden must be bfloat16, float16 or float32, got torch.int32"),
        ((hidden.to(torch.float8_e4m3fn), weight), ValueError, "hidden must be bfloat16, float16 or float32"),
        ((hidden, weight.double()), ValueError, "router_weight must be float32, got torch.float64"),
        ((hidden[0], weight), ValueError, r"hidden must be 2-D \[T, H\], got shape \(64,\)"),
        ((hidden, weight[None]), ValueError, r"router_weight must be 2-D \[E, H\], got shape \(1, 16, 64\)"),
        ((hidden, weight[:, :48]), ValueError, r"hidden \[T, H=64\] and router_weight \[E, H=48\] must share H"),
        ((hidden, weight.to("meta")), ValueError, "router_weight is on meta but hidden is on cpu"),
        (("hidden", weight), TypeError, "hidden must be a torch.Tensor, got str"),
        ((hidden, None), TypeError, "router_weight must be a torch.Tensor, got NoneType"),
    ]:
        with pytest.raises(exc, match=match):
            moe.route(*args)


@pytest.mark.skipif(not moe.routing._op.has_cuda_kernel(), reason="the C++ kernel is not built")
def test_cuda_kernel_checks_match_python(gen):
    """Host checks beyond the error table: limits at their edges, as C++ and Python word them."""
    for e, args in [(512, (16,)), (160, (8, 8, 3)), (160, (8, 80, 4)), (7, (7,)), (160, (8, 160, 8)),
                    (6, (7,)), (256, (8, 8, 4, True, 2.5))]:
        x = torch.randn(2, e, generator=gen)
        assert cuda_kernel_differs(moe.routing._op, (x, None, *args)) is None


def test_bench_cases_refcheck():
    """The benchmark cases build on the CPU ('small' preset) and every CPU backend matches the
    torch reference on them, as ``glm45-bench moe --refcheck`` checks."""
    from glm45_ops.bench import cases as cases_mod
    from glm45_ops.bench.case import BenchContext
    from glm45_ops.config import preset

    cpu = torch.device("cpu")
    route_cases = [c for c in cases_mod.load("moe").cases(BenchContext(preset("small"), cpu, (7, 1)))
                   if c.name.startswith("moe_route")]
    assert [c.name for c in route_cases] == ["moe_route T=7", "moe_route T=1"]
    for case in route_cases:
        inputs = case.inputs(cpu, torch.Generator().manual_seed(0))
        want = case.run("torch", cpu, *inputs)()
        for backend in cpu_backends()[1:]:
            assert outputs_differ(case.run(backend, cpu, *inputs)(), want) is None, f"{case.name} {backend}"


# ---------------------------------------------------------------------------------------------
# GPU only: prefill-sized batches, CUDA graphs
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("device,backend", GPU_BACKENDS)
@pytest.mark.parametrize("cfg", [GLM_4_5, GLM_4_5_AIR], ids=lambda c: c.name)
def test_gpu_prefill(device, backend, cfg):
    gen = torch.Generator().manual_seed(cfg.n_routed_experts)
    e = cfg.n_routed_experts
    logits = (torch.randn(4097, e, generator=gen) * 2).bfloat16()
    bias = torch.randn(e, generator=gen) * 0.05
    args = (cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
    with poisoned_outputs():
        got = moe.moe_route(logits.cuda(), bias.cuda(), *args, backend=backend)
    assert outputs_differ(got, ref.moe_route_ref(logits, bias, *args)) is None
    grouped = (8, 8, 4, True, 2.5)  # DeepSeek-V3's grouping on the same expert count
    got = moe.moe_route(logits.cuda(), bias.cuda(), *grouped, backend=backend)
    assert outputs_differ(got, ref.moe_route_ref(logits, bias, *grouped)) is None


@pytest.mark.gpu
@pytest.mark.parametrize("device,backend", GPU_BACKENDS)
def test_gpu_cuda_graph(device, backend):
    """The op captures into a CUDA graph (no host sync) and replays recompute from new logits."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 160, generator=gen).bfloat16().cuda()
    bias = (torch.randn(160, generator=gen) * 0.05).cuda()
    moe.moe_route(logits, bias, 8, routed_scaling_factor=2.5, backend=backend)  # warm up (Triton compiles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.moe_route(logits, bias, 8, routed_scaling_factor=2.5, backend=backend)
    logits.copy_(torch.randn(64, 160, generator=gen).bfloat16().cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert outputs_differ(out, ref.moe_route_ref(logits.cpu(), bias.cpu(), 8, 1, 1, True, 2.5)) is None
