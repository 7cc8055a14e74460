"""The MoE layer (glm45_ops.moe.layer): the shared expert fused as expert E and as a dense SwiGLU,
and ``MoE.forward`` against an independent float64 loop over KNOWLEDGE.md §4's routing, FP8
against the dequantized math, and transformers' ``Glm4MoeMoE`` on the same weights when installed.
Small shapes: the Triton backend runs in the interpreter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_backends
from glm45_ops.config import SMALL
from glm45_ops.moe import fused_moe
from glm45_ops.moe.fused import _compare
from glm45_ops.moe.layer import (MoE, append_shared_routing, backend_for, fuse_shared_expert, shared_expert,
                                 split_shared_expert)
from glm45_ops.quant import dequant_fp8, per_block_quant_fp8, per_token_group_quant_fp8
from glm45_ops.testing import calc_diff

BACKENDS = cpu_backends()
CFG = dataclasses.replace(SMALL, hidden_size=64, moe_intermediate_size=32, n_routed_experts=16,
                          num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=2.5)
FP8_LIMIT = 1e-3  # DeepGEMM's FP8 similarity threshold


def act_fp8(a):
    """What an FP8 GEMM reads of a bf16 activation: its 1 x 128 e4m3 quantization, dequantized."""
    q, s = per_token_group_quant_fp8(a.bfloat16().reshape(-1, a.shape[-1]), backend="torch")
    return dequant_fp8(q, s, 1, 128, torch.float32).double().view(a.shape)


def swiglu64(x, w13, w2, h_dtype=None, fp8=False):
    """float64 SwiGLU, the intermediate rounded into ``h_dtype`` as the kernels store it; ``fp8``:
    x and the intermediate quantized 1 x 128 first, as the FP8 kernels do (the weights are
    passed dequantized)."""
    read = act_fp8 if fp8 else torch.Tensor.double
    gu = read(x) @ w13.double().t()
    g, u = gu.chunk(2, dim=-1)
    h = F.silu(g) * u
    if h_dtype is not None:
        h = h.to(h_dtype).double()
    return read(h) @ w2.double().t()


def deq(w, s):
    return dequant_fp8(w, s, 128, 128, torch.float32)


def experts(e, h, inter, dtype, gen):
    w13 = (torch.randn(e, 2 * inter, h, generator=gen) * h**-0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=gen) * inter**-0.5).to(dtype)
    return w13, w2


# ---------------------------------------------------------------------------------------------
# The dense shared expert and the fusion helpers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [32, 192])
def test_shared_expert_dense(gen, dtype, inter):
    x = torch.randn(2, 5, 64, generator=gen).to(dtype)
    w13, w2 = (w[0] for w in experts(1, 64, inter, dtype, gen))
    got = shared_expert(x, w13, w2)
    assert got.dtype == dtype and got.shape == x.shape
    want = swiglu64(x, w13, w2)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    else:  # g, u, h and the output each rounded to bf16
        assert calc_diff(got, want) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_expert_fp8(gen, backend):
    """I = 192: the gate/up boundary and the down GEMM's K fall inside scale blocks."""
    x = torch.randn(5, 256, generator=gen).bfloat16()
    w13, w2 = (w[0] for w in experts(1, 256, 192, torch.float32, gen))
    (q13, s13), (q2, s2) = per_block_quant_fp8(w13), per_block_quant_fp8(w2)
    got = shared_expert(x, q13, q2, s13, s2, backend=backend)
    assert got.dtype == torch.bfloat16
    assert calc_diff(got, swiglu64(x, deq(q13, s13), deq(q2, s2), torch.bfloat16, fp8=True)) < FP8_LIMIT


