"""The CUDA kernels of the FP8 quant family (csrc/quant/fp8_quant.cu): bit-exact with the torch
reference on the shapes, strides and alignments that pick each kernel path (NaN/inf, partial last
groups, empty tensors and grids past 65535 and 2^31 - 1 CTAs included), plus their checks.

Without a GPU this still checks the kernels' scalar math on the host (tests/cpp/fp8_scale_check.cpp)
and, when the extension is built, the C++ argument checks beyond the error tables (which
tests/test_extension.py runs for every op): size limits, partial blocks, eps values and every
dtype's name, through ``glm45_ops.testing.cuda_kernel_differs`` (Python's ValueError word for
word, or, for arguments Python accepts, only the device error).
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import glm45_ops
from glm45_ops import quant
from glm45_ops.reference.quant import E4M3_MAX, FP8_DTYPE
from glm45_ops.testing import assert_bit_equal, cuda_kernel_differs, poison_cuda_cache

ROOT = Path(__file__).resolve().parents[2]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OPS = {op.name: op for op in quant.OPS}
gpu = pytest.mark.gpu


def spread(shape, dtype, gen, device="cuda") -> torch.Tensor:
    """Random values spanning ~9 decades along the last dim (groups and blocks get very different
    scales), a zero region, and exact e4m3 ties at scale 1."""
    x = torch.randn(shape, generator=gen) * torch.logspace(-5, 4, shape[-1])
    flat = x.view(-1, shape[-1])
    if flat.shape[0] > 0:
        flat[0, : min(shape[-1], 128)] = 0.0
    if flat.shape[0] > 1 and shape[-1] >= 4:
        flat[1, :4] = torch.tensor([448.0, 1.0625, 1.1875, -0.0029296875])
    return x.to(dtype).to(device)


def poison_outputs(*tensors: torch.Tensor) -> None:
    """Garbage in the caching allocator's free blocks of each reference output's size, so the
    kernel's outputs (allocated right after, reusing them) start as garbage, not zeros."""
    for t in tensors:
        poison_cuda_cache(max(t.numel() * t.element_size(), 1))


def check_ptgq(x: torch.Tensor, group: int = 128, eps: float = 1e-4, ue8m0: bool = False, col: bool = False) -> None:
    want_q, want_s = quant.per_token_group_quant_fp8(x.cpu(), group, eps, ue8m0, col, backend="torch")
    poison_outputs(want_q, want_s)
    q, s = quant.per_token_group_quant_fp8(x, group, eps, ue8m0, col, backend="cuda")
    assert q.is_contiguous() and s.stride() == want_s.stride(), (s.stride(), want_s.stride())
    assert_bit_equal(q, want_q, "x_q")
    assert_bit_equal(s, want_s, "scale")


def check_pbq(w: torch.Tensor, block: int = 128, eps: float = 1e-4, ue8m0: bool = False) -> None:
    want_q, want_s = quant.per_block_quant_fp8(w.cpu(), block, eps, ue8m0, backend="torch")
    poison_outputs(want_q, want_s)
    q, s = quant.per_block_quant_fp8(w, block, eps, ue8m0, backend="cuda")
    assert q.is_contiguous() and s.is_contiguous()
    assert_bit_equal(q, want_q, "w_q")
    assert_bit_equal(s, want_s, "scale_inv")


def check_dequant(x_q: torch.Tensor, scale: torch.Tensor, bm: int, bn: int, out_dtype: torch.dtype) -> None:
    want = quant.dequant_fp8(x_q.cpu(), scale.cpu(), bm, bn, out_dtype, backend="torch")
    poison_outputs(want)
    got = quant.dequant_fp8(x_q, scale, bm, bn, out_dtype, backend="cuda")
    assert got.is_contiguous()
    assert_bit_equal(got, want, "dequant")


# ---------------------------------------------------------------------------------------------
# No GPU needed: the scale math on the host, the C++ checks through the CUDA key
# ---------------------------------------------------------------------------------------------

