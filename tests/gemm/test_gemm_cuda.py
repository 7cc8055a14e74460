"""The CUTLASS kernel of fp8_block_gemm (csrc/gemm/fp8_block_gemm_sm90.cu).

Without a GPU: its C++ checks, called through the CUDA dispatch key with CPU tensors
(``glm45_ops.testing.cuda_kernel_differs``; the error table's cases are tests/test_extension.py's),
raise the Python check's ValueError word for word, and for arguments Python accepts (K = 16, 176,
192, 1040, single rows with any stride, odd N, both a_scale layouts) get past CUTLASS's
can_implement (run on the host before the device check) to the device error; and the translation
unit refuses, at preprocessing time, a build for sm_90 without the 'a' features.

On the GPU: the swap-AB decode kernel (M <= 64) and the cooperative kernel just above it, at
GLM-4.5's shard widths and odd N, outputs poisoned in the caching allocator before every call,
against the float64 oracle under the op's own rule (``OP.compare``: the tensor-core bound of
``glm45_ops.gemm.error_bound``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import glm45_ops
from glm45_ops import gemm, quant, registered_ops
from glm45_ops.reference.gemm import fp8_block_gemm_ref
from glm45_ops.reference.quant import FP8_DTYPE
from glm45_ops.testing import check_sm90a_refusal, cuda_kernel_differs, poison_cuda_cache

ROOT = Path(__file__).resolve().parents[2]
OP = registered_ops()["fp8_block_gemm"]
gpu = pytest.mark.gpu


# ---------------------------------------------------------------------------------------------
# No GPU needed: the C++ checks and can_implement through the CUDA key
# ---------------------------------------------------------------------------------------------

def fp8(*shape, stride=None, offset=0) -> torch.Tensor:
    """An e4m3 tensor of zeros; with ``stride`` a view of that stride, ``offset`` bytes into its
    buffer (16-byte aligned allocations: an offset that is not a multiple of 16 misaligns it)."""
    if stride is None and offset == 0:
        return torch.zeros(shape).to(FP8_DTYPE)
    stride = stride or torch.empty(shape).stride()
    size = offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    return torch.zeros(size, dtype=torch.uint8).view(FP8_DTYPE).as_strided(shape, stride, offset)


def scales(m, k, layout="row") -> torch.Tensor:
    g = -(-k // gemm.GEMM_BLOCK)
    if layout == "row":
        return torch.ones(m, g)
    m4 = -(-max(m, 1) // 4) * 4
    return torch.ones(g, m4).t()[:m]


def weight_scales(n, k) -> torch.Tensor:
    return torch.ones(-(-n // gemm.GEMM_BLOCK), -(-k // gemm.GEMM_BLOCK))


def operands(m, n, k, layout="row"):
    return fp8(m, k), scales(m, k, layout), fp8(n, k), weight_scales(n, k)


ACCEPTED = [
    # K: multiples of 16 with a partial last 128-block (16..112 valid columns), both kernels
    *[(*operands(m, n, k, layout), dt) for m in (1, 3, 64, 65, 200) for n, k in ((257, 192), (1000, 176),
      (130, 16), (8, 1040), (14336, 128)) for layout in ("row", "mn")
      for dt in (torch.bfloat16, torch.float32)],
    # single rows with any stride (TMA gets the row length), odd N, unaligned bases (copied)
    (fp8(1, 192, stride=(0, 1)), scales(1, 192), *operands(1, 257, 192)[2:]),
    (fp8(4, 192, stride=(0, 1)), scales(4, 192), *operands(4, 257, 192)[2:]),   # broadcast rows (copied)
    (fp8(70, 192, stride=(16, 1)), scales(70, 192), *operands(70, 257, 192)[2:]),  # overlapping rows
    (fp8(1, 176, stride=(12345, 1)), scales(1, 176, "mn"), *operands(1, 1000, 176)[2:]),
    (*operands(3, 1, 176)[:2], fp8(1, 176, stride=(7, 1)), weight_scales(1, 176)),
    (fp8(5, 192, offset=8), scales(5, 192), *operands(5, 7, 192)[2:]),
    (*operands(100, 300, 384)[:2], fp8(300, 384, stride=(400, 1), offset=3), weight_scales(300, 384)),
    (fp8(70, 256, stride=(272, 1)), torch.ones(3, 80).t()[:70, :2], *operands(70, 129, 256)[2:]),
    (*operands(0, 40, 176), torch.float32),
]
REFUSED = [
    *[(fp8(4, k, stride=(112, 1)), scales(4, k), fp8(64, k, stride=(112, 1)), weight_scales(64, k)) for k in (100, 8)],
    operands(4, 64, 0), operands(4, 0, 128),
    (fp8(4, 192), scales(4, 128), *operands(4, 64, 192)[2:]),        # a_scale [M, K/128] (floor)
    (*operands(4, 300, 176)[:3], weight_scales(300, 128)),
    (fp8(4, 176, stride=(200, 1)), *operands(4, 64, 176)[1:]),       # row stride not a multiple of 16
    (fp8(4, 176).t(), *operands(176, 64, 4)[1:]),
    (*operands(4, 200, 256)[:3], weight_scales(200, 256).t().contiguous().t()),
    (*operands(4, 64, 256), torch.float16),
    (*operands(4, 64, 256)[:3], weight_scales(64, 256).to("meta")),
]


@pytest.mark.parametrize("args", ACCEPTED + REFUSED, ids=[f"accepted{i}" for i in range(len(ACCEPTED))]
                         + [f"refused{i}" for i in range(len(REFUSED))])
def test_cpp_checks_and_can_implement(args):
    """The C++ kernel's ValueError is Python's, or, where Python accepts, the device error (so
    CUTLASS's can_implement, which runs before it, passed)."""
    if not glm45_ops.extension_loaded():
        pytest.skip(f"extension not built: {glm45_ops.extension_error()}")
    why = cuda_kernel_differs(OP, args)
    assert why is None, why


def test_the_accepted_cases_are_accepted_by_python():
    """So test_cpp_checks_and_can_implement reaches CUTLASS's can_implement for each of them."""
    for args in ACCEPTED:
        OP.check(*OP.bind(args, {}))
    for args in REFUSED:
        with pytest.raises(ValueError):
            OP.check(*OP.bind(args, {}))


@pytest.mark.parametrize("gencode,refused", [
    ("arch=compute_90a,code=sm_90a", False),
    ("arch=compute_90,code=sm_90", True),           # TORCH_CUDA_ARCH_LIST=9.0
    ("arch=compute_90,code=compute_90", True),      # 9.0+PTX
])
def test_build_for_sm90_without_a_is_refused(gencode, refused):
    """CUTLASS compiles the kernel body out for plain sm_90 (the op would return uninitialised
    memory): the #error fires in the device pass. Preprocessing alone shows it (seconds, not
    the minutes and 8 GB of a CUTLASS build)."""
    check_sm90a_refusal(ROOT / "csrc" / "gemm" / "fp8_block_gemm_sm90.cu", gencode, refused)


# ---------------------------------------------------------------------------------------------
# On the GPU
# ---------------------------------------------------------------------------------------------

# The bound (OP.compare -> gemm.error_bound with tensor_cores=True) assumes the tensor cores'
# ~14-bit partial sums span at most one 128-wide K slice before promotion into fp32. In CUTLASS's
# FP8BlockScaledAccum mainloop that holds by construction: ScalePromotionInterval = 128 / 32 = 4
# wgmma K-steps (32 e4m3 values each), after which GmmaFP8Accumulation scales the partial by
# a_scale * b_scale and adds it to the fp32 accumulator; stream-K splits K only at 128-wide tile
# boundaries and reduces the fp32 partials; the partial last slice (K = 176, 192) adds TMA's zero
# fill, exactly. So per slice the error is the 14-bit model's, then fp32 promotion, then the one
# rounding into out_dtype: exactly the three terms of error_bound.

@functools.lru_cache(maxsize=None)
def weights(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """128 x 128-quantized weights (torch reference) with blocks spanning ~6 decades."""
    gen = torch.Generator().manual_seed(n * 7919 + k)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 3, n).unsqueeze(1)
    return tuple(t.cuda() for t in quant.per_block_quant_fp8(w, backend="torch"))


@functools.lru_cache(maxsize=None)
def activations(m: int, k: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x 128-quantized activations; ``layout`` "mn" is the quantizer's column_major_scales."""
    gen = torch.Generator().manual_seed(m * 104729 + k)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 3, k)[torch.randperm(k, generator=gen)]
    q, s = quant.per_token_group_quant_fp8(x, 128, 1e-4, False, layout == "mn", backend="torch")
    return q.cuda(), s.cuda()


def check_gemm(a, a_scale, b, b_scale, out_dtype) -> None:
    want = fp8_block_gemm_ref(*(t.cpu() for t in (a, a_scale, b, b_scale)), out_dtype)
    poison_cuda_cache(want.numel() * want.element_size())  # the C++ kernel's output starts as garbage
    got = gemm.fp8_block_gemm(a, a_scale, b, b_scale, out_dtype, backend="cuda")
    assert got.is_contiguous() and got.dtype == out_dtype
    why = OP.compare(got, want, (a, a_scale, b, b_scale, out_dtype))
    assert why is None, why


@gpu
@pytest.mark.parametrize("out_dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("layout", ["row", "mn"])
@pytest.mark.parametrize("k", [128, 384, 192, 176])
@pytest.mark.parametrize("n", [257, 1000, 14336])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 63, 64, 65])
def test_swap_ab_decode(m, n, k, layout, out_dtype):
    """M <= 64: the swap-AB kernel (weights on wgmma's M side, tokens on its N side, a_scale read as
    B's MN-major scales, round_up(M, 4) rows); M = 65: the cooperative kernel. Small N with one to
    three K tiles leaves most SMs idle, so stream-K splits K and exercises its fix-up; N = 257
    pads the output to whole 16-byte rows."""
    a, a_scale = activations(m, k, layout)
    assert gemm.scale_layout(a_scale) == ("mn" if layout == "mn" or m == 1 or k <= 128 else "row")
    check_gemm(a, a_scale, *weights(n, k), out_dtype)