def test_append_shared_routing():
    w = torch.rand(3, 2)
    ids = torch.tensor([[0, 5], [3, 1], [2, 2]], dtype=torch.int64)
    w2, ids2 = append_shared_routing(w, ids, 6, num_shared=2)
    assert ids2.dtype == torch.int64 and w2.dtype == torch.float32
    assert ids2.tolist() == [[0, 5, 6, 7], [3, 1, 6, 7], [2, 2, 6, 7]]
    assert torch.equal(w2[:, :2], w) and w2[:, 2:].eq(1).all()
    w0, ids0 = append_shared_routing(w[:0], ids[:0].int(), 160)
    assert w0.shape == (0, 3) and ids0.shape == (0, 3) and ids0.dtype == torch.int32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fp8,inter,h", [(False, 32, 64), (False, 192, 32), (True, 192, 256)])
def test_fused_shared_equals_routed_plus_dense(gen, backend, fp8, inter, h):
    """One fused_moe over E+1 experts (top-k+1) equals routed fused_moe + the dense SwiGLU,
    within fused_moe's own tolerance; I = 192 is GLM-4.5's TP8 shard."""
    e, k, t = 4, 2, 6
    x = torch.randn(t, h, generator=gen).bfloat16()
    w13, w2 = experts(e, h, inter, torch.float32 if fp8 else torch.bfloat16, gen)
    sh13, sh2 = (w[0] for w in experts(1, h, inter, w13.dtype, gen))
    wts, ids = torch.rand(t, k, generator=gen), torch.rand(t, e, generator=gen).topk(k, 1).indices.int()
    scales = (None,) * 4
    if fp8:
        (w13, s13), (w2, s2), (sh13, ss13), (sh2, ss2) = (per_block_quant_fp8(w) for w in (w13, w2, sh13, sh2))
        scales = (s13, s2, ss13, ss2)
    fw13, fw2, fs13, fs2 = fuse_shared_expert(w13, w2, sh13, sh2, *scales)
    assert fw13.shape[0] == e + 1 and torch.equal(fw13[e].view(torch.uint8), sh13.view(torch.uint8))
    fw, fids = append_shared_routing(wts, ids, e)
    args = (x, fw13, fw2, fw, fids, fs13, fs2)
    got = fused_moe(*args, backend=backend)
    routed = fused_moe(x, w13, w2, wts, ids, scales[0], scales[1], backend=backend)
    want = routed + shared_expert(x, sh13, sh2, scales[2], scales[3], backend=backend)
    assert _compare(got, want, args) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_shared_expert_splits_into_experts(gen, dtype):
    """n_shared_experts = 2: a shared expert 2I wide is two experts of width I."""
    h, inter, t = 64, 32, 5
    x = torch.randn(t, h, generator=gen).to(dtype)
    sh13, sh2 = (w[0] for w in experts(1, h, 2 * inter, dtype, gen))
    p13, p2, _, _ = split_shared_expert(sh13, sh2, inter)
    assert p13.shape == (2, 2 * inter, h) and p2.shape == (2, h, inter)
    ones, ids = append_shared_routing(torch.empty(t, 0), torch.empty(t, 0, dtype=torch.int32), 0, 2)
    got = fused_moe(x, p13, p2, ones, ids, backend="torch")
    want = swiglu64(x, sh13, sh2, dtype)
    assert calc_diff(got, want) < (1e-10 if dtype == torch.float32 else 1e-4)


def test_wide_fp8_shared_expert_splits_along_blocks(gen):
    """S = 2 FP8 slices keep their own scale blocks when 128 | I, and refuse otherwise."""
    sh13, sh2 = (w[0] for w in experts(1, 128, 256, torch.float32, gen))
    (q13, s13), (q2, s2) = per_block_quant_fp8(sh13), per_block_quant_fp8(sh2)
    p13, p2, ps13, ps2 = split_shared_expert(q13, q2, 128, s13, s2)
    assert ps13.shape == (2, 2, 1) and ps2.shape == (2, 1, 1)
    torch.testing.assert_close(deq(p13[1], ps13[1]), torch.cat((deq(q13, s13)[128:256], deq(q13, s13)[384:])))
    torch.testing.assert_close(deq(p2[0], ps2[0]), deq(q2, s2)[:, :128])
    (q13, s13), (q2, s2) = (per_block_quant_fp8(w[0]) for w in experts(1, 64, 64, torch.float32, gen))
    with pytest.raises(ValueError, match="not a multiple of 128"):
        split_shared_expert(q13, q2, 32, s13, s2)


