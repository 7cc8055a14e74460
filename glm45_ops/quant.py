"""FP8 (e4m3fn) block-wise quantization: 1 x 128 activations, 128 x 128 weights, and back.

Ops (schemas below, defaults there and nowhere else), every backend bit-exact with
``glm45_ops.reference.quant`` (which also defines NaN/inf, empty-tensor and partial-block rules):

* ``per_token_group_quant_fp8(x, group_size=128, eps=1e-4, scale_ue8m0=False,
  column_major_scales=False) -> (x_q, scale)``
* ``per_block_quant_fp8(w, block_size=128, eps=1e-4, scale_ue8m0=False) -> (w_q, scale_inv)``
* ``dequant_fp8(x_q, scale, block_m=1, block_n=128, out_dtype=bfloat16) -> x``

``requant_fp8_weights(weights)`` quantizes a list of BF16 weights (a whole model's, for FP8
rollouts in RL) through the block quantizer.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from glm45_ops._registry import ErrorInput, Op, Sample
from glm45_ops.reference import cdiv, quant as ref
from glm45_ops.reference.quant import E4M3_MAX, FP8_DTYPE

__all__ = [
    "E4M3_MAX",
    "FP8_DTYPE",
    "per_token_group_quant_fp8",
    "per_block_quant_fp8",
    "dequant_fp8",
    "requant_fp8_weights",
]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SCALE_ALIGN = 4  # column-major scales: M stride rounded up to 4 fp32 = 16 bytes (TMA)
# Largest sizes every backend honours: a Triton program holds one group (padded to a power of
# two) or one block in registers; 4096 and 256 x 256 stay far below its 2^20-element block limit.
MAX_GROUP_SIZE = 4096
MAX_BLOCK_SIZE = 256
_MAX_DEQUANT_BLOCK = 2**31 - 1  # block indices are int32 in the kernels
_FP32_MIN_NORMAL = torch.finfo(torch.float32).tiny



def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")


def _check_unit_last_stride(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {tuple(t.stride())}")


def _check_size(name: str, size: int, top: int) -> None:
    if not 1 <= size <= top:
        raise ValueError(f"{name} must be in [1, {top}], got {size}")


def _check_eps(eps: float) -> None:
    # float32(eps) / 448 must be a positive normal fp32: else zero blocks get a zero or
    # subnormal scale and dequantize to NaN (0 * inf) or lose the scale's precision.
    e32 = torch.tensor(eps, dtype=torch.float32).item() if math.isfinite(eps) else eps
    if not (math.isfinite(e32) and e32 > 0 and e32 / E4M3_MAX >= _FP32_MIN_NORMAL):
        raise ValueError(
            f"eps must be finite and at least {E4M3_MAX * _FP32_MIN_NORMAL:.3g} (so eps / 448 is a "
            f"positive normal fp32 number: the scale of an all-zero block), got {eps!r}"
        )


# ---------------------------------------------------------------------------------------------
# per_token_group_quant_fp8
# ---------------------------------------------------------------------------------------------

def _check_ptgq(x, group_size, eps, scale_ue8m0, column_major_scales):
    _check_float("x", x)
    _check_size("group_size", group_size, MAX_GROUP_SIZE)
    _check_eps(eps)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim [..., K]")
    _check_unit_last_stride("x", x)
    if column_major_scales and x.dim() != 2:
        raise ValueError(f"column_major_scales=True needs a 2-D x [M, K], got {x.dim()}-D")


def _alloc_ptgq(x, group_size, eps, scale_ue8m0, column_major_scales):
    x_q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    groups = cdiv(x.shape[-1], group_size)
    if column_major_scales:
        m = x.shape[0]
        m_pad = cdiv(m, _SCALE_ALIGN) * _SCALE_ALIGN
        scale = torch.empty((groups, m_pad), dtype=torch.float32, device=x.device).t()[:m]
    else:
        scale = torch.empty((*x.shape[:-1], groups), dtype=torch.float32, device=x.device)
    return x_q, scale


def _ptgq_torch(x, group_size, eps, scale_ue8m0, column_major_scales):
    return ref.per_token_group_quant_fp8_ref(x, group_size, eps, scale_ue8m0)


def _ptgq_launch(outs, x, group_size, eps, scale_ue8m0, column_major_scales):
    from triton_ops import quant as tq

    x_q, scale = outs
    k = x.shape[-1]
    groups = scale.shape[-1]
    tq.per_token_group_quant_fp8(
        x.reshape(-1, k), x_q.view(-1, k), scale if column_major_scales else scale.view(-1, groups),
        group_size, eps, scale_ue8m0,
    )


def _ptgq_samples(device, gen):
    return [
        Sample((_spread((7, 256), torch.bfloat16, gen, device),)),
        Sample((_spread((3, 5, 200), torch.float32, gen, device), 64, 1e-10, True), note="partial last group"),
        Sample((_spread((9, 192), torch.float16, gen, device),), {"column_major_scales": True}, note="K=192"),
        Sample((_spread((4, 176), torch.bfloat16, gen, device), 96), {"scale_ue8m0": True}, note="K=176, group 96"),
        Sample((_spread((4, 640), torch.bfloat16, gen, device)[:, 128:512],), note="row-strided view"),
        Sample((torch.empty(0, 256, device=device),), tag="empty"),
        Sample((torch.empty(4, 0, dtype=torch.bfloat16, device=device),), tag="empty"),
        Sample((torch.empty(0, 256, device=device),), {"column_major_scales": True}, tag="empty"),
        Sample((_nonfinite((3, 384), torch.bfloat16, gen, device),), tag="nonfinite"),
        Sample((_nonfinite((3, 384), torch.float32, gen, device), 128, 1e-4, True, True), tag="nonfinite"),
    ]


def _ptgq_errors(device):
    x = torch.randn(4, 256, device=device)
    return [
        ErrorInput((x.to(torch.int32),), match="x must be bfloat16"),
        ErrorInput((x, 0), match=r"group_size must be in \[1, 4096\]"),
        ErrorInput((x, 2**21), match=r"group_size must be in \[1, 4096\]"),
        ErrorInput((x, 128, 0.0), match="eps must be finite and at least"),
        ErrorInput((x, 128, 1e-44), match="eps must be finite and at least"),
        ErrorInput((x, 128, float("inf")), match="eps must be finite and at least"),
        ErrorInput((torch.randn(256, 4, device=device).t(),), match="contiguous in its last dim"),
        ErrorInput((x.view(2, 2, 256),), {"column_major_scales": True}, match="column_major_scales=True needs a 2-D"),
        ErrorInput((x, True), exc=TypeError, match="group_size must be int", raw=False),
        ErrorInput(("x",), exc=TypeError, match="x must be torch.Tensor", raw=False),
    ]


_ptgq_op = Op(
    "per_token_group_quant_fp8",
    "(Tensor x, int group_size=128, float eps=1e-4, bool scale_ue8m0=False, "
    "bool column_major_scales=False) -> (Tensor, Tensor)",
    check=_check_ptgq,
    alloc=_alloc_ptgq,
    torch_impl=_ptgq_torch,
    triton_launch=_ptgq_launch,
    samples=_ptgq_samples,
    errors=_ptgq_errors,
)

per_token_group_quant_fp8 = _ptgq_op.api(
    """Quantize activations per (token, group of ``group_size`` channels) to e4m3.

    ``x`` ``[..., K]`` bf16/fp16/fp32 with a unit last stride, any K -> ``x_q`` e4m3 ``[..., K]``
    (contiguous) and ``scale`` fp32 ``[..., ceil(K/group_size)]`` with ``x ~= x_q * scale``; the
    last group of a row is partial when ``group_size`` does not divide K (GLM-4.5's TP8 expert
    width 192, Air's 176). Formula, NaN/inf and empty rules: :mod:`glm45_ops.reference.quant`.
    ``scale_ue8m0`` rounds scales up to powers of two. ``column_major_scales`` (2-D ``x`` only)
    returns ``scale`` with the same logical shape stored MN-major, its M stride rounded up to a
    multiple of 4 (the TMA-aligned layout DeepGEMM's SM90 kernels read).
    """
)


# ---------------------------------------------------------------------------------------------
# per_block_quant_fp8
# ---------------------------------------------------------------------------------------------

def _check_pbq(w, block_size, eps, scale_ue8m0):
    _check_float("w", w)
    _check_size("block_size", block_size, MAX_BLOCK_SIZE)
    _check_eps(eps)
    if w.dim() not in (2, 3):
        raise ValueError(f"w must be [N, K] or [E, N, K], got {w.dim()}-D shape {tuple(w.shape)}")
    _check_unit_last_stride("w", w)


def _alloc_pbq(w, block_size, eps, scale_ue8m0):
    n, k = w.shape[-2:]
    w_q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty((*w.shape[:-2], cdiv(n, block_size), cdiv(k, block_size)), dtype=torch.float32, device=w.device)
    return w_q, scale


def _pbq_launch(outs, w, block_size, eps, scale_ue8m0):
    from triton_ops import quant as tq

    as3 = lambda t: t if t.dim() == 3 else t.unsqueeze(0)  # noqa: E731
    tq.per_block_quant_fp8(as3(w), *map(as3, outs), block_size, eps, scale_ue8m0)


def _pbq_samples(device, gen):
    def w(shape, dtype):
        return (torch.randn(shape, generator=gen, device=gen.device) * torch.logspace(-3, 2, shape[-1], device=gen.device)).to(dtype).to(device)

    bad = w((2, 130, 200), torch.float32)
    bad[0, 3, 7] = float("nan")
    bad[1, 129, 199] = float("inf")
    bad[1, 0, 0] = -float("inf")
    return [
        Sample((w((130, 200), torch.bfloat16),)),
        Sample((w((2, 129, 257), torch.float32), 128, 1e-4, True)),
        Sample((w((1, 5), torch.float16),)),
        Sample((w((200, 100), torch.bfloat16), 96), note="non-power-of-two block"),
        Sample((w((3, 64, 40), torch.float32), 16, 1e-10), note="many small blocks"),
        Sample((torch.empty(0, 128, device=device),), tag="empty"),
        Sample((torch.empty(128, 0, dtype=torch.bfloat16, device=device),), tag="empty"),
        Sample((torch.empty(2, 0, 128, device=device),), tag="empty"),
        Sample((bad,), tag="nonfinite"),
        Sample((bad, 128, 1e-4, True), tag="nonfinite"),
    ]


def _pbq_errors(device):
    x = torch.randn(4, 256, device=device)
    return [
        ErrorInput((x.view(2, 2, 2, 128),), match=r"w must be \[N, K\] or \[E, N, K\]"),
        ErrorInput((x.to(torch.float64),), match="w must be bfloat16"),
        ErrorInput((x, -128), match=r"block_size must be in \[1, 256\]"),
        ErrorInput((x, 512), match=r"block_size must be in \[1, 256\]"),
        ErrorInput((x, 128, 1e-44), match="eps must be finite and at least"),
        ErrorInput((torch.randn(256, 4, device=device).t(),), match="contiguous in its last dim"),
        ErrorInput((x, 128.0), exc=TypeError, match="block_size must be int", raw=False),
    ]


_pbq_op = Op(
    "per_block_quant_fp8",
    "(Tensor w, int block_size=128, float eps=1e-4, bool scale_ue8m0=False) -> (Tensor, Tensor)",
    check=_check_pbq,
    alloc=_alloc_pbq,
    torch_impl=ref.per_block_quant_fp8_ref,
    triton_launch=_pbq_launch,
    samples=_pbq_samples,
    errors=_pbq_errors,
)

per_block_quant_fp8 = _pbq_op.api(
    """Quantize weights per ``block_size x block_size`` block to e4m3 (DeepSeek-V3 FP8 checkpoints).

    ``w`` ``[N, K]`` or ``[E, N, K]`` bf16/fp16/fp32, any N and K (edge blocks are partial), unit
    last stride -> ``w_q`` e4m3 (w's shape, contiguous) and ``scale_inv`` fp32
    ``[(E,) ceil(N/b), ceil(K/b)]`` with ``w ~= w_q * scale_inv`` blockwise. Any block size up
    to 256 (128 is DeepSeek-V3's).
    """
)


def requant_fp8_weights(
    weights: Iterable[torch.Tensor],
    block_size: int = 128,
    eps: float = 1e-4,
    scale_ue8m0: bool = False,
    *,
    backend: str | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Online requantization for FP8 rollouts: ``[(w_q, scale_inv)]`` for each BF16 weight.

    Each weight is one launch with no host sync, so a whole model's weights stream through at
    the quantizer's bandwidth; the results are bit-identical to one ``per_block_quant_fp8`` each.
    """
    return [per_block_quant_fp8(w, block_size, eps, scale_ue8m0, backend=backend) for w in weights]


# ---------------------------------------------------------------------------------------------
# dequant_fp8
# ---------------------------------------------------------------------------------------------

def _check_dequant(x_q, scale, block_m, block_n, out_dtype):
    if x_q.dtype != FP8_DTYPE:
        raise ValueError(f"x_q must be a float8_e4m3fn tensor, got {x_q.dtype}")
    if scale.dtype != torch.float32:
        raise ValueError(f"scale must be a float32 tensor, got {scale.dtype}")
    _check_size("block_m", block_m, _MAX_DEQUANT_BLOCK)
    _check_size("block_n", block_n, _MAX_DEQUANT_BLOCK)
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if x_q.dim() < 2:
        raise ValueError(f"x_q must be at least 2-D [..., R, C], got shape {tuple(x_q.shape)}")
    if x_q.device != scale.device:
        raise ValueError(f"x_q and scale must be on the same device, got {x_q.device} and {scale.device}")
    r, c = x_q.shape[-2:]
    want = (*x_q.shape[:-2], cdiv(r, block_m), cdiv(c, block_n))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"scale must have shape {want} for x_q {tuple(x_q.shape)} with blocks {block_m}x{block_n}, "
            f"got {tuple(scale.shape)}"
        )
    _check_unit_last_stride("x_q", x_q)


def _alloc_dequant(x_q, scale, block_m, block_n, out_dtype):
    return torch.empty(x_q.shape, dtype=out_dtype, device=x_q.device)


def _dequant_launch(out, x_q, scale, block_m, block_n, out_dtype):
    from triton_ops import quant as tq

    r, c = x_q.shape[-2:]
    tq.dequant_fp8(x_q.reshape(-1, r, c), scale.reshape(-1, *scale.shape[-2:]), out.view(-1, r, c), block_m, block_n)


def _dequant_samples(device, gen):
    x = _spread((9, 384), torch.bfloat16, gen, gen.device)
    q, s = ref.per_token_group_quant_fp8_ref(x, 128, 1e-4, False)
    w = torch.randn(2, 200, 260, generator=gen, device=gen.device)
    wq, ws = ref.per_block_quant_fp8_ref(w, 128, 1e-4, True)
    q_cm, s_cm = per_token_group_quant_fp8(x, column_major_scales=True, backend="torch")
    nan_q = q.clone()
    nan_q.view(torch.uint8)[2, 5] = 0x7F
    nan_q.view(torch.uint8)[3, 300] = 0xFF
    nan_s = s.clone()
    nan_s[4, 1] = float("nan")
    nan_s[5, 2] = float("inf")
    d = lambda *ts: tuple(t.to(device) for t in ts)  # noqa: E731
    return [
        Sample(d(q, s)),
        Sample((*d(wq, ws), 128, 128, torch.float32)),
        Sample((*d(wq, ws), 128, 128, torch.float16)),
        Sample(d(q_cm, s_cm), note="column-major scales"),
        Sample((*d(q[:, :200], s[:, :2].contiguous()), 1, 128), note="partial last block"),
        Sample((*d(wq[:, :5, :7].contiguous(), ws[:, :1, :1].contiguous()), 2**33 // 2**3, 128), note="huge block_m"),
        Sample(d(q[:0], s[:0]), tag="empty"),
        Sample((*d(wq[:, :, :0], ws[:, :, :0]), 128, 128), tag="empty"),
        Sample((*d(nan_q, nan_s), 1, 128, torch.float32), tag="nonfinite"),
    ]


def _dequant_errors(device):
    x = torch.randn(4, 256, device=device)
    q, s = ref.per_token_group_quant_fp8_ref(x, 128, 1e-4, False)
    return [
        ErrorInput((q, s[:, :1]), match="scale must have shape"),
        ErrorInput((x, s), match="x_q must be a float8_e4m3fn"),
        ErrorInput((q, s.double()), match="scale must be a float32"),
        ErrorInput((q, s, 1, 128, torch.int8), match="out_dtype must be"),
        ErrorInput((q, s, 2**33, 128), match=r"block_m must be in \[1, 2147483647\]"),
        ErrorInput((q, s, 1, 0), match=r"block_n must be in \[1, 2147483647\]"),
        ErrorInput((q.view(-1), s), match="x_q must be at least 2-D"),
        ErrorInput((q, s, 1, 128, "bf16"), exc=TypeError, match="out_dtype must be torch.dtype", raw=False),
    ]


_dequant_op = Op(
    "dequant_fp8",
    "(Tensor x_q, Tensor scale, int block_m=1, int block_n=128, ScalarType out_dtype=bfloat16) -> Tensor",
    check=_check_dequant,
    alloc=_alloc_dequant,
    torch_impl=ref.dequant_fp8_ref,
    triton_launch=_dequant_launch,
    samples=_dequant_samples,
    errors=_dequant_errors,
)

dequant_fp8 = _dequant_op.api(
    """``x_q`` e4m3 ``[..., R, C]`` times ``scale`` fp32 ``[..., ceil(R/bm), ceil(C/bn)]`` (any
    strides, so column-major activation scales work) -> ``out_dtype`` ``[..., R, C]``.

    The defaults ``(1, 128)`` undo ``per_token_group_quant_fp8`` on 2-D+ activations;
    ``(128, 128)`` undoes ``per_block_quant_fp8``. Computed in fp32, one rounding into
    ``out_dtype``; a NaN byte or a NaN scale gives NaN.
    """
)


# ---------------------------------------------------------------------------------------------
# Sample inputs shared by the tables above
# ---------------------------------------------------------------------------------------------

def _spread(shape, dtype, gen, device) -> torch.Tensor:
    """Random values spanning ~9 decades along the last dim (groups and blocks get very different
    scales), one all-zero group, and exact e4m3 ties at scale 1."""
    k = shape[-1]
    x = torch.randn(shape, generator=gen, device=gen.device) * torch.logspace(-5, 4, k, device=gen.device)
    flat = x.view(-1, k)
    if flat.shape[0] > 0:
        flat[0, : min(k, 128)] = 0.0
    if flat.shape[0] > 1 and k >= 4:
        # 448 sets the scale to exactly 1, so 1.0625 and 1.1875 are ties between e4m3 neighbours
        flat[1, :4] = torch.tensor([448.0, 1.0625, 1.1875, -0.0029296875])
    return x.to(dtype).to(device)


def _nonfinite(shape, dtype, gen, device) -> torch.Tensor:
    """NaN in one group, +inf and -inf in another, the rest finite."""
    x = _spread(shape, torch.float32, gen, gen.device)
    x[0, 5] = float("nan")
    x[1, 130] = float("inf")
    x[1, 131] = -float("inf")
    x[2, 300] = float("nan")
    x[2, 301] = float("inf")
    return x.to(dtype).to(device)


OPS: Sequence[Op] = (_ptgq_op, _pbq_op, _dequant_op)
