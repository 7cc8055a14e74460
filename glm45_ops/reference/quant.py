"""FP8 (e4m3fn) block-wise quantization: the numerical definition every backend matches bit for bit.

For a block ``B`` of ``x`` (1 x group_size of a token, or 128 x 128 of a weight):

    amax  = max(|x_i|, i in B)                               (fp32)
    scale = max(amax, eps) / 448                              (fp32, IEEE division)
    scale = 2^ceil(log2(scale))            if scale_ue8m0    (exact, from the fp32 bits)
    x_q   = e4m3(clamp(x / scale, -448, 448))                (IEEE division, RTNE cast)
    dequant: x ~= float(x_q) * scale

Follows DeepSeek-V3 / DeepGEMM's 1x128 activation and 128x128 weight recipe; ``eps=1e-4`` is
DeepGEMM's amax floor (slime and SGLang use 1e-10). UE8M0 scales round *up*, so
``|x / scale| <= 448`` still holds (DeepGEMM ``ceil_to_ue8m0``).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def ceil_to_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= ``scale`` (positive fp32), exactly.

    ``exp2(ceil(log2(s)))`` is not exact: fp32 ``log2`` of ``2^k * (1 + 2^-23)`` rounds to ``k``
    for large ``|k|``, giving a scale below ``s``. ``frexp`` is exact: ``s = m * 2^e`` with
    ``m`` in [0.5, 1), and ``s`` is a power of two iff ``m == 0.5``.
    """
    mantissa, exponent = torch.frexp(scale)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(scale), exponent)


def _scales_from_amax(amax: torch.Tensor, eps: float, scale_ue8m0: bool) -> torch.Tensor:
    # eps goes through fp32 first, as the kernels receive it.
    eps32 = torch.tensor(eps, dtype=torch.float32)
    scale = torch.maximum(amax.float(), eps32) / E4M3_MAX
    return ceil_to_ue8m0(scale) if scale_ue8m0 else scale


def _to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def per_token_group_quant_fp8_ref(
    x: torch.Tensor,
    group_size: int = 128,
    eps: float = 1e-4,
    scale_ue8m0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., K]`` float -> (``x_q`` e4m3 ``[..., K]``, ``scale`` fp32 ``[..., K/g]`` contiguous)."""
    k = x.shape[-1]
    xg = x.float().reshape(*x.shape[:-1], k // group_size, group_size)
    scale = _scales_from_amax(xg.abs().amax(dim=-1), eps, scale_ue8m0)
    x_q = _to_e4m3(xg, scale.unsqueeze(-1)).reshape(x.shape)
    return x_q, scale


def _block_view(t: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    """``[E, N, K]`` -> zero-padded ``[E, nb, block, kb, block]`` and the original N, K."""
    e, n, k = t.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = t.new_zeros(e, nb * block, kb * block)
    padded[:, :n, :k] = t
    return padded.view(e, nb, block, kb, block), n, k


def per_block_quant_fp8_ref(
    w: torch.Tensor,
    block_size: int = 128,
    eps: float = 1e-4,
    scale_ue8m0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[(E,) N, K]`` float -> (``w_q`` e4m3, ``scale_inv`` fp32 ``[(E,) ceil(N/b), ceil(K/b)]``).

    Edge blocks are partial: zero padding never raises a block's amax, so padding is harmless.
    """
    w3 = w.float().reshape(-1, *w.shape[-2:])
    blocks, n, k = _block_view(w3, block_size)
    scale = _scales_from_amax(blocks.abs().amax(dim=(2, 4)), eps, scale_ue8m0)
    w_q = _to_e4m3(blocks, scale[:, :, None, :, None])
    w_q = w_q.reshape(w3.shape[0], blocks.shape[1] * block_size, -1)[:, :n, :k]
    return w_q.reshape(w.shape).contiguous(), scale.reshape(*w.shape[:-2], *scale.shape[1:])


def dequant_fp8_ref(
    x_q: torch.Tensor,
    scale: torch.Tensor,
    block_m: int,
    block_n: int,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``x_q`` e4m3 ``[..., R, C]``, ``scale`` fp32 ``[..., ceil(R/bm), ceil(C/bn)]`` -> ``x_q * scale``.

    Computed in fp32 (one rounding, into ``out_dtype``).
    """
    r, c = x_q.shape[-2:]
    s = scale.float().repeat_interleave(block_m, dim=-2)[..., :r, :]
    s = s.repeat_interleave(block_n, dim=-1)[..., :c]
    return (x_q.float() * s).to(out_dtype)