def test_helper_bad_input(gen):
    w13, w2 = experts(3, 64, 32, torch.bfloat16, gen)
    sh13, sh2 = w13[0], w2[0]
    with pytest.raises(ValueError, match="expert width 48"):
        split_shared_expert(sh13, sh2, 48)
    with pytest.raises(ValueError, match="do not stack"):
        fuse_shared_expert(w13, w2, sh13.float(), sh2.float())
    with pytest.raises(ValueError, match="FP8 weights"):
        fuse_shared_expert(w13, w2, sh13, sh2, w13_scale=torch.ones(3, 1, 1))
    with pytest.raises(ValueError, match="one shape"):
        append_shared_routing(torch.ones(2, 3), torch.zeros(2, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"w13 must be \[2I, H\]"):
        shared_expert(torch.ones(2, 64).bfloat16(), sh13[:50], sh2)
    with pytest.raises(ValueError, match="must share H"):
        shared_expert(torch.ones(2, 32).bfloat16(), sh13, sh2)


# ---------------------------------------------------------------------------------------------
# The MoE module
# ---------------------------------------------------------------------------------------------

def make_moe(gen, dtype=torch.float32, cfg=CFG, **kw) -> MoE:
    m = MoE(cfg, dtype=dtype, **kw)
    with torch.no_grad():
        m.gate.weight.copy_(torch.randn(m.gate.weight.shape, generator=gen) * cfg.hidden_size**-0.5)
        # bias comparable to the score spread, so it changes which experts are chosen
        m.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=gen) * 0.3)
        w13, w2 = experts(m.w13.shape[0], cfg.hidden_size, cfg.moe_intermediate_size, dtype, gen)
        m.w13.copy_(w13)
        m.w2.copy_(w2)
    return m


