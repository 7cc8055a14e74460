"""FP8 block-wise quantization: every backend bit-exact with the reference, the reference checked
against an independent float64 oracle, layouts, opcheck, torch.compile and bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import device_backends
from glm45_ops import quant
from glm45_ops.reference.quant import E4M3_MAX, FP8_DTYPE

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BACKENDS = device_backends()


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare fp8 by bit pattern (NaN-safe, -0.0 distinct)."""
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t.view(torch.int32)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    diff = (bits(a.cpu()) != bits(b.cpu())).sum().item()
    assert diff == 0, f"{what}: {diff} of {a.numel()} values differ"


def wide_range(shape, dtype, gen, device="cpu") -> torch.Tensor:
    """Random values spanning ~9 decades across channels, so groups get very different scales,
    with one all-zero group and one exact e4m3 tie pattern."""
    k = shape[-1]
    x = torch.randn(shape, generator=gen) * torch.logspace(-5, 4, k)
    x = x.reshape(-1, k)
    x[0, : min(k, 128)] = 0.0
    if x.shape[0] > 1 and k >= 128:
        # 448 sets the scale to exactly 1, so 1.0625 and 1.1875 are ties between e4m3 neighbours
        x[1, :4] = torch.tensor([448.0, 1.0625, 1.1875, -0.0029296875])
    return x.reshape(shape).to(dtype).to(device)


@pytest.fixture
def poisoned(monkeypatch):
    """Every output buffer the ops allocate starts as NaN garbage, so a kernel that skips
    elements cannot pass by luck of zeroed memory."""

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == FP8_DTYPE:
            t.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
        else:
            t.fill_(float("nan"))
        return t

    orig_ptgq, orig_pbq = quant._alloc_ptgq, quant._alloc_pbq
    monkeypatch.setattr(quant, "_alloc_ptgq", lambda *a: tuple(map(poison, orig_ptgq(*a))))
    monkeypatch.setattr(quant, "_alloc_pbq", lambda *a: tuple(map(poison, orig_pbq(*a))))
    orig_empty = torch.empty

    def empty(*args, **kwargs):
        return poison(orig_empty(*args, **kwargs))

    monkeypatch.setattr(quant.torch, "empty", empty)
    yield


# ---------------------------------------------------------------------------------------------
# The reference against an independent float64 oracle
# ---------------------------------------------------------------------------------------------

def e4m3_grid() -> torch.Tensor:
    """All finite non-negative e4m3fn values, as float64."""
    v = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).double()
    return v[torch.isfinite(v) & (v >= 0)].unique()


def oracle_round_e4m3(y: torch.Tensor) -> torch.Tensor:
    """Round float64 values (already clamped to +-448) to the nearest e4m3 value, ties to even
    mantissa, by exhaustive search over the grid: no fp8 cast involved."""
    grid = e4m3_grid()
    a = y.abs().unsqueeze(-1)
    d = (a - grid).abs()
    best = d.min(dim=-1, keepdim=True).values
    cand = d == best
    codes = torch.arange(len(grid))
    # the grid is in bit-pattern order, so among tied candidates the even index has the even
    # mantissa
    score = torch.where(cand, codes % 2, torch.full_like(d, 99, dtype=torch.int64))
    idx = score.argmin(dim=-1)
    return grid[idx] * torch.sign(y) + 0.0 * y


@pytest.mark.parametrize("ue8m0", [False, True])
def test_reference_matches_float64_oracle(gen, ue8m0):
    x = wide_range((5, 384), torch.bfloat16, gen)
    x_q, scale = quant.per_token_group_quant_fp8(x, 128, 1e-4, ue8m0, backend="torch")
    xg = x.double().view(5, 3, 128)
    amax = xg.abs().amax(-1)
    want_scale = torch.maximum(amax, torch.tensor(1e-4, dtype=torch.float32).double()) / E4M3_MAX
    want_scale = want_scale.float()  # the definition rounds the scale to fp32
    if ue8m0:  # float64 log2 of an fp32 value is exact enough for ceil here
        want_scale = torch.exp2(torch.ceil(torch.log2(want_scale.double()))).float()
    assert_bit_equal(scale, want_scale, "scale")
    y = (xg / scale.double().unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX)
    # .float(): the definition divides in fp32 (the float64 quotient rounded once to fp32 is
    # the IEEE fp32 quotient: 53 >= 2*24 + 2 bits, so no double-rounding error)
    want_q = oracle_round_e4m3(y.float().double())
    torch.testing.assert_close(x_q.double().view(5, 3, 128), want_q, rtol=0, atol=0)


