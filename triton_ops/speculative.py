"""Triton MTP verification kernels (definition: glm45_ops/reference/speculative.py).

One program per request, looping over the vocabulary in blocks. Both kernels are exact:

* greedy: the argmax is a max over an order-preserving int32 key of the fp32 value (``-0 == +0``,
  NaN above ``+inf``, as ``torch.argmax``), then the minimum index holding it, so ties go to the
  lowest id whatever the reduction tree;
* sampling: the CDF is summed over int64 fixed-point weights (exact and associative), so the
  blocked ``tl.cumsum`` here, the warp scans of the CUDA kernel and the reference's sequential
  ``cumsum`` give the same integers and the same token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_ops import CompileSpec, interpreting
from triton_ops._common import as_mask, order_key

_INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def _order_key(x):
    """x's order with NaN above +inf (torch.argmax's rule)."""
    return order_key(x, 0x7FFFFFFF)


@triton.jit
def _row_argmax(row_ptr, V, BLOCK_V: tl.constexpr):
    """Lowest index of the maximum of ``row_ptr[0:V]`` (any float dtype), as int32."""
    offs = tl.arange(0, BLOCK_V)
    best_key = tl.full([BLOCK_V], _INT32_MIN, tl.int32)
    best_idx = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        mask = idx < V
        x = tl.load(row_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        key = tl.where(mask, _order_key(x), _INT32_MIN)
        better = key > best_key  # strict: each lane keeps its first (lowest) index on ties
        best_key = tl.where(better, key, best_key)
        best_idx = tl.where(better, idx, best_idx)
    top = tl.max(best_key, axis=0)
    return tl.min(tl.where(best_key == top, best_idx, V), axis=0)


@triton.jit
def _write_result(out_row, o_ss, draft_row, d_ss, k, tok, S, BLOCK_S: tl.constexpr):
    """out[0:S+1] = accepted drafts [0, k), the emitted ``tok`` at k, then -1."""
    pos = tl.arange(0, BLOCK_S)
    drafts = tl.load(draft_row + pos * d_ss, mask=pos < k, other=0).to(tl.int32)
    out = tl.where(pos < k, drafts, tl.where(pos == k, tok, -1))
    tl.store(out_row + pos * o_ss, out, mask=pos <= S)


@triton.jit
def _verify_greedy_kernel(
    draft_ptr, logits_ptr, out_ptr, nacc_ptr,
    S, V,
    d_sb, d_ss, l_sb, l_ss, o_sb, o_ss,
    BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    draft_row = draft_ptr + b * d_sb
    logits_row = logits_ptr + b * l_sb
    # rows past the first mismatch are never read
    k = tl.zeros([], tl.int32)
    tok = _row_argmax(logits_row, V, BLOCK_V)
    d = tl.load(draft_row, mask=S > 0, other=-1)
    while (k < S) & (d == tok):
        k += 1
        tok = _row_argmax(logits_row + k.to(tl.int64) * l_ss, V, BLOCK_V)
        d = tl.load(draft_row + k * d_ss, mask=k < S, other=-1)
    _write_result(out_ptr + b * o_sb, o_ss, draft_row, d_ss, k, tok, S, BLOCK_S)
    tl.store(nacc_ptr + b, k)


@triton.jit
def _fixed_point(d):
    """fp32 probabilities -> int64 multiples of 2**-40 (reference: ``to_fixed_point``)."""
    d = tl.where(d > 0.0, tl.minimum(d, 1.0), 0.0)
    return (d * 1099511627776.0).to(tl.int64)  # 2**40: exact scaling, then truncation


@triton.jit
def _accepts(draft_row, d_ss, dp_row, dp_ss, tp_row, t_ss, u_row, u_ss, i, S, V, HAS_DRAFT: tl.constexpr):
    """Whether draft ``i`` is accepted: in the chain, a valid id, and ``u * p(x) < q(x)`` in fp32."""
    in_chain = i < S
    x = tl.load(draft_row + i * d_ss, mask=in_chain, other=-1).to(tl.int64)
    ok = in_chain & (x >= 0) & (x < V)
    x = tl.where(ok, x, 0)
    q = tl.load(tp_row + i.to(tl.int64) * t_ss + x, mask=ok, other=0.0).to(tl.float32)
    if HAS_DRAFT:
        p = tl.load(dp_row + i.to(tl.int64) * dp_ss + x, mask=ok, other=0.0).to(tl.float32)
    else:
        p = 1.0
    u = tl.load(u_row + i * u_ss, mask=in_chain, other=1.0)
    return ok & (u * p < q)


@triton.jit
def _draw_weights(q_row, p_row, idx, mask, has_p, x_k, use_q, HAS_DRAFT: tl.constexpr):
    """Fixed-point weights at ``idx`` of the residual (relu(q - p), or q without the one-hot
    draft's token ``x_k``), or of q itself when ``use_q``."""
    q = tl.load(q_row + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_DRAFT:
        p = tl.load(p_row + idx, mask=as_mask(mask & has_p & (use_q == 0)), other=0.0).to(tl.float32)
        r = q - p
    else:
        r = tl.where((idx == x_k) & (use_q == 0), 0.0, q)
    return _fixed_point(r)


@triton.jit
def _row_mass(q_row, p_row, V, has_p, x_k, use_q, HAS_DRAFT: tl.constexpr, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_V], tl.int64)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        acc += _draw_weights(q_row, p_row, idx, idx < V, has_p, x_k, use_q, HAS_DRAFT)
    return tl.sum(acc, axis=0)


@triton.jit
def _verify_sampling_kernel(
    dp_ptr, draft_ptr, tp_ptr, u_ptr, out_ptr, nacc_ptr,
    S, V,
    dp_sb, dp_ss, d_sb, d_ss, t_sb, t_ss, u_sb, u_ss, o_sb, o_ss,
    HAS_DRAFT: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    draft_row = draft_ptr + b * d_sb
    dp_row = dp_ptr + b * dp_sb
    tp_row = tp_ptr + b * t_sb
    u_row = u_ptr + b * u_sb

    # 1. the acceptance chain: k = first rejected position, S if none
    k = tl.zeros([], tl.int32)
    accepted = _accepts(draft_row, d_ss, dp_row, dp_ss, tp_row, t_ss, u_row, u_ss, k, S, V, HAS_DRAFT)
    while accepted:
        k += 1
        accepted = _accepts(draft_row, d_ss, dp_row, dp_ss, tp_row, t_ss, u_row, u_ss, k, S, V, HAS_DRAFT)

    # 2. the total fixed-point mass of the residual at k; of q_k when the residual has none
    has_p = k < S
    x_k = tl.load(draft_row + k * d_ss, mask=has_p, other=-1).to(tl.int64)
    q_row = tp_row + k.to(tl.int64) * t_ss
    p_row = dp_row + k.to(tl.int64) * dp_ss
    use_q = tl.zeros([], tl.int32)
    total = _row_mass(q_row, p_row, V, has_p, x_k, use_q, HAS_DRAFT, BLOCK_V)
    if total == 0:
        use_q += 1
        total = _row_mass(q_row, p_row, V, has_p, x_k, use_q, HAS_DRAFT, BLOCK_V)
    thr = (tl.load(u_row + S * u_ss).to(tl.float64) * total.to(tl.float64)).to(tl.int64)

    # 3. inverse CDF: the smallest j with C_j > thr, stopping at the block that holds it
    offs = tl.arange(0, BLOCK_V)
    tok = V
    carry = tl.zeros([], tl.int64)
    start = 0
    while (start < V) & (tok == V):
        idx = start + offs
        mask = idx < V
        w = _draw_weights(q_row, p_row, idx, mask, has_p, x_k, use_q, HAS_DRAFT)
        cdf = tl.cumsum(w, axis=0) + carry
        tok = tl.min(tl.where(mask & (cdf > thr), idx, V), axis=0)
        carry += tl.sum(w, axis=0)
        start += BLOCK_V
    tok = tl.minimum(tok, V - 1)
    _write_result(out_ptr + b * o_sb, o_ss, draft_row, d_ss, k, tok, S, BLOCK_S)
    tl.store(nacc_ptr + b, k)


def _block_v(v: int, elem_bytes: int) -> int:
    # GPU: 16 KB of one row per loop step (256 threads x 4 x 16-byte loads with 8 warps);
    # interpreter: the whole row in one step (its cost is per op, not per element)
    if interpreting():
        return triton.next_power_of_2(v)
    return min(16384 // elem_bytes, triton.next_power_of_2(v))


def verify_greedy(draft_ids: torch.Tensor, logits: torch.Tensor, out_ids: torch.Tensor, num_accepted: torch.Tensor) -> None:
    """Fill ``out_ids`` ``[B, S+1]`` and ``num_accepted`` ``[B]`` from ``draft_ids`` ``[B, S]``
    and ``logits`` ``[B, S+1, V]`` (unit last stride; other strides free)."""
    b, s = draft_ids.shape
    v = logits.shape[-1]
    if b == 0:
        return
    _verify_greedy_kernel[(b,)](
        draft_ids, logits, out_ids, num_accepted, s, v,
        draft_ids.stride(0), draft_ids.stride(1), logits.stride(0), logits.stride(1),
        out_ids.stride(0), out_ids.stride(1),
        BLOCK_V=_block_v(v, logits.element_size()), BLOCK_S=triton.next_power_of_2(s + 1), num_warps=8,
    )


def verify_sampling(
    draft_ids: torch.Tensor,
    target_probs: torch.Tensor,
    uniform: torch.Tensor,
    draft_probs: torch.Tensor | None,
    out_ids: torch.Tensor,
    num_accepted: torch.Tensor,
) -> None:
    """Fill ``out_ids`` ``[B, S+1]`` and ``num_accepted`` ``[B]`` (chain rejection sampling)."""
    b, s = draft_ids.shape
    v = target_probs.shape[-1]
    if b == 0:
        return
    has_draft = draft_probs is not None
    dp = draft_probs if has_draft else target_probs  # never read when HAS_DRAFT is False
    _verify_sampling_kernel[(b,)](
        dp, draft_ids, target_probs, uniform, out_ids, num_accepted, s, v,
        dp.stride(0) if has_draft else 0, dp.stride(1) if has_draft else 0,
        draft_ids.stride(0), draft_ids.stride(1), target_probs.stride(0), target_probs.stride(1),
        uniform.stride(0), uniform.stride(1), out_ids.stride(0), out_ids.stride(1),
        HAS_DRAFT=has_draft, BLOCK_V=_block_v(v, target_probs.element_size()),
        BLOCK_S=triton.next_power_of_2(s + 1), num_warps=8,
    )


# GPU configurations at GLM-4.5's vocabulary (V = 151552: rows 16-byte aligned, strides % 16 == 0)
_TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_V = 151552


def _greedy_spec(dtype: torch.dtype) -> CompileSpec:
    return CompileSpec(
        label=f"{_TL[dtype]} logits",
        kernel=_verify_greedy_kernel,
        signature={"draft_ptr": "*i64", "logits_ptr": f"*{_TL[dtype]}", "out_ptr": "*i32", "nacc_ptr": "*i32",
                   "S": "i32", "V": "i32", "d_sb": "i32", "d_ss": "constexpr", "l_sb": "i32", "l_ss": "i32",
                   "o_sb": "i32", "o_ss": "constexpr", "BLOCK_V": "constexpr", "BLOCK_S": "constexpr"},
        constexprs={"d_ss": 1, "o_ss": 1, "BLOCK_V": _block_v(_V, dtype.itemsize), "BLOCK_S": 4},
        options={"num_warps": 8},
        aligned=("V", "l_sb", "l_ss"),
    )


def _sampling_spec(dtype: torch.dtype, has_draft: bool) -> CompileSpec:
    return CompileSpec(
        label=f"{_TL[dtype]} probs, {'draft probs' if has_draft else 'one-hot draft'}",
        kernel=_verify_sampling_kernel,
        signature={"dp_ptr": f"*{_TL[dtype]}", "draft_ptr": "*i64", "tp_ptr": f"*{_TL[dtype]}", "u_ptr": "*fp32",
                   "out_ptr": "*i32", "nacc_ptr": "*i32", "S": "i32", "V": "i32",
                   "dp_sb": "i32", "dp_ss": "i32", "d_sb": "i32", "d_ss": "constexpr", "t_sb": "i32", "t_ss": "i32",
                   "u_sb": "i32", "u_ss": "constexpr", "o_sb": "i32", "o_ss": "constexpr",
                   "HAS_DRAFT": "constexpr", "BLOCK_V": "constexpr", "BLOCK_S": "constexpr"},
        constexprs={"d_ss": 1, "u_ss": 1, "o_ss": 1, "HAS_DRAFT": has_draft,
                    "BLOCK_V": _block_v(_V, dtype.itemsize), "BLOCK_S": 4},
        options={"num_warps": 8},
        aligned=("V", "dp_sb", "dp_ss", "t_sb", "t_ss"),
    )


COMPILE_SPECS = [
    *(_greedy_spec(dt) for dt in _TL),
    *(_sampling_spec(dt, hd) for dt in (torch.float32, torch.bfloat16) for hd in (True, False)),
]
