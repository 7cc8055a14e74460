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

from glm45_ops._registry import Op
from glm45_ops.quant import per_token_group_quant_fp8
from glm45_ops.reference import gemm as ref
from glm45_ops.reference.gemm import GEMM_BLOCK
from glm45_ops.reference.quant import FP8_DTYPE

__all__ = ["GEMM_BLOCK", "fp8_block_gemm", "fp8_linear", "scale_layout"]

_OUT_DTYPES = (torch.bfloat16, torch.float32)
_ROW_ALIGN_BYTES = 16  # TMA: every row stride of a and b a multiple of 16 bytes
K_ALIGN = 16  # TMA: K e4m3 values per row must fill whole 16-byte units


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
    groups = _cdiv(k, GEMM_BLOCK)
    _check_scale("a_scale", a_scale, (m, groups))
    if scale_layout(a_scale) is None:
        raise ValueError(
            "a_scale must be row-major (unit stride along K/128) or MN-major (unit stride along M, "
            f"M stride >= M), got strides {tuple(a_scale.stride())}"
        )
    _check_scale("b_scale", b_scale, (_cdiv(n, GEMM_BLOCK), groups))
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


_gemm_op = Op(
    "fp8_block_gemm",
    "(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, ScalarType out_dtype=bfloat16) -> Tensor",
    check=_check_gemm,
    alloc=_alloc_gemm,
    torch_impl=ref.fp8_block_gemm_ref,
    triton_launch=_gemm_launch,
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