def test_zero_group_scale_is_eps_over_448():
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    x_q, scale = quant.per_token_group_quant_fp8(x, eps=1e-10, backend="torch")
    assert torch.all(scale == torch.tensor(1e-10, dtype=torch.float32) / 448.0)
    assert torch.all(x_q.float() == 0)


def test_ue8m0_is_exact_power_of_two_just_above():
    from glm45_ops.reference.quant import ceil_to_ue8m0

    s = torch.tensor([2.0**-20, 2.0**-20 * (1 + 2.0**-23), 0.75, 1.0, 3.0, 2.0**-126], dtype=torch.float32)
    want = torch.tensor([2.0**-20, 2.0**-19, 1.0, 1.0, 4.0, 2.0**-126], dtype=torch.float32)
    assert_bit_equal(ceil_to_ue8m0(s), want, "ue8m0")


# ---------------------------------------------------------------------------------------------
# Backends bit-exact with the reference
# ---------------------------------------------------------------------------------------------

PTGQ_SHAPES = [((1, 128), 128), ((7, 256), 128), ((3, 5, 384), 128), ((129, 128), 128), ((4, 192), 64), ((2, 96), 32)]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape,group", PTGQ_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_group_quant_bit_exact(poisoned, gen, device, backend, shape, group, dtype):
    x = wide_range(shape, dtype, gen, device)
    for ue8m0 in (False, True):
        for column_major in (False, True) if len(shape) == 2 else (False,):
            want = quant.per_token_group_quant_fp8(x.cpu(), group, 1e-4, ue8m0, column_major, backend="torch")
            got = quant.per_token_group_quant_fp8(x, group, 1e-4, ue8m0, column_major, backend=backend)
            tag = f"{backend} ue8m0={ue8m0} column_major={column_major}"
            assert_bit_equal(got[0], want[0], f"x_q {tag}")
            assert_bit_equal(got[1], want[1], f"scale {tag}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_per_token_group_quant_layouts(gen, device, backend):
    """Row-strided input (a slice of a wider buffer) and the column-major scale layout."""
    big = wide_range((9, 640), torch.bfloat16, gen, device)
    x = big[:, 128:512]
    assert not x.is_contiguous()
    x_q, scale = quant.per_token_group_quant_fp8(x, column_major_scales=True, backend=backend)
    assert scale.shape == (9, 3) and scale.stride() == (1, 12), scale.stride()
    assert x_q.is_contiguous()
    want_q, want_s = quant.per_token_group_quant_fp8(x.contiguous().cpu(), backend="torch")
    assert_bit_equal(x_q, want_q, "x_q")
    assert_bit_equal(scale.contiguous(), want_s, "scale")


PBQ_SHAPES = [(128, 128), (300, 260), (1, 5), (3, 129, 257), (2, 130, 384)]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape", PBQ_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_block_quant_bit_exact(poisoned, gen, device, backend, shape, dtype):
    w = (torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[-1])).to(dtype).to(device)
    w.view(-1, shape[-1])[0, 0] = 0.0
    for ue8m0 in (False, True):
        want = quant.per_block_quant_fp8(w.cpu(), 128, 1e-4, ue8m0, backend="torch")
        got = quant.per_block_quant_fp8(w, 128, 1e-4, ue8m0, backend=backend)
        assert_bit_equal(got[0], want[0], f"w_q {backend} ue8m0={ue8m0}")
        assert_bit_equal(got[1], want[1], f"scale_inv {backend} ue8m0={ue8m0}")


