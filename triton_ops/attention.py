"""Triton GQA flash attention over packed (varlen) or paged KV, split-KV, and the merge of
partial attention states (definitions: glm45_ops/reference/attention.py).

    s_ij = sm_scale q_i . k_j,   out_i = sum_j softmax_j(s_ij) v_j,   lse_i = log sum_j exp(s_ij)

FlashAttention-2's online softmax: one program owns an M tile of query rows and streams the keys
in ``BLOCK_N`` tiles, keeping a running max ``m``, weight sum ``l`` and fp32 accumulator; scores
are taken in base 2 (``log2(e)`` folded into the scale, so ``exp2``). GQA: the M tile packs
``GROUP`` query heads of one KV head times ``BLOCK_M // GROUP`` query positions (row ``r`` is
position ``r // GROUP``, head ``r % GROUP``), so each K/V tile is read once for all of them. A
group that does not divide ``BLOCK_M`` (GLM-4.5's 12) leaves ``BLOCK_M mod GROUP`` rows masked:
12 of 16 rows used at one query (decode), 60 of 64 at 4-5 (MTP verify), 120 of 128 in prefill.
Groups above 128 are packed in pieces (``GROUP`` a divisor of ``Hq / Hk``).

Causal (bottom-right: query ``i`` of a sequence with ``Tq`` queries and ``Tk`` keys sees keys
``<= i + Tk - Tq``): key tiles past the tile's last row's diagonal are skipped, and only the
tiles the diagonal crosses pay for a mask; the key tiles before it run unmasked. Query tiles
run longest first.

Paged KV: key ``j`` lives in slot ``j % PAGE_SIZE`` of page ``block_table[b, j // PAGE_SIZE]``;
every K/V row is addressed through the table (page ids clamped into the cache), so a tile may
span pages. e4m3 caches: ``k_scale`` is folded into the score scale and ``v_scale`` applied to
the accumulator, so the tiles go to the tensor cores as exact 16-bit values.

Split-KV (long contexts, few query tiles): program ``(query tile, split)`` takes the keys
``[split * chunk, (split + 1) * chunk)`` and writes its normalised partial output (fp32) and
lse; ``_merge_splits_kernel`` combines them (the ``merge_attn_states`` rule, ``_merge_step``).

Non-finite rules follow the reference: rows that see no key (or only ``-inf`` scores) get out 0
and lse ``-inf`` (the max is replaced by 0 before ``exp2`` so no ``inf - inf`` appears), and the
final ``l == 0`` test (not ``l > 0``) lets a NaN weight sum through as NaN.

Interpreter (CPU): bf16 ``tl.dot`` is wrong there (KNOWLEDGE.md §2), so ``INTERPRET`` upcasts
the operands (p included) to fp32 and rounds the output on the fp32 grid (``to_out_dtype``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from triton_ops import CompileSpec, interpreting
from triton_ops._common import to_out_dtype

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # the kernels' copies (a jit function reads constexpr globals only)
_LN2 = tl.constexpr(0.6931471805599453)
MAX_PACK = 128  # query heads of one KV head packed into one M tile at most (GQA groups above: in pieces)
MAX_SPLITS = 64
MIN_SPLIT_KEYS = 512  # a split below this many keys costs more in partial writes and merging than it saves
NO_SPLIT_CHUNK = 1 << 30  # a "chunk" covering any context: one split


@triton.jit
def _kv_rows(cols, valid, k_start, bt_row, num_pages, stride_kt, stride_ks, stride_vt, stride_vs,
             PAGE_SIZE: tl.constexpr):
    """int64 offsets of keys ``cols`` (a ``[BLOCK_N]`` range) in k and v: packed rows
    (``PAGE_SIZE == 0``) or slots of the pages the block table names."""
    if PAGE_SIZE == 0:
        t = (k_start + cols).to(tl.int64)
        return t * stride_kt, t * stride_vt
    else:
        page = tl.load(bt_row + cols // PAGE_SIZE, mask=valid, other=0)
        page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
        slot = (cols % PAGE_SIZE).to(tl.int64)
        return page * stride_kt + slot * stride_ks, page * stride_vt + slot * stride_vs


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, bt_row, start, end, k_start, seq_k, row_limit, qk_scale,
            num_pages, stride_kt, stride_ks, stride_vt, stride_vs,
            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr,
            CAUSAL: tl.constexpr, NUM_STAGES: tl.constexpr, INTERPRET: tl.constexpr):
    """Online softmax over the key tiles in ``[start, end)`` (``start`` a multiple of BLOCK_N).
    ``MASKED``: tiles that may hold keys past ``seq_k`` or past a row's diagonal (``row_limit``)."""
    d = tl.arange(0, HEAD_DIM)
    for n0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        cols = n0 + tl.arange(0, BLOCK_N)
        in_k = cols < seq_k
        k_rows, v_rows = _kv_rows(cols, in_k, k_start, bt_row, num_pages, stride_kt, stride_ks, stride_vt,
                                  stride_vs, PAGE_SIZE)
        if MASKED:
            k = tl.load(k_base + k_rows[:, None] + d[None, :], mask=in_k[:, None], other=0.0)
            v = tl.load(v_base + v_rows[:, None] + d[None, :], mask=in_k[:, None], other=0.0)
        else:
            k = tl.load(k_base + k_rows[:, None] + d[None, :])
            v = tl.load(v_base + v_rows[:, None] + d[None, :])
        if INTERPRET:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        else:
            k = k.to(q.dtype)  # e4m3 -> bf16/fp16 is exact; a no-op otherwise
            v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            seen = in_k[None, :]
            if CAUSAL:
                seen = seen & (cols[None, :] <= row_limit[:, None])
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, kv_len_ptr, bt_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, total_q, total_k, num_pages, num_packs, q_tiles, chunk,
    stride_qt, stride_qh, stride_kt, stride_ks, stride_kh, stride_vt, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_os, stride_lh, stride_ls, stride_bt,
    GROUP: tl.constexpr, KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, FP8_KV: tl.constexpr,
    NUM_STAGES: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Program ``((b * num_packs + pack) * q_tiles + tile, split)``: ``GROUP`` query heads (of the
    ``KV_GROUP`` sharing one KV head) times ``BLOCK_M // GROUP`` positions of sequence ``b`` (one
    grid dimension for all three: CUDA caps the others at 65535). ``kv_len_ptr``:
    ``cu_seqlens_k`` (packed, ``PAGE_SIZE == 0``) or ``seq_lens`` (paged)."""
    Q_TILE: tl.constexpr = BLOCK_M // GROUP
    tile = tl.program_id(0) % q_tiles
    b = tl.program_id(0) // q_tiles // num_packs
    hq0 = (tl.program_id(0) // q_tiles % num_packs) * GROUP
    kvh = hq0 // KV_GROUP
    split = tl.program_id(1)
    # sequence bounds, clamped into the tensors (bad device values cannot address outside them)
    q_start = tl.minimum(tl.maximum(tl.load(cu_q_ptr + b), 0), total_q)
    seq_q = tl.minimum(tl.maximum(tl.load(cu_q_ptr + b + 1), q_start), total_q) - q_start
    if PAGE_SIZE == 0:
        k_start = tl.minimum(tl.maximum(tl.load(kv_len_ptr + b), 0), total_k)
        seq_k = tl.minimum(tl.maximum(tl.load(kv_len_ptr + b + 1), k_start), total_k) - k_start
    else:
        k_start = 0
        seq_k = tl.minimum(tl.maximum(tl.load(kv_len_ptr + b), 0), total_k)
    pos0 = (q_tiles - 1 - tile) * Q_TILE  # a sequence's longest causal tiles first
    if pos0 < seq_q:
        r = tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        pos = pos0 + r // GROUP
        hq = hq0 + r % GROUP
        row_ok = (r < Q_TILE * GROUP) & (pos < seq_q)
        q_rows = (q_start + pos).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + hq[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        if INTERPRET:
            q = q.to(tl.float32)
        if FP8_KV:
            qk_scale = qk_scale * tl.load(k_scale_ptr + kvh)
        offset = seq_k - seq_q  # bottom-right alignment
        row_limit = pos + offset  # the last key each row sees
        last_pos = tl.minimum(pos0 + Q_TILE, seq_q) - 1
        if CAUSAL:
            hi = tl.maximum(tl.minimum(seq_k, last_pos + offset + 1), 0)
            full = tl.minimum(tl.maximum(pos0 + offset + 1, 0), hi)
        else:
            hi = seq_k
            full = hi
        full = (full // BLOCK_N) * BLOCK_N  # key tiles below: every row sees every key
        lo_s = split * chunk
        hi_s = tl.minimum(hi, lo_s + chunk)
        k_base = k_ptr + kvh.to(tl.int64) * stride_kh
        v_base = v_ptr + kvh.to(tl.int64) * stride_vh
        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, bt_row, lo_s, tl.minimum(full, hi_s), k_start,
                                seq_k, row_limit, qk_scale, num_pages, stride_kt, stride_ks, stride_vt, stride_vs,
                                BLOCK_N, HEAD_DIM, PAGE_SIZE, False, CAUSAL, NUM_STAGES, INTERPRET)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, bt_row, tl.maximum(full, lo_s), hi_s, k_start,
                                seq_k, row_limit, qk_scale, num_pages, stride_kt, stride_ks, stride_vt, stride_vs,
                                BLOCK_N, HEAD_DIM, PAGE_SIZE, True, CAUSAL, NUM_STAGES, INTERPRET)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        if FP8_KV:
            out = out * tl.load(v_scale_ptr + kvh)
        out = tl.where(empty[:, None], 0.0, out)
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
        o_ptrs = (o_ptr + split.to(tl.int64) * stride_os + q_rows[:, None] * stride_ot + hq[:, None] * stride_oh
                  + d[None, :])
        tl.store(o_ptrs, to_out_dtype(out, o_ptr.dtype.element_ty, INTERPRET), mask=row_ok[:, None])
        tl.store(lse_ptr + split.to(tl.int64) * stride_ls + hq.to(tl.int64) * stride_lh + q_rows, lse, mask=row_ok)


@triton.jit
def _merge_step(m, l, acc, lse, o):
    """Fold one state (natural-log ``lse`` ``[BLOCK_H]``, ``o`` ``[BLOCK_H, BLOCK_D]``) into the running
    base-2 max ``m``, weight sum ``l`` and weighted sum ``acc``; an empty state (lse -inf) adds
    nothing, whatever its ``o`` holds."""
    lse2 = lse * _LOG2E
    m_new = tl.maximum(m, lse2)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m - m_use)
    w = tl.math.exp2(lse2 - m_use)
    acc = acc * alpha[:, None] + tl.where((lse2 == float("-inf"))[:, None], 0.0, w[:, None] * o)
    return m_new, l * alpha + w, acc


@triton.jit
def _merge_finish(m, l, acc, o_ptrs, lse_ptrs, mask_h, mask_d, INTERPRET: tl.constexpr):
    empty = l == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l)[:, None])
    tl.store(o_ptrs, to_out_dtype(out, o_ptrs.dtype.element_ty, INTERPRET), mask=mask_h[:, None] & mask_d[None, :])
    lse = (m + tl.math.log2(tl.where(empty, 1.0, l))) * _LN2
    tl.store(lse_ptrs, tl.where(empty, float("-inf"), lse), mask=mask_h)


@triton.jit
def _merge_splits_kernel(po_ptr, plse_ptr, o_ptr, lse_ptr, num_heads, head_dim, num_splits,
                         stride_ps, stride_pt, stride_ph, stride_ls, stride_lh, stride_ot, stride_oh,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """Program ``(t, head block)``: combine the ``num_splits`` fp32 partials of token ``t``."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask_h, mask_d = h < num_heads, d < head_dim
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    po = po_ptr + t * stride_pt + h[:, None] * stride_ph + d[None, :]
    pl = plse_ptr + h * stride_lh + t
    for _ in range(num_splits):
        lse = tl.load(pl, mask=mask_h, other=float("-inf"))
        o = tl.load(po, mask=mask_h[:, None] & mask_d[None, :], other=0.0)
        m, l, acc = _merge_step(m, l, acc, lse, o)
        po += stride_ps  # pointer steps: 64-bit, where split * stride could pass 2**31
        pl += stride_ls
    _merge_finish(m, l, acc, o_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :],
                  lse_ptr + h * stride_lh + t, mask_h, mask_d, INTERPRET)


