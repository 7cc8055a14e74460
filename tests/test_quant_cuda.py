"""The CUDA kernels of the FP8 quant family (csrc/quant/fp8_quant.cu): bit-exact with the torch
reference on the shapes, strides and alignments that pick each kernel path, plus their checks.

Without a GPU this still checks the kernels' scalar math on the host (tests/cpp/fp8_scale_check.cpp)
and, when the extension is built, the C++ argument checks (called through the CUDA dispatch key
with CPU tensors: every check runs before the device check).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import glm45_ops
from glm45_ops import quant
from glm45_ops.reference.quant import FP8_DTYPE

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
gpu = pytest.mark.gpu


def fp8_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """e4m3 by bit pattern; any NaN matches any NaN (the sign of a NaN is not part of the contract)."""
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} vs {want.shape}"
    g, w = got.cpu(), want.cpu()
    nan_g, nan_w = torch.isnan(g.float()), torch.isnan(w.float())
    assert torch.equal(nan_g, nan_w), f"{what}: NaN positions differ"
    diff = ((g.view(torch.uint8) != w.view(torch.uint8)) & ~nan_w).sum().item()
    assert diff == 0, f"{what}: {diff} of {g.numel()} values differ"


def float_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert (got.shape, got.dtype) == (want.shape, want.dtype), f"{what}: {got.shape, got.dtype} vs {want.shape, want.dtype}"
    g, w = got.cpu(), want.cpu()
    nan_w = torch.isnan(w.float())
    assert torch.equal(torch.isnan(g.float()), nan_w), f"{what}: NaN positions differ"
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[g.element_size()]
    diff = ((g.view(ints) != w.view(ints)) & ~nan_w).sum().item()
    assert diff == 0, f"{what}: {diff} of {g.numel()} values differ"


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


def poison_cache(*nbytes: int) -> None:
    """Fill freed blocks of the CUDA caching allocator with 0x7F (e4m3 NaN, a NaN-ish fp32), so the
    op's outputs (allocated right after, reusing them) start as garbage, not zeros."""
    for n in nbytes:
        torch.empty(max(n, 1), dtype=torch.uint8, device="cuda").fill_(0x7F)


def check_ptgq(x: torch.Tensor, group: int = 128, eps: float = 1e-4, ue8m0: bool = False, col: bool = False) -> None:
    want_q, want_s = quant.per_token_group_quant_fp8(x.cpu(), group, eps, ue8m0, col, backend="torch")
    poison_cache(x.numel(), 4 * want_s.numel() + 64)
    q, s = quant.per_token_group_quant_fp8(x, group, eps, ue8m0, col, backend="cuda")
    assert q.is_contiguous() and s.stride() == want_s.stride(), (s.stride(), want_s.stride())
    fp8_bits_equal(q, want_q, "x_q")
    float_bits_equal(s, want_s, "scale")


def check_pbq(w: torch.Tensor, block: int = 128, eps: float = 1e-4, ue8m0: bool = False) -> None:
    want_q, want_s = quant.per_block_quant_fp8(w.cpu(), block, eps, ue8m0, backend="torch")
    poison_cache(w.numel(), 4 * want_s.numel())
    q, s = quant.per_block_quant_fp8(w, block, eps, ue8m0, backend="cuda")
    assert q.is_contiguous() and s.is_contiguous()
    fp8_bits_equal(q, want_q, "w_q")
    float_bits_equal(s, want_s, "scale_inv")


def check_dequant(x_q: torch.Tensor, scale: torch.Tensor, bm: int, bn: int, out_dtype: torch.dtype) -> None:
    want = quant.dequant_fp8(x_q.cpu(), scale.cpu(), bm, bn, out_dtype, backend="torch")
    poison_cache(want.numel() * want.element_size())
    got = quant.dequant_fp8(x_q, scale, bm, bn, out_dtype, backend="cuda")
    assert got.is_contiguous()
    float_bits_equal(got, want, "dequant")


# ---------------------------------------------------------------------------------------------
# No GPU needed
# ---------------------------------------------------------------------------------------------

