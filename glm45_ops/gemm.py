"""FP8 block-scaled GEMM (DeepSeek-V3 / DeepGEMM "NT" recipe) and the FP8 linear layer on it.

Op (schema below, its default there and nowhere else; definition, partial K blocks and NaN/inf
in :mod:`glm45_ops.reference.gemm`):

* ``fp8_block_gemm(a, a_scale, b, b_scale, out_dtype=bfloat16) -> out``
  ``out[m, n] = sum_k a[m,k] a_scale[m, k//128] b[n,k] b_scale[n//128, k//128]``, fp32 accumulation
  promoted per 128-wide K slice (DeepGEMM), one rounding into bf16 or fp32; K any positive
  multiple of 16.

Backends: ``torch`` (reference: dequantize, fp32 matmul), ``triton`` (``triton_ops.gemm``) and, when
``glm45_ops._C`` is built for sm_90a, ``cuda`` (CUTLASS, ``csrc/gemm/fp8_block_gemm_sm90.cu``).
They agree within the tolerance of :func:`_compare` (summation order and, on Hopper, the tensor
cores' narrower accumulator), not bit for bit.

``fp8_linear(x, w_q, w_scale_inv, bias=None)`` is the drop-in for an FP8 checkpoint's linear layer:
quantize activations 1 x 128 (scales MN-major, the layout both kernels read fastest), then the GEMM.
"""

from __future__ import annotations

import torch

from glm45_ops._registry import ErrorInput, Op, Sample
from glm45_ops.quant import per_block_quant_fp8, per_token_group_quant_fp8
from glm45_ops.reference import cdiv, gemm as ref
from glm45_ops.reference.gemm import GEMM_BLOCK
from glm45_ops.reference.quant import FP8_DTYPE
from glm45_ops.testing import calc_diff

__all__ = [
    "GEMM_BLOCK", "K_ALIGN", "SIMILARITY_LIMIT", "error_bound", "fp8_block_gemm", "fp8_linear", "nonfinite_outputs",
    "oracle", "scale_layout", "tensor_core_accumulation",
]

_OUT_DTYPES = (torch.bfloat16, torch.float32)
_ROW_ALIGN_BYTES = 16  # TMA: every row stride of a and b a multiple of 16 bytes
K_ALIGN = 16  # TMA: K e4m3 values per row must fill whole 16-byte units



def scale_layout(a_scale: torch.Tensor) -> str | None:
    """``"row"`` (unit stride along K/128) or ``"mn"`` (unit stride along M, M stride >= M: what
    ``per_token_group_quant_fp8(column_major_scales=True)`` returns, M stride rounded up to 4),
    or ``None`` (neither, or overlapping).

    Size-1 dims have no meaningful stride, so a ``[1, G]`` or ``[M, 1]`` scale may be both;
    ``"mn"`` wins then (the layout the kernels read without a copy).
    """
    m, g = a_scale.shape
    if m == 0:
        return "mn"
    s_m, s_g = a_scale.stride()
    if (m == 1 or s_m == 1) and (g == 1 or s_g >= m):
        return "mn"
    if (g == 1 or s_g == 1) and (m == 1 or s_m >= g):
        return "row"
    return None


