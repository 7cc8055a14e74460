"""FP8 block-scaled GEMM: every backend against a float64 oracle of the dequantized operands
(``glm45_ops.gemm.error_bound``: one rounding into out's dtype plus fp32 accumulation, or the
tensor cores' 14-bit accumulator on CUDA; and DeepGEMM's calc_diff), at GLM-4.5's TP8 expert
widths K = 192 and 176 through the quantizer, both a_scale layouts, UE8M0 scales, fp8_linear
(NaN rows included) and the GPU bound's derivation. opcheck, fake tensors, empty and non-finite
samples, torch.compile of the op and its bad inputs are the generic contract tests' (the op's
samples/errors tables in glm45_ops/gemm.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import cpu_backends, device_backends
from glm45_ops import gemm, quant, registered_ops
from glm45_ops.reference.gemm import fp8_block_gemm_ref
from glm45_ops.testing import assert_bit_equal, calc_diff, poisoned_outputs

OP = registered_ops()["fp8_block_gemm"]
BACKENDS = device_backends()
OUT_DTYPES = (torch.bfloat16, torch.float32)
# (M, N, K): M from decode to a few tiles, N odd and across 128-blocks of b_scale, K over 1-3
# full scale slices and the partial last slice of GLM-4.5 (192) and GLM-4.5-Air (176) at TP8,
# and the smallest K (16, one partial slice)
SHAPES = [(1, 257, 256), (7, 129, 384), (64, 300, 128), (130, 77, 256), (5, 257, 192), (3, 130, 176), (9, 33, 16)]
TP8_WIDTHS = (192, 176)


@pytest.fixture
def poisoned():
    with poisoned_outputs():
        yield


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


def tensor_cores(device, backend) -> bool:
    """The kernels on CUDA accumulate at the tensor cores' width; torch's fp32 matmul does not."""
    return gemm.tensor_core_accumulation(torch.device(device)) and backend != "torch"


def assert_gemm_close(out, a, a_scale, b, b_scale, *, tc=False):
    """Finite, within ``gemm.error_bound`` of the float64 oracle everywhere, and calc_diff < 1e-4."""
    want, bound = gemm.error_bound(a, a_scale, b, b_scale, out.dtype, tc)
    got = out.to(want.device).double()
    assert out.shape == want.shape
    assert torch.isfinite(got).all()
    excess = (got - want).abs() - bound
    assert torch.all(excess <= 0), f"max excess {excess.max().item():.3g}"
    assert calc_diff(got, want) < gemm.SIMILARITY_LIMIT


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["row", "mn"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_matches_float64_oracle(poisoned, gen, device, backend, shape, layout, out_dtype):
    ops = make_operands(*shape, gen, layout=layout, device=device)
    one_dim = shape[0] == 1 or shape[2] <= 128  # a size-1 dim: both layouts at once
    assert gemm.scale_layout(ops[1]) == ("mn" if layout == "mn" or one_dim else "row")
    out = gemm.fp8_block_gemm(*ops, out_dtype, backend=backend)
    assert out.dtype == out_dtype and out.is_contiguous()
    assert_gemm_close(out, *ops, tc=tensor_cores(device, backend))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("k", TP8_WIDTHS)
def test_tp8_expert_widths_through_quant(poisoned, gen, device, backend, k):
    """GLM-4.5 (K=192) and Air (K=176) at TP8: quantize on the backend (partial last group,
    bit-exact with the reference), then the GEMM on it (partial last K block)."""
    x = (torch.randn(6, k, generator=gen) * torch.logspace(-2, 2, k)).to(torch.bfloat16).to(device)
    w = (torch.randn(200, k, generator=gen) * 0.05).to(device)
    a, a_scale = quant.per_token_group_quant_fp8(x, column_major_scales=True, backend=backend)
    b, b_scale = quant.per_block_quant_fp8(w, backend=backend)
    assert a_scale.shape == (6, 2) and b_scale.shape == (2, 2)
    want_a = quant.per_token_group_quant_fp8(x, column_major_scales=True, backend="torch")
    for got, want, what in ((a, want_a[0], "x_q"), (a_scale, want_a[1], "x scale")):
        assert_bit_equal(got, want, what)
    out = gemm.fp8_block_gemm(a, a_scale, b, b_scale, backend=backend)
    assert_gemm_close(out, a, a_scale, b, b_scale, tc=tensor_cores(device, backend))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ue8m0_scales(poisoned, gen, device, backend):
    ops = make_operands(33, 200, 176, gen, layout="mn", ue8m0=True, device=device)
    mantissa, _ = torch.frexp(torch.cat([ops[1].flatten(), ops[3].flatten()]))
    assert torch.all(mantissa == 0.5), "test setup: scales must be powers of two"
    assert_gemm_close(gemm.fp8_block_gemm(*ops, backend=backend), *ops, tc=tensor_cores(device, backend))


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_large_m(gen, device, backend):
    ops = make_operands(4097, 135, 256, gen, layout="mn", device=device)
    assert_gemm_close(gemm.fp8_block_gemm(*ops, backend=backend), *ops, tc=tensor_cores(device, backend))


@pytest.mark.parametrize("k", [256, 176])
def test_reference_is_the_dequantized_matmul(gen, k):
    ops = make_operands(5, 130, k, gen)
    want, _ = gemm.oracle(*ops)
    got = fp8_block_gemm_ref(*ops, torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("k", [256, 176])
def test_triton_launcher_writes_exactly_its_tile(gen, k):
    """A strided output view: every element written, nothing outside it touched."""
    from triton_ops import gemm as tg

    a, a_scale, b, b_scale = make_operands(9, 70, k, gen, layout="mn")
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
# The GPU bound (glm45_ops.gemm: a 14-bit accumulator inside each 128-wide K slice)
# ---------------------------------------------------------------------------------------------

def _truncate(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` (float64) truncated toward zero to ``bits`` significant bits."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.trunc(torch.ldexp(mantissa, torch.full_like(exponent, bits))), exponent - bits)


def tensor_core_gemm(a, a_scale, b, b_scale, *, bits=14, fused=4):
    """A simulated Hopper FP8 GEMM: inside each 128-wide K slice, ``fused`` exact products at a
    time are added into an accumulator truncated to ``bits`` significant bits; the slices are
    promoted into fp32 with their scales, as the kernels do."""
    m, k = a.shape
    nb = torch.arange(b.shape[0]) // gemm.GEMM_BLOCK
    af, bf = a.double(), b.double()
    out = torch.zeros(m, b.shape[0], dtype=torch.float32)
    for s in range(0, k, gemm.GEMM_BLOCK):
        acc = torch.zeros(m, b.shape[0], dtype=torch.float64)
        for g in range(s, min(s + gemm.GEMM_BLOCK, k), fused):
            acc = _truncate(acc + af[:, g:g + fused] @ bf[:, g:g + fused].t(), bits)
        j = s // gemm.GEMM_BLOCK
        out += acc.float() * a_scale[:, j:j + 1] * b_scale[nb, j][None, :]
    return out


def test_gpu_bound_covers_a_14_bit_accumulator(gen):
    """The simulated tensor-core GEMM breaks the fp32 bound (why GPUs get their own) and stays
    within the tensor-core bound, which compare picks for CUDA tensors only."""
    assert gemm.tensor_core_accumulation(torch.device("cuda", 0))
    assert not gemm.tensor_core_accumulation(torch.device("cpu"))
    worst_fp32 = worst_tc = 0.0
    for m, n, k in [(16, 64, 128), (16, 64, 192), (16, 64, 176), (8, 40, 384)]:
        ops = make_operands(m, n, k, gen)
        out = tensor_core_gemm(*ops)
        y, fp32_bound = gemm.error_bound(*ops, torch.float32, False)
        _, tc_bound = gemm.error_bound(*ops, torch.float32, True)
        err = (out.double() - y).abs()
        worst_fp32 = max(worst_fp32, (err / fp32_bound).nan_to_num().max().item())
        worst_tc = max(worst_tc, (err / tc_bound).nan_to_num().max().item())
        assert calc_diff(out, y) < gemm.SIMILARITY_LIMIT
    assert worst_fp32 > 2, "test setup: a 14-bit accumulator must break the fp32 bound"
    assert worst_tc < 0.5, f"the tensor-core bound leaves too little margin: {worst_tc:.2f} of it used"
    ops = make_operands(16, 64, 128, gen)
    simulated = tensor_core_gemm(*ops)
    want = gemm.fp8_block_gemm(*ops, torch.float32, backend="torch")
    assert "beyond the bound" in OP.compare(simulated, want, (*ops, torch.float32))


# ---------------------------------------------------------------------------------------------
# fp8_linear
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("k", [384, 192])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear(gen, device, backend, k, bias):
    n = 136
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
        assert_gemm_close(y.view(-1, n), x_q, x_s, w_q, w_s, tc=tensor_cores(device, backend))
    # and FP8 is a faithful stand-in for the bf16 linear layer (DeepGEMM's FP8 threshold)
    exact = x.view(-1, k).double() @ w.double().t() + (b.double() if bias else 0)
    assert calc_diff(y.view(-1, n), exact) < 1e-3


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_fp8_linear_nan_activation_gives_a_nan_row(gen, device, backend):
    """A NaN activation makes its group's scale NaN, so its output row is NaN and no other."""
    k, n = 192, 72
    x = torch.randn(4, k, generator=gen).to(torch.bfloat16)
    x[2, 150] = float("nan")  # in the partial last group
    w_q, w_s = quant.per_block_quant_fp8(torch.randn(n, k, generator=gen) * 0.05, backend="torch")
    y = gemm.fp8_linear(x.to(device), w_q.to(device), w_s.to(device), backend=backend).cpu()
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3]]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_fp8_linear_bad_input(gen, device, backend):
    """fp8_linear's own checks (the GEMM's are its error table)."""
    _, _, b, b_scale = make_operands(1, 130, 256, gen, device=device)
    with pytest.raises(ValueError, match="x must be a bfloat16"):
        gemm.fp8_linear(torch.ones(2, 256, device=device), b, b_scale, backend=backend)
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(130,\)"):
        gemm.fp8_linear(torch.ones(2, 256, dtype=torch.bfloat16, device=device), b, b_scale, torch.ones(3), backend=backend)