def test_scale_math_is_exact_on_host(tmp_path):
    """The kernels' scale math (csrc/quant/fp8_scale.cuh: IEEE scale, UE8M0, x / scale by
    Markstein's correction) against IEEE division and frexp/ldexp, on the host's floats."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "fp8_scale_check"
    src = ROOT / "tests" / "cpp" / "fp8_scale_check.cpp"
    subprocess.run([cxx, "-O2", "-std=c++17", "-ffp-contract=off", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)],
                   check=True, timeout=300)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "mismatches=0" in run.stdout, run.stdout + run.stderr


def _cuda_kernel(name: str):
    if not glm45_ops.extension_loaded():
        pytest.skip(f"extension not built: {glm45_ops.extension_error()}")
    op = getattr(torch.ops.glm45, name).default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    return lambda *args: op.redispatch(keys, *args)


_x, _w = torch.ones(4, 256), torch.ones(4, 256)
_xq, _s = torch.ones(4, 256).to(FP8_DTYPE), torch.ones(4, 2)
BAD = [
    ("per_token_group_quant_fp8", (_x.int(), 128, 1e-4, False, False), "x must be bfloat16, float16 or float32"),
    ("per_token_group_quant_fp8", (_x, 0, 1e-4, False, False), "group_size must be a positive int"),
    ("per_token_group_quant_fp8", (_x, 128, 0.0, False, False), "eps must be > 0"),
    ("per_token_group_quant_fp8", (_x, 128, float("nan"), False, False), "eps must be > 0"),
    ("per_token_group_quant_fp8", (_x, 96, 1e-4, False, False),
     r"x.shape\[-1\] \(K=256\) must be divisible by group_size=96"),
    ("per_token_group_quant_fp8", (_x.t(), 4, 1e-4, False, False), "x must be contiguous in its last dim"),
    ("per_token_group_quant_fp8", (_x.view(2, 2, 256), 128, 1e-4, False, True), "column_major_scales=True needs a 2-D"),
    ("per_token_group_quant_fp8", (torch.ones(()), 1, 1e-4, False, False), "x must have at least 1 dim"),
    ("per_token_group_quant_fp8", (_x, 128, 1e-4, False, False), "x must be a CUDA tensor"),
    ("per_block_quant_fp8", (_w.long(), 128, 1e-4, False), "w must be bfloat16, float16 or float32"),
    ("per_block_quant_fp8", (_w, -1, 1e-4, False), "block_size must be a positive int"),
    ("per_block_quant_fp8", (_w, 128, -1.0, False), "eps must be > 0"),
    ("per_block_quant_fp8", (torch.ones(256), 128, 1e-4, False), r"w must be \[N, K\] or \[E, N, K\], got 1-D"),
    ("per_block_quant_fp8", (torch.ones(1, 1, 4, 4), 128, 1e-4, False), "got 4-D"),
    ("per_block_quant_fp8", (torch.ones(8, 4).t(), 128, 1e-4, False), "w must be contiguous in its last dim"),
    ("per_block_quant_fp8", (_w, 128, 1e-4, False), "w must be a CUDA tensor"),
    ("dequant_fp8", (_x, _s, 1, 128, torch.bfloat16), "x_q must be a float8_e4m3fn tensor"),
    ("dequant_fp8", (_xq, _s.double(), 1, 128, torch.bfloat16), "scale must be a float32 tensor"),
    ("dequant_fp8", (_xq, _s, 0, 128, torch.bfloat16), "block_m must be a positive int"),
    ("dequant_fp8", (_xq, _s, 1, -128, torch.bfloat16), "block_n must be a positive int"),
    ("dequant_fp8", (_xq, _s, 1, 128, torch.int32), "out_dtype must be bfloat16, float16 or float32"),
    ("dequant_fp8", (_xq[0], _s[0], 1, 128, torch.float), "x_q must be at least 2-D"),
    ("dequant_fp8", (_xq, torch.ones(4, 3), 1, 128, torch.float), r"scale must have shape \[4, 2\]"),
    ("dequant_fp8", (_xq.t().contiguous().t(), _s, 1, 128, torch.float), "x_q must be contiguous in its last dim"),
    ("dequant_fp8", (_xq, _s, 1, 128, torch.float), "x_q must be a CUDA tensor"),
]


@pytest.mark.parametrize("name,args,match", BAD, ids=[f"{n}-{m[:30]}" for n, _, m in BAD])
def test_cpp_checks(name, args, match):
    """The C++ kernels validate like the Python checks (ValueError naming the argument), so a
    direct torch.ops.glm45 call on CUDA tensors fails as clearly as the Python API."""
    with pytest.raises(ValueError, match=match):
        _cuda_kernel(name)(*args)


# ---------------------------------------------------------------------------------------------
# On the GPU: bit-exact with the reference, path by path
# ---------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("ue8m0,col", [(False, False), (True, True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [128, 384, 5120])
@pytest.mark.parametrize("m", [1, 7, 129, 4097])
def test_per_token_group_quant(gen, m, k, dtype, ue8m0, col):
    check_ptgq(spread((m, k), dtype, gen), ue8m0=ue8m0, col=col)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [8, 16, 32, 64, 96, 256, 512, 1024, 4096])
def test_per_token_group_quant_group_sizes(gen, dtype, group):
    """Warp path (16-byte vectors, a power-of-two number of lanes <= 32), one-pass block path
    (1 x group blocks), and the scalar path (groups of odd byte sizes)."""
    check_ptgq(spread((33, 2 * group), dtype, gen), group)
    check_ptgq(spread((5, 4 * group), dtype, gen), group, ue8m0=True, col=True)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_group_quant_strides_and_alignment(gen, dtype):
    base = spread((65, 1000), dtype, gen)
    check_ptgq(base[:, :512])                       # row stride 1000 (16-byte aligned rows)
    check_ptgq(base[:, 8:520])                      # aligned base, strided rows
    check_ptgq(base[:, 1:513])                      # misaligned base: the scalar path
    check_ptgq(base[::3, 104:232], col=True)        # row stride 3000
    x3 = spread((4, 6, 256), dtype, gen)
    check_ptgq(x3)                                  # leading dims flatten to a view
    check_ptgq(x3.transpose(0, 1))                  # they do not: a contiguous copy
    check_ptgq(spread((384,), dtype, gen))          # 1-D
    check_ptgq(spread((0, 256), dtype, gen))        # empty
    check_ptgq(spread((3, 0), dtype, gen))


@gpu
@pytest.mark.parametrize("eps", [1e-30, 1e-10, 1e-4, 10.0, 1e37])
def test_eps_range(gen, eps):
    """Tiny eps makes tiny scales (the 2^100-lifted division), huge eps huge ones."""
    x = spread((17, 512), torch.float32, gen) * 1e-25
    for ue8m0 in (False, True):
        check_ptgq(x, 128, eps, ue8m0)
        check_pbq(x, 128, eps, ue8m0)


@gpu
def test_infinities_and_nan(gen):
    x = spread((8, 256), torch.float32, gen)
    x[2, 5], x[3, 130], x[4, 7] = float("inf"), float("-inf"), float("nan")
    for ue8m0 in (False, True):
        check_ptgq(x, ue8m0=ue8m0)
        check_pbq(x, 64, ue8m0=ue8m0)


@gpu
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(1, 1), (7, 100), (128, 128), (129, 300), (300, 5120), (1, 3, 130), (3, 257, 384), (2, 64, 1000)]
)
def test_per_block_quant(gen, shape, dtype, ue8m0):
    check_pbq(spread(shape, dtype, gen), ue8m0=ue8m0)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [1, 8, 64, 100, 256])
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
    check_pbq(spread((0, 4, 128), dtype, gen))


@gpu
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequant(gen, out_dtype):
    x = spread((129, 640), torch.bfloat16, gen)
    for col in (False, True):                       # both activation scale layouts
        q, s = quant.per_token_group_quant_fp8(x, 128, column_major_scales=col, backend="cuda")
        check_dequant(q, s, 1, 128, out_dtype)
    w = spread((3, 300, 384), torch.float32, gen)
    q, s = quant.per_block_quant_fp8(w, backend="cuda")
    check_dequant(q, s, 128, 128, out_dtype)
    check_dequant(q[:, :, :256], s[:, :, :2], 128, 128, out_dtype)  # strided rows, 16-byte vectors
    check_dequant(q[:, :, :260], s, 128, 128, out_dtype)            # partial column block: scalar path
    q, s = quant.per_block_quant_fp8(spread((7, 100), torch.float32, gen), 8, backend="cuda")
    check_dequant(q, s, 8, 8, out_dtype)            # the scalar path
    check_dequant(q, s.t().contiguous().t(), 8, 8, out_dtype)
    check_dequant(q[:0], s[:0], 8, 8, out_dtype)


@gpu
def test_opcheck_cuda(gen):
    """The kernels' outputs match the fakes (shapes, dtypes, strides) and dispatch cleanly."""
    x = spread((33, 256), torch.bfloat16, gen)
    w = spread((2, 130, 260), torch.float32, gen)
    wq, ws = quant.per_block_quant_fp8(w, backend="cuda")
    tests = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for op, args in (
        (torch.ops.glm45.per_token_group_quant_fp8.default, (x, 128, 1e-4, False, False)),
        (torch.ops.glm45.per_token_group_quant_fp8.default, (x, 128, 1e-4, True, True)),
        (torch.ops.glm45.per_block_quant_fp8.default, (w, 128, 1e-4, False)),
        (torch.ops.glm45.dequant_fp8.default, (wq, ws, 128, 128, torch.bfloat16)),
    ):
        torch.library.opcheck(op, args, test_utils=tests)


