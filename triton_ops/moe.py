"""Triton MoE kernels: the device-side token permutation and the two grouped GEMMs of the fused
expert MLP (definitions: glm45_ops/reference/moe.py).

* ``_moe_align_kernel``: decode sizes, one program, three passes over the (token, slot) pairs:
  per-expert counts (atomics: a sum, so order cannot change it), padded segment starts (a cumsum
  over the experts in registers), then the scatter, chunk by chunk, each pair going to its
  segment's running offset plus its rank among the chunk's pairs of the same expert. Ascending
  pair order within each expert, as the definition says, whatever the hardware's atomic order.
  Prefill sizes split the same passes over spans of pairs: ``_moe_align_count_kernel`` (a row of
  counts per span), ``_moe_align_scan_kernel`` (one program: segments, then each span's starting
  cursors) and ``_moe_align_scatter_kernel`` (a span per program, from its own cursors).
* ``_moe_gate_up_kernel``: per block of ``BLOCK_M`` permuted rows (one expert), gate and up tiles
  of ``w13`` in the same program, ``h = silu(g) * u`` in the epilogue, stored in x's dtype, or
  quantized 1 x 128 (FP8: one 128-wide tile is one scale group). A block whose expert is -1
  (past the used segments) returns at once: experts without tokens cost nothing, and the grids
  stop at a host-known bound of the filled blocks (:func:`used_blocks`). At decode sizes K is
  split (:func:`gate_up_split_k`) into fp32 partials that ``_moe_swiglu_kernel`` sums in split
  order before the same epilogue, and FP8 x is quantized in the kernel (:func:`quantizes_x`).
* ``_moe_down_kernel``: ``h @ w2[e]^T`` times the routing weight, written to the pair's own row
  of an fp32 ``[T*k, H]`` buffer; ``_moe_combine_kernel`` sums each token's local slots in slot
  order (deterministic, no atomics) into the output, in x's dtype.

FP8 GEMMs promote per 128-wide K slice (``fp8_block_gemm``'s recipe), the last slice masked when
K is not a multiple of 128 (GLM-4.5's TP8 width I = 192, Air's 176).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_ops import CompileSpec, interpreting
from triton_ops._common import e4m3_bits, round_to_e4m3_grid, to_out_dtype

ALIGN_CHUNK = 64  # pairs per scatter step: a [64, 64] rank comparison stays in registers
ALIGN_SPAN = 4096  # pairs per program of the prefill path (decode sizes take the one-program kernel)
QUANT_GROUP = 128
H200_SMS = 132
SPLIT_K_MIN_TILES = 4  # K tiles per gate-up slice at least
SPLIT_K_MAX_BYTES = 8 << 20  # fp32 partials of a split gate-up GEMM
COMBINE_BLOCK_H = 1024  # columns per combine program
QUANT_X_MAX_PAIRS = 512  # FP8 up to this many (token, slot) pairs: x quantized in the gate-up kernel


@triton.jit
def _count_pairs(ids_ptr, count_ptr, lo, hi, E, CHUNK: tl.constexpr):
    """Per-expert counts of pairs ``[lo, hi)`` added into ``count_ptr[e]`` (atomics: a sum, so
    their order cannot change it). Ids outside [0, E) are left out."""
    lanes = tl.arange(0, CHUNK)
    for c0 in range(lo, hi, CHUNK):
        e = tl.load(ids_ptr + c0 + lanes, mask=c0 + lanes < hi, other=-1)
        valid = (e >= 0) & (e < E) & (c0 + lanes < hi)  # before narrowing: int64 ids may not fit int32
        tl.atomic_add(count_ptr + e.to(tl.int32), 1, mask=valid)


@triton.jit
def _segments(counts, block_expert_ptr, num_padded_ptr, E, P, num_blocks,
              BLOCK_SIZE: tl.constexpr, E_P: tl.constexpr, CHUNK: tl.constexpr):
    """From the per-expert ``counts`` ``[E_P]``: each expert's padded segment start (returned),
    ``num_padded`` and every block's expert (-1 past the used segments)."""
    experts = tl.arange(0, E_P)
    padded = (counts + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    start = tl.cumsum(padded, 0) - padded
    total = tl.sum(padded, 0)
    tl.store(num_padded_ptr, total)
    end = tl.where(experts < E, start + padded, P + 1)
    lanes = tl.arange(0, CHUNK)
    for b0 in range(0, num_blocks, CHUNK):
        pos = (b0 + lanes) * BLOCK_SIZE
        owner = tl.sum((end[None, :] <= pos[:, None]).to(tl.int32), 1)  # = searchsorted(end, pos, right)
        tl.store(block_expert_ptr + b0 + lanes, tl.where(pos < total, owner, -1), mask=b0 + lanes < num_blocks)
    return start


@triton.jit
def _scatter_pairs(ids_ptr, sorted_ptr, cursor_ptr, lo, hi, E, CHUNK: tl.constexpr):
    """Pairs ``[lo, hi)``, in order, to ``sorted[cursor[e] + rank]`` (rank: among the step's
    earlier pairs of the same expert), each expert's cursor advancing as they land: ascending
    pair order within every expert, whatever the order of the hardware's atomics."""
    lanes = tl.arange(0, CHUNK)
    earlier = lanes[None, :] < lanes[:, None]
    for c0 in range(lo, hi, CHUNK):
        e = tl.load(ids_ptr + c0 + lanes, mask=c0 + lanes < hi, other=-1)
        valid = (e >= 0) & (e < E) & (c0 + lanes < hi)
        e = tl.where(valid, e, -1).to(tl.int32)
        same = (e[:, None] == e[None, :]) & valid[None, :] & earlier
        rank = tl.sum(same.to(tl.int32), 1)
        base = tl.load(cursor_ptr + e, mask=valid, other=0)
        tl.store(sorted_ptr + base + rank, c0 + lanes, mask=valid)
        tl.debug_barrier()
        tl.atomic_add(cursor_ptr + e, 1, mask=valid)
        tl.debug_barrier()


@triton.jit
def _fill(ptr, lo, hi, value, CHUNK: tl.constexpr):
    lanes = tl.arange(0, CHUNK)
    for p0 in range(lo, hi, CHUNK):
        tl.store(ptr + p0 + lanes, value, mask=p0 + lanes < hi)


@triton.jit
def _moe_align_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, cursor_ptr,
    n, E, P, num_blocks,
    BLOCK_SIZE: tl.constexpr, E_P: tl.constexpr, CHUNK: tl.constexpr,
):
    """Decode sizes: everything in one program (one launch: it zeroes its own counters)."""
    _fill(sorted_ptr, 0, P, n, CHUNK)
    _fill(cursor_ptr, 0, E, 0, CHUNK)
    tl.debug_barrier()
    _count_pairs(ids_ptr, cursor_ptr, 0, n, E, CHUNK)
    tl.debug_barrier()
    experts = tl.arange(0, E_P)
    counts = tl.load(cursor_ptr + experts, mask=experts < E, other=0)
    start = _segments(counts, block_expert_ptr, num_padded_ptr, E, P, num_blocks, BLOCK_SIZE, E_P, CHUNK)
    tl.debug_barrier()
    tl.store(cursor_ptr + experts, start, mask=experts < E)  # the running slot of each expert
    tl.debug_barrier()
    _scatter_pairs(ids_ptr, sorted_ptr, cursor_ptr, 0, n, E, CHUNK)