def test_scale_math_is_exact_on_host(tmp_path):
    """The kernels' scale math (csrc/quant/fp8_scale.cuh: IEEE scale, UE8M0 keeping NaN, x / scale
    by Markstein's correction, +-inf / scale) against IEEE division and frexp/ldexp."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "fp8_scale_check"
    src = ROOT / "tests" / "cpp" / "fp8_scale_check.cpp"
    subprocess.run([cxx, "-O2", "-std=c++17", "-ffp-contract=off", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)],
                   check=True, timeout=300)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "mismatches=0" in run.stdout, run.stdout + run.stderr


def every_dtype(shape) -> list[torch.Tensor]:
    """An empty tensor of each dtype torch has (quiet about the experimental ones)."""
    dtypes = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [torch.empty(shape, dtype=d) for d in dtypes]


_x = torch.ones(4, 256)
_xq, _s = torch.ones(4, 256).to(FP8_DTYPE), torch.ones(4, 2)
_EPS_REFUSED = [0.0, -0.0, -1.0, -2.5, 1e-44, 1e-40, 5e-36, 5.26e-36, float("nan"), float("inf"), -float("inf"),
                1e39, -1e16, -1e15, -0.0001, -1.5e-05, -1 / 3, -123456789.5]
_EPS_ACCEPTED = [5.27e-36, 1e-35, 1e-10, 1e-4, 448.0, 3.4e38]
MORE = [
    # sizes at and past their limits
    ("per_token_group_quant_fp8", (_x, 4096)), ("per_token_group_quant_fp8", (_x, 4097)),
    ("per_token_group_quant_fp8", (_x, -5)), ("per_block_quant_fp8", (_x, 256)), ("per_block_quant_fp8", (_x, 257)),
    ("per_block_quant_fp8", (_x, 0)), ("dequant_fp8", (_xq, _s[:, :1], 1, 2**31 - 1)),
    ("dequant_fp8", (_xq, _s[:, :1], 1, 2**31)), ("dequant_fp8", (_xq, _s[:1, :1], 2**31 - 1, 256)),
    ("dequant_fp8", (_xq, _s, -1, 128)),
    # any K, partial last groups and blocks
    ("per_token_group_quant_fp8", (torch.ones(3, 192),)), ("per_token_group_quant_fp8", (torch.ones(3, 176), 128)),
    ("per_token_group_quant_fp8", (torch.ones(3, 7), 4)), ("per_token_group_quant_fp8", (torch.ones(5, 176),),
                                                             {"column_major_scales": True}),
    ("per_block_quant_fp8", (torch.ones(130, 200), 96)), ("dequant_fp8", (_xq[:, :200], _s, 1, 128)),
    ("dequant_fp8", (_xq[:, :200], _s[:, :1], 1, 128)),
    # dims, strides, empty tensors, devices
    ("per_token_group_quant_fp8", (torch.ones(()),)), ("per_token_group_quant_fp8", (torch.ones(256),)),
    ("per_token_group_quant_fp8", (torch.ones(4, 0),)), ("per_token_group_quant_fp8", (_x.t(),)),
    ("per_token_group_quant_fp8", (torch.ones(4, 256).t()[:, :1],)),
    ("per_block_quant_fp8", (torch.ones(256),)), ("per_block_quant_fp8", (torch.ones(1, 1, 4, 4),)),
    ("per_block_quant_fp8", (torch.ones(2, 0, 128),)), ("per_block_quant_fp8", (torch.ones(8, 4).t(),)),
    ("dequant_fp8", (_xq[0], _s[0])), ("dequant_fp8", (_xq, torch.ones(4, 3))),
    ("dequant_fp8", (_xq.view(2, 2, 256), _s.view(2, 2, 2))), ("dequant_fp8", (_xq.view(2, 2, 256), _s)),
    ("dequant_fp8", (_xq.t().contiguous().t(), _s)), ("dequant_fp8", (_xq[:0], _s[:0])),
    ("dequant_fp8", (_xq, _s.to("meta"))), ("dequant_fp8", (_xq, _s, 1, 128, torch.float64)),
    ("dequant_fp8", (_xq, _s, 1, 128, torch.float8_e4m3fn)),
    # eps: Python's repr in the message, the fp32 rounding of the threshold
    *[("per_token_group_quant_fp8", (_x, 128, eps)) for eps in _EPS_REFUSED + _EPS_ACCEPTED],
    *[("per_block_quant_fp8", (_x, 128, eps)) for eps in (1e-44, 1e-35)],
    # every dtype, printed as Python prints it
    *[("dequant_fp8", (t, _s[:2, :1])) for t in every_dtype((2, 2))],
    *[("per_token_group_quant_fp8", (_x.to(d),)) for d in (torch.float64, torch.int8, torch.bool, torch.complex64)],
    *[("per_block_quant_fp8", (_x.to(d),)) for d in (torch.float8_e5m2, torch.uint8)],
]


@pytest.mark.parametrize("name,args,kwargs", [pytest.param(*(c if len(c) == 3 else (*c, {})), id=f"{c[0]}-{i}")
                                              for i, c in enumerate(MORE)])
def test_cpp_checks_match_python(name, args, kwargs):
    """Limits, partial blocks, dims, strides, empty tensors, eps (its repr and its fp32 threshold)
    and every dtype's name: the C++ message is Python's, or the device error where Python accepts."""
    if not glm45_ops.extension_loaded():
        pytest.skip(f"extension not built: {glm45_ops.extension_error()}")
    why = cuda_kernel_differs(OPS[name], args, kwargs)
    assert why is None, why


def test_the_smallest_eps_is_the_fp32_threshold():
    """The eps cases above straddle the threshold from both sides."""
    least = E4M3_MAX * torch.finfo(torch.float32).tiny
    assert max(e for e in _EPS_REFUSED if 0 < e < 1) < least < min(_EPS_ACCEPTED)


# ---------------------------------------------------------------------------------------------
# On the GPU: bit-exact with the reference, path by path
# ---------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("ue8m0,col", [(False, False), (True, True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [128, 176, 192, 384, 5120])
@pytest.mark.parametrize("m", [1, 7, 129, 4097])
def test_per_token_group_quant(gen, m, k, dtype, ue8m0, col):
    """K = 192 and 176 (GLM-4.5 and -Air TP8 expert widths): a partial last group of 64 / 48 on
    the warp path (its lanes past K idle)."""
    check_ptgq(spread((m, k), dtype, gen), ue8m0=ue8m0, col=col)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [8, 16, 32, 64, 96, 256, 512, 1024, 4096])
def test_per_token_group_quant_group_sizes(gen, dtype, group):
    """Warp path (16-byte vectors, a power-of-two number of lanes <= 32), one-pass block path
    (1 x group blocks), and the scalar path (groups of odd byte sizes); whole and partial groups."""
    check_ptgq(spread((33, 2 * group), dtype, gen), group)
    check_ptgq(spread((5, 4 * group), dtype, gen), group, ue8m0=True, col=True)
    check_ptgq(spread((9, 2 * group + 8), dtype, gen), group)  # a partial group of 8 on every path
    check_ptgq(spread((3, 3 * group - 1), dtype, gen), group, col=True)  # K odd: the block paths


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_group_quant_strides_and_alignment(gen, dtype):
    base = spread((65, 1000), dtype, gen)
    check_ptgq(base[:, :512])                       # row stride 1000 (16-byte aligned rows)
    check_ptgq(base[:, 8:520])                      # aligned base, strided rows
    check_ptgq(base[:, 1:513])                      # misaligned base: the scalar path
    check_ptgq(base[:, 8:184])                      # K = 176 in a strided view
    check_ptgq(base[::3, 104:232], col=True)        # row stride 3000
    x3 = spread((4, 6, 256), dtype, gen)
    check_ptgq(x3)                                  # leading dims flatten to a view
    check_ptgq(x3.transpose(0, 1))                  # they do not: a contiguous copy
    check_ptgq(spread((384,), dtype, gen))          # 1-D
    check_ptgq(spread((1, 192), dtype, gen)[0])     # 1-D, partial group


@gpu
@pytest.mark.parametrize("eps", [5.3e-36, 1e-30, 1e-10, 1e-4, 10.0, 1e37])
def test_eps_range(gen, eps):
    """Tiny eps makes tiny scales (the 2^100-lifted division), huge eps huge ones."""
    x = spread((17, 512), torch.float32, gen) * 1e-25
    for ue8m0 in (False, True):
        check_ptgq(x, 128, eps, ue8m0)
        check_pbq(x, 128, eps, ue8m0)


def nonfinite(shape, dtype, gen) -> torch.Tensor:
    """NaN in some blocks, +-inf in others (alone, and next to a NaN), finite values around them."""
    x = spread(shape, torch.float32, gen, "cpu")
    flat = x.view(-1, shape[-1])
    flat[2, 5], flat[3, 130], flat[3, 131], flat[4, 7] = float("inf"), float("-inf"), float("inf"), float("nan")
    flat[5, 9], flat[5, 10] = float("nan"), float("-inf")
    flat[6, :] = float("inf")  # a row with nothing finite: amax 0, the scale eps / 448
    return x.to(dtype).cuda()


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_nan_poisons_its_block_and_inf_saturates(gen, dtype, ue8m0):
    """On every kernel path: a NaN makes its group's / block's scale NaN (UE8M0 too) and every
    x_q of it NaN; +-inf stays out of the amax and quantizes to +-448."""
    x = nonfinite((8, 256), dtype, gen)
    for group, col in ((128, False), (128, True), (64, False), (96, False)):  # warp, warp, warp, block path
        check_ptgq(x, group, ue8m0=ue8m0, col=col)
    check_ptgq(x[:, 1:250], 128, ue8m0=ue8m0)  # misaligned: the scalar path
    for block in (64, 128, 100):  # one-pass, one-pass, any-shape kernel
        check_pbq(x, block, ue8m0=ue8m0)
    check_pbq(x.view(2, 4, 256)[:, :, 3:200], 64, ue8m0=ue8m0)

    q, s = quant.per_token_group_quant_fp8(x, 128, 1e-4, ue8m0, backend="cuda")
    assert torch.isnan(s[4, 0]) and torch.isnan(q[4, :128].float()).all()
    assert torch.isnan(s[5, 0]) and torch.isnan(q[5, :128].float()).all()
    assert q[2, 5].float() == E4M3_MAX and q[3, 130].float() == -E4M3_MAX and q[3, 131].float() == E4M3_MAX
    assert torch.isfinite(s[2:4]).all() and torch.isfinite(q[2, 6:128].float()).all()
    assert (q[6].float() == E4M3_MAX).all() and (s[6] == quant.per_token_group_quant_fp8(
        torch.zeros(1, 256), 128, 1e-4, ue8m0, backend="torch")[1]).all()


@gpu
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(1, 1), (7, 100), (128, 128), (129, 300), (300, 5120), (1, 3, 130), (3, 257, 384), (2, 64, 1000),
              (4, 192, 176)]
)
def test_per_block_quant(gen, shape, dtype, ue8m0):
    check_pbq(spread(shape, dtype, gen), ue8m0=ue8m0)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [1, 8, 64, 96, 100, 256])
def test_per_block_quant_block_sizes(gen, dtype, block):
    """128 and smaller multiples of 8: the one-pass kernel; others: the any-shape kernel."""
    check_pbq(spread((2, 300, 520), dtype, gen), block)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_block_quant_strides_and_alignment(gen, dtype):
    wide = spread((3, 260, 1040), dtype, gen)
    check_pbq(wide[:, :, :512])                     # strided rows
    check_pbq(wide[:, :, 3:515])                    # misaligned: any-shape kernel
    check_pbq(wide[1, :200, 16:400])                # 2-D view
    check_pbq(wide.transpose(0, 1)[:, :, :256])     # leading strides in any order
    check_pbq(spread((3, 129, 333), dtype, gen))    # K not a multiple of the vector width


@gpu
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequant(gen, out_dtype):
    x = spread((129, 640), torch.bfloat16, gen)
    for col in (False, True):                       # both activation scale layouts
        q, s = quant.per_token_group_quant_fp8(x, 128, column_major_scales=col, backend="cuda")
        check_dequant(q, s, 1, 128, out_dtype)
        check_dequant(q[:, :192], s[:, :2], 1, 128, out_dtype)  # K = 192: a partial last block
    w = spread((3, 300, 384), torch.float32, gen)
    q, s = quant.per_block_quant_fp8(w, backend="cuda")
    check_dequant(q, s, 128, 128, out_dtype)
    check_dequant(q[:, :, :256], s[:, :, :2], 128, 128, out_dtype)  # strided rows, 16-byte vectors
    check_dequant(q[:, :, :260], s, 128, 128, out_dtype)            # partial column block: scalar path
    q, s = quant.per_block_quant_fp8(spread((7, 100), torch.float32, gen), 8, backend="cuda")
    check_dequant(q, s, 8, 8, out_dtype)            # the scalar path
    check_dequant(q, s.t().contiguous().t(), 8, 8, out_dtype)
    check_dequant(q[:, :16], s[:1, :2], 2**31 - 1, 8, out_dtype)  # one block row of any height


@gpu
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequant_nan_bytes_and_scales(gen, out_dtype):
    """A NaN byte (0x7f, 0xff) or a NaN scale gives NaN; an inf scale gives inf (NaN on a zero)."""
    q, s = quant.per_token_group_quant_fp8(spread((6, 256), torch.float32, gen), backend="cuda")
    q.view(torch.uint8)[1, 3] = 0x7F
    q.view(torch.uint8)[2, 200] = 0xFF
    q.view(torch.uint8)[4, 7] = 0x00
    s[3, 1], s[4, 0] = float("nan"), float("inf")
    for qq, ss in ((q, s), (q[:, :248], s)):  # the vector path, the scalar path
        check_dequant(qq, ss, 1, 128, out_dtype)
    out = quant.dequant_fp8(q, s, 1, 128, out_dtype, backend="cuda").float()
    assert torch.isnan(out[1, 3]) and torch.isnan(out[2, 200]) and torch.isnan(out[3, 128:]).all()
    assert torch.isnan(out[4, 7]) and torch.isinf(out[4, :128][q[4, :128].float() != 0]).all()


@gpu
def test_empty_tensors_launch_nothing():
    """Empty inputs give empty outputs of the Python alloc's shapes and strides, without a launch
    (an empty grid would be a launch error)."""
    for dtype in DTYPES:
        for shape, kw in (((0, 256), {}), ((4, 0), {}), ((0, 256), {"column_major_scales": True}),
                          ((0, 176), {"column_major_scales": True}), ((3, 0), {"column_major_scales": True}),
                          ((2, 0, 128), {}), ((0,), {})):
            x = torch.empty(shape, dtype=dtype, device="cuda")
            op = OPS["per_token_group_quant_fp8"]
            want = op.alloc(*op.bind((x,), kw))
            got = quant.per_token_group_quant_fp8(x, **kw, backend="cuda")
            for g, w in zip(got, want):
                assert (g.shape, g.stride(), g.dtype) == (w.shape, w.stride(), w.dtype), (shape, kw)
        for shape in ((0, 128), (128, 0), (2, 0, 128), (0, 5, 7), (3, 4, 0)):
            w = torch.empty(shape, dtype=dtype, device="cuda")
            got = quant.per_block_quant_fp8(w, backend="cuda")
            op = OPS["per_block_quant_fp8"]
            want = op.alloc(*op.bind((w,), {}))
            assert [(g.shape, g.dtype) for g in got] == [(v.shape, v.dtype) for v in want]
    for shape, s_shape in (((0, 256), (0, 2)), ((4, 0), (4, 0)), ((2, 0, 300), (2, 0, 3))):
        q = torch.empty(shape, dtype=FP8_DTYPE, device="cuda")
        out = quant.dequant_fp8(q, torch.empty(s_shape, device="cuda"), backend="cuda")
        assert out.shape == q.shape and out.dtype == torch.bfloat16


@gpu
def test_grids_past_65535_ctas(gen):
    """Every grid is 1-D: 532480 one-pass blocks, 133120 any-shape blocks, 1.6 M dequant CTAs."""
    w = spread((2, 4096, 4160), torch.bfloat16, gen)
    check_pbq(w, 8)                                  # 2 * 512 * 520 CTAs
    check_pbq(w[:, :1040, :1024], 4)                 # 2 * 260 * 256 CTAs (vectors of 4 bf16: any-shape)
    q, s = quant.per_block_quant_fp8(w, 8, backend="cuda")
    check_dequant(q, s, 8, 8, torch.float32)         # 2 * 4096 * 4160 / 16 / 256 vectors per CTA


@gpu
@pytest.mark.slow
def test_grid_past_2_31_ctas():
    """1 x 1 groups: one CTA per element, 2^31 + 2^20 of them, launched in two slices of at most
    2^31 - 1 CTAs (gridDim.x's limit). The first and last rows against the reference."""
    x = torch.empty((65568, 32768), dtype=torch.bfloat16, device="cuda").normal_()
    q, s = quant.per_token_group_quant_fp8(x, 1, backend="cuda")
    for rows in (slice(0, 8), slice(-8, None)):
        want_q, want_s = quant.per_token_group_quant_fp8(x[rows].cpu(), 1, backend="torch")
        assert_bit_equal(q[rows], want_q, f"x_q[{rows}]")
        assert_bit_equal(s[rows], want_s, f"scale[{rows}]")


@gpu
def test_opcheck_cuda(gen):
    """The kernels' outputs match the fakes (shapes, dtypes, strides) and dispatch cleanly."""
    x = spread((33, 256), torch.bfloat16, gen)
    w = spread((2, 130, 260), torch.float32, gen)
    wq, ws = quant.per_block_quant_fp8(w, backend="cuda")
    tests = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for op, args in (
        (torch.ops.glm45.per_token_group_quant_fp8.default, (x, 128, 1e-4, False, False)),
        (torch.ops.glm45.per_token_group_quant_fp8.default, (x[:, :176], 128, 1e-4, True, True)),
        (torch.ops.glm45.per_block_quant_fp8.default, (w, 128, 1e-4, False)),
        (torch.ops.glm45.dequant_fp8.default, (wq, ws, 128, 128, torch.bfloat16)),
    ):
        torch.library.opcheck(op, args, test_utils=tests)


@gpu
def test_auto_picks_cuda_and_compiles(gen):
    x = spread((64, 512), torch.bfloat16, gen)
    assert OPS["per_token_group_quant_fp8"].resolve("auto", x.device) == "cuda"

    @torch.compile(fullgraph=True)
    def roundtrip(t):
        q, s = quant.per_token_group_quant_fp8(t, column_major_scales=True)
        return quant.dequant_fp8(q, s, 1, 128, torch.float32)

    want = quant.dequant_fp8(*quant.per_token_group_quant_fp8(x.cpu(), column_major_scales=True, backend="torch"),
                             1, 128, torch.float32, backend="torch")
    assert_bit_equal(roundtrip(x), want, "compiled roundtrip")


@gpu
def test_raw_op_checks_on_cuda():
    """On CUDA tensors the raw op goes straight to the C++ kernel: its own checks answer."""
    x = torch.ones(4, 256, device="cuda")
    with pytest.raises(ValueError, match=r"group_size must be in \[1, 4096\], got 8192"):
        torch.ops.glm45.per_token_group_quant_fp8(x, 8192)
    with pytest.raises(ValueError, match="eps must be finite and at least 5.27e-36"):
        torch.ops.glm45.per_block_quant_fp8(x, 128, 1e-40)
    q, s = quant.per_token_group_quant_fp8(x, backend="cuda")
    with pytest.raises(ValueError, match="x_q and scale must be on the same device, got cuda:0 and cpu"):
        torch.ops.glm45.dequant_fp8(q, s.cpu(), 1, 128, torch.bfloat16)


@gpu
@pytest.mark.slow
def test_offsets_beyond_int32(gen):
    """GLM-4.5's MoE weights [160, 3072, 5120] bf16 (2.5e9 elements) and 2.1e9-element activations:
    offsets past 2^31 elements, checked on the last and first slices against the reference."""
    w = torch.empty((160, 3072, 5120), dtype=torch.bfloat16, device="cuda").normal_()
    wq, ws = quant.per_block_quant_fp8(w, backend="cuda")
    for e in (0, 159):
        rq, rs = quant.per_block_quant_fp8(w[e].cpu(), backend="torch")
        assert_bit_equal(wq[e], rq, f"w_q[{e}]")
        assert_bit_equal(ws[e], rs, f"scale_inv[{e}]")
    out = quant.dequant_fp8(wq, ws, 128, 128, backend="cuda")
    want = quant.dequant_fp8(wq[159].cpu(), ws[159].cpu(), 128, 128, backend="torch")
    assert_bit_equal(out[159], want, "dequant[159]")
    del w, wq, ws, out
    x = torch.empty((419431, 5120), dtype=torch.bfloat16, device="cuda").normal_()
    for col in (False, True):
        q, s = quant.per_token_group_quant_fp8(x, column_major_scales=col, backend="cuda")
        for rows in (slice(0, 64), slice(-64, None)):
            rq, rs = quant.per_token_group_quant_fp8(x[rows].cpu(), backend="torch")
            assert_bit_equal(q[rows], rq, "x_q rows")
            assert_bit_equal(s[rows].contiguous(), rs, "scale rows")
