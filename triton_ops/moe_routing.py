"""Triton MoE routing kernel (definition: glm45_ops/reference/moe_routing.py).

One program per block of ``BLOCK_T`` tokens holds their ``[BLOCK_T, BLOCK_E]`` scores in
registers (``BLOCK_E`` = E padded to a power of two, so any E <= 512). Every choice is an argmax
of an int32 order key (NaN below ``-inf``, ``-0 == +0``) followed by the lowest index holding it,
so ties go to the lower id whatever the reduction tree: ``topk_group`` rounds over the group
scores, then ``top_k`` rounds over the experts, each round masking its winner. The sigmoid is
computed in float64 and rounded, linear below 2^-12 (the reference's definition); the renormalising division is
IEEE (``div_rn``: Triton's ``/`` on fp32 is approximate on the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_ops import CompileSpec, interpreting
from triton_ops._common import order_key

_NAN_KEY = tl.constexpr(-2147483647)
_EXCLUDED = tl.constexpr(-2147483648)


@triton.jit
def _order_key(x):
    """The reference's ``order_key``: x's order, NaN below -inf."""
    return order_key(x, _NAN_KEY)


@triton.jit
def _key_value(key):
    """The fp32 value of a key (any NaN for the NaN key): the inverse of ``_order_key``."""
    return tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)


@triton.jit
def _argmax_lowest(key, idx, N: tl.constexpr):
    """Per row of ``key`` ``[BT, BN]``: (max key, lowest ``idx`` holding it)."""
    best = tl.max(key, axis=1)
    return best, tl.min(tl.where(key == best[:, None], idx, N), axis=1)


@triton.jit
def _moe_route_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr,
    T, E, l_st, l_se, b_se, top_k, n_group, topk_group, factor,
    HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    valid = row_ok[:, None] & (e < E)[None, :]
    x = tl.load(logits_ptr + rows[:, None] * l_st + e[None, :] * l_se, mask=valid, other=0.0)
    x = x.to(tl.float64)
    s = tl.where(tl.abs(x) < 0.000244140625, 0.5 + 0.25 * x, 1.0 / (1.0 + tl.exp(-x))).to(tl.float32)  # |x| < 2^-12
    if HAS_BIAS:
        b = s + tl.load(bias_ptr + e * b_se, mask=e < E, other=0.0)[None, :]
    else:
        b = s
    key = tl.where(valid, _order_key(b), _EXCLUDED)

    if n_group > 1:
        gsize = E // n_group
        grp = e // gsize
        g = tl.arange(0, BLOCK_G)
        gscore = tl.full([BLOCK_T, BLOCK_G], _EXCLUDED, tl.int32)
        for gi in range(n_group):  # the group's two best scores (the second may equal the first)
            in_g = (grp == gi)[None, :]
            k1, i1 = _argmax_lowest(tl.where(in_g, key, _EXCLUDED), e[None, :], BLOCK_E)
            k2 = tl.max(tl.where(in_g & (e[None, :] != i1[:, None]), key, _EXCLUDED), axis=1)
            sc = _order_key(_key_value(k1) + _key_value(k2))
            gscore = tl.where(g[None, :] == gi, sc[:, None], gscore)
        kept = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
        for _ in range(topk_group):
            _, gbest = _argmax_lowest(gscore, g[None, :], BLOCK_G)
            gscore = tl.where(g[None, :] == gbest[:, None], _EXCLUDED, gscore)
            kept = tl.where(grp[None, :] == gbest[:, None], 1, kept)
        key = tl.where(kept != 0, key, _EXCLUDED)

    kk = tl.arange(0, BLOCK_K)
    w = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    ids = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    total = tl.zeros([BLOCK_T], tl.float32)
    for j in range(top_k):
        _, best = _argmax_lowest(key, e[None, :], BLOCK_E)
        hit = e[None, :] == best[:, None]
        wj = tl.sum(tl.where(hit, s, 0.0), axis=1)  # exactly s[best] (NaN if it is NaN)
        key = tl.where(hit, _EXCLUDED, key)
        total += wj  # left to right, as the reference (0 + w_0 is w_0: scores are never -0)
        w = tl.where(kk[None, :] == j, wj[:, None], w)
        ids = tl.where(kk[None, :] == j, best[:, None], ids)
    if RENORMALIZE:
        w = tl.math.div_rn(w, (total + 1e-20)[:, None])
    w = w * factor
    out_mask = row_ok[:, None] & (kk < top_k)[None, :]
    out_off = rows[:, None] * top_k + kk[None, :]
    tl.store(w_ptr + out_off, w, mask=out_mask)
    tl.store(ids_ptr + out_off, ids, mask=out_mask)


def _num_warps(block_e: int) -> int:
    # 4 tokens x BLOCK_E scores, 4 per thread: E = 160 takes 8 warps at 48 registers, no
    # spills (sm_90a compile report; 4 warps spilled)
    return max(4, min(16, block_e // 32))


def _block_t(t: int) -> int:
    # the interpreter's cost is per program: few, large blocks there; on the GPU 4 tokens per
    # program (a warp's worth of E = 160 scores each) keep many SMs busy at small T
    if interpreting():
        return min(64, triton.next_power_of_2(max(t, 1)))
    return 4


def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    factor: float,
    weights: torch.Tensor,
    ids: torch.Tensor,
) -> None:
    """Fill ``weights`` fp32 and ``ids`` int32 ``[T, top_k]`` (contiguous) from ``logits`` ``[T, E]``."""
    t, e = logits.shape
    if t == 0:
        return
    block_t = _block_t(t)
    has_bias = bias is not None
    _moe_route_kernel[(triton.cdiv(t, block_t),)](
        logits, bias if has_bias else logits, weights, ids,
        t, e, logits.stride(0), logits.stride(1), bias.stride(0) if has_bias else 0,
        top_k, n_group, topk_group, factor,
        HAS_BIAS=has_bias, RENORMALIZE=renormalize,
        BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_G=triton.next_power_of_2(n_group), num_warps=_num_warps(triton.next_power_of_2(e)),
    )


def _spec(label: str, dtype: str, e: int, top_k: int, n_group: int, has_bias: bool) -> CompileSpec:
    return CompileSpec(
        label=label,
        kernel=_moe_route_kernel,
        signature={"logits_ptr": f"*{dtype}", "bias_ptr": "*fp32", "w_ptr": "*fp32", "ids_ptr": "*i32",
                   "T": "i32", "E": "i32", "l_st": "i32", "l_se": "constexpr", "b_se": "constexpr",
                   "top_k": "i32", "n_group": "i32", "topk_group": "i32", "factor": "fp32",
                   "HAS_BIAS": "constexpr", "RENORMALIZE": "constexpr",
                   "BLOCK_T": "constexpr", "BLOCK_E": "constexpr", "BLOCK_K": "constexpr", "BLOCK_G": "constexpr"},
        constexprs={"l_se": 1, "b_se": 1, "HAS_BIAS": has_bias, "RENORMALIZE": True, "BLOCK_T": 4,
                    "BLOCK_E": triton.next_power_of_2(e), "BLOCK_K": triton.next_power_of_2(top_k),
                    "BLOCK_G": triton.next_power_of_2(n_group)},
        options={"num_warps": _num_warps(triton.next_power_of_2(e))},
        aligned=("E", "l_st"),
    )


COMPILE_SPECS = [
    _spec("GLM-4.5 E=160 k=8 bf16", "bf16", 160, 8, 1, True),
    _spec("GLM-4.5 E=160 k=8 fp32", "fp32", 160, 8, 1, True),
    _spec("DeepSeek-V3 E=256 k=8 8 groups bf16", "bf16", 256, 8, 8, True),
    _spec("E=512 k=16 fp32", "fp32", 512, 16, 1, False),
]