@triton.jit
def _moe_align_count_kernel(ids_ptr, sorted_ptr, counts_ptr, n, E, P, SPAN: tl.constexpr, CHUNK: tl.constexpr):
    """Prefill, step 1 of 3: program c fills its span of ``sorted`` with the padding id and counts
    the experts of its span of pairs into row c of ``counts`` ``[programs, E]``."""
    c = tl.program_id(0)
    _fill(sorted_ptr, c * SPAN, tl.minimum(c * SPAN + SPAN, P), n, CHUNK)
    _fill(counts_ptr + c * E, 0, E, 0, CHUNK)  # its own row: no memset launch before this one
    tl.debug_barrier()
    _count_pairs(ids_ptr, counts_ptr + c * E, c * SPAN, tl.minimum(c * SPAN + SPAN, n), E, CHUNK)


@triton.jit
def _moe_align_scan_kernel(
    counts_ptr, block_expert_ptr, num_padded_ptr, num_spans, E, P, num_blocks,
    BLOCK_SIZE: tl.constexpr, E_P: tl.constexpr, CHUNK: tl.constexpr,
):
    """Step 2 (one program): the segments from the summed counts, then each span's row of
    ``counts`` replaced by where its first pair of each expert goes (segment start plus the
    earlier spans' counts: spans keep the pairs' order)."""
    experts = tl.arange(0, E_P)
    total = tl.zeros((E_P,), tl.int32)
    for c in range(num_spans):
        total += tl.load(counts_ptr + c * E + experts, mask=experts < E, other=0)
    running = _segments(total, block_expert_ptr, num_padded_ptr, E, P, num_blocks, BLOCK_SIZE, E_P, CHUNK)
    for c in range(num_spans):
        row = tl.load(counts_ptr + c * E + experts, mask=experts < E, other=0)
        tl.store(counts_ptr + c * E + experts, running, mask=experts < E)
        running += row


@triton.jit
def _moe_align_scatter_kernel(ids_ptr, sorted_ptr, cursors_ptr, n, E, SPAN: tl.constexpr, CHUNK: tl.constexpr):
    """Step 3: program c scatters its span of pairs from its own row of cursors."""
    c = tl.program_id(0)
    _scatter_pairs(ids_ptr, sorted_ptr, cursors_ptr + c * E, c * SPAN, tl.minimum(c * SPAN + SPAN, n), E, CHUNK)