@gpu
@pytest.mark.parametrize("k", [16, 1040])
@pytest.mark.parametrize("m", [1, 65, 300])
def test_smallest_and_long_partial_k(m, k):
    """K = 16: one K tile, 16 valid columns of 128; K = 1040: eight whole tiles and a partial one."""
    check_gemm(*activations(m, k, "mn"), *weights(1000, k), torch.bfloat16)


@gpu
def test_single_rows_and_misaligned_operands():
    """A one-row a whose row stride is 0 or odd (TMA must get the row length), broadcast rows
    (stride 0, copied), a one-row b (the padded path), misaligned bases (copied), a row-strided b
    and an unpadded MN-major a_scale."""
    a, a_s = activations(1, 192, "row")
    for stride in (0, 12345):
        buf = torch.zeros(12345 + 192, dtype=torch.uint8, device="cuda").view(FP8_DTYPE)
        buf[:192] = a[0]
        check_gemm(buf.as_strided((1, 192), (stride, 1)), a_s, *weights(257, 192), torch.bfloat16)
    a, a_s = activations(1, 192, "mn")
    for m in (5, 65):  # both kernels
        check_gemm(a.expand(m, 192), a_s.expand(m, 2).contiguous(), *weights(1000, 192), torch.bfloat16)
    a, a_s = activations(3, 176, "mn")
    b, b_s = weights(257, 176)
    check_gemm(a, a_s, b[:1], b_s[:1], torch.float32)
    buf = torch.empty(5 * 192 + 8, dtype=torch.uint8, device="cuda").view(FP8_DTYPE)
    a, a_s = activations(5, 192, "row")
    moved = buf[8:].view(5, 192)
    moved.copy_(a)
    check_gemm(moved, a_s, *weights(1000, 192), torch.bfloat16)
    b, b_s = weights(1000, 384)
    wide = torch.empty(1000, 400, dtype=torch.uint8, device="cuda").view(FP8_DTYPE)
    wide[:, :384] = b
    a, a_s = activations(100, 384, "row")
    check_gemm(a, a_s.t().contiguous().t(), wide[:, :384], b_s, torch.bfloat16)


@gpu
@pytest.mark.parametrize("m", [3, 100])
def test_nan_and_inf_reach_their_outputs(m):
    """A NaN activation group (its scale NaN) makes its row NaN, a NaN weight byte its column, an
    inf weight scale its 128 columns non-finite, on both kernels."""
    x = torch.randn(m, 192)
    x[1, 150] = float("nan")
    a, a_s = (t.cuda() for t in quant.per_token_group_quant_fp8(x, column_major_scales=True, backend="torch"))
    b, b_s = (t.clone() for t in weights(300, 192))
    b.view(torch.uint8)[7, 3] = 0x7F
    b_s[2, 1] = float("inf")
    check_gemm(a, a_s, b, b_s, torch.float32)
    out = gemm.fp8_block_gemm(a, a_s, b, b_s, backend="cuda")
    assert torch.isnan(out[1]).all() and torch.isnan(out[:, 7]).all()
    assert not torch.isfinite(out[:, 256:300]).any()
