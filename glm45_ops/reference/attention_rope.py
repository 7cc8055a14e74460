"""QK-Norm + partial NeoX RoPE and the paged KV-cache write: the numerical definition.

GLM-4.5 attention (KNOWLEDGE.md §4; HF ``Glm4MoeAttention``), per token ``t`` and head, for a
head ``x`` of ``D`` values in dtype ``dt`` (bf16, fp16 or fp32), ``R = rotary_dim`` and
``half = R / 2``::

    norm (when the weight is given; HF Glm4MoeRMSNorm, op for op, so bit for bit on a CPU):
        h   = fp32(x)
        var = mean(h * h)                                  fp32, torch's reduction order
        y   = dt(weight) * dt(h * rsqrt(var + fp32(eps)))  two roundings to dt; the product is
                                                           one dt multiply (exact in fp32, rounded once)
    (no weight: y = x)
    rope, in fp32 from the dt values y, one rounding to dt at the end:
        c, s = cos_sin_cache[pos, :half], cos_sin_cache[pos, half:R]
        out[i]        = dt(y[i] * c[i] - y[i + half] * s[i])          i < half
        out[i + half] = dt(y[i + half] * c[i] + y[i] * s[i])
        out[R:]       = y[R:]                                          passed through
    each product and sum a separate IEEE fp32 operation (no fused multiply-add).

**Rounding choice.** HF casts cos and sin to the model dtype and rounds ``q * cos``,
``rotate_half(q) * sin`` and their sum to bf16 one by one; we keep the fp32 table and round
once (as vLLM's and SGLang's fused kernels do), which is more accurate. In fp32 the two are the
same operations: there the whole definition equals HF bit for bit (``q * cos + rotate_half(q) *
sin`` with ``-a * b == -(a * b)``), given the table :func:`cos_sin_cache` builds (HF's own cos
and sin, bit for bit). In bf16/fp16 the norm and the pass-through dims equal HF bit for bit and
the rotated dims differ from HF by its extra roundings (tests/attention/test_qk_norm_rope.py).

**Kernels** compute the rope bit for bit and the norm with their own reduction order and an
IEEE ``1 / sqrt``: ``var`` and ``rsqrt`` may differ from torch's in the last fp32 bit, which
can move ``y`` by one dt ulp; ``NORM_TOL`` bounds what that does to the outputs.

**Edge values**, as IEEE arithmetic on the formula gives them: with the norm, a NaN anywhere in
a head makes the whole head NaN; an inf (or a square overflowing fp32) makes ``var`` inf and
``rsqrt`` 0, so that element becomes NaN (``inf * 0``) and the head's finite elements +-0, and a
NaN spreads to its rotation partner. Without the norm NaN and inf go through the rotation
element by element (``inf * c - y * s`` is inf, ``inf * 0`` NaN). A position outside
``[0, max_pos)`` gives NaN in that token's rotated dims (the pass-through dims are still
normed): the op's check refuses such positions on CPU tensors; on the GPU, where checking would
cost a host sync, this is what every backend computes. ``T = 0`` gives empty outputs.

**KV-cache write** (``[num_pages, page_size, Hk, D]`` caches, ``slot = page * page_size +
offset``): token ``t`` goes to ``cache[slot // page_size, slot % page_size]``, unchanged when the
cache has the input's dtype, else (``float8_e4m3fn``) as ``e4m3(clamp(fp32(x) / scale[h],
-448, 448))`` with the fp32 per-head scale (IEEE division; NaN stays NaN, +-inf saturates to
+-448). A negative slot writes nothing; so does a slot past the cache (refused on CPU tensors,
skipped on the GPU). Two tokens with the same slot: one of them wins, unspecified which.
"""

from __future__ import annotations

import torch

from glm45_ops.reference.quant import E4M3_MAX, FP8_DTYPE

# How far a kernel's normed output may be from the reference's, per dtype, in units of the
# dtype's eps times the head's largest |output| (see "Kernels" above); bit-exact without the norm.
# bf16/fp16: y moves by at most one dt ulp (<= eps * |y|) when the kernel's fp32 rstd differs
# from torch's across a rounding boundary, as may its rotation partner; a rotated output mixes
# both (|c|, |s| <= 1, |pair| <= sqrt(2) * max |out|) and adds its own rounding: < 4. fp32: y is
# not re-rounded on a coarser grid, so the whole rstd difference shows: two summation orders of
# D = 128 squares differ by up to ~2 log2(D) = 14 ulps in the worst case (measured: 3), plus
# torch's rsqrt's ulp.
NORM_TOL = {torch.bfloat16: 4.0, torch.float16: 4.0, torch.float32: 16.0}