def test_torch_compile_fp8_linear(gen):
    """fp8_linear (quantizer + GEMM + bias) traces into one graph, and compiled == eager."""
    torch._dynamo.reset()
    k, n = 192, 130
    w_q, w_s = quant.per_block_quant_fp8(torch.randn(n, k, generator=gen) * 0.05)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    x = torch.randn(5, k, generator=gen).to(torch.bfloat16)

    def f(x):
        return gemm.fp8_linear(x, w_q, w_s, bias)

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA/CUTLASS and Triton kernels at GLM-4.5 shapes (M buckets of both kernels)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("m", [1, 16, 64, 65, 130, 512, 4097])
@pytest.mark.parametrize("n,k", [(14336, 5120), (5120, 12288), (1000, 384), (5120, 192), (4096, 176)])
@pytest.mark.parametrize("layout,out_dtype", [("mn", torch.bfloat16), ("row", torch.float32)], ids=str)
def test_gpu_glm_shapes(poisoned, backend, m, n, k, layout, out_dtype):
    if backend not in OP.backends(torch.device("cuda")):
        pytest.skip(f"{backend} backend not available (extension not built?)")
    gen = torch.Generator("cuda").manual_seed(m * 7 + n)
    ops = make_operands(m, n, k, gen, layout=layout, device="cuda")
    out = gemm.fp8_block_gemm(*ops, out_dtype, backend=backend)
    assert_gemm_close(out, *ops, tc=True)


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