@triton.jit
def _merge_attn_states_kernel(oa_ptr, la_ptr, ob_ptr, lb_ptr, o_ptr, lse_ptr, num_heads, head_dim,
                              stride_at, stride_ah, stride_bt, stride_bh, stride_lah, stride_lat, stride_lbh,
                              stride_lbt, stride_ot, stride_oh, stride_lh,
                              BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """Program ``(t, head block)``: merge state a and state b of token ``t``."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask_h, mask_d = h < num_heads, d < head_dim
    mask = mask_h[:, None] & mask_d[None, :]
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    lse_a = tl.load(la_ptr + h * stride_lah + t * stride_lat, mask=mask_h, other=float("-inf"))
    o_a = tl.load(oa_ptr + t * stride_at + h[:, None] * stride_ah + d[None, :], mask=mask, other=0.0)
    m, l, acc = _merge_step(m, l, acc, lse_a, o_a.to(tl.float32))
    lse_b = tl.load(lb_ptr + h * stride_lbh + t * stride_lbt, mask=mask_h, other=float("-inf"))
    o_b = tl.load(ob_ptr + t * stride_bt + h[:, None] * stride_bh + d[None, :], mask=mask, other=0.0)
    m, l, acc = _merge_step(m, l, acc, lse_b, o_b.to(tl.float32))
    _merge_finish(m, l, acc, o_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :],
                  lse_ptr + h * stride_lh + t, mask_h, mask_d, INTERPRET)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

class AttnConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def pack_size(group: int) -> int:
    """Query heads per M tile: the whole GQA group up to ``MAX_PACK``, else its largest divisor
    that fits (each tile still reads one KV head)."""
    return max(p for p in range(1, min(group, MAX_PACK) + 1) if group % p == 0)


def pick_config(pack: int, head_dim: int, max_seqlen_q: int) -> AttnConfig:
    """The tile for ``pack`` packed heads and up to ``max_seqlen_q`` queries per sequence.

    A FIRST GUESS pending H200 tuning (sm_90a, head dim 128, no spills in any). Prefill: 128 x 64
    tiles on two warpgroups' wgmma, 3 stages (186 registers, 128 KB shared; 128 x 128 fits in 240
    registers with 2 stages, a tuning candidate; one warpgroup spills). Decode and MTP verify:
    the smallest M tile holding every packed row of one sequence (16 = 12 heads x 1 query on
    mma.sync, as wgmma needs 64 rows; 64 = 12 x 4-5 queries on one warpgroup's wgmma); decode is
    bound by the K/V read, not the MMA. Interpreter: few, large programs, and 32-key tiles so
    the short test sequences still cross unmasked and masked tiles."""
    rows = max(16, triton.next_power_of_2(pack * max(max_seqlen_q, 1)))
    if interpreting():
        return AttnConfig(max(triton.next_power_of_2(pack), min(rows, 64)), 32, 4, 1)
    if rows >= 128 or pack > 64:
        return AttnConfig(max(128, triton.next_power_of_2(pack)), 64, 8, 3)
    return AttnConfig(rows, 64 if head_dim == 128 else 128, 4, 3)


def num_kv_splits(programs: int, max_keys: int, block_n: int, device: torch.device, requested: int) -> tuple[int, int]:
    """``(splits, chunk)``: the keys ``[0, max_keys)`` cut into ``splits`` chunks of ``chunk``
    keys (a multiple of ``block_n``). ``requested`` 0 picks: split until the GPU holds about two
    waves of programs, keeping chunks >= ``MIN_SPLIT_KEYS`` (one split on the CPU, where each
    program costs interpreter time); else that many splits at most (1: no split), capped at
    ``MAX_SPLITS``."""
    if requested == 0:
        if device.type != "cuda":
            return 1, NO_SPLIT_CHUNK
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        requested = min(max(1, 2 * sms // max(programs, 1)), max(1, max_keys // MIN_SPLIT_KEYS))
    requested = min(requested, MAX_SPLITS)
    if requested <= 1 or max_keys <= block_n:
        return 1, NO_SPLIT_CHUNK
    chunk = triton.cdiv(triton.cdiv(max_keys, requested), block_n) * block_n
    return triton.cdiv(max_keys, chunk), chunk


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor,
              max_seqlen_q: int, max_keys: int, sm_scale: float, causal: bool, out: torch.Tensor, lse: torch.Tensor, *,
              block_table: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
              v_scale: torch.Tensor | None = None, num_splits: int = 0) -> None:
    """Fill ``out`` ``[Tq, Hq, D]`` and ``lse`` fp32 ``[Hq, Tq]`` (contiguous).

    Packed KV (``block_table`` None): ``k``/``v`` ``[Tk, Hk, D]`` (unit last stride), ``kv_lens``
    = ``cu_seqlens_k`` int32 ``[B + 1]``. Paged: ``k``/``v`` the caches ``[num_pages, page_size, Hk,
    D]``, ``kv_lens`` = ``seq_lens`` int32 ``[B]``, ``block_table`` int32 ``[B, max_pages]`` (unit
    last stride), e4m3 caches with fp32 ``k_scale``/``v_scale`` ``[Hk]``. ``max_seqlen_q`` and
    ``max_keys`` bound the per-sequence query and key counts (grid sizes, no host sync);
    ``num_splits`` as in :func:`num_kv_splits`."""
    total_q, hq, head_dim = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    paged = block_table is not None
    hk = k.shape[-2]
    group = hq // hk
    pack = pack_size(group)
    cfg = pick_config(pack, head_dim, max_seqlen_q)
    q_tiles = triton.cdiv(max_seqlen_q, cfg.block_m // pack)
    num_packs = hq // pack
    splits, chunk = num_kv_splits(q_tiles * batch * num_packs, max_keys, cfg.block_n, q.device, num_splits)
    if paged:
        num_pages, page_size = k.shape[0], k.shape[1]
        total_k = block_table.shape[1] * page_size if num_pages else 0
        strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
        table, bt_stride = block_table, block_table.stride(0)
    else:
        num_pages, page_size, total_k = 0, 0, k.shape[0]
        strides = (k.stride(0), 0, k.stride(1), v.stride(0), 0, v.stride(1))
        table, bt_stride = kv_lens, 0  # never read
    fp8 = k_scale is not None
    if splits == 1:
        o_dst, lse_dst, stride_os, stride_ls = out, lse, 0, 0
    else:
        o_dst = torch.empty((splits, total_q, hq, head_dim), dtype=torch.float32, device=q.device)
        lse_dst = torch.empty((splits, hq, total_q), dtype=torch.float32, device=q.device)
        stride_os, stride_ls = o_dst.stride(0), lse_dst.stride(0)
    grid = (q_tiles * batch * num_packs, splits)
    if grid[0] == 0:  # max_seqlen_q = 0 with queries (refused on CPU): nothing to attend
        return
    _attn_fwd_kernel[grid](
        q, k, v, o_dst, lse_dst, cu_seqlens_q, kv_lens, table, k_scale if fp8 else lse, v_scale if fp8 else lse,
        sm_scale * LOG2E, total_q, total_k, num_pages, num_packs, q_tiles, chunk,
        q.stride(0), q.stride(1), *strides, o_dst.stride(-3), o_dst.stride(-2), stride_os, lse_dst.stride(-2),
        stride_ls, bt_stride,
        GROUP=pack, KV_GROUP=group, HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGE_SIZE=page_size,
        CAUSAL=causal, FP8_KV=fp8, NUM_STAGES=cfg.num_stages, INTERPRET=interpreting(), num_warps=cfg.num_warps,
    )
    if splits > 1:
        block_h = _merge_heads(hq)
        _merge_splits_kernel[(total_q, triton.cdiv(hq, block_h))](
            o_dst, lse_dst, out, lse, hq, head_dim, splits, o_dst.stride(0), o_dst.stride(1), o_dst.stride(2),
            lse_dst.stride(0), lse_dst.stride(1), out.stride(0), out.stride(1),
            BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(head_dim), INTERPRET=interpreting(),
        )


def _merge_heads(num_heads: int) -> int:
    return min(triton.next_power_of_2(num_heads), 16)


def merge_attn_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fill ``out`` ``[T, H, D]`` and ``lse`` fp32 ``[H, T]`` (contiguous) from two states
    (``out_*`` unit last stride, any other strides; ``lse_*`` any strides). T >= 1."""
    t, h, d = out_a.shape
    block_h = _merge_heads(h)
    _merge_attn_states_kernel[(t, triton.cdiv(h, block_h))](
        out_a, lse_a, out_b, lse_b, out, lse, h, d, out_a.stride(0), out_a.stride(1), out_b.stride(0),
        out_b.stride(1), lse_a.stride(0), lse_a.stride(1), lse_b.stride(0), lse_b.stride(1), out.stride(0),
        out.stride(1), lse.stride(0),
        BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(d), INTERPRET=interpreting(),
    )


# ---------------------------------------------------------------------------------------------
# Default GPU configurations, for `glm45-bench compile-report` (format: triton_ops/__init__.py)
# ---------------------------------------------------------------------------------------------
# As the JIT sees GLM-4.5 calls at TP8 (12 query heads over 1 KV head, D = 128): q, k, v views
# into the fused QKV output [T, 14, 128] (varlen) or a [pages, 16, 1, 128] cache (paged), every
# stride but the head stride of a single KV head a multiple of 16; num_packs = 1 is specialized.

FP8 = torch.float8_e4m3fn
_TL = {torch.bfloat16: "bf16", torch.float32: "fp32", FP8: "fp8e4nv"}


def _attn_spec(label: str, rows: int, page_size: int, causal: bool, kv_dtype: torch.dtype = torch.bfloat16,
               split: bool = False) -> CompileSpec:
    group, head_dim = 12, 128
    cfg = pick_config(group, head_dim, rows // group)
    one_tile = rows <= cfg.block_m  # decode / MTP verify: q_tiles = 1, which the JIT specializes
    ints = ("total_q", "total_k", "num_pages", "q_tiles", "chunk", "stride_qt", "stride_qh", "stride_kt", "stride_ks",
            "stride_kh",
            "stride_vt", "stride_vs", "stride_vh", "stride_ot", "stride_oh", "stride_os", "stride_lh", "stride_ls",
            "stride_bt")
    sig = {"q_ptr": "*bf16", "k_ptr": f"*{_TL[kv_dtype]}", "v_ptr": f"*{_TL[kv_dtype]}",
           "o_ptr": "*fp32" if split else "*bf16", "lse_ptr": "*fp32", "cu_q_ptr": "*i32", "kv_len_ptr": "*i32",
           "bt_ptr": "*i32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "qk_scale": "fp32",
           **{n: "i32" for n in ints[:3]}, "num_packs": "constexpr", **{n: "i32" for n in ints[3:]},
           **({"q_tiles": "constexpr"} if one_tile else {}),
           "GROUP": "constexpr", "KV_GROUP": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr",
           "BLOCK_N": "constexpr", "PAGE_SIZE": "constexpr", "CAUSAL": "constexpr", "FP8_KV": "constexpr",
           "NUM_STAGES": "constexpr", "INTERPRET": "constexpr"}
    return CompileSpec(
        label=f"{label} {cfg.block_m}x{cfg.block_n}" + (f" page {page_size}" if page_size else ""),
        kernel=_attn_fwd_kernel,
        signature=sig,
        constexprs={"num_packs": 1, **({"q_tiles": 1} if one_tile else {}), "GROUP": group, "KV_GROUP": group,
                    "HEAD_DIM": head_dim, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "PAGE_SIZE": page_size,
                    "CAUSAL": causal, "FP8_KV": kv_dtype == FP8, "NUM_STAGES": cfg.num_stages, "INTERPRET": False},
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        aligned=("chunk", "stride_qt", "stride_kt", "stride_ks", "stride_vt", "stride_vs", "stride_ot", "stride_oh",
                 "stride_os", "stride_lh", "stride_ls", "stride_bt") + (("stride_qh",) if not page_size else ()),
    )


def _merge_spec(label: str, kernel, signature: dict[str, str], aligned: tuple[str, ...], **ones: int) -> CompileSpec:
    """12 heads of 128 (GLM-4.5 TP8) in one program; ``ones``: strides the JIT sees as 1."""
    return CompileSpec(label=label, kernel=kernel, signature={**signature, "BLOCK_H": "constexpr", "BLOCK_D": "constexpr",
                                                                 "INTERPRET": "constexpr"},
                       constexprs={**ones, "BLOCK_H": 16, "BLOCK_D": 128, "INTERPRET": False},
                       options={"num_warps": 4, "num_stages": 1}, aligned=aligned)


COMPILE_SPECS = [
    _attn_spec("varlen prefill causal", 8192, 0, True),
    _attn_spec("varlen prefill", 8192, 0, False),
    _attn_spec("paged decode", 12, 16, True),
    _attn_spec("paged decode split", 12, 16, True, split=True),
    _attn_spec("paged decode e4m3 split", 12, 16, True, kv_dtype=FP8, split=True),
    _attn_spec("paged MTP verify", 48, 16, True),
    _attn_spec("paged chunked prefill", 8192, 64, True),
    _merge_spec("split merge -> bf16", _merge_splits_kernel,
                {"po_ptr": "*fp32", "plse_ptr": "*fp32", "o_ptr": "*bf16", "lse_ptr": "*fp32", "num_heads": "i32",
                 "head_dim": "i32", "num_splits": "i32", **{n: "i32" for n in ("stride_ps", "stride_pt", "stride_ph",
                 "stride_ls", "stride_lh", "stride_ot", "stride_oh")}},
                ("head_dim", "stride_ps", "stride_pt", "stride_ph", "stride_ot", "stride_oh")),
    _merge_spec("merge_attn_states bf16", _merge_attn_states_kernel,
                {"oa_ptr": "*bf16", "la_ptr": "*fp32", "ob_ptr": "*bf16", "lb_ptr": "*fp32", "o_ptr": "*bf16",
                 "lse_ptr": "*fp32", "num_heads": "i32", "head_dim": "i32",
                 **{n: "i32" for n in ("stride_at", "stride_ah", "stride_bt", "stride_bh", "stride_lah")},
                 "stride_lat": "constexpr", **{n: "i32" for n in ("stride_lbh",)}, "stride_lbt": "constexpr",
                 "stride_ot": "i32", "stride_oh": "i32", "stride_lh": "i32"},
                ("head_dim", "stride_at", "stride_ah", "stride_bt", "stride_bh", "stride_ot", "stride_oh"),
                stride_lat=1, stride_lbt=1),
]
