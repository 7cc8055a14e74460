"""FP8 (e4m3fn) block-wise quantization: 1 x 128 activations, 128 x 128 weights, and back.

Ops (schemas below), every backend bit-exact with ``glm45_ops.reference.quant``:

* ``per_token_group_quant_fp8(x, group_size=128, eps=1e-4, scale_ue8m0=False,
  column_major_scales=False) -> (x_q, scale)``
* ``per_block_quant_fp8(w, block_size=128, eps=1e-4, scale_ue8m0=False) -> (w_q, scale_inv)``
* ``dequant_fp8(x_q, scale, block_m, block_n, out_dtype) -> x``

``requant_fp8_weights(weights)`` quantizes a list of BF16 weights (a whole model's, for FP8
rollouts in RL) through the block quantizer.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from glm45_ops._registry import Op
from glm45_ops.reference import quant as ref
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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")


def _check_unit_last_stride(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {tuple(t.stride())}")


def _check_quant_params(size_name: str, size: int, eps: float) -> None:
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"{size_name} must be a positive int, got {size!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it floors amax so zero blocks get a finite scale), got {eps!r}")


# ---------------------------------------------------------------------------------------------
# per_token_group_quant_fp8
# ---------------------------------------------------------------------------------------------

def _check_ptgq(x, group_size=128, eps=1e-4, scale_ue8m0=False, column_major_scales=False):
    _check_float("x", x)
    _check_quant_params("group_size", group_size, eps)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim [..., K]")
    if x.shape[-1] % group_size:
        raise ValueError(f"x.shape[-1] (K={x.shape[-1]}) must be divisible by group_size={group_size}")
    _check_unit_last_stride("x", x)
    if column_major_scales and x.dim() != 2:
        raise ValueError(f"column_major_scales=True needs a 2-D x [M, K], got {x.dim()}-D")


def _alloc_ptgq(x, group_size, column_major_scales):
    x_q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    groups = x.shape[-1] // group_size
    if column_major_scales:
        m = x.shape[0]
        m_pad = _cdiv(m, _SCALE_ALIGN) * _SCALE_ALIGN
        scale = torch.empty((groups, m_pad), dtype=torch.float32, device=x.device).t()[:m]
    else:
        scale = torch.empty((*x.shape[:-1], groups), dtype=torch.float32, device=x.device)
    return x_q, scale


def _ptgq_torch(x, group_size=128, eps=1e-4, scale_ue8m0=False, column_major_scales=False):
    x_q, scale = ref.per_token_group_quant_fp8_ref(x, group_size, eps, scale_ue8m0)
    if column_major_scales:
        _, out_scale = _alloc_ptgq(x, group_size, True)
        return x_q, out_scale.copy_(scale)
    return x_q, scale


def _ptgq_triton(x, group_size=128, eps=1e-4, scale_ue8m0=False, column_major_scales=False):
    from triton_ops import quant as tq

    x_q, scale = _alloc_ptgq(x, group_size, column_major_scales)
    k = x.shape[-1]
    tq.per_token_group_quant_fp8(
        x.reshape(-1, k), x_q.view(-1, k), scale.view(-1, k // group_size) if not column_major_scales else scale,
        group_size, eps, scale_ue8m0,
    )
    return x_q, scale


def _ptgq_fake(x, group_size=128, eps=1e-4, scale_ue8m0=False, column_major_scales=False):
    return _alloc_ptgq(x, group_size, column_major_scales)


_ptgq_op = Op(
    "per_token_group_quant_fp8",
    "(Tensor x, int group_size=128, float eps=1e-4, bool scale_ue8m0=False, "
    "bool column_major_scales=False) -> (Tensor, Tensor)",
    torch_impl=_ptgq_torch,
    triton_impl=_ptgq_triton,
    fake=_ptgq_fake,
    check=_check_ptgq,
)


def per_token_group_quant_fp8(
    x: torch.Tensor,
    group_size: int = 128,
    eps: float = 1e-4,
    scale_ue8m0: bool = False,
    column_major_scales: bool = False,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per (token, group of ``group_size`` channels) to e4m3.

    ``x`` ``[..., K]`` bf16/fp16/fp32 with a unit last stride and ``K % group_size == 0`` ->
    ``x_q`` e4m3 ``[..., K]`` (contiguous) and ``scale`` fp32 ``[..., K/group_size]`` with
    ``x ~= x_q * scale`` (formula in :mod:`glm45_ops.reference.quant`). ``scale_ue8m0`` rounds
    scales up to powers of two. ``column_major_scales`` (2-D ``x`` only) returns ``scale`` with
    the same logical shape stored MN-major, its M stride rounded up to a multiple of 4 (the
    TMA-aligned layout DeepGEMM's SM90 kernels read).
    """
    return _ptgq_op(x, group_size, eps, scale_ue8m0, column_major_scales, backend=backend)


# ---------------------------------------------------------------------------------------------
# per_block_quant_fp8
# ---------------------------------------------------------------------------------------------