def cos_sin_cache(max_position: int, rotary_dim: int, theta: float, device=None) -> torch.Tensor:
    """fp32 ``[max_position, rotary_dim]`` = ``cat(cos(p * inv_freq), sin(p * inv_freq))`` with
    ``inv_freq = 1 / theta^(arange(0, R, 2) / R)``, computed with HF ``Glm4MoeRotaryEmbedding``'s
    operations in fp32 (its cos and sin, bit for bit on the same device). GLM-4.5: ``R = 64``,
    ``theta = 1e6``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=device) / rotary_dim))
    freqs = torch.arange(max_position, device=device).float()[:, None] * inv_freq
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``Glm4MoeRMSNorm`` over the last dim, op for op (``weight`` in ``x``'s dtype)."""
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(x.dtype)


def _cos_sin(positions: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, 1, half]`` cos and sin rows; NaN for positions outside ``[0, max_pos)``."""
    max_pos, r = cache.shape
    valid = (positions >= 0) & (positions < max_pos)
    rows = cache[positions.clamp(0, max_pos - 1).long()]
    rows = torch.where(valid[:, None], rows, torch.full_like(rows, float("nan")))
    return rows[:, None, : r // 2], rows[:, None, r // 2 :]


def _norm_rope(x, weight, cos, sin, eps, rotary_dim):
    y = x if weight is None else rms_norm_ref(x, weight, eps)
    half = rotary_dim // 2
    y1, y2 = y[..., :half].float(), y[..., half:rotary_dim].float()
    o1 = y1 * cos - y2 * sin
    o2 = y2 * cos + y1 * sin
    return torch.cat((o1.to(x.dtype), o2.to(x.dtype), y[..., rotary_dim:]), dim=-1)


def qk_norm_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    eps: float,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[T, Hq, D]``, ``k`` ``[T, Hk, D]`` -> new contiguous ``(q_out, k_out)`` (module docstring)."""
    cos, sin = _cos_sin(positions, cos_sin_cache)
    return (_norm_rope(q, q_norm_weight, cos, sin, eps, rotary_dim),
            _norm_rope(k, k_norm_weight, cos, sin, eps, rotary_dim))


def split_qkv(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, ...]:
    """Views ``q`` ``[T, Hq, D]``, ``k`` and ``v`` ``[T, Hk, D]`` into the fused projection
    ``qkv`` ``[T, (Hq + 2 Hk) * D]`` (columns q, then k, then v)."""
    t, width = qkv.shape
    d = width // (num_q_heads + 2 * num_kv_heads)
    q, k, v = qkv.split([num_q_heads * d, num_kv_heads * d, num_kv_heads * d], dim=1)
    return q.unflatten(1, (num_q_heads, d)), k.unflatten(1, (num_kv_heads, d)), v.unflatten(1, (num_kv_heads, d))


def qk_norm_rope_inplace_ref(qkv, q_norm_weight, k_norm_weight, positions, cos_sin_cache, num_q_heads, num_kv_heads,
                             eps, rotary_dim) -> None:
    """``qk_norm_rope`` written back into the q and k columns of ``qkv``; v untouched."""
    q, k, _ = split_qkv(qkv, num_q_heads, num_kv_heads)
    q_out, k_out = qk_norm_rope_ref(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps, rotary_dim)
    q.copy_(q_out)
    k.copy_(k_out)


def quantize_kv_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[..., Hk, D]`` float -> e4m3 ``e4m3(clamp(fp32(x) / scale[h], -448, 448))``, ``scale`` fp32 ``[Hk]``."""
    return (x.float() / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def kv_cache_write_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    """Write ``k``, ``v`` ``[T, Hk, D]`` into the paged caches at ``slot_mapping`` (module docstring)."""
    num_pages, page_size = k_cache.shape[:2]
    slots = slot_mapping.long()
    keep = (slots >= 0) & (slots < num_pages * page_size)
    slots = slots[keep]
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        x = x[keep]
        if cache.dtype == FP8_DTYPE:
            x = quantize_kv_ref(x, scale)
        cache[slots // page_size, slots % page_size] = x


def qk_norm_rope_kv_write_ref(q, k, v, q_norm_weight, k_norm_weight, positions, cos_sin_cache, k_cache, v_cache,
                              slot_mapping, eps, rotary_dim, k_scale, v_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """``qk_norm_rope``, then ``kv_cache_write`` of its ``k_out`` and ``v``; returns ``(q_out, k_out)``."""
    q_out, k_out = qk_norm_rope_ref(q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps, rotary_dim)
    kv_cache_write_ref(k_out, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q_out, k_out