def test_per_block_quant_block_semantics(gen):
    """Each 128x128 block (partial at the edges) gets its own scale: a single large value
    only raises its own block's scale."""
    w = torch.randn(300, 260, generator=gen, dtype=torch.float32)
    w[200, 250] = 1000.0  # block (1, 1)
    _, s = quant.per_block_quant_fp8(w, backend="torch")
    assert s.shape == (3, 3)
    assert s[1, 1] == torch.tensor(1000.0, dtype=torch.float32) / 448.0
    others = torch.ones(3, 3, dtype=torch.bool)
    others[1, 1] = False
    assert torch.all(s[others] < 10.0 / 448.0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequant_bit_exact_and_roundtrip(poisoned, gen, device, backend, out_dtype):
    x = wide_range((9, 384), torch.bfloat16, gen, device)
    w = torch.randn(2, 200, 260, generator=gen).to(device)
    for t, blocks, cm in ((x, (1, 128), False), (x, (1, 128), True), (w, (128, 128), False)):
        if blocks == (1, 128):
            q, s = quant.per_token_group_quant_fp8(t, column_major_scales=cm, backend="torch" if device == "cpu" else backend)
        else:
            q, s = quant.per_block_quant_fp8(t, backend="torch" if device == "cpu" else backend)
        want = quant.dequant_fp8(q.cpu(), s.cpu(), *blocks, out_dtype, backend="torch")
        got = quant.dequant_fp8(q, s, *blocks, out_dtype, backend=backend)
        assert_bit_equal(got.float(), want.float(), f"dequant {blocks} column_major={cm}")
        # round trip: e4m3 keeps 3 mantissa bits, so |err| <= 2^-4 |x| on the normal range, and
        # <= 2^-10 * scale in the subnormal range; plus out_dtype's own rounding
        s_full = quant.dequant_fp8(torch.ones_like(q.float()).to(FP8_DTYPE), s, *blocks, torch.float32, backend="torch")
        err = (want.double().cpu() - t.double().cpu()).abs()
        out_eps = torch.finfo(out_dtype).eps
        bound = t.double().cpu().abs() * (2.0**-4 + out_eps) + s_full.double().cpu() * 2.0**-10
        assert torch.all(err <= bound * (1 + 1e-6)), (err - bound).max()


# ---------------------------------------------------------------------------------------------
# Ops: opcheck, torch.compile, dispatch
# ---------------------------------------------------------------------------------------------

# test_schema calls allclose on outputs, and CPU torch has no fp8 arithmetic (KNOWLEDGE.md §2)
OPCHECK_FP8 = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(gen, backend):
    from conftest import cpu_backends
    import glm45_ops

    if backend not in cpu_backends():
        pytest.skip("triton needs TRITON_INTERPRET=1 on CPU")
    x = wide_range((5, 256), torch.bfloat16, gen)
    w = torch.randn(3, 130, 200, generator=gen, dtype=torch.bfloat16)
    with glm45_ops.use_backend(backend):
        q, s = torch.ops.glm45.per_token_group_quant_fp8(x)
        wq, ws = torch.ops.glm45.per_block_quant_fp8(w)
        cases = [
            (torch.ops.glm45.per_token_group_quant_fp8.default, (x, 128, 1e-4, False, False)),
            (torch.ops.glm45.per_token_group_quant_fp8.default, (x, 64, 1e-10, True, True)),
            (torch.ops.glm45.per_block_quant_fp8.default, (w, 128, 1e-4, True)),
            (torch.ops.glm45.dequant_fp8.default, (q, s, 1, 128, torch.bfloat16)),
            (torch.ops.glm45.dequant_fp8.default, (wq, ws, 128, 128, torch.float32)),
        ]
        for op, args in cases:
            torch.library.opcheck(op, args, test_utils=OPCHECK_FP8)


def test_torch_compile_fullgraph(gen):
    """The quantizer traces through its fake into a full graph, and compiled == eager."""
    torch._dynamo.reset()

    def f(x):
        q, s = torch.ops.glm45.per_token_group_quant_fp8(x, 128, 1e-4, True)
        return torch.ops.glm45.dequant_fp8(q, s, 1, 128, torch.float32) * 2

    x = wide_range((6, 256), torch.bfloat16, gen)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    assert_bit_equal(compiled(x), f(x), "compiled vs eager")


def test_dispatch_and_backend_choice(gen, monkeypatch):
    import glm45_ops
    from glm45_ops import _registry
    from conftest import cpu_backends

    op = _registry.registered_ops()["per_token_group_quant_fp8"]
    cpu = torch.device("cpu")
    assert op.resolve("auto", cpu) == "torch"
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        quant.per_token_group_quant_fp8(torch.ones(1, 128), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        quant.per_token_group_quant_fp8(torch.ones(1, 128), backend="fast")
    monkeypatch.setenv("GLM45_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        glm45_ops.default_backend()
    monkeypatch.setenv("GLM45_BACKEND", "auto")
    if "triton" in cpu_backends():
        calls = []
        orig = op.impls["triton"]
        monkeypatch.setitem(op.impls, "triton", lambda *a, **k: calls.append(1) or orig(*a, **k))
        with glm45_ops.use_backend("triton"):  # reaches the op's dispatcher impl too
            torch.ops.glm45.per_token_group_quant_fp8(torch.ones(2, 128))
        assert calls == [1]


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


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bad_input(device, backend):
    x = torch.randn(4, 256, device=device)
    with pytest.raises(ValueError, match="divisible by group_size"):
        quant.per_token_group_quant_fp8(x[:, :200], backend=backend)
    with pytest.raises(ValueError, match="x must be bfloat16"):
        quant.per_token_group_quant_fp8(x.to(torch.int32), backend=backend)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        quant.per_token_group_quant_fp8(x, 0, backend=backend)
    with pytest.raises(ValueError, match="eps must be > 0"):
        quant.per_token_group_quant_fp8(x, 128, 0.0, backend=backend)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        quant.per_token_group_quant_fp8(torch.randn(256, 4, device=device).t(), backend=backend)
    with pytest.raises(ValueError, match="column_major_scales=True needs a 2-D x"):
        quant.per_token_group_quant_fp8(x.view(2, 2, 256), column_major_scales=True, backend=backend)
    with pytest.raises(ValueError, match=r"w must be \[N, K\] or \[E, N, K\]"):
        quant.per_block_quant_fp8(x.view(2, 2, 2, 128), backend=backend)
    with pytest.raises(ValueError, match="w must be bfloat16"):
        quant.per_block_quant_fp8(x.to(torch.float64), backend=backend)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        quant.per_block_quant_fp8(x, -128, backend=backend)
    q, s = quant.per_token_group_quant_fp8(x, backend="torch" if device == "cpu" else backend)
    with pytest.raises(ValueError, match="scale must have shape"):
        quant.dequant_fp8(q, s[:, :1], 1, 128, backend=backend)
    with pytest.raises(ValueError, match="x_q must be a float8_e4m3fn"):
        quant.dequant_fp8(x, s, 1, 128, backend=backend)
    with pytest.raises(ValueError, match="scale must be a float32"):
        quant.dequant_fp8(q, s.double(), 1, 128, backend=backend)
    with pytest.raises(ValueError, match="out_dtype must be"):
        quant.dequant_fp8(q, s, 1, 128, torch.int8, backend=backend)


def test_bad_input_through_the_op_and_fake():
    """Framework users call torch.ops.glm45.* directly: same errors, eager and under tracing."""
    with pytest.raises(ValueError, match="divisible by group_size"):
        torch.ops.glm45.per_token_group_quant_fp8(torch.randn(2, 100))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        with pytest.raises(ValueError, match="divisible by group_size"):
            torch.ops.glm45.per_token_group_quant_fp8(torch.randn(2, 100))


def test_requant_fp8_weights(gen):
    ws = [torch.randn(s, generator=gen, dtype=torch.bfloat16) for s in ((256, 128), (2, 130, 300), (7, 9))]
    out = quant.requant_fp8_weights(ws, scale_ue8m0=True, backend="torch")
    for w, (q, s) in zip(ws, out):
        want = quant.per_block_quant_fp8(w, scale_ue8m0=True, backend="torch")
        assert_bit_equal(q, want[0], "w_q")
        assert_bit_equal(s, want[1], "scale_inv")