def moe_oracle(m: MoE, x, w13, w2, use_bias=True, fp8=False):
    """KNOWLEDGE.md §4 in float64, token by token: sigmoid scores, selection on the biased scores
    (groups ranked by the sum of their best two), unbiased weights renormalised and scaled, plus
    the shared expert."""
    e, k, ng = m.num_experts, m.top_k, m.n_group
    out = torch.zeros(x.shape, dtype=torch.float64)
    chosen = []
    for t in range(x.shape[0]):
        s = torch.sigmoid(m.gate.weight.double() @ x[t].double())
        b = s + m.gate.e_score_correction_bias.double() * use_bias
        groups = b.view(ng, e // ng).topk(2, dim=1).values.sum(1)
        keep = torch.zeros(ng, dtype=torch.bool)
        keep[groups.topk(m.topk_group).indices] = True
        ids = b.masked_fill(~keep.repeat_interleave(e // ng), -float("inf")).topk(k).indices
        w = s[ids] / (s[ids].sum() + 1e-20) if m.norm_topk_prob else s[ids]
        w = w * m.routed_scaling_factor
        chosen.append(set(ids.tolist()))
        for wj, j in zip(w, ids.tolist()):
            out[t] += wj * swiglu64(x[t], w13[j], w2[j], fp8=fp8)
        for j in range(e, e + m.num_shared):
            out[t] += swiglu64(x[t], w13[j], w2[j], fp8=fp8)
    return out, chosen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
@pytest.mark.parametrize("fuse", [True, False])
def test_moe_against_float64_loop(gen, backend, groups, fuse):
    cfg = dataclasses.replace(CFG, n_group=groups[0], topk_group=groups[1])
    m = make_moe(gen, cfg=cfg, backend=backend, fuse_shared=fuse)
    x = torch.randn(9, 64, generator=gen)
    got = m(x)
    want, chosen = moe_oracle(m, x, m.w13.detach(), m.w2.detach())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert chosen != moe_oracle(m, x, m.w13.detach(), m.w2.detach(), use_bias=False)[1]  # the bias matters


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_bf16_fused_equals_separate(gen, backend):
    m = make_moe(gen, torch.bfloat16, backend=backend)
    x = torch.randn(3, 4, 64, generator=gen).bfloat16()
    fused, separate = m(x), m(x, fuse_shared=False)
    assert fused.shape == x.shape and fused.dtype == torch.bfloat16
    want, _ = moe_oracle(m, x.view(-1, 64), m.w13.detach(), m.w2.detach())
    for got in (fused, separate):
        assert calc_diff(got.view(-1, 64), want) < 1e-4
    assert _compare(fused, separate, (None,) * 7) is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fuse", [True, False])
def test_moe_fp8_against_dequantized_math(gen, backend, fuse):
    m = make_moe(gen, torch.bfloat16, backend=backend, fuse_shared=fuse).quantize_fp8()
    assert m.w13.dtype == torch.float8_e4m3fn and m.w13_scale.shape == (17, 1, 1)
    x = torch.randn(7, 64, generator=gen).bfloat16()
    got = m(x)
    assert got.dtype == torch.bfloat16
    want, _ = moe_oracle(m, x, deq(m.w13, m.w13_scale), deq(m.w2, m.w2_scale), fp8=True)
    assert calc_diff(got, want) < FP8_LIMIT
    with pytest.raises(ValueError, match="already FP8"):
        m.quantize_fp8()


def test_backend_for_maps_cuda_to_an_op_that_has_it():
    """``MoE(backend="cuda")`` gives each op a backend it has: ``fused_moe`` has no CUDA kernel
    (Triton and torch only), so "auto"; an op with a C++ or Python CUDA kernel keeps "cuda"
    (and still raises if the extension is missing); every other choice is passed unchanged."""
    from types import SimpleNamespace

    from glm45_ops.moe.fused import _fused_op

    assert backend_for(_fused_op, "cuda") == "auto"
    for b in (None, "auto", "torch", "triton"):
        assert backend_for(_fused_op, b) == b
    python_cuda = SimpleNamespace(impls={"torch": None, "cuda": None}, has_cuda_kernel=lambda: False)
    cpp_cuda = SimpleNamespace(impls={"torch": None}, has_cuda_kernel=lambda: True)
    for op in (python_cuda, cpp_cuda):
        assert backend_for(op, "cuda") == "cuda"


@pytest.mark.parametrize("fuse", [True, False])
def test_moe_cuda_backend_runs_fused_moe_on_the_registrys_choice(gen, fuse, monkeypatch):
    """The layer's forward with backend="cuda" (no GPU here: routing is stood in for, recording
    its backend) gives routing "cuda" and ``fused_moe`` "auto", which on these CPU tensors is
    the reference: the same output as the default backends. It used to pass "cuda" to
    ``fused_moe`` and raise."""
    from glm45_ops.moe import layer

    m = make_moe(gen)
    x = torch.randn(5, 64, generator=gen)
    want = m(x, fuse_shared=fuse)
    seen, real_route = [], layer.route

    def route(*args, backend):
        seen.append(("route", backend))
        return real_route(*args)

    def experts(*args, backend):
        seen.append(("fused_moe", backend))
        return fused_moe(*args, backend=backend)

    monkeypatch.setattr(layer, "route", route)
    monkeypatch.setattr(layer, "fused_moe", experts)
    m.backend = "cuda"
    torch.testing.assert_close(m(x, fuse_shared=fuse), want, rtol=0, atol=0)
    assert seen == [("route", "cuda"), ("fused_moe", "auto")]


@pytest.mark.parametrize("fuse", [True, False])
def test_moe_no_tokens(gen, fuse):
    for m in (make_moe(gen, fuse_shared=fuse), make_moe(gen, torch.bfloat16, fuse_shared=fuse).quantize_fp8()):
        x = torch.empty(0, 64, dtype=torch.bfloat16 if m.is_fp8 else torch.float32)
        assert m(x).shape == (0, 64)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., H=64\]"):
        m(torch.ones(2, 32))


# ---------------------------------------------------------------------------------------------
# Checkpoints and transformers' Glm4MoeMoE
# ---------------------------------------------------------------------------------------------

def per_expert_names(sd, e, inter, prefix):
    """transformers' in-memory stacked experts as a checkpoint file stores them, one by one."""
    out = {prefix + n: v for n, v in sd.items() if not n.startswith("experts.")}
    for j in range(e):
        out[f"{prefix}experts.{j}.gate_proj.weight"] = sd["experts.gate_up_proj"][j, :inter]
        out[f"{prefix}experts.{j}.up_proj.weight"] = sd["experts.gate_up_proj"][j, inter:]
        out[f"{prefix}experts.{j}.down_proj.weight"] = sd["experts.down_proj"][j]
    return out


@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_matches_transformers_glm4moe(gen, groups):
    transformers = pytest.importorskip("transformers")
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    hf_cfg = transformers.Glm4MoeConfig(
        hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
        n_group=groups[0], topk_group=groups[1], norm_topk_prob=True, routed_scaling_factor=2.5)
    hf = Glm4MoeMoE(hf_cfg).float()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        hf.gate.e_score_correction_bias.copy_(torch.randn(16, generator=gen) * 0.3)
    x = torch.randn(2, 5, 64, generator=gen)
    with torch.no_grad():
        want = hf(x)
    sd = hf.state_dict()
    for source in (sd, per_expert_names(sd, 16, 32, "model.layers.3.mlp.")):
        m = MoE(hf_cfg, dtype=torch.float32)  # transformers' config has our field names
        m.load_hf_state_dict(source, "" if source is sd else "model.layers.3.mlp")
        for fuse in (True, False):
            torch.testing.assert_close(m(x, fuse_shared=fuse), want, rtol=1e-5, atol=1e-5)


def test_load_fp8_checkpoint(gen):
    """An FP8 checkpoint (e4m3 weights + weight_scale_inv, 128 | I) loads scales and all, and a
    BF16 one loads into an FP8 module by quantizing."""
    cfg = dataclasses.replace(CFG, hidden_size=128, moe_intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2)
    src = make_moe(gen, torch.bfloat16, cfg=cfg)
    fp8_sd = {"gate.weight": src.gate.weight, "gate.e_score_correction_bias": src.gate.e_score_correction_bias}
    bf16_sd = dict(fp8_sd)
    names = [f"experts.{j}" for j in range(4)] + ["shared_experts"]
    for j, name in enumerate(names):
        for proj, w in (("gate", src.w13[j, :128]), ("up", src.w13[j, 128:]), ("down", src.w2[j])):
            bf16_sd[f"{name}.{proj}_proj.weight"] = w.detach()
            fp8_sd[f"{name}.{proj}_proj.weight"], fp8_sd[f"{name}.{proj}_proj.weight_scale_inv"] = per_block_quant_fp8(w.detach())
    want = src.quantize_fp8()
    for sd in (fp8_sd, bf16_sd):
        m = make_moe(gen, torch.bfloat16, cfg=cfg).quantize_fp8()
        m.load_hf_state_dict(sd)
        for a, b in ((m.w13, want.w13), (m.w2, want.w2)):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert torch.equal(m.w13_scale, want.w13_scale) and torch.equal(m.w2_scale, want.w2_scale)
    with pytest.raises(ValueError, match="call quantize_fp8"):
        make_moe(gen, torch.bfloat16, cfg=cfg).load_hf_state_dict(fp8_sd)
    with pytest.raises(ValueError, match="sd lacks 'mlp.gate.weight'"):
        m.load_hf_state_dict({"mlp." + k: v for k, v in fp8_sd.items() if k != "gate.weight"}, "mlp")
