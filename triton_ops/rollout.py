"""Triton rollout kernels: token log-probs and entropy (definition: glm45_ops/reference/rollout.py).

Every kernel keeps, per row, the online softmax state ``(m, s, w)``: the running max ``m`` of
the logits, ``s = sum exp(d)`` and ``w = sum exp(d) * d`` with ``d = (x - m) / t``. When the max
grows from ``m`` to ``m'`` the old terms' ``d`` shift by ``delta = (m - m') / t``, so
``s <- s * exp(delta)`` and ``w <- exp(delta) * (w + s * delta)``. ``d`` is ``(x - m) * (1/t)``
with ``1/t`` rounded once (clamped to the largest fp32, so a temperature whose reciprocal
overflows still gives 0 at the maximum, not ``0 * inf``). Fully masked stretches (max ``-inf``)
subtract 0 instead of ``-inf`` and contribute exactly 0.

* ``_token_logprobs_kernel``: one program per row, streaming V in ``BLOCK_V`` chunks (one
  block-wide max per chunk, one ``exp`` per logit). Greedy rows (``t <= 0``) take an argmax loop
  instead.
* ``_linear_fwd_kernel``: ``BLOCK_M`` rows x a range of V tiles per program; each tile is
  ``hidden @ weight_tile^T`` on the tensor cores (``tl.dot``, fp32 accumulation; wgmma on
  Hopper), whose epilogue updates the rows' state, the target logit and (when a row may be
  greedy) the running argmax. Programs along V write partial states; ``_linear_merge_kernel``
  merges them per row.
* ``_linear_grad_kernel``: the backward's grad-logits for one V chunk, recomputed tile by tile
  (module docstring of the reference); the two GEMMs that follow are torch's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from triton_ops import CompileSpec, interpreting
from triton_ops._common import order_key, to_out_dtype
from triton_ops.speculative import _row_argmax  # the greedy rule of probs_from_logits (NaN largest)

_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_INT32_MIN = tl.constexpr(-2147483648)
_NAN_KEY = tl.constexpr(2147483647)  # NaN above +inf, as probs_from_logits' argmax
_STATS = 4  # partial state rows: m, s, w, x_i
BWD_CHUNK_V = 8192  # backward: grad-logits [T, 8192] at a time (16-bit: 16 KB per row)


@triton.jit
def _inv_temperature(t):
    """``1/t`` rounded once (IEEE), at most the largest fp32; NaN for a NaN ``t`` (a plain
    minimum would return the other operand)."""
    return tl.minimum(tl.math.div_rn(1.0, t), _FLT_MAX, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _online_update(m, s, w, x, ok, c, AXIS: tl.constexpr):
    """Fold the logits ``x`` where ``ok`` (reduced along ``AXIS``) into the state ``(m, s, w)``;
    ``c`` = 1/t. AXIS 0: one row, ``s`` and ``w`` kept per lane (summed at the end); AXIS 1: a
    row per ``x[i, :]``, with ``m``, ``s``, ``w``, ``c`` per row. A state that never saw a value
    above -inf is dropped exactly (factor 0), even where ``delta`` is ``-inf * 0`` (t = +inf),
    and lanes outside ``ok`` add nothing (not even the NaN a -inf logit gives at t = +inf)."""
    m_new = tl.maximum(m, tl.max(tl.where(ok, x, float("-inf")), axis=AXIS))
    ms = tl.where(m_new == float("-inf"), 0.0, m_new)
    delta = (m - ms) * c
    a = tl.where(m == float("-inf"), 0.0, tl.exp(delta))
    w = tl.where(a == 0.0, 0.0, a * (w + s * delta))
    s = s * a
    if AXIS == 1:
        d = (x - ms[:, None]) * c[:, None]
    else:
        d = (x - ms) * c
    e = tl.where(ok, tl.exp(d), 0.0)
    ed = tl.where(e == 0.0, 0.0, e * d)
    if AXIS == 1:
        e = tl.sum(e, axis=1)
        ed = tl.sum(ed, axis=1)
    return m_new, s + e, w + ed


@triton.jit
def _finish(m, s, w, x_i, valid, c):
    """(logprob, entropy, lse) from a row's state and target logit (reference ``_finish``)."""
    ms = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    lp = tl.where(valid, (x_i - ms) * c, float("-inf")) - log_s
    ent = log_s - tl.math.div_rn(w, s)
    lse = tl.where(s == 0.0, float("nan"), ms * c + log_s)  # s == 0: a row of -inf
    return lp, ent, lse