@triton.jit
def _block_pairs(block_expert_ptr, sorted_ptr, num_pairs, BLOCK_M: tl.constexpr):
    """This program's block of permuted rows: its expert (-1: past the used segments, nothing to
    do), the rows, the (token, slot) pair of each and which rows hold a pair (not padding)."""
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    return e, rows, pair, pair < num_pairs


@triton.jit
def _quant_tile_e4m3(h, ROUND_ON_GRID: tl.constexpr):
    """One 1 x 128 group per row of ``h`` (fp32, already on x's dtype grid): the reference
    quantizer's scale (eps 1e-4, NaN -> NaN scale, inf left out of amax) and e4m3 bytes."""
    ah = tl.abs(h)
    key = tl.where(h != h, float("inf"), tl.where(ah == float("inf"), 0.0, ah))
    amax = tl.max(key, 1)
    scale = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
    scale = tl.where(amax == float("inf"), float("nan"), scale)
    q = tl.math.div_rn(h, scale[:, None])
    y = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if ROUND_ON_GRID:
        y = round_to_e4m3_grid(y)
    return e4m3_bits(tl.where(q != q, q, y), ROUND_ON_GRID), scale


@triton.jit
def _gate_up_cols(pid_n, I, i_offset, BLOCK_N: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """Tile ``pid_n``'s columns of the intermediate and which of them exist. Tiles along I start
    i_offset columns early (a tensor-parallel shard whose first column sits inside a 128-block),
    so each FP8 tile is one 1 x 128 group aligned with the w2 scale blocks. (HAS_OFFSET is a
    constexpr so the common, aligned case keeps its simple masks and registers.)"""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < I
    if HAS_OFFSET:
        offs_n -= i_offset
        nmask = (offs_n >= 0) & (offs_n < I)
        offs_n = tl.where(nmask, offs_n, 0)
    return offs_n, nmask


@triton.jit
def _swiglu_store(acc_g, acc_u, rows, valid, offs_n, nmask, pid_n, h_ptr, hs_ptr, stride_hm, stride_hsm, stride_hsk,
                  FP8: tl.constexpr, ROUND_ON_GRID: tl.constexpr):
    """``h = silu(g) * u`` of a finished ``[BLOCK_M, BLOCK_N]`` tile into its rows of ``h``: in
    h's dtype, or (FP8) rounded into bf16 as the definition says, then quantized 1 x 128 (the
    tile is one group) with its scale into column ``pid_n`` of ``hs``."""
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    out_rows = rows.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]  # masked where offs_n was clamped
    omask = valid[:, None] & nmask[None, :]
    if FP8:
        hb = to_out_dtype(h, tl.bfloat16, ROUND_ON_GRID).to(tl.float32)
        hb = tl.where(nmask[None, :], hb, 0.0)
        q, scale = _quant_tile_e4m3(hb, ROUND_ON_GRID)
        tl.store(h_ptr + out_rows, q, mask=omask)
        tl.store(hs_ptr + rows.to(tl.int64) * stride_hsm + pid_n * stride_hsk, scale, mask=valid)
    else:
        tl.store(h_ptr + out_rows, to_out_dtype(h, h_ptr.dtype.element_ty, ROUND_ON_GRID), mask=omask)


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, h_ptr, hs_ptr, part_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, top_k, H, I, i_offset, k_per_split,
    stride_xm, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wse, stride_wsn, stride_wsk,
    stride_hm, stride_hsm, stride_hsk, stride_ps, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FP8: tl.constexpr, ROW_SCALES: tl.constexpr, HAS_OFFSET: tl.constexpr, UPCAST: tl.constexpr,
    ROUND_ON_GRID: tl.constexpr, SPLIT_K: tl.constexpr, QUANT_X: tl.constexpr,
):
    """Gate and up tiles of one (row block, I tile) over all of H, SwiGLU in the epilogue; or,
    with ``SPLIT_K`` > 1, over K slice ``program_id(2)`` (``k_per_split`` columns of H, a multiple
    of BLOCK_K), the fp32 partial sums stored to ``part`` ``[SPLIT_K, T*k, 2, tiles*BLOCK_N]``
    (by pair, so padding rows cost nothing) for ``_moe_swiglu_kernel`` to finish. ``QUANT_X``
    (FP8, decode sizes): x is bf16 and each program quantizes its own 1 x 128 groups of it as
    it loads them (the quantizer's exact math, so the same bytes as ``per_token_group_quant_fp8``),
    one launch fewer where launches, not bytes, are the cost."""
    pid_n = tl.program_id(1)
    e, rows, pair, valid = _block_pairs(block_expert_ptr, sorted_ptr, num_pairs, BLOCK_M)
    if e < 0:
        return
    token = (pair // top_k).to(tl.int64)
    offs_n, nmask = _gate_up_cols(pid_n, I, i_offset, BLOCK_N, HAS_OFFSET)
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + e * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = 0
    k_hi = H
    if SPLIT_K > 1:
        k_lo = tl.program_id(2) * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, H)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kmask = k0 + offs_k < H
        a = tl.load(x_ptr + token[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        if QUANT_X:
            a_bits, a_s = _quant_tile_e4m3(a.to(tl.float32), ROUND_ON_GRID)
            a = a_bits.to(tl.float8e4nv, bitcast=True)
        elif FP8:
            a_s = tl.load(xs_ptr + token * stride_xsm + (k0 // BLOCK_K) * stride_xsk, mask=valid, other=0.0)
        wmask = kmask[:, None] & nmask[None, :]
        wg = tl.load(w_rows + (k0 + offs_k)[:, None], mask=wmask, other=0.0)
        wu = tl.load(w_rows + I * stride_wn + (k0 + offs_k)[:, None], mask=wmask, other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (KNOWLEDGE.md §2); fp8 and fp32 are right
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        if FP8:
            s_base = ws_ptr + e * stride_wse + (k0 // BLOCK_K) * stride_wsk
            if ROW_SCALES:  # one scale per w13 row (a shard's scales, expanded from its blocks)
                s_g = tl.load(s_base + offs_n * stride_wsn, mask=nmask, other=0.0)
                s_u = tl.load(s_base + (offs_n + I) * stride_wsn, mask=nmask, other=0.0)
            else:
                s_g = tl.load(s_base + (offs_n // BLOCK_K) * stride_wsn, mask=nmask, other=0.0)
                s_u = tl.load(s_base + ((offs_n + I) // BLOCK_K) * stride_wsn, mask=nmask, other=0.0)
            acc_g += tl.dot(a, wg, out_dtype=tl.float32) * a_s[:, None] * s_g[None, :]
            acc_u += tl.dot(a, wu, out_dtype=tl.float32) * a_s[:, None] * s_u[None, :]
        else:
            acc_g += tl.dot(a, wg, out_dtype=tl.float32)
            acc_u += tl.dot(a, wu, out_dtype=tl.float32)
    if SPLIT_K > 1:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        width = tl.num_programs(1) * BLOCK_N
        dst = part_ptr + tl.program_id(2) * stride_ps + pair.to(tl.int64)[:, None] * stride_pm + cols[None, :]
        tl.store(dst, acc_g, mask=valid[:, None])
        tl.store(dst + width, acc_u, mask=valid[:, None])
    else:
        _swiglu_store(acc_g, acc_u, rows, valid, offs_n, nmask, pid_n, h_ptr, hs_ptr, stride_hm, stride_hsm,
                      stride_hsk, FP8, ROUND_ON_GRID)


@triton.jit
def _moe_swiglu_kernel(
    part_ptr, h_ptr, hs_ptr, sorted_ptr, block_expert_ptr, num_pairs, I, i_offset,
    stride_ps, stride_pm, stride_hm, stride_hsm, stride_hsk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, FP8: tl.constexpr,
    HAS_OFFSET: tl.constexpr, ROUND_ON_GRID: tl.constexpr,
):
    """Split-K's second step, on the gate-up grid: the ``SPLIT_K`` partial sums of a tile, added
    in split order (deterministic), then the gate-up kernel's own epilogue."""
    pid_n = tl.program_id(1)
    e, rows, pair, valid = _block_pairs(block_expert_ptr, sorted_ptr, num_pairs, BLOCK_M)
    if e < 0:
        return
    offs_n, nmask = _gate_up_cols(pid_n, I, i_offset, BLOCK_N, HAS_OFFSET)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    width = tl.num_programs(1) * BLOCK_N
    src = part_ptr + pair.to(tl.int64)[:, None] * stride_pm + cols[None, :]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc_g += tl.load(src + s * stride_ps, mask=valid[:, None], other=0.0)
        acc_u += tl.load(src + s * stride_ps + width, mask=valid[:, None], other=0.0)
    _swiglu_store(acc_g, acc_u, rows, valid, offs_n, nmask, pid_n, h_ptr, hs_ptr, stride_hm, stride_hsm, stride_hsk,
                  FP8, ROUND_ON_GRID)


@triton.jit
def _moe_down_kernel(
    h_ptr, hs_ptr, w_ptr, ws_ptr, y_ptr, topk_w_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, H, I, i_offset,
    stride_hm, stride_hsm, stride_hsk, stride_we, stride_wn, stride_wse, stride_wsn, stride_wsk, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FP8: tl.constexpr, HAS_OFFSET: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(1)
    e, rows, pair, valid = _block_pairs(block_expert_ptr, sorted_ptr, num_pairs, BLOCK_M)
    if e < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K slices aligned to the w2 scale blocks: a shard starting i_offset columns into a block
    # begins with a partial slice (one promotion per scale block, whatever the shard boundary)
    k_first = 0
    if HAS_OFFSET:
        k_first = -i_offset
    for k0 in range(k_first, I, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < I
        if HAS_OFFSET:
            kmask = (kk >= 0) & kmask
            kk = tl.where(kmask, kk, 0)
        a = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hm + kk[None, :],
                    mask=valid[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + e * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + kk[:, None],
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        if FP8:
            slot = (k0 + i_offset) // BLOCK_K
            a_s = tl.load(hs_ptr + rows.to(tl.int64) * stride_hsm + slot * stride_hsk, mask=valid, other=0.0)
            b_s = tl.load(ws_ptr + e * stride_wse + (offs_n // BLOCK_K) * stride_wsn + slot * stride_wsk,
                          mask=nmask, other=0.0)
            acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
        else:
            acc += tl.dot(a, b, out_dtype=tl.float32)
    weight = tl.load(topk_w_ptr + pair, mask=valid, other=0.0)
    tl.store(y_ptr + pair.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc * weight[:, None],
             mask=valid[:, None] & nmask[None, :])


@triton.jit
def _moe_combine_kernel(y_ptr, ids_ptr, out_ptr, H, E, stride_ym, stride_om,
                        TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, ROUND_ON_GRID: tl.constexpr):
    """``out[t] = sum_j y[t*k + j]`` over the slots whose expert is local (id in [0, E)), in slot
    order in fp32, rounded once into out's dtype: the rows of other slots were never written."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + j)
        if (e >= 0) & (e < E):
            acc += tl.load(y_ptr + (t * TOP_K + j) * stride_ym + cols, mask=cmask, other=0.0)
    tl.store(out_ptr + t * stride_om + cols, to_out_dtype(acc, out_ptr.dtype.element_ty, ROUND_ON_GRID), mask=cmask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int, sorted_ids: torch.Tensor,
                         block_expert: torch.Tensor, num_padded: torch.Tensor, span: int = ALIGN_SPAN) -> None:
    """Fill the three outputs of ``moe_align_block_size`` from ``topk_ids`` (contiguous): one
    program up to ``span`` pairs, else three launches over spans of ``span`` pairs (count, scan,
    scatter). ``span`` is a multiple of ``ALIGN_CHUNK``; tests lower it to reach the prefill path."""
    n, p, nb, dev = topk_ids.numel(), sorted_ids.numel(), block_expert.numel(), topk_ids.device
    e_p = triton.next_power_of_2(num_experts)
    if n <= span:
        cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)
        _moe_align_kernel[(1,)](topk_ids, sorted_ids, block_expert, num_padded, cursor, n, num_experts, p, nb,
                                BLOCK_SIZE=block_size, E_P=e_p, CHUNK=ALIGN_CHUNK, num_warps=4)
        return
    # The count step's programs also fill the padding, so they cover P >= n entries.
    spans = triton.cdiv(p, span)
    counts = torch.empty(spans, num_experts, dtype=torch.int32, device=dev)
    _moe_align_count_kernel[(spans,)](topk_ids, sorted_ids, counts, n, num_experts, p, SPAN=span, CHUNK=ALIGN_CHUNK,
                                      num_warps=4)
    _moe_align_scan_kernel[(1,)](counts, block_expert, num_padded, spans, num_experts, p, nb,
                                 BLOCK_SIZE=block_size, E_P=e_p, CHUNK=ALIGN_CHUNK, num_warps=8, num_stages=1)
    _moe_align_scatter_kernel[(triton.cdiv(n, span),)](topk_ids, sorted_ids, counts, n, num_experts, SPAN=span,
                                                       CHUNK=ALIGN_CHUNK, num_warps=4)


def row_scales(w13: torch.Tensor, w13_scale: torch.Tensor) -> bool:
    """Whether ``w13_scale`` holds one scale per row ``[E, 2I, ceil(H/128)]`` (a tensor-parallel
    shard's, see glm45_ops.moe.shard) rather than one per 128 x 128 block."""
    return w13_scale.shape[1] == w13.shape[1] != triton.cdiv(w13.shape[1], QUANT_GROUP)


def used_blocks(num_pairs: int, num_experts: int, block_m: int, num_blocks: int | None = None) -> int:
    """An upper bound of the row blocks the permutation fills, known on the host: each expert
    hit adds at most one partial block, so ``ceil(pairs / BLOCK_M) + min(E, pairs)``. The used
    blocks come first, so the GEMM grids stop there: one decode token on GLM-4.5 at TP8 launches
    9 row blocks instead of the layout's 150 (the rest would only start and return)."""
    bound = triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)
    return bound if num_blocks is None else min(num_blocks, bound)


def gate_up_split_k(num_pairs: int, num_experts: int, block_m: int, block_n: int, n_tiles: int, k_tiles: int,
                    device: torch.device) -> int:
    """K slices for the gate-up GEMM. Decode routes a few tokens to a few experts: then the
    (row block, I tile) programs, at most ``used_blocks * n_tiles``, are too few to stream the weights at HBM speed (GLM-4.5
    at TP8, one token: 8 experts x 2 tiles = 16 programs for 132 SMs). Split H until about two
    waves of programs, keeping at least ``SPLIT_K_MIN_TILES`` K tiles per slice (a shorter loop
    leaves the pipeline empty) and the fp32 partials under ``SPLIT_K_MAX_BYTES``. The SM count
    is the GPU's (a nominal H200's on the CPU, so the interpreter takes the same path)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else H200_SMS
    programs = used_blocks(num_pairs, num_experts, block_m) * n_tiles
    if programs >= sms:
        return 1
    split = min(triton.cdiv(2 * sms, programs), k_tiles // SPLIT_K_MIN_TILES)
    per_split = num_pairs * 2 * n_tiles * block_n * 4  # bytes of one slice's fp32 partials
    return max(1, min(split, SPLIT_K_MAX_BYTES // max(per_split, 1)))


def quantizes_x(num_pairs: int) -> bool:
    """Whether FP8 ``fused_moe`` quantizes x inside its gate-up kernel (decode sizes, where a
    launch costs more than the programs' redundant quantization of their tiles) rather than in
    ``per_token_group_quant_fp8`` first (then ``x_scale`` is given)."""
    return num_pairs <= QUANT_X_MAX_PAIRS


def fused_moe(x, x_scale, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, sorted_ids, block_expert, top_k,
              config, out, i_offset: int = 0) -> None:
    """The two grouped GEMMs over permuted rows, then the combine into ``out`` ``[T, H]`` (x's
    activation dtype; contiguous ``topk_ids`` say which slots are local). FP8: ``x`` e4m3 with
    ``x_scale``, or bf16 with ``x_scale`` None (quantized in the gate-up kernel:
    :func:`quantizes_x`). ``w`` e4m3 with scales for FP8, else
    bf16/fp16/fp32. ``config``: vLLM-style block sizes from ``triton_ops.moe_configs.get_config``
    (its ``BLOCK_SIZE_M`` is the block ``sorted_ids`` was padded to; FP8 tiles are 128 wide, one
    scale block / quantization group each); under the interpreter, BF16 tiles span whole dims
    unless the gate-up GEMM splits K (:func:`gate_up_split_k`: decode sizes)."""
    t, h = x.shape
    inter = w13.shape[1] // 2
    n = topk_weights.numel()
    fp8 = w13_scale is not None
    rows = sorted_ids.numel()
    interp = interpreting()
    block_m = config["BLOCK_SIZE_M"]
    launch = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    dev = x.device
    split = gate_up_split_k(n, w13.shape[0], block_m, config["BLOCK_SIZE_N"],
                            triton.cdiv(inter + i_offset, config["BLOCK_SIZE_N"]), triton.cdiv(h, config["BLOCK_SIZE_K"]), dev)
    whole = interp and not fp8 and split == 1  # the interpreter pays per program: one tile per dimension
    block_k = triton.next_power_of_2(max(h, 16)) if whole else config["BLOCK_SIZE_K"]
    block_n = triton.next_power_of_2(max(inter, 16)) if whole else config["BLOCK_SIZE_N"]
    if fp8:
        act = torch.empty((rows, inter), dtype=torch.uint8, device=dev)
        act_s = torch.empty((rows, triton.cdiv(inter + i_offset, QUANT_GROUP)), dtype=torch.float32, device=dev)
    else:
        act = torch.empty((rows, inter), dtype=x.dtype, device=dev)
        act_s = act  # unused
    quant_x = fp8 and x_scale is None
    dummy = x_scale if fp8 and not quant_x else x
    upcast = interp and not fp8
    n_tiles = triton.cdiv(inter + i_offset, block_n)
    k_per_split = triton.cdiv(triton.cdiv(h, block_k), split) * block_k
    split = triton.cdiv(h, k_per_split)  # no empty slice
    # without a split, any fp32 tensor stands in for the partials (never read or written)
    part = torch.empty((split, n, 2 * n_tiles * block_n), dtype=torch.float32, device=dev) if split > 1 else topk_weights
    grid1 = (used_blocks(n, w13.shape[0], block_m, block_expert.numel()), n_tiles, split)
    common = dict(BLOCK_M=block_m, BLOCK_N=block_n, FP8=fp8, HAS_OFFSET=i_offset != 0, ROUND_ON_GRID=interp,
                  SPLIT_K=split)
    _moe_gate_up_kernel[grid1](
        x, dummy, w13, w13_scale if fp8 else w13, act, act_s, part, sorted_ids, block_expert,
        n, top_k, h, inter, i_offset, k_per_split,
        x.stride(0), dummy.stride(0), dummy.stride(-1), w13.stride(0), w13.stride(1),
        *((w13_scale.stride(0), w13_scale.stride(1), w13_scale.stride(2)) if fp8 else (0, 0, 0)),
        act.stride(0), act_s.stride(0), act_s.stride(-1), *((part.stride(0), part.stride(1)) if split > 1 else (0, 0)),
        BLOCK_K=block_k, ROW_SCALES=fp8 and row_scales(w13, w13_scale), UPCAST=upcast, QUANT_X=quant_x, **common,
        **launch,
    )
    if split > 1:
        _moe_swiglu_kernel[grid1[:2]](
            part, act, act_s, sorted_ids, block_expert, n, inter, i_offset,
            part.stride(0), part.stride(1), act.stride(0), act_s.stride(0), act_s.stride(-1),
            **common, num_warps=4,
        )
    y = torch.empty((n, h), dtype=torch.float32, device=dev)  # rows of non-local slots are never read
    block_k2 = triton.next_power_of_2(max(inter, 16)) if interp and not fp8 else config["BLOCK_SIZE_K"]
    block_n2 = triton.next_power_of_2(max(h, 16)) if interp else config["BLOCK_SIZE_N"]
    grid2 = (grid1[0], triton.cdiv(h, block_n2))
    _moe_down_kernel[grid2](
        act.view(torch.float8_e4m3fn) if fp8 else act, act_s, w2, w2_scale if fp8 else w2, y, topk_weights,
        sorted_ids, block_expert, n, h, inter, i_offset,
        act.stride(0), act_s.stride(0), act_s.stride(-1), w2.stride(0), w2.stride(1),
        *((w2_scale.stride(0), w2_scale.stride(1), w2_scale.stride(2)) if fp8 else (0, 0, 0)), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n2, BLOCK_K=block_k2, FP8=fp8, HAS_OFFSET=i_offset != 0, UPCAST=upcast,
        **launch,
    )
    block_h = min(triton.next_power_of_2(h), COMBINE_BLOCK_H)
    _moe_combine_kernel[(t, triton.cdiv(h, block_h))](y, topk_ids, out, h, w13.shape[0], y.stride(0), out.stride(0),
                                                      TOP_K=top_k, BLOCK_H=block_h, ROUND_ON_GRID=interp, num_warps=4)


# ---------------------------------------------------------------------------------------------
# Default GPU configurations, for `glm45-bench compile-report` (format: triton_ops/__init__.py)
# ---------------------------------------------------------------------------------------------

def _default(fp8: bool, block_m: int) -> dict:
    from triton_ops.moe_configs import FP8_BLOCK_SHAPE, default_config

    m = 1 if block_m == 16 else 4096  # a decode batch and a prefill one
    return default_config(160, 192, 5120, m, "fp8_w8a8" if fp8 else torch.bfloat16, FP8_BLOCK_SHAPE if fp8 else None)


def _gate_up_spec(fp8: bool, block_m: int, split: int = 1) -> CompileSpec:
    quant_x = fp8 and block_m == 16  # decode sizes: x quantized in the kernel (quantizes_x)
    x_t = "*fp8e4nv" if fp8 and not quant_x else "*bf16"
    sig = {"x_ptr": x_t, "xs_ptr": "*fp32", "w_ptr": "*fp8e4nv" if fp8 else "*bf16", "ws_ptr": "*fp32",
           "h_ptr": "*u8" if fp8 else "*bf16",
           "hs_ptr": "*fp32", "part_ptr": "*fp32", "sorted_ptr": "*i32", "block_expert_ptr": "*i32",
           "num_pairs": "i32", "top_k": "i32", "H": "i32", "I": "i32", "i_offset": "i32", "k_per_split": "i32",
           **{s: "i32" for s in ("stride_xm", "stride_xsm", "stride_xsk", "stride_we", "stride_wn", "stride_wse",
                                 "stride_wsn", "stride_wsk", "stride_hm", "stride_hsm", "stride_hsk", "stride_ps",
                                 "stride_pm")},
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "FP8": "constexpr",
           "ROW_SCALES": "constexpr", "HAS_OFFSET": "constexpr", "UPCAST": "constexpr", "ROUND_ON_GRID": "constexpr",
           "SPLIT_K": "constexpr", "QUANT_X": "constexpr"}
    cfg = _default(fp8, block_m)
    bn, bk = cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    return CompileSpec(
        label=f"{'fp8' if fp8 else 'bf16'} BLOCK_M={block_m}" + (f" SPLIT_K={split}" if split > 1 else ""),
        kernel=_moe_gate_up_kernel, signature=sig,
        constexprs={"BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": bk, "FP8": fp8, "ROW_SCALES": False,
                    "HAS_OFFSET": False, "UPCAST": False, "ROUND_ON_GRID": False, "SPLIT_K": split,
                    "QUANT_X": quant_x},
        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
        aligned=("H", "I", "k_per_split", "stride_xm", "stride_we", "stride_wn", "stride_hm", "stride_ps", "stride_pm"),
    )


def _swiglu_spec(fp8: bool) -> CompileSpec:
    sig = {"part_ptr": "*fp32", "h_ptr": "*u8" if fp8 else "*bf16", "hs_ptr": "*fp32", "sorted_ptr": "*i32",
           "block_expert_ptr": "*i32", "num_pairs": "i32", "I": "i32", "i_offset": "i32",
           **{s: "i32" for s in ("stride_ps", "stride_pm", "stride_hm", "stride_hsm", "stride_hsk")},
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "SPLIT_K": "constexpr", "FP8": "constexpr",
           "HAS_OFFSET": "constexpr", "ROUND_ON_GRID": "constexpr"}
    cfg = _default(fp8, 16)
    return CompileSpec(
        label=f"{'fp8' if fp8 else 'bf16'} BLOCK_M=16 SPLIT_K=10", kernel=_moe_swiglu_kernel, signature=sig,
        constexprs={"BLOCK_M": 16, "BLOCK_N": cfg["BLOCK_SIZE_N"], "SPLIT_K": 10, "FP8": fp8, "HAS_OFFSET": False,
                    "ROUND_ON_GRID": False},
        options={"num_warps": 4}, aligned=("I", "stride_ps", "stride_pm", "stride_hm"),
    )


def _down_spec(fp8: bool, block_m: int) -> CompileSpec:
    cfg = _default(fp8, block_m)
    a_t = "*fp8e4nv" if fp8 else "*bf16"
    sig = {"h_ptr": a_t, "hs_ptr": "*fp32", "w_ptr": a_t, "ws_ptr": "*fp32", "y_ptr": "*fp32", "topk_w_ptr": "*fp32",
           "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "num_pairs": "i32", "H": "i32", "I": "i32", "i_offset": "i32",
           **{s: "i32" for s in ("stride_hm", "stride_hsm", "stride_hsk", "stride_we", "stride_wn", "stride_wse",
                                 "stride_wsn", "stride_wsk", "stride_ym")},
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "FP8": "constexpr",
           "HAS_OFFSET": "constexpr", "UPCAST": "constexpr"}
    return CompileSpec(
        label=f"{'fp8' if fp8 else 'bf16'} BLOCK_M={block_m}", kernel=_moe_down_kernel, signature=sig,
        constexprs={"BLOCK_M": block_m, "BLOCK_N": cfg["BLOCK_SIZE_N"], "BLOCK_K": cfg["BLOCK_SIZE_K"], "FP8": fp8,
                    "HAS_OFFSET": False, "UPCAST": False},
        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}, aligned=("H", "I", "stride_hm", "stride_we", "stride_wn", "stride_ym"),
    )


COMPILE_SPECS = [
    CompileSpec(
        label="E<=256", kernel=_moe_align_kernel,
        signature={"ids_ptr": "*i32", "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "num_padded_ptr": "*i32",
                   "cursor_ptr": "*i32", "n": "i32", "E": "i32", "P": "i32", "num_blocks": "i32",
                   "BLOCK_SIZE": "constexpr", "E_P": "constexpr", "CHUNK": "constexpr"},
        constexprs={"BLOCK_SIZE": 64, "E_P": 256, "CHUNK": ALIGN_CHUNK}, options={"num_warps": 4},
    ),
    CompileSpec(
        label="count span", kernel=_moe_align_count_kernel,
        signature={"ids_ptr": "*i32", "sorted_ptr": "*i32", "counts_ptr": "*i32", "n": "i32", "E": "i32", "P": "i32",
                   "SPAN": "constexpr", "CHUNK": "constexpr"},
        constexprs={"SPAN": ALIGN_SPAN, "CHUNK": ALIGN_CHUNK}, options={"num_warps": 4},
    ),
    CompileSpec(
        label="scan E<=256", kernel=_moe_align_scan_kernel,
        signature={"counts_ptr": "*i32", "block_expert_ptr": "*i32", "num_padded_ptr": "*i32", "num_spans": "i32",
                   "E": "i32", "P": "i32", "num_blocks": "i32", "BLOCK_SIZE": "constexpr", "E_P": "constexpr",
                   "CHUNK": "constexpr"},
        constexprs={"BLOCK_SIZE": 64, "E_P": 256, "CHUNK": ALIGN_CHUNK}, options={"num_warps": 8, "num_stages": 1},
    ),
    CompileSpec(
        label="scatter span", kernel=_moe_align_scatter_kernel,
        signature={"ids_ptr": "*i32", "sorted_ptr": "*i32", "cursors_ptr": "*i32", "n": "i32", "E": "i32",
                   "SPAN": "constexpr", "CHUNK": "constexpr"},
        constexprs={"SPAN": ALIGN_SPAN, "CHUNK": ALIGN_CHUNK}, options={"num_warps": 4},
    ),
    *(_gate_up_spec(fp8, bm) for fp8 in (False, True) for bm in (16, 64)),
    *(_gate_up_spec(fp8, 16, split=10) for fp8 in (False, True)),
    *(_swiglu_spec(fp8) for fp8 in (False, True)),
    CompileSpec(
        label="top-8 bf16", kernel=_moe_combine_kernel,
        signature={"y_ptr": "*fp32", "ids_ptr": "*i32", "out_ptr": "*bf16", "H": "i32", "E": "i32",
                   "stride_ym": "i32", "stride_om": "i32", "TOP_K": "constexpr", "BLOCK_H": "constexpr",
                   "ROUND_ON_GRID": "constexpr"},
        constexprs={"TOP_K": 8, "BLOCK_H": COMBINE_BLOCK_H, "ROUND_ON_GRID": False}, options={"num_warps": 4},
        aligned=("H", "stride_ym", "stride_om"),
    ),
    *(_down_spec(fp8, bm) for fp8 in (False, True) for bm in (16, 64)),
]
