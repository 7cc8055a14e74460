"""FP8 block-wise quantization: the reference checked against an independent float64 oracle
(finite, NaN/inf and partial-group semantics), every backend bit-exact with it on awkward shapes,
layouts and strides. opcheck, torch.compile, bad input, empty and non-finite inputs of every op
are the generic contract tests (tests/test_contract.py, tables in glm45_ops/quant.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import device_backends
from glm45_ops import quant
from glm45_ops.reference.quant import E4M3_MAX, FP8_DTYPE
from glm45_ops.testing import assert_bit_equal, poisoned_outputs

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BACKENDS = device_backends()


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
def poisoned():
    """Every output buffer the ops allocate starts as NaN garbage, so a kernel that skips
    elements cannot pass by luck of zeroed memory."""
    with poisoned_outputs():
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
    assert torch.isnan(ceil_to_ue8m0(torch.tensor([float("nan")]))).all(), "NaN used to become 1.0"


# ---------------------------------------------------------------------------------------------
# Backends bit-exact with the reference
# ---------------------------------------------------------------------------------------------

PTGQ_SHAPES = [((1, 128), 128), ((7, 256), 128), ((3, 5, 384), 128), ((129, 128), 128), ((4, 192), 64), ((2, 96), 32),
               ((5, 192), 128), ((3, 176), 128), ((4, 100), 96), ((2, 7), 128)]


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


# ---------------------------------------------------------------------------------------------
# Non-finite values and edge sizes (the reference docstring's rules, on every backend)
# ---------------------------------------------------------------------------------------------

def _is_nan_fp8(q: torch.Tensor) -> torch.Tensor:
    return (q.view(torch.uint8) & 0x7F) == 0x7F


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_nan_poisons_its_group_and_inf_saturates(poisoned, gen, device, backend, ue8m0):
    """A NaN makes its group's scale and values NaN (the Triton kernels used to drop it in
    tl.max and clamp NaN to -448); +-inf leaves amax alone and saturates to +-448 (it used to
    become -448 or NaN); other groups are untouched."""
    x = wide_range((3, 384), torch.float32, gen)
    x[0, 130] = float("nan")  # row 0, group 1
    x[1, 5], x[1, 6] = float("inf"), -float("inf")  # row 1, group 0
    clean = x.clone()
    clean[0, 130], clean[1, 5], clean[1, 6] = 0.0, 0.0, 0.0
    q, s = quant.per_token_group_quant_fp8(x.to(device), scale_ue8m0=ue8m0, backend=backend)
    q_clean, s_clean = quant.per_token_group_quant_fp8(clean, scale_ue8m0=ue8m0, backend="torch")
    q, s = q.cpu(), s.cpu()
    assert torch.isnan(s[0, 1]) and _is_nan_fp8(q[0, 128:256]).all()
    assert not torch.isnan(s).flatten()[[0, 2, 3, 4, 5, 6, 7, 8]].any()
    assert s[1, 0] == s_clean[1, 0], "inf must not enter amax"
    assert q[1, 5].float() == E4M3_MAX and q[1, 6].float() == -E4M3_MAX
    keep = torch.ones(3, 384, dtype=torch.bool)
    keep[0, 128:256] = False
    keep[1, 5:7] = False
    assert torch.equal(q.view(torch.uint8)[keep], q_clean.view(torch.uint8)[keep])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_per_block_nan_and_inf(poisoned, gen, device, backend):
    w = torch.randn(2, 200, 300, generator=gen)
    w[0, 150, 10] = float("nan")  # block (0, 1, 0)
    w[1, 3, 299] = -float("inf")  # block (1, 0, 2)
    for ue8m0 in (False, True):
        q, s = quant.per_block_quant_fp8(w.to(device), scale_ue8m0=ue8m0, backend=backend)
        q, s = q.cpu(), s.cpu()
        assert torch.isnan(s[0, 1, 0]) and _is_nan_fp8(q[0, 128:200, :128]).all()
        assert torch.isnan(s).sum() == 1
        assert torch.isfinite(s[1, 0, 2]) and q[1, 3, 299].float() == -E4M3_MAX


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_dequant_nan_bytes_and_scales(device, backend):
    """The e4m3 NaN bytes 0x7f/0xff dequantize to NaN (the interpreter decodes them as +-480)."""
    q = torch.full((2, 256), 0x38, dtype=torch.uint8)  # 1.0
    q[0, 3], q[1, 200] = 0x7F, 0xFF
    s = torch.tensor([[2.0, float("nan")], [0.5, 4.0]])
    out = quant.dequant_fp8(q.view(FP8_DTYPE).to(device), s.to(device), out_dtype=torch.float32, backend=backend).cpu()
    nan = torch.zeros(2, 256, dtype=torch.bool)
    nan[0, 3] = nan[1, 200] = True
    nan[0, 128:] = True
    assert torch.equal(torch.isnan(out), nan)
    assert torch.all(out[1, :128] == 0.5) and out[0, 0] == 2.0


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_partial_last_group_is_its_own_group(gen, device, backend):
    """K = 192 (GLM-4.5's expert width at TP8) with 128-groups: the second group holds 64
    channels, scaled by their own amax; the same as quantizing that slice alone."""
    x = wide_range((5, 192), torch.bfloat16, gen)
    q, s = quant.per_token_group_quant_fp8(x.to(device), backend=backend)
    assert s.shape == (5, 2) and q.shape == (5, 192)
    q0, s0 = quant.per_token_group_quant_fp8(x[:, :128].contiguous(), backend="torch")
    q1, s1 = quant.per_token_group_quant_fp8(x[:, 128:].contiguous(), 64, backend="torch")
    assert_bit_equal(s.cpu(), torch.cat([s0, s1], 1), "scales")
    assert_bit_equal(q.cpu(), torch.cat([q0, q1], 1), "x_q")


def test_smallest_eps_gives_a_normal_scale():
    """The smallest accepted eps still gives zero groups a positive normal fp32 scale
    (1e-44 used to give a zero scale, so 0/0 = NaN); one ulp below it is refused."""
    tiny = torch.finfo(torch.float32).tiny
    eps = float(torch.tensor(448.0 * tiny))
    _, s = quant.per_token_group_quant_fp8(torch.zeros(1, 128), eps=eps, backend="torch")
    assert s.item() >= tiny
    with pytest.raises(ValueError, match="eps must be finite and at least"):
        quant.per_token_group_quant_fp8(torch.zeros(1, 128), eps=eps * (1 - 2**-20))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_per_block_quant_non_power_of_two_blocks(poisoned, gen, device, backend):
    """block_size 96 used to crash the Triton kernel (tl.arange needs a power of two)."""
    big = torch.randn(3, 200, 130, generator=gen, dtype=torch.bfloat16)
    # one interpreted program per block: block 1 gets a small tensor
    for block, w in ((96, big), (33, big), (1, big[:2, :3, :5])):
        want = quant.per_block_quant_fp8(w, block, backend="torch")
        got = quant.per_block_quant_fp8(w.to(device), block, backend=backend)
        assert_bit_equal(got[0], want[0], f"w_q block {block}")
        assert_bit_equal(got[1], want[1], f"scale block {block}")


def test_dequant_huge_block_allocates_nothing_extra():
    """dequant_fp8(..., block_m=2**30) used to repeat the scales 2**30 times (64 GiB)."""
    q, s = quant.per_block_quant_fp8(torch.randn(5, 7), backend="torch")
    out = quant.dequant_fp8(q, s, 2**30, 2**30, torch.float32, backend="torch")
    torch.testing.assert_close(out, q.float() * s.item(), rtol=0, atol=0)


def test_requant_fp8_weights(gen):
    ws = [torch.randn(s, generator=gen, dtype=torch.bfloat16) for s in ((256, 128), (2, 130, 300), (7, 9))]
    out = quant.requant_fp8_weights(ws, scale_ue8m0=True, backend="torch")
    for w, (q, s) in zip(ws, out):
        want = quant.per_block_quant_fp8(w, scale_ue8m0=True, backend="torch")
        assert_bit_equal(q, want[0], "w_q")
        assert_bit_equal(s, want[1], "scale_inv")
