"""FP8 (e4m3fn) block-wise quantization: the numerical definition every backend matches bit for bit.

For a block ``B`` of ``x`` (1 x group_size of a token, or b x b of a weight; the last block of a
row or column may be partial):

    amax  = max(|x_i|, i in B, x_i finite)                   (fp32; 0 if none is)
    scale = max(amax, eps) / 448                              (fp32, IEEE division)
    scale = 2^ceil(log2(scale))            if scale_ue8m0    (exact, from the fp32 bits)
    x_q   = e4m3(clamp(x / scale, -448, 448))                (IEEE division, RTNE cast)
    dequant: x ~= float(x_q) * scale

Non-finite values, the same on every backend:

* **NaN** anywhere in a block makes the block's ``scale`` NaN (UE8M0 too), so every ``x_q`` of
  the block is NaN and the NaN reaches whatever consumes them (a GEMM's output rows). The sign
  of a NaN is not part of the contract: compare NaN with NaN.
* **+-inf** saturates: it does not enter ``amax``, and ``x / scale`` clamps to ``+-448`` with
  its sign kept, so the block's finite values keep their precision.
* ``dequant_fp8``: a NaN byte (``0x7f``/``0xff``) or a NaN scale gives NaN.

Empty tensors give empty outputs of the shapes below. ``eps`` must be finite and large enough
that ``float32(eps) / 448`` is a positive normal fp32 number (else an all-zero block's scale
would underflow to a subnormal or zero and its dequantization give NaN); ``check`` refuses others.

Follows DeepSeek-V3 / DeepGEMM's 1x128 activation and 128x128 weight recipe; ``eps=1e-4`` is
DeepGEMM's amax floor (slime and SGLang use 1e-10). UE8M0 scales round *up*, so
``|x / scale| <= 448`` still holds (DeepGEMM ``ceil_to_ue8m0``).
"""

from __future__ import annotations

import math

import torch

from glm45_ops.reference import cdiv

E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def ceil_to_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= ``scale`` (positive fp32), exactly; NaN stays NaN.

    ``exp2(ceil(log2(s)))`` is not exact: fp32 ``log2`` of ``2^k * (1 + 2^-23)`` rounds to ``k``
    for large ``|k|``, giving a scale below ``s``. ``frexp`` is exact: ``s = m * 2^e`` with
    ``m`` in [0.5, 1), and ``s`` is a power of two iff ``m == 0.5``.
    """
    mantissa, exponent = torch.frexp(scale)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.where(torch.isnan(scale), scale, torch.ldexp(torch.ones_like(scale), exponent))


def _finite_amax(x: torch.Tensor, dims) -> torch.Tensor:
    """max |x| over ``dims`` ignoring +-inf; NaN if any element is NaN (torch's amax propagates it)."""
    a = x.abs()
    return torch.where(torch.isinf(a), torch.zeros_like(a), a).amax(dim=dims)


def _scales_from_amax(amax: torch.Tensor, eps: float, scale_ue8m0: bool) -> torch.Tensor:
    # eps goes through fp32 first, as the kernels receive it; maximum propagates NaN.
    eps32 = torch.tensor(eps, dtype=torch.float32, device=amax.device)
    scale = torch.maximum(amax.float(), eps32) / E4M3_MAX
    return ceil_to_ue8m0(scale) if scale_ue8m0 else scale


def _to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dim to ``size`` (zeros never raise an amax)."""
    k = x.shape[-1]
    return x if k == size else torch.nn.functional.pad(x, (0, size - k))


def per_token_group_quant_fp8_ref(
    x: torch.Tensor,
    group_size: int,
    eps: float,
    scale_ue8m0: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., K]`` float, any K -> (``x_q`` e4m3 ``[..., K]``, ``scale`` fp32
    ``[..., ceil(K/g)]`` contiguous); the last group of a row is partial when ``g`` does not divide K."""
    k = x.shape[-1]
    groups = cdiv(k, group_size)
    xg = _pad_last(x.float(), groups * group_size).reshape(*x.shape[:-1], groups, group_size)
    scale = _scales_from_amax(_finite_amax(xg, -1), eps, scale_ue8m0) if xg.numel() else \
        torch.empty((*x.shape[:-1], groups), dtype=torch.float32, device=x.device)
    x_q = _to_e4m3(xg, scale.unsqueeze(-1)).reshape(*x.shape[:-1], groups * group_size)[..., :k]
    return x_q.contiguous(), scale


def per_block_quant_fp8_ref(
    w: torch.Tensor,
    block_size: int,
    eps: float,
    scale_ue8m0: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[(E,) N, K]`` float -> (``w_q`` e4m3, ``scale_inv`` fp32 ``[(E,) ceil(N/b), ceil(K/b)]``).

    Edge blocks are partial: zero padding never raises a block's amax, so padding is harmless.
    """
    *lead, n, k = w.shape
    nb, kb = cdiv(n, block_size), cdiv(k, block_size)
    w3 = w.float().reshape(math.prod(lead), n, k)
    padded = torch.nn.functional.pad(w3, (0, kb * block_size - k, 0, nb * block_size - n))
    blocks = padded.view(w3.shape[0], nb, block_size, kb, block_size)
    if blocks.numel():
        scale = _scales_from_amax(_finite_amax(blocks, (2, 4)), eps, scale_ue8m0)
    else:
        scale = torch.empty((w3.shape[0], nb, kb), dtype=torch.float32, device=w.device)
    w_q = _to_e4m3(blocks, scale[:, :, None, :, None]).reshape(w3.shape[0], nb * block_size, kb * block_size)
    return w_q[:, :n, :k].reshape(w.shape).contiguous(), scale.reshape(*lead, nb, kb)


def dequant_fp8_ref(
    x_q: torch.Tensor,
    scale: torch.Tensor,
    block_m: int,
    block_n: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``x_q`` e4m3 ``[..., R, C]``, ``scale`` fp32 ``[..., ceil(R/bm), ceil(C/bn)]`` -> ``x_q * scale``.

    Computed in fp32 (one rounding, into ``out_dtype``); each element reads its block's scale by
    index, so any block size costs no more memory than the output.
    """
    r, c = x_q.shape[-2:]
    rows = torch.arange(r, device=x_q.device) // block_m
    cols = torch.arange(c, device=x_q.device) // block_n
    s = scale.float()[..., rows, :][..., cols]
    return (x_q.float() * s).to(out_dtype)