@gpu
def test_auto_picks_cuda_and_compiles(gen):
    x = spread((64, 512), torch.bfloat16, gen)
    assert quant._ptgq_op.resolve("auto", x.device) == "cuda"

    @torch.compile(fullgraph=True)
    def roundtrip(t):
        q, s = quant.per_token_group_quant_fp8(t, column_major_scales=True)
        return quant.dequant_fp8(q, s, 1, 128, torch.float32)

    want = quant.dequant_fp8(*quant.per_token_group_quant_fp8(x.cpu(), column_major_scales=True, backend="torch"),
                             1, 128, torch.float32, backend="torch")
    float_bits_equal(roundtrip(x), want, "compiled roundtrip")


@gpu
def test_bad_input_cuda():
    x = torch.ones(4, 256, device="cuda")
    with pytest.raises(ValueError, match="must be divisible by group_size"):
        quant.per_token_group_quant_fp8(x, 96, backend="cuda")
    with pytest.raises(ValueError, match="x must be bfloat16"):
        quant.per_token_group_quant_fp8(x.int(), backend="cuda")
    with pytest.raises(ValueError, match="w must be contiguous in its last dim"):
        quant.per_block_quant_fp8(x.t(), backend="cuda")
    q, s = quant.per_token_group_quant_fp8(x, backend="cuda")
    with pytest.raises(ValueError, match="x_q and scale must be on the same device"):
        torch.ops.glm45.dequant_fp8(q, s.cpu(), 1, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="scale must have shape"):
        quant.dequant_fp8(q, s[:, :1], 1, 128, backend="cuda")