@triton.jit
def _token_logprobs_kernel(
    logits_ptr, ids_ptr, temps_ptr, lp_ptr, ent_ptr,
    V, l_st, i_st, t_st, temperature,
    HAS_TEMPS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * l_st
    if HAS_TEMPS:
        t = tl.load(temps_ptr + row * t_st)
    else:
        t = temperature
    tok = tl.load(ids_ptr + row * i_st).to(tl.int64)
    valid = (tok >= 0) & (tok < V)
    if t <= 0.0:  # greedy; False for NaN, which takes the softmax path and gives NaN
        lp = tl.where(valid & (tok == _row_argmax(base, V, BLOCK_V)), 0.0, float("-inf"))
        ent = tl.zeros([], tl.float32)
    else:
        c = _inv_temperature(t)
        offs = tl.arange(0, BLOCK_V)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        w = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            ok = idx < V
            x = tl.load(base + idx, mask=ok, other=0.0).to(tl.float32)
            m, s, w = _online_update(m, s, w, x, ok, c, 0)
        x_i = tl.load(base + tl.where(valid, tok, 0)).to(tl.float32)
        lp, ent, _ = _finish(m, tl.sum(s, axis=0), tl.sum(w, axis=0), x_i, valid, c)
    tl.store(lp_ptr + row, lp)
    tl.store(ent_ptr + row, ent)


def _block_v(v: int, elem_bytes: int) -> int:
    # GPU: 16 KB of the row per step (8 warps x 32 lanes x 4 x 16-byte loads in flight);
    # interpreter: the whole row in one step (its cost is per op, not per element)
    if interpreting():
        return triton.next_power_of_2(v)
    return min(16384 // elem_bytes, triton.next_power_of_2(v))


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, temperatures: torch.Tensor | None,
    logprobs: torch.Tensor, entropy: torch.Tensor, block_v: int | None = None,
) -> None:
    """Fill ``logprobs`` and ``entropy`` fp32 ``[T]`` from ``logits`` ``[T, V]`` (unit last stride).
    ``block_v`` (a power of two) overrides the chunk size: tests use it to run the online
    rescaling across chunks in the interpreter, where a row is otherwise one chunk."""
    n, v = logits.shape
    has_t = temperatures is not None
    _token_logprobs_kernel[(n,)](
        logits, token_ids, temperatures if has_t else logits, logprobs, entropy,
        v, logits.stride(0), token_ids.stride(0), temperatures.stride(0) if has_t else 0, temperature,
        HAS_TEMPS=has_t, BLOCK_V=block_v or _block_v(v, logits.element_size()), num_warps=8,
    )


# ---------------------------------------------------------------------------------------------
# linear_logprobs: the LM-head GEMM with the statistics in its epilogue
# ---------------------------------------------------------------------------------------------

@triton.jit
def _row_params(ids_ptr, temps_ptr, rows, row_ok, V, i_st, t_st, temperature, HAS_TEMPS: tl.constexpr):
    """Per row: (the target id, whether it is in range, 1/t, whether the row is greedy)."""
    if HAS_TEMPS:
        t = tl.load(temps_ptr + rows * t_st, mask=row_ok, other=1.0)
    else:
        t = tl.full(rows.shape, temperature, tl.float32)
    greedy = t <= 0.0
    c = tl.where(greedy, 1.0, _inv_temperature(t))
    tok = tl.load(ids_ptr + rows * i_st, mask=row_ok, other=-1).to(tl.int64)
    return tok, (tok >= 0) & (tok < V), c, greedy


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, h_st, w_st,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``hidden[rows] @ weight[cols]^T`` ``[BLOCK_M, BLOCK_N]``."""
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + kk
        k_ok = k < H
        a = tl.load(h_ptr + rows[:, None] * h_st + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * w_st + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (KNOWLEDGE.md §2); fp32 is right
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _linear_fwd_kernel(
    h_ptr, w_ptr, ids_ptr, temps_ptr, part_ptr, arg_ptr,
    T, V, H, h_st, w_st, i_st, t_st, temperature, tiles_per_split,
    HAS_TEMPS: tl.constexpr, TRACK_ARGMAX: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    tok, _, c, _ = _row_params(ids_ptr, temps_ptr, rows, row_ok, V, i_st, t_st, temperature, HAS_TEMPS)
    nn = tl.arange(0, BLOCK_N)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    w = tl.zeros([BLOCK_M], tl.float32)
    x_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_key = tl.full([BLOCK_M], _INT32_MIN, tl.int32)
    best_id = tl.zeros([BLOCK_M], tl.int32)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, tl.cdiv(V, BLOCK_N))
    for tile in range(tile_lo, tile_hi):
        n0 = tile * BLOCK_N
        cols = n0 + nn
        col_ok = cols < V
        x = _logits_tile(h_ptr, w_ptr, rows, row_ok, cols.to(tl.int64), col_ok, H, h_st, w_st,
                         UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        if TRACK_ARGMAX:  # lowest id of the largest value (NaN largest): an exact integer max
            key = tl.where(col_ok[None, :], order_key(x, _NAN_KEY), _INT32_MIN)
            tile_key = tl.max(key, axis=1)
            tile_id = tl.min(tl.where(key == tile_key[:, None], cols[None, :], V), axis=1)
            better = tile_key > best_key  # strict: earlier (lower) tiles win ties
            best_key = tl.where(better, tile_key, best_key)
            best_id = tl.where(better, tile_id, best_id)
        here = (tok >= n0) & (tok < n0 + BLOCK_N)
        x_i = tl.where(here, tl.sum(tl.where(cols[None, :] == tok[:, None], x, 0.0), axis=1), x_i)
        m, s, w = _online_update(m, s, w, x, col_ok[None, :], c, 1)
    part = part_ptr + split.to(tl.int64) * 4 * T + rows  # int64 from the left
    tl.store(part, m, mask=row_ok)
    tl.store(part + T, s, mask=row_ok)
    tl.store(part + 2 * T, w, mask=row_ok)
    tl.store(part + 3 * T, x_i, mask=row_ok)
    if TRACK_ARGMAX:
        arg = arg_ptr + split.to(tl.int64) * 2 * T + rows
        tl.store(arg, best_key, mask=row_ok)
        tl.store(arg + T, best_id, mask=row_ok)


@triton.jit
def _linear_merge_kernel(
    part_ptr, arg_ptr, ids_ptr, temps_ptr, lp_ptr, ent_ptr, lse_ptr,
    T, V, n_split, i_st, t_st, temperature,
    HAS_TEMPS: tl.constexpr, TRACK_ARGMAX: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    tok, valid, c, greedy = _row_params(ids_ptr, temps_ptr, rows, row_ok, V, i_st, t_st, temperature, HAS_TEMPS)
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    x_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    # the splits' states lie 4T floats (argmax: 2T ints) apart: the pointers step along (64-bit
    # addresses) instead of forming k * 4T in int32
    part = part_ptr + rows
    for _ in range(0, n_split):  # the row's max, and its target logit (-inf in the other splits)
        m = tl.maximum(m, tl.load(part, mask=row_ok, other=0.0))
        x_i = tl.maximum(x_i, tl.load(part + 3 * T, mask=row_ok, other=0.0))
        part += 4 * T
    ms = tl.where(m == float("-inf"), 0.0, m)
    s = tl.zeros([BLOCK_T], tl.float32)
    w = tl.zeros([BLOCK_T], tl.float32)
    best_key = tl.full([BLOCK_T], _INT32_MIN, tl.int32)
    best_id = tl.zeros([BLOCK_T], tl.int32)
    part = part_ptr + rows
    arg = arg_ptr + rows
    for _ in range(0, n_split):
        mk = tl.load(part, mask=row_ok, other=0.0)
        sk = tl.load(part + T, mask=row_ok, other=0.0)
        wk = tl.load(part + 2 * T, mask=row_ok, other=0.0)
        delta = (mk - ms) * c
        a = tl.where(mk == float("-inf"), 0.0, tl.exp(delta))
        s += sk * a
        w += tl.where(a == 0.0, 0.0, a * (wk + sk * delta))
        part += 4 * T
        if TRACK_ARGMAX:
            key = tl.load(arg, mask=row_ok, other=_INT32_MIN)
            better = key > best_key  # strict: earlier splits (lower ids) win ties
            best_key = tl.where(better, key, best_key)
            best_id = tl.where(better, tl.load(arg + T, mask=row_ok, other=0), best_id)
            arg += 2 * T
    lp, ent, lse = _finish(m, s, w, x_i, valid, c)
    if TRACK_ARGMAX:
        lp = tl.where(greedy, tl.where(valid & (tok == best_id), 0.0, float("-inf")), lp)
        ent = tl.where(greedy, 0.0, ent)
        lse = tl.where(greedy, 0.0, lse)
    tl.store(lp_ptr + rows, lp, mask=row_ok)
    tl.store(ent_ptr + rows, ent, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _linear_grad_kernel(
    h_ptr, w_ptr, ids_ptr, temps_ptr, ent_ptr, lse_ptr, glp_ptr, gent_ptr, glse_ptr, g_ptr,
    T, V, H, v0, n_cols, h_st, w_st, g_st, i_st, t_st, temperature,
    HAS_TEMPS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_ON_GRID: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # column within the chunk
    j_ok = j < n_cols
    cols = v0 + j
    tok, valid, c, greedy = _row_params(ids_ptr, temps_ptr, rows, row_ok, V, i_st, t_st, temperature, HAS_TEMPS)
    x = _logits_tile(h_ptr, w_ptr, rows, row_ok, cols.to(tl.int64), j_ok, H, h_st, w_st,
                     UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    a = tl.where(valid, tl.load(glp_ptr + rows, mask=row_ok, other=0.0), 0.0)[:, None]
    b = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)[:, None]
    g_lse = tl.load(glse_ptr + rows, mask=row_ok, other=0.0)[:, None]
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)[:, None]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None]
    log_p = x * c[:, None] - lse
    p = tl.exp(log_p)
    g = (g_lse - a) * p - b * tl.where(p == 0.0, 0.0, p * (log_p + ent))
    g = tl.where(cols[None, :] == tok[:, None], g + a, g) * c[:, None]
    g = tl.where(greedy[:, None], 0.0, g)
    out = g_ptr + rows[:, None] * g_st + j[None, :]
    tl.store(out, to_out_dtype(g, g_ptr.dtype.element_ty, ROUND_ON_GRID), mask=row_ok[:, None] & j_ok[None, :])


class LinearConfig(NamedTuple):
    """Tile sizes of the linear kernels."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def gpu_config(dtype: torch.dtype) -> LinearConfig:
    """A first guess for H = 5120 pending H200 tuning: a 128 x 128 fp32 accumulator is 64
    registers per thread over 8 warps, leaving room for the epilogue's exp/select temporaries
    (254 registers, no spills on sm_90a); 3 stages of 128 x 64 + 128 x 64 16-bit tiles = 96 KB of
    shared memory. fp32 operands (3xTF32) take K = 32: with K = 64 they need 224 KB and spill."""
    return LinearConfig(128, 128, 32 if dtype == torch.float32 else 64, 8, 3)


def linear_config(t: int, v: int, h: int, dtype: torch.dtype) -> LinearConfig:
    """The interpreter's cost is per program: few, large tiles there."""
    if interpreting():
        return LinearConfig(min(64, max(16, triton.next_power_of_2(t))), min(256, max(16, triton.next_power_of_2(v))),
                            min(128, max(16, triton.next_power_of_2(h))), 4, 1)
    return gpu_config(dtype)


def _num_splits(m_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Programs along V per row block: enough for ~2 waves of programs on the GPU; two in the
    interpreter (so the merge always runs there)."""
    if interpreting():
        return min(2, n_tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(2 * sms, m_blocks)))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands: 3xTF32 keeps ~fp32 accuracy on the tensor cores (plain TF32 would put ~1e-3
    # relative error into every logit); 16-bit operands ignore it
    return "tf32x3" if dtype == torch.float32 else "tf32"


def linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, temperature: float,
    temperatures: torch.Tensor | None, logprobs: torch.Tensor, entropy: torch.Tensor, lse: torch.Tensor,
) -> None:
    """Fill ``logprobs``, ``entropy``, ``lse`` fp32 ``[T]`` (T >= 1) from ``hidden`` ``[T, H]`` and
    ``weight`` ``[V, H]`` (same dtype, unit last strides)."""
    n, h = hidden.shape
    v = weight.shape[0]
    cfg = linear_config(n, v, h, hidden.dtype)
    m_blocks, n_tiles = triton.cdiv(n, cfg.block_m), triton.cdiv(v, cfg.block_n)
    n_split = _num_splits(m_blocks, n_tiles, hidden.device)
    tiles_per_split = triton.cdiv(n_tiles, n_split)
    n_split = triton.cdiv(n_tiles, tiles_per_split)
    has_t = temperatures is not None
    track = has_t or temperature <= 0
    part = torch.empty((n_split, _STATS, n), dtype=torch.float32, device=hidden.device)
    arg = torch.empty((n_split, 2, n) if track else (1,), dtype=torch.int32, device=hidden.device)
    temps = temperatures if has_t else part
    t_st = temperatures.stride(0) if has_t else 0
    _linear_fwd_kernel[(m_blocks, n_split)](
        hidden, weight, token_ids, temps, part, arg,
        n, v, h, hidden.stride(0), weight.stride(0), token_ids.stride(0), t_st, temperature, tiles_per_split,
        HAS_TEMPS=has_t, TRACK_ARGMAX=track, UPCAST=interpreting() and hidden.dtype != torch.float32,
        DOT_PRECISION=_dot_precision(hidden.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    block_t = min(1024, triton.next_power_of_2(n))
    _linear_merge_kernel[(triton.cdiv(n, block_t),)](
        part, arg, token_ids, temps, logprobs, entropy, lse,
        n, v, n_split, token_ids.stride(0), t_st, temperature,
        HAS_TEMPS=has_t, TRACK_ARGMAX=track, BLOCK_T=block_t, num_warps=4,
    )


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result (CUDA: 16-bit operands on the tensor cores, fp32 out; the CPU
    has no such overload: upcast there, where only the interpreter tests run)."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def linear_logprobs_backward(
    grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor, grad_lse: torch.Tensor,
    hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, entropy: torch.Tensor,
    lse: torch.Tensor, temperature: float, temperatures: torch.Tensor | None,
    need_grad_hidden: bool, need_grad_weight: bool,
    grad_hidden: torch.Tensor, grad_weight: torch.Tensor, chunk_v: int = BWD_CHUNK_V,
) -> None:
    """Fill ``grad_hidden`` ``[T, H]`` and ``grad_weight`` ``[V, H]`` (contiguous; ``[0, H]`` and
    left alone when not needed): per chunk of ``chunk_v`` columns, the grad-logits ``g``
    ``[T, chunk]`` in the operands' dtype (recomputed by ``_linear_grad_kernel``), then
    ``grad_weight[chunk] = g^T @ hidden`` and ``grad_hidden += g @ weight[chunk]`` (accumulated
    in fp32), each GEMM only for a gradient that is needed."""
    n, h = hidden.shape
    v = weight.shape[0]
    if n == 0 or not (need_grad_hidden or need_grad_weight):
        grad_weight.zero_()
        return
    # the [T] vectors may have any strides (autograd passes sum()'s gradient expanded): the kernel
    # reads them contiguous (T floats each)
    grad_logprobs, grad_entropy, grad_lse, entropy, lse = (
        x.contiguous() for x in (grad_logprobs, grad_entropy, grad_lse, entropy, lse))
    cfg = linear_config(n, min(v, chunk_v), h, hidden.dtype)
    chunk_v = triton.cdiv(chunk_v, cfg.block_n) * cfg.block_n
    has_t = temperatures is not None
    acc = torch.zeros((n, h), dtype=torch.float32, device=hidden.device) if need_grad_hidden else None
    g = torch.empty((n, min(v, chunk_v)), dtype=hidden.dtype, device=hidden.device)
    for v0 in range(0, v, chunk_v):
        cols = min(chunk_v, v - v0)
        _linear_grad_kernel[(triton.cdiv(n, cfg.block_m), triton.cdiv(cols, cfg.block_n))](
            hidden, weight, token_ids, temperatures if has_t else lse, entropy, lse,
            grad_logprobs, grad_entropy, grad_lse, g,
            n, v, h, v0, cols, hidden.stride(0), weight.stride(0), g.stride(0), token_ids.stride(0),
            temperatures.stride(0) if has_t else 0, temperature,
            HAS_TEMPS=has_t, UPCAST=interpreting() and hidden.dtype != torch.float32,
            DOT_PRECISION=_dot_precision(hidden.dtype), ROUND_ON_GRID=interpreting(),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        gc = g[:, :cols]
        if acc is not None:
            acc += _mm_fp32(gc, weight[v0:v0 + cols])
        if need_grad_weight:
            torch.mm(gc.t(), hidden, out=grad_weight[v0:v0 + cols])
    if acc is not None:
        grad_hidden.copy_(acc)


# ---------------------------------------------------------------------------------------------
# Default GPU configurations, for `glm45-bench compile-report` (format: triton_ops/__init__.py)
# at GLM-4.5's LM head: V = 151552, H = 5120, contiguous bf16 operands.
# ---------------------------------------------------------------------------------------------

_TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_V, _H = 151552, 5120


def _token_spec(dtype: torch.dtype, has_t: bool) -> CompileSpec:
    return CompileSpec(
        label=f"{_TL[dtype]} logits V={_V}{', per-row temperature' if has_t else ''}",
        kernel=_token_logprobs_kernel,
        signature={"logits_ptr": f"*{_TL[dtype]}", "ids_ptr": "*i64", "temps_ptr": "*fp32", "lp_ptr": "*fp32",
                   "ent_ptr": "*fp32", "V": "i32", "l_st": "i32", "i_st": "constexpr", "t_st": "constexpr",
                   "temperature": "fp32", "HAS_TEMPS": "constexpr", "BLOCK_V": "constexpr"},
        constexprs={"i_st": 1, "t_st": 1, "HAS_TEMPS": has_t, "BLOCK_V": 16384 // dtype.itemsize},
        options={"num_warps": 8},
        aligned=("V", "l_st"),
    )


def _linear_common(dtype: torch.dtype) -> dict:
    cfg = gpu_config(dtype)
    return {"UPCAST": False, "DOT_PRECISION": _dot_precision(dtype), "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
            "BLOCK_K": cfg.block_k, "i_st": 1, "t_st": 1}


def _options(dtype: torch.dtype) -> dict:
    cfg = gpu_config(dtype)
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _fwd_spec(dtype: torch.dtype, track: bool) -> CompileSpec:
    return CompileSpec(
        label=f"{_TL[dtype]} H={_H} V={_V}{', argmax (per-row temperature)' if track else ''}",
        kernel=_linear_fwd_kernel,
        signature={"h_ptr": f"*{_TL[dtype]}", "w_ptr": f"*{_TL[dtype]}", "ids_ptr": "*i64", "temps_ptr": "*fp32",
                   "part_ptr": "*fp32", "arg_ptr": "*i32", "T": "i32", "V": "i32", "H": "i32", "h_st": "i32",
                   "w_st": "i32", "i_st": "constexpr", "t_st": "constexpr", "temperature": "fp32",
                   "tiles_per_split": "i32", "HAS_TEMPS": "constexpr", "TRACK_ARGMAX": "constexpr",
                   "UPCAST": "constexpr", "DOT_PRECISION": "constexpr",
                   "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
        constexprs={**_linear_common(dtype), "HAS_TEMPS": track, "TRACK_ARGMAX": track},
        options=_options(dtype),
        aligned=("T", "V", "H", "h_st", "w_st"),
    )


def _merge_spec(track: bool) -> CompileSpec:
    return CompileSpec(
        label="T=16384, 3 V splits" + (", argmax (per-row temperature)" if track else ""),
        kernel=_linear_merge_kernel,
        signature={"part_ptr": "*fp32", "arg_ptr": "*i32", "ids_ptr": "*i64", "temps_ptr": "*fp32", "lp_ptr": "*fp32",
                   "ent_ptr": "*fp32", "lse_ptr": "*fp32", "T": "i32", "V": "i32", "n_split": "i32",
                   "i_st": "constexpr", "t_st": "constexpr", "temperature": "fp32", "HAS_TEMPS": "constexpr",
                   "TRACK_ARGMAX": "constexpr", "BLOCK_T": "constexpr"},
        constexprs={"i_st": 1, "t_st": 1, "HAS_TEMPS": track, "TRACK_ARGMAX": track, "BLOCK_T": 1024},
        options={"num_warps": 4},
        aligned=("T", "V"),
    )


def _grad_spec(dtype: torch.dtype) -> CompileSpec:
    return CompileSpec(
        label=f"{_TL[dtype]} H={_H} V={_V} chunk {BWD_CHUNK_V}",
        kernel=_linear_grad_kernel,
        signature={"h_ptr": f"*{_TL[dtype]}", "w_ptr": f"*{_TL[dtype]}", "ids_ptr": "*i64", "temps_ptr": "*fp32",
                   "ent_ptr": "*fp32", "lse_ptr": "*fp32", "glp_ptr": "*fp32", "gent_ptr": "*fp32",
                   "glse_ptr": "*fp32", "g_ptr": f"*{_TL[dtype]}", "T": "i32", "V": "i32", "H": "i32", "v0": "i32",
                   "n_cols": "i32", "h_st": "i32", "w_st": "i32", "g_st": "i32", "i_st": "constexpr",
                   "t_st": "constexpr", "temperature": "fp32", "HAS_TEMPS": "constexpr", "UPCAST": "constexpr",
                   "DOT_PRECISION": "constexpr", "ROUND_ON_GRID": "constexpr",
                   "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
        constexprs={**_linear_common(dtype), "HAS_TEMPS": False, "ROUND_ON_GRID": False},
        options=_options(dtype),
        aligned=("T", "V", "H", "v0", "n_cols", "h_st", "w_st", "g_st"),
    )


COMPILE_SPECS = [
    _token_spec(torch.bfloat16, False),
    _token_spec(torch.bfloat16, True),
    _token_spec(torch.float32, False),
    _fwd_spec(torch.bfloat16, False),
    _fwd_spec(torch.bfloat16, True),
    _fwd_spec(torch.float32, False),
    _merge_spec(False),
    _merge_spec(True),
    _grad_spec(torch.bfloat16),
    _grad_spec(torch.float32),
]