def _check_fp8_matrix(name: str, t: torch.Tensor) -> None:
    if t.dtype != FP8_DTYPE:
        raise ValueError(f"{name} must be float8_e4m3fn, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.stride(1) != 1 or (t.shape[0] > 1 and t.stride(0) % _ROW_ALIGN_BYTES):
        raise ValueError(
            f"{name} must have a unit last stride and a row stride that is a multiple of "
            f"{_ROW_ALIGN_BYTES} (TMA), got strides {tuple(t.stride())}"
        )


def _check_scale(name: str, t: torch.Tensor, want: tuple[int, int]) -> None:
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def _check_gemm(a, a_scale, b, b_scale, out_dtype):
    _check_fp8_matrix("a", a)
    _check_fp8_matrix("b", b)
    (m, k), (n, kb) = a.shape, b.shape
    if k != kb:
        raise ValueError(f"a [M, K] and b [N, K] must share K, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if k == 0 or k % K_ALIGN:
        raise ValueError(f"K (a.shape[1] = {k}) must be a positive multiple of {K_ALIGN} (TMA)")
    if n == 0:
        raise ValueError("b must have at least one row (N >= 1)")
    groups = cdiv(k, GEMM_BLOCK)
    _check_scale("a_scale", a_scale, (m, groups))
    if scale_layout(a_scale) is None:
        raise ValueError(
            "a_scale must be row-major (unit stride along K/128) or MN-major (unit stride along M, "
            f"M stride >= M), got strides {tuple(a_scale.stride())}"
        )
    _check_scale("b_scale", b_scale, (cdiv(n, GEMM_BLOCK), groups))
    if groups > 1 and b_scale.stride(1) != 1:
        raise ValueError(f"b_scale must have a unit last stride, got strides {tuple(b_scale.stride())}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    devices = {t.device for t in (a, a_scale, b, b_scale)}
    if len(devices) != 1:
        raise ValueError(f"a, a_scale, b and b_scale must be on one device, got {sorted(map(str, devices))}")


def _alloc_gemm(a, a_scale, b, b_scale, out_dtype):
    return torch.empty((a.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)


def _gemm_launch(out, a, a_scale, b, b_scale, out_dtype):
    from triton_ops import gemm as tg

    tg.fp8_block_gemm(a, a_scale, b, b_scale, out)


# ---------------------------------------------------------------------------------------------
# Numerics contract: the float64 oracle and the error every backend is held to
# ---------------------------------------------------------------------------------------------

# Tolerances against the float64 oracle y = deq(a) @ deq(b)^T, per output, with S = sum_k |a_k b_k|
# (dequantized) and u the unit roundoff of out_dtype (2^-8 bf16, 0 fp32: one rounding at the end):
#     |out - y| <= u |y| + (1 + u) gamma S
# * fp32 accumulation (torch reference, CPU interpreter): any fp32 sum of K terms in any order,
#   plus the per-slice scale multiplies and promotions (a few roundings more), is off by at most
#   (K + 8) 2^-24 S (Higham's gamma_n bound with n = K + 8).
# * Hopper FP8 tensor cores (Triton and CUTLASS on sm_90): inside each 128-wide K slice the
#   accumulator keeps only ~14 significant bits (DeepSeek-V3, sec. 3.3.2), and Triton's default
#   max_num_imprecise_acc (2^30 on sm_90) leaves the whole 128-K tl.dot at that width; the
#   kernels promote into fp32 only between slices. A 14-bit truncating accumulator loses less than
#   2^-13 of its magnitude (<= the slice's S) per addition. The adder's internal grouping is not
#   documented; taking the smallest fused group reported for FP8 (a 4-way dot product), a
#   128-wide slice is at most 32 additions: gamma_tc = 32 * 2^-13 = 2^-8 of each slice's S, and
#   the slices' S add up to S: ~480x the fp32 bound at K = 128. tests/gemm simulates it on the
#   tests' operands: truncating after every 4-way sum breaks the fp32 bound by up to ~100x and
#   uses <= ~25% of this one; truncating after every single product, <= ~55%. It is consistent
#   with DeepSeek-V3's ~2% maximum relative error at K = 4096 without promotion (1024
#   additions: <= 12.5% of S).
# Both bounds also require DeepGEMM's similarity calc_diff(out, y) < 1e-4 over the finite
# outputs (~1e-7 for fp32 accumulation into bf16, ~1e-6 at 14 bits; a wrong scale index gives
# >1e-2): the elementwise bound is a worst case, the similarity catches a small bias everywhere.
_FP32_GAMMA_EXTRA = 8  # roundings beyond the K additions: scale multiplies, promotion, output
_TC_ACC_BITS = 14
_TC_ADDS_PER_SLICE = GEMM_BLOCK // 4  # 4-way fused FP8 dot products per 128-wide slice
SIMILARITY_LIMIT = 1e-4


def tensor_core_accumulation(device: torch.device) -> bool:
    """Whether the GEMM kernels for tensors on ``device`` accumulate each K slice at the tensor
    cores' ~14 bits (CUDA: Triton and CUTLASS on sm_90) rather than in fp32 (CPU)."""
    return device.type == "cuda"


def oracle(a, a_scale, b, b_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(deq(a) @ deq(b)^T, |deq(a)| @ |deq(b)|^T)`` on the operands' device (the
    dequantization by block index written out again, independent of the reference's code)."""
    m, k = a.shape
    kb = torch.arange(k, device=a.device) // GEMM_BLOCK
    nb = torch.arange(b.shape[0], device=a.device) // GEMM_BLOCK
    a64 = a.double() * a_scale.double()[:, kb]
    b64 = b.double() * b_scale.double()[nb][:, kb]
    return a64 @ b64.t(), a64.abs() @ b64.abs().t()


def error_bound(a, a_scale, b, b_scale, out_dtype, tensor_cores: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, bound)`` in float64: the oracle and the largest ``|out - y|`` allowed per output
    (derivation in the comment above this function)."""
    y, s = oracle(a, a_scale, b, b_scale)
    gamma = (a.shape[1] + _FP32_GAMMA_EXTRA) * 2.0**-24
    if tensor_cores:
        gamma += _TC_ADDS_PER_SLICE * 2.0 ** (1 - _TC_ACC_BITS)
    u = 2.0**-8 if out_dtype == torch.bfloat16 else 0.0
    return y, u * y.abs() + (1 + u) * gamma * s


def nonfinite_outputs(a, a_scale, b, b_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nan, nonfinite)`` boolean ``[M, N]``: where the reference's definition makes the output
    NaN (a NaN byte or scale in its row or column), and where non-finite (those, plus any touched
    by an infinite scale)."""
    nb = torch.arange(b.shape[0], device=b.device) // GEMM_BLOCK
    row_nan = torch.isnan(a.float()).any(1) | torch.isnan(a_scale).any(1)
    col_nan = torch.isnan(b.float()).any(1) | torch.isnan(b_scale).any(1)[nb]
    row_inf = torch.isinf(a_scale).any(1)
    col_inf = torch.isinf(b_scale).any(1)[nb]
    nan = row_nan[:, None] | col_nan[None, :]
    return nan, nan | row_inf[:, None] | col_inf[None, :]


def _compare(got, want, args) -> str | None:
    """Backends against the definition: the same non-finite outputs as the reference (NaN exactly
    where a NaN reaches), and the finite ones within :func:`error_bound` of the float64 oracle
    (the tensor-core bound for CUDA tensors) with calc_diff below ``SIMILARITY_LIMIT``."""
    a, a_scale, b, b_scale, out_dtype = args
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{got.dtype}{list(got.shape)} vs reference {want.dtype}{list(want.shape)}"
    nan, nonfinite = nonfinite_outputs(a, a_scale, b, b_scale)
    for name, t in (("output", got), ("reference", want)):
        t = t.to(a.device)
        if not torch.equal(~torch.isfinite(t), nonfinite):
            return (f"{name}: non-finite at {int((~torch.isfinite(t)).sum())} outputs, "
                    f"the definition says {int(nonfinite.sum())}")
        if not torch.isnan(t[nan]).all():
            return f"{name}: {int((~torch.isnan(t[nan])).sum())} outputs reached by a NaN are not NaN"
    y, bound = error_bound(a, a_scale, b, b_scale, out_dtype, tensor_core_accumulation(a.device))
    finite = ~nonfinite
    g, y, bound = got.to(a.device).double()[finite], y[finite], bound[finite]
    excess = (g - y).abs() - bound
    if excess.numel() and excess.max() > 0:
        i = int(excess.argmax())
        return (f"{int((excess > 0).sum())} outputs beyond the bound, worst {g[i].item()!r} vs oracle "
                f"{y[i].item()!r} (bound {bound[i].item():.3g})")
    diff = calc_diff(g, y)
    if diff >= SIMILARITY_LIMIT:
        return f"calc_diff {diff:.3g} >= {SIMILARITY_LIMIT}"
    return None


# ---------------------------------------------------------------------------------------------
# Contract tables: samples and bad inputs
# ---------------------------------------------------------------------------------------------

def _operands(m, n, k, gen, device, *, mn=False, ue8m0=False, nan_at=None):
    """Quantized random operands (torch reference quantizers on ``gen``'s device), their 1x128 /
    128x128 blocks spanning ~6 decades so that a mixed-up scale index shows; ``nan_at`` puts a
    NaN into that activation, so its group's scale is NaN."""
    d = gen.device
    x = torch.randn(m, k, generator=gen, device=d)
    x = x * torch.logspace(-3, 3, k, device=d)[torch.randperm(k, generator=gen, device=d)]
    w = torch.randn(n, k, generator=gen, device=d) * torch.logspace(-3, 3, n, device=d).unsqueeze(1)
    if nan_at is not None:
        x[nan_at] = float("nan")
    a, a_scale = per_token_group_quant_fp8(x, GEMM_BLOCK, 1e-4, ue8m0, mn, backend="torch")
    b, b_scale = per_block_quant_fp8(w, GEMM_BLOCK, 1e-4, ue8m0, backend="torch")
    return tuple(t.to(device) for t in (a, a_scale, b, b_scale))


def _gemm_samples(device, gen):
    ops = lambda *shape, **kw: _operands(*shape, gen, device, **kw)  # noqa: E731
    a, a_s, b, b_s = ops(4, 200, 176, mn=True, nan_at=(0, 5))
    b_s[1, 1] = float("inf")  # columns 128..199, second K block
    a2, a2_s, b2, b2_s = ops(3, 130, 192)
    b2.view(torch.uint8)[7, 150] = 0x7F  # the e4m3 NaN byte, under a finite scale
    a2_s[1, 0] = -float("inf")
    return [
        Sample((*ops(5, 257, 192), torch.bfloat16), note="K=192 (GLM-4.5 TP8), N odd, row-major a_scale"),
        Sample((*ops(1, 130, 176, mn=True), torch.float32), note="K=176 (GLM-4.5-Air TP8), M=1, fp32 out"),
        Sample(ops(7, 129, 384, mn=True, ue8m0=True), note="UE8M0 scales, 3 full K blocks"),
        Sample((*ops(9, 33, 16), torch.float32), note="K=16: one partial K block"),
        Sample((torch.empty(0, 192, dtype=FP8_DTYPE, device=device), torch.empty(2, 4, device=device).t()[:0],
                *ops(1, 40, 192)[2:]), tag="empty", note="M=0, MN-major a_scale"),
        Sample((a, a_s, b, b_s), tag="nonfinite", note="NaN activation group, +inf weight scale"),
        Sample((a2, a2_s, b2, b2_s, torch.float32), tag="nonfinite",
               note="NaN weight byte, -inf activation scale"),
    ]


def _gemm_errors(device):
    fp8 = lambda *shape: torch.zeros(shape, device=device).to(FP8_DTYPE)  # noqa: E731
    a, a_s, b, b_s = fp8(8, 256), torch.ones(8, 2, device=device), fp8(130, 256), torch.ones(2, 2, device=device)
    tma = r"must have a unit last stride and a row stride that is a multiple of 16 \(TMA\), got strides"
    value_errors = [
        ((a.float(), a_s, b, b_s), "a must be float8_e4m3fn, got torch.float32"),
        ((a, a_s, b.to(torch.float8_e5m2), b_s), "b must be float8_e4m3fn, got torch.float8_e5m2"),
        ((a.view(2, 4, 256), a_s, b, b_s), r"a must be 2-D, got shape \(2, 4, 256\)"),
        ((a, a_s, b.view(-1), b_s), r"b must be 2-D, got shape \(33280,\)"),
        ((fp8(256, 8).t(), a_s, b, b_s), rf"a {tma} \(1, 8\)"),
        ((a, a_s, fp8(130, 264)[:, :256], b_s), rf"b {tma} \(264, 1\)"),
        ((a, a_s, b[:, :128], b_s[:, :1]),
         r"a \[M, K\] and b \[N, K\] must share K, got a \(8, 256\) and b \(130, 128\)"),
        ((fp8(2, 112)[:, :100], a_s[:2, :1], fp8(3, 112)[:, :100], b_s[:1, :1]),
         r"K \(a.shape\[1\] = 100\) must be a positive multiple of 16 \(TMA\)"),
        ((fp8(2, 16)[:, :0], a_s[:2, :0], fp8(3, 16)[:, :0], b_s[:1, :0]),
         r"K \(a.shape\[1\] = 0\) must be a positive multiple of 16 \(TMA\)"),
        ((a, a_s, b[:0], b_s[:0]), r"b must have at least one row \(N >= 1\)"),
        ((a, a_s.double(), b, b_s), "a_scale must be float32, got torch.float64"),
        ((a, a_s[:7], b, b_s), r"a_scale must have shape \(8, 2\), got \(7, 2\)"),
        ((a[:, :192], a_s[:, :1], b[:, :192], b_s), r"a_scale must have shape \(8, 2\), got \(8, 1\)"),
        ((a, torch.ones(16, device=device).as_strided((8, 2), (1, 4)), b, b_s),
         r"a_scale must be row-major \(unit stride along K/128\) or MN-major \(unit stride along M, "
         r"M stride >= M\), got strides \(1, 4\)"),
        ((a, a_s, b, b_s.half()), "b_scale must be float32, got torch.float16"),
        ((a, a_s, b, b_s[:1]), r"b_scale must have shape \(2, 2\), got \(1, 2\)"),
        ((a, a_s, b, b_s.t().contiguous().t()), r"b_scale must have a unit last stride, got strides \(1, 2\)"),
        ((a, a_s, b, b_s, torch.float16), "out_dtype must be bfloat16 or float32, got torch.float16"),
        ((a, a_s, b, b_s.to("meta")), r"a, a_scale, b and b_scale must be on one device, got \["),
    ]
    return [ErrorInput(args, match=match) for args, match in value_errors] + [
        ErrorInput(("a", a_s, b, b_s), exc=TypeError, match="a must be torch.Tensor, got str", raw=False),
        ErrorInput((a, a_s, b, b_s, "bf16"), exc=TypeError, match="out_dtype must be torch.dtype, got str", raw=False),
    ]


_gemm_op = Op(
    "fp8_block_gemm",
    "(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, ScalarType out_dtype=bfloat16) -> Tensor",
    check=_check_gemm,
    alloc=_alloc_gemm,
    torch_impl=ref.fp8_block_gemm_ref,
    triton_launch=_gemm_launch,
    compare=_compare,
    samples=_gemm_samples,
    errors=_gemm_errors,
)

fp8_block_gemm = _gemm_op.api(
    """``out = (a * a_scale) @ (b * b_scale)^T`` with 1 x 128 and 128 x 128 scale blocks.

    ``a`` e4m3 ``[M, K]`` (any M >= 0), ``a_scale`` fp32 ``[M, ceil(K/128)]`` row-major or
    MN-major (see :func:`scale_layout`; MN-major with its M stride a multiple of 4, as the
    quantizer writes it, is what the kernels read fastest), ``b`` e4m3 ``[N, K]`` (any N >= 1),
    ``b_scale`` fp32 ``[ceil(N/128), ceil(K/128)]`` with a unit last stride -> ``out_dtype``
    (bf16 or fp32) ``[M, N]``, contiguous. K must be a positive multiple of 16 (TMA: 16-byte
    rows); when 128 does not divide it the last K block is partial (GLM-4.5's TP8 expert width
    192, Air's 176). ``a`` and ``b`` need unit last strides and row strides that are multiples
    of 16. UE8M0 (power-of-two) scales need nothing special. NaN/inf: see
    :mod:`glm45_ops.reference.gemm`.
    """
)


def fp8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``y = x @ deq(w_q, w_scale_inv)^T (+ bias)`` for an FP8 checkpoint's linear layer.

    ``x`` bf16 ``[..., K]`` (K a multiple of 16), ``w_q`` e4m3 ``[N, K]``, ``w_scale_inv`` fp32
    ``[ceil(N/128), ceil(K/128)]``, ``bias`` ``[N]`` or None -> bf16 ``[..., N]``. Activations
    are quantized 1 x 128 (``per_token_group_quant_fp8``, eps 1e-4, fp32 scales stored MN-major)
    and fed to :func:`fp8_block_gemm`; the bias is added to the bf16 output (one more rounding,
    as an unfused nn.Linear on a bf16 GEMM does). A NaN in a row of ``x`` makes that row of
    ``y`` NaN (its group's scale is NaN).
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16:
        raise ValueError(f"x must be a bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim [..., K]")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (w_q.shape[0],)):
        raise ValueError(f"bias must be a tensor of shape ({w_q.shape[0]},), got {getattr(bias, 'shape', bias)}")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    x_q, x_s = per_token_group_quant_fp8(x2, GEMM_BLOCK, column_major_scales=True, backend=backend)
    out = fp8_block_gemm(x_q, x_s, w_q, w_scale_inv, backend=backend)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*lead, w_q.shape[0])


OPS = (_gemm_op,)