@gpu
@pytest.mark.slow
def test_offsets_beyond_int32(gen):
    """GLM-4.5's MoE weights [160, 3072, 5120] bf16 (2.5e9 elements) and 2.1e9-element activations:
    offsets past 2^31 elements, checked on the last and first slices against the reference."""
    w = torch.empty((160, 3072, 5120), dtype=torch.bfloat16, device="cuda").normal_()
    wq, ws = quant.per_block_quant_fp8(w, backend="cuda")
    for e in (0, 159):
        rq, rs = quant.per_block_quant_fp8(w[e].cpu(), backend="torch")
        fp8_bits_equal(wq[e], rq, f"w_q[{e}]")
        float_bits_equal(ws[e], rs, f"scale_inv[{e}]")
    out = quant.dequant_fp8(wq, ws, 128, 128, backend="cuda")
    want = quant.dequant_fp8(wq[159].cpu(), ws[159].cpu(), 128, 128, backend="torch")
    float_bits_equal(out[159], want, "dequant[159]")
    del w, wq, ws, out
    x = torch.empty((419431, 5120), dtype=torch.bfloat16, device="cuda").normal_()
    for col in (False, True):
        q, s = quant.per_token_group_quant_fp8(x, column_major_scales=col, backend="cuda")
        for rows in (slice(0, 64), slice(-64, None)):
            rq, rs = quant.per_token_group_quant_fp8(x[rows].cpu(), backend="torch")
            fp8_bits_equal(q[rows], rq, "x_q rows")
            float_bits_equal(s[rows].contiguous(), rs, "scale rows")
