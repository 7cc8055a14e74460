"""FP8 block-scaled GEMM: every backend against a float64 oracle of the dequantized operands
(DeepGEMM's similarity metric and a max-error bound of one bf16 rounding plus fp32 accumulation),
both a_scale layouts, UE8M0 scales, opcheck, fake shapes, torch.compile through fp8_linear, bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import cpu_backends, device_backends
from glm45_ops import gemm, quant
from glm45_ops.reference.gemm import fp8_block_gemm_ref
from glm45_ops.reference.quant import FP8_DTYPE

BACKENDS = device_backends()
OUT_DTYPES = (torch.bfloat16, torch.float32)
# (M, N, K): M from the issue, N odd and across 128-blocks of b_scale, K over 1-3 scale slices
SHAPES = [(1, 257, 256), (7, 129, 384), (64, 300, 128), (130, 77, 256)]
# test_schema calls allclose on outputs, and CPU torch has no fp8 arithmetic (KNOWLEDGE.md §2)
OPCHECK_FP8 = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def make_operands(m, n, k, gen, *, layout="row", ue8m0=False, device="cpu"):
    """Quantized random operands whose 1x128 / 128x128 blocks span ~6 decades of magnitude, so
    every scale differs and a kernel that mixes up scale indices fails. Drawn on ``gen``'s
    device (quantized there by the torch reference), returned on ``device``."""
    d = gen.device
    x = torch.randn(m, k, generator=gen, device=d)
    x = x * torch.logspace(-3, 3, k, device=d)[torch.randperm(k, generator=gen, device=d)]
    w = torch.randn(n, k, generator=gen, device=d) * torch.logspace(-3, 3, n, device=d).unsqueeze(1)
    a, a_scale = quant.per_token_group_quant_fp8(x, 128, 1e-4, ue8m0, layout == "mn", backend="torch")
    b, b_scale = quant.per_block_quant_fp8(w, 128, 1e-4, ue8m0, backend="torch")
    return tuple(t.to(device) for t in (a, a_scale, b, b_scale))


def oracle(a, a_scale, b, b_scale):
    """float64 ``(deq(a) @ deq(b)^T, |deq(a)| @ |deq(b)|^T)``, independent of the reference code."""
    m, k = a.shape
    n = b.shape[0]
    ka = torch.arange(k, device=a.device) // 128
    nb = torch.arange(n, device=a.device) // 128
    a64 = a.double() * a_scale.double()[:, ka]
    b64 = b.double() * b_scale.double()[nb][:, ka]
    return a64 @ b64.t(), a64.abs() @ b64.abs().t()


def similarity_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's ``1 - 2 sum(xy) / sum(x^2 + y^2)`` (0 when equal), in float64."""
    x, y = x.double(), y.double()
    return 1 - 2 * (x * y).sum().item() / (x * x + y * y).sum().item()


def assert_gemm_close(out, a, a_scale, b, b_scale):
    """Within one rounding into out's dtype of an fp32 sum of K products in any order.

    An fp32 sum of K terms (plus the per-slice scale multiplies, a few more roundings) is off by
    at most ``(K + 8) * 2^-24 * sum|a_k b_k|``; bf16 output rounding adds ``2^-8 * |y|`` on top."""
    want, abs_sum = oracle(a, a_scale, b, b_scale)
    got = out.double()
    assert out.shape == want.shape
    assert torch.isfinite(got).all()
    k = a.shape[1]
    gamma = (k + 8) * 2.0**-24
    u = 2.0**-8 if out.dtype == torch.bfloat16 else 0.0
    bound = u * want.abs() + (1 + u) * gamma * abs_sum
    err = (got - want).abs()
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item():.3g}"
    assert similarity_diff(got, want) < 1e-4