def _check_pbq(w, block_size=128, eps=1e-4, scale_ue8m0=False):
    _check_float("w", w)
    _check_quant_params("block_size", block_size, eps)
    if w.dim() not in (2, 3):
        raise ValueError(f"w must be [N, K] or [E, N, K], got {w.dim()}-D shape {tuple(w.shape)}")
    _check_unit_last_stride("w", w)


def _alloc_pbq(w, block_size):
    n, k = w.shape[-2:]
    w_q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty((*w.shape[:-2], _cdiv(n, block_size), _cdiv(k, block_size)), dtype=torch.float32, device=w.device)
    return w_q, scale


def _pbq_triton(w, block_size=128, eps=1e-4, scale_ue8m0=False):
    from triton_ops import quant as tq

    w_q, scale = _alloc_pbq(w, block_size)
    as3 = lambda t: t if t.dim() == 3 else t.unsqueeze(0)  # noqa: E731
    tq.per_block_quant_fp8(as3(w), as3(w_q), as3(scale), block_size, eps, scale_ue8m0)
    return w_q, scale


def _pbq_fake(w, block_size=128, eps=1e-4, scale_ue8m0=False):
    return _alloc_pbq(w, block_size)


_pbq_op = Op(
    "per_block_quant_fp8",
    "(Tensor w, int block_size=128, float eps=1e-4, bool scale_ue8m0=False) -> (Tensor, Tensor)",
    torch_impl=ref.per_block_quant_fp8_ref,
    triton_impl=_pbq_triton,
    fake=_pbq_fake,
    check=_check_pbq,
)


def per_block_quant_fp8(
    w: torch.Tensor,
    block_size: int = 128,
    eps: float = 1e-4,
    scale_ue8m0: bool = False,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weights per ``block_size x block_size`` block to e4m3 (DeepSeek-V3 FP8 checkpoints).

    ``w`` ``[N, K]`` or ``[E, N, K]`` bf16/fp16/fp32, any N and K (edge blocks are partial), unit
    last stride -> ``w_q`` e4m3 (w's shape, contiguous) and ``scale_inv`` fp32
    ``[(E,) ceil(N/b), ceil(K/b)]`` with ``w ~= w_q * scale_inv`` blockwise.
    """
    return _pbq_op(w, block_size, eps, scale_ue8m0, backend=backend)


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

def _check_dequant(x_q, scale, block_m, block_n, out_dtype=torch.bfloat16):
    if not isinstance(x_q, torch.Tensor) or x_q.dtype != FP8_DTYPE:
        raise ValueError(f"x_q must be a float8_e4m3fn tensor, got {getattr(x_q, 'dtype', type(x_q))}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be a float32 tensor, got {getattr(scale, 'dtype', type(scale))}")
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if x_q.dim() < 2:
        raise ValueError(f"x_q must be at least 2-D [..., R, C], got shape {tuple(x_q.shape)}")
    if x_q.device != scale.device:
        raise ValueError(f"x_q and scale must be on the same device, got {x_q.device} and {scale.device}")
    r, c = x_q.shape[-2:]
    want = (*x_q.shape[:-2], _cdiv(r, block_m), _cdiv(c, block_n))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"scale must have shape {want} for x_q {tuple(x_q.shape)} with blocks {block_m}x{block_n}, "
            f"got {tuple(scale.shape)}"
        )
    _check_unit_last_stride("x_q", x_q)


def _dequant_triton(x_q, scale, block_m, block_n, out_dtype=torch.bfloat16):
    from triton_ops import quant as tq

    out = torch.empty(x_q.shape, dtype=out_dtype, device=x_q.device)
    r, c = x_q.shape[-2:]
    tq.dequant_fp8(x_q.reshape(-1, r, c), scale.reshape(-1, *scale.shape[-2:]), out.view(-1, r, c), block_m, block_n)
    return out


def _dequant_fake(x_q, scale, block_m, block_n, out_dtype=torch.bfloat16):
    return torch.empty(x_q.shape, dtype=out_dtype, device=x_q.device)


_dequant_op = Op(
    "dequant_fp8",
    "(Tensor x_q, Tensor scale, int block_m, int block_n, ScalarType out_dtype) -> Tensor",
    torch_impl=ref.dequant_fp8_ref,
    triton_impl=_dequant_triton,
    fake=_dequant_fake,
    check=_check_dequant,
)


def dequant_fp8(
    x_q: torch.Tensor,
    scale: torch.Tensor,
    block_m: int,
    block_n: int,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``x_q`` e4m3 ``[..., R, C]`` times ``scale`` fp32 ``[..., ceil(R/bm), ceil(C/bn)]`` (any
    strides, so column-major activation scales work) -> ``out_dtype`` ``[..., R, C]``.

    ``(1, 128)`` undoes ``per_token_group_quant_fp8`` on 2-D+ activations; ``(128, 128)`` undoes
    ``per_block_quant_fp8``. Computed in fp32, one rounding into ``out_dtype``.
    """
    return _dequant_op(x_q, scale, block_m, block_n, out_dtype, backend=backend)


OPS: Sequence[Op] = (_ptgq_op, _pbq_op, _dequant_op)