@pytest.fixture
def poisoned(monkeypatch):
    """Buffers the ops allocate start as NaN, so a kernel that skips elements cannot pass."""
    orig_empty = torch.empty
    monkeypatch.setattr(gemm.torch, "empty", lambda *a, **k: orig_empty(*a, **k).fill_(float("nan")))


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["row", "mn"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_matches_float64_oracle(poisoned, gen, device, backend, shape, layout, out_dtype):
    ops = make_operands(*shape, gen, layout=layout, device=device)
    one_dim = shape[0] == 1 or shape[2] == 128  # a size-1 dim: both layouts at once
    assert gemm.scale_layout(ops[1]) == ("mn" if layout == "mn" or one_dim else "row")
    out = gemm.fp8_block_gemm(*ops, out_dtype, backend=backend)
    assert out.dtype == out_dtype and out.is_contiguous()
    assert_gemm_close(out.cpu(), *(t.cpu() for t in ops))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ue8m0_scales(poisoned, gen, device, backend):
    ops = make_operands(33, 200, 256, gen, layout="mn", ue8m0=True, device=device)
    mantissa, _ = torch.frexp(torch.cat([ops[1].flatten(), ops[3].flatten()]))
    assert torch.all(mantissa == 0.5), "test setup: scales must be powers of two"
    assert_gemm_close(gemm.fp8_block_gemm(*ops, backend=backend).cpu(), *(t.cpu() for t in ops))


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_large_m(gen, device, backend):
    ops = make_operands(4097, 135, 256, gen, layout="mn", device=device)
    assert_gemm_close(gemm.fp8_block_gemm(*ops, backend=backend).cpu(), *(t.cpu() for t in ops))


def test_reference_is_the_dequantized_matmul(gen):
    ops = make_operands(5, 130, 256, gen)
    want, _ = oracle(*ops)
    got = fp8_block_gemm_ref(*ops, torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_m(device, backend, gen):
    a, a_scale, b, b_scale = make_operands(3, 40, 128, gen, device=device)
    out = gemm.fp8_block_gemm(a[:0], a_scale[:0], b, b_scale, backend=backend)
    assert out.shape == (0, 40)


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs TRITON_INTERPRET=1 on CPU")
def test_triton_launcher_writes_exactly_its_tile(gen):
    """A strided output view: every element written, nothing outside it touched."""
    from triton_ops import gemm as tg

    a, a_scale, b, b_scale = make_operands(9, 70, 256, gen, layout="mn")
    buf = torch.full((9, 75), float("nan"))
    tg.fp8_block_gemm(a, a_scale, b, b_scale, buf[:, :70])
    assert torch.isnan(buf[:, 70:]).all()
    assert_gemm_close(buf[:, :70], a, a_scale, b, b_scale)


def test_scale_layout():
    assert gemm.scale_layout(torch.empty(5, 3)) == "row"
    assert gemm.scale_layout(torch.empty(3, 8).t()[:5]) == "mn"
    assert gemm.scale_layout(torch.empty(3, 5).t()) == "mn"  # unaligned M stride: still MN-major
    assert gemm.scale_layout(torch.empty(15).as_strided((5, 3), (1, 2))) is None  # overlapping
    assert gemm.scale_layout(torch.empty(5, 6)[:, ::2]) is None
    assert gemm.scale_layout(torch.empty(1, 3)) in ("row", "mn")


# ---------------------------------------------------------------------------------------------
# fp8_linear
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear(gen, device, backend, bias):
    k, n = 384, 136
    x = torch.randn(2, 3, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen) * 0.05
    w_q, w_s = quant.per_block_quant_fp8(w, backend="torch")
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    y = gemm.fp8_linear(dev(x), dev(w_q), dev(w_s), dev(b), backend=backend).cpu()
    assert y.shape == (2, 3, n) and y.dtype == torch.bfloat16
    if bias:  # the bias is added after the GEMM: the same kernel without it, plus b
        y0 = gemm.fp8_linear(dev(x), dev(w_q), dev(w_s), backend=backend).cpu()
        torch.testing.assert_close(y, y0 + b, rtol=0, atol=0)
    else:  # the composition: quantize 1x128, then the GEMM, within the GEMM's rounding bound
        x_q, x_s = quant.per_token_group_quant_fp8(x.view(-1, k), backend="torch")
        assert_gemm_close(y.view(-1, n), x_q, x_s, w_q, w_s)
    # and FP8 is a faithful stand-in for the bf16 linear layer (DeepGEMM's FP8 threshold)
    exact = x.view(-1, k).double() @ w.double().t() + (b.double() if bias else 0)
    assert similarity_diff(y.view(-1, n), exact) < 1e-3


# ---------------------------------------------------------------------------------------------
# The op: opcheck, fake shapes, torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(gen, backend):
    import glm45_ops

    if backend not in cpu_backends():
        pytest.skip("triton needs TRITON_INTERPRET=1 on CPU")
    with glm45_ops.use_backend(backend):
        for layout, out_dtype in (("row", torch.bfloat16), ("mn", torch.float32)):
            args = (*make_operands(7, 130, 256, gen, layout=layout), out_dtype)
            torch.library.opcheck(torch.ops.glm45.fp8_block_gemm.default, args, test_utils=OPCHECK_FP8)


@pytest.mark.parametrize("layout", ["row", "mn"])
def test_fake_shapes(layout):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        m, n, k = 4097, 14336, 5120
        a = torch.empty(m, k, dtype=FP8_DTYPE)
        a_scale = torch.empty(m, k // 128) if layout == "row" else torch.empty(k // 128, 4100).t()[:m]
        b = torch.empty(n, k, dtype=FP8_DTYPE)
        b_scale = torch.empty(n // 128, k // 128)
        out = torch.ops.glm45.fp8_block_gemm(a, a_scale, b, b_scale, torch.float32)
        assert out.shape == (m, n) and out.dtype == torch.float32 and out.is_contiguous()
    meta = [t.to("meta") for t in make_operands(3, 200, 128, torch.Generator().manual_seed(0))]
    out = torch.ops.glm45.fp8_block_gemm(*meta, torch.bfloat16)
    assert out.device.type == "meta" and out.shape == (3, 200) and out.dtype == torch.bfloat16


def test_torch_compile_fp8_linear(gen):
    """fp8_linear (quantizer + GEMM + bias) traces into one graph, and compiled == eager."""
    torch._dynamo.reset()
    k, n = 256, 130
    w_q, w_s = quant.per_block_quant_fp8(torch.randn(n, k, generator=gen) * 0.05)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    x = torch.randn(5, k, generator=gen).to(torch.bfloat16)

    def f(x):
        return gemm.fp8_linear(x, w_q, w_s, bias)

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bad_input(gen, device, backend):
    a, a_scale, b, b_scale = make_operands(8, 130, 256, gen, device=device)
    f = lambda *args, **kw: gemm.fp8_block_gemm(*args, backend=backend, **kw)  # noqa: E731
    cases = [
        ("a must be float8_e4m3fn", (a.float(), a_scale, b, b_scale)),
        ("b must be float8_e4m3fn", (a, a_scale, b.to(torch.float8_e5m2), b_scale)),
        ("a_scale must be float32", (a, a_scale.double(), b, b_scale)),
        ("b_scale must be float32", (a, a_scale, b, b_scale.half())),
        ("a must be 2-D", (a.view(2, 4, 256), a_scale, b, b_scale)),
        ("must share K", (a, a_scale, b[:, :128], b_scale[:, :1])),
        ("positive multiple of 128", (a[:, :64], a_scale[:, :1], b[:, :64], b_scale[:, :1])),
        (r"a_scale must have shape \(8, 2\)", (a, a_scale[:7], b, b_scale)),
        (r"b_scale must have shape \(2, 2\)", (a, a_scale, b, b_scale[:1])),
        ("a_scale must be row-major", (a, torch.empty(16, device=device).as_strided((8, 2), (1, 4)), b, b_scale)),
        ("b_scale must have a unit last stride", (a, a_scale, b, b_scale.t().contiguous().t())),
        ("a must have a unit last stride", (torch.empty(256, 8, dtype=FP8_DTYPE, device=device).t(), a_scale, b, b_scale)),
        ("b must have a unit last stride", (a, a_scale, b.t().contiguous().t(), b_scale)),
        ("row stride that is a multiple of 16", (a, a_scale, torch.empty(130, 264, dtype=FP8_DTYPE, device=device)[:, :256], b_scale)),
        ("at least one row", (a, a_scale, b[:0], b_scale[:0])),
        ("on one device", (a, a_scale, b, b_scale.to("meta"))),
    ]
    for match, args in cases:
        with pytest.raises(ValueError, match=match):
            f(*args)
    with pytest.raises(ValueError, match="out_dtype must be bfloat16 or float32"):
        f(a, a_scale, b, b_scale, torch.float16)
    with pytest.raises(ValueError, match="x must be a bfloat16"):
        gemm.fp8_linear(a.float(), b, b_scale, backend=backend)
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(130,\)"):
        gemm.fp8_linear(torch.ones(2, 256, dtype=torch.bfloat16, device=device), b, b_scale, torch.ones(3), backend=backend)


def test_bad_input_through_the_op_and_fake(gen):
    """Framework users call torch.ops.glm45.* directly: same errors, eager and under tracing."""
    a, a_scale, b, b_scale = make_operands(2, 130, 256, gen)
    with pytest.raises(ValueError, match="must share K"):
        torch.ops.glm45.fp8_block_gemm(a, a_scale, b[:, :128], b_scale[:, :1], torch.bfloat16)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(ValueError, match="must share K"):
            torch.ops.glm45.fp8_block_gemm(a, a_scale, b[:, :128], b_scale[:, :1], torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA/CUTLASS and Triton kernels at GLM-4.5 shapes (M buckets of both kernels)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("m", [1, 16, 64, 65, 130, 512, 4097])
@pytest.mark.parametrize("n,k", [(14336, 5120), (5120, 12288), (1000, 384)])
@pytest.mark.parametrize("layout,out_dtype", [("mn", torch.bfloat16), ("row", torch.float32)], ids=str)
def test_gpu_glm_shapes(backend, m, n, k, layout, out_dtype):
    from glm45_ops._registry import registered_ops

    if backend not in registered_ops()["fp8_block_gemm"].backends(torch.device("cuda")):
        pytest.skip(f"{backend} backend not available (extension not built?)")
    gen = torch.Generator("cuda").manual_seed(m * 7 + n)
    ops = make_operands(m, n, k, gen, layout=layout, device="cuda")
    out = gemm.fp8_block_gemm(*ops, out_dtype, backend=backend)
    assert_gemm_close(out, *ops)


# ---------------------------------------------------------------------------------------------
# Benchmark cases (glm45_ops/bench/cases/gemm.py): shapes and refcheck rule
# ---------------------------------------------------------------------------------------------

def test_bench_cases():
    from glm45_ops.bench.case import BenchContext
    from glm45_ops.bench.cases import gemm as cases_mod
    from glm45_ops.config import preset

    assert cases_mod.linear_shapes(preset("glm-4.5")) == [
        ("qkv_proj", 14336, 5120), ("o_proj/down_proj", 5120, 12288), ("gate_up_proj", 24576, 5120)]
    ctx = BenchContext(preset("small"), torch.device("cpu"), (256, 1))
    cases = cases_mod.cases(ctx)
    assert len({c.name for c in cases}) == len(cases)
    case = next(c for c in cases if c.name == "fp8_block_gemm qkv_proj M=1")
    outs = {b: case.make(b, torch.device("cpu"), torch.Generator().manual_seed(0))() for b in cpu_backends()}
    for out in outs.values():
        assert cases_mod.close(out, outs["torch"]) is None
    assert cases_mod.close(outs["torch"] * 1.01, outs["torch"]) is not None
