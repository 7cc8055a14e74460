"""GQA flash attention for GLM-4.5 (96 query heads over 8 KV heads: groups of 12), packed or paged.

Ops (schemas below, defaults there and nowhere else; definitions, the empty-row rule and NaN/inf
in :mod:`glm45_ops.reference.attention`):

* ``attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale,
  causal=True) -> (out, lse)``: packed sequences (prefill); ``k``/``v`` may be strided views into
  the fused QKV output.
* ``attention_paged(q, cu_seqlens_q, k_cache, v_cache, block_table, seq_lens, sm_scale,
  causal=True, max_seqlen_q=-1, num_splits=0, k_scale=None, v_scale=None) -> (out, lse)``: any
  number of queries per sequence against a paged KV cache (decode 1, MTP verify S+1, chunked
  prefill), bf16/fp16 or e4m3 caches; split-KV for long contexts.
* ``merge_attn_states(out_a, lse_a, out_b, lse_b) -> (out, lse)``: two partial states over
  disjoint keys combined (cascade attention, chunked prefill, split-KV).

``lse`` is always fp32 ``[Hq, Tq]`` (natural log; FlashAttention's and vLLM's layout), ``-inf``
for rows that see no key (whose ``out`` is 0). Causality is bottom-right aligned. ``max_seqlen_*``
and ``num_splits`` size the launch grid, so no op syncs with the host; the values of
``cu_seqlens_*``, ``seq_lens`` and ``block_table`` are checked on CPU tensors only (on a GPU the
kernels clamp them into the tensors, and the rows they compute are then unspecified).

Backends: ``torch`` (reference, fp32 math per sequence) and ``triton``
(``triton_ops.attention``: FlashAttention-2 online softmax with a GQA group packed per tile).
They agree within :func:`_compare_states`' tolerance, not bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

from glm45_ops._registry import Op
from glm45_ops.attention import flash_tables as tables
from glm45_ops.reference import attention as ref
from glm45_ops.reference.attention import LSE_DTYPE
from glm45_ops.reference.quant import FP8_DTYPE

__all__ = ["HEAD_DIMS", "MAX_PAGE_SIZE", "attention_paged", "attention_varlen", "merge_attn_states"]

HEAD_DIMS = (64, 128)  # the kernels' tiles; GLM-4.5's is 128
MAX_PAGE_SIZE = 256
_GPU_DTYPES = (torch.bfloat16, torch.float16)
# Output tolerance per dtype, relative to |out| + max|v| (out is a convex combination of v rows):
# 4 unit roundoffs: the reference's and the kernel's final rounding, and, on the GPU, p rounded
# to the operand dtype before the P @ V tensor-core product (relative error u on each weight).
# fp32 (CPU only): exp2 / summation order, ~1e-6.
_OUT_TOL = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9, torch.float32: 2.0**-16}
_LSE_TOL = 2.0**-20  # relative, beyond the score error: exp2/log2 (approx.ftz on the GPU: 2^-22)


# ---------------------------------------------------------------------------------------------
# Checks shared by the ops
# ---------------------------------------------------------------------------------------------

def _real_cpu(t: torch.Tensor) -> bool:
    """Whether ``t``'s values may be read here without a host sync or a fake tensor."""
    return t.device.type == "cpu" and not is_fake(t) and not torch.compiler.is_compiling()


def _check_qkv(name: str, t: torch.Tensor, dims: str, ndim: int, fp8_ok: bool = False) -> None:
    allowed = (*_GPU_DTYPES, torch.float32) + ((FP8_DTYPE,) if fp8_ok else ())
    if t.dtype not in allowed:
        names = "bfloat16, float16, float32" + (" or float8_e4m3fn" if fp8_ok else "")
        raise ValueError(f"{name} must be {names}, got {t.dtype}")
    if t.dtype == torch.float32 and t.device.type != "cpu":
        raise ValueError(f"{name} must be bfloat16 or float16 on {t.device} (float32 runs on CPU only)")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {dims}, got shape {tuple(t.shape)}")
    if t.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{name}: head dim {t.shape[-1]} is not supported (choose from {HEAD_DIMS})")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {tuple(t.stride())}")


def _check_heads(hq: int, kv_name: str, hk: int) -> None:
    if hk == 0 or hq % hk:
        raise ValueError(f"the query heads (q.shape[1] = {hq}) must be a multiple of {kv_name}'s KV heads "
                         f"({kv_name}.shape[-2] = {hk})")


def _check_int32(name: str, t: torch.Tensor, ndim: int, dims: str) -> None:
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {dims}, got shape {tuple(t.shape)}")


def _check_cu_values(name: str, cu: torch.Tensor, total: int, max_len: int, max_name: str, covers: bool) -> list[int]:
    """Nondecreasing within [0, total] (from 0 to total when ``covers``), no length above
    ``max_len`` (-1: unbounded). Real CPU tensors only."""
    values = cu.tolist()
    if not values:
        raise ValueError(f"{name} must have at least one element (B + 1 >= 1)")
    if covers and (values[0] != 0 or values[-1] != total):
        raise ValueError(f"{name} must run from 0 to {total} (every query row in one sequence), "
                         f"got {values[0]} .. {values[-1]}")
    prev = 0
    for i, v in enumerate(values):
        if v < prev or v > total:
            raise ValueError(f"{name} must be nondecreasing within [0, {total}], got {name}[{i}] = {v}")
        if i and max_len >= 0 and v - values[i - 1] > max_len:
            raise ValueError(f"{max_name} = {max_len} is below sequence {i - 1}'s length {v - values[i - 1]} "
                             f"({name})")
        prev = v
    return values


def _check_sm_scale(sm_scale: float) -> None:
    if not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale must be finite, got {sm_scale!r}")


def _same_device(**tensors: torch.Tensor | None) -> None:
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{', '.join(devices)} must be on one device, got {sorted(map(str, set(devices.values())))}")


# ---------------------------------------------------------------------------------------------
# Comparison with the reference
# ---------------------------------------------------------------------------------------------

def _finite_absmax(*ts: torch.Tensor) -> float:
    vals = [t.detach().double().abs()[torch.isfinite(t)].max().item() for t in ts if torch.isfinite(t).any()]
    return max(vals, default=0.0)


def _score_error(q: torch.Tensor, k: torch.Tensor, sm_scale: float) -> float:
    """A bound on an fp32 score's summation error, doubled (the kernel's and the reference's):
    ``D * 2^-24 * |sm_scale| * max|q_i| * max|k_j|`` (Euclidean norms; the 16-bit products are exact)."""
    if q.numel() == 0 or k.numel() == 0:
        return 0.0
    norm = lambda t: t.double().nan_to_num(0, 0, 0).norm(dim=-1).max().item()  # noqa: E731
    return 2 * q.shape[-1] * 2.0**-24 * abs(sm_scale) * norm(q) * norm(k)


def _compare_states(got, want, vmax: float, score_err: float) -> str | None:
    """``(out, lse)`` against the reference's: the same non-finite rows (out: finite or not; lse:
    NaN and ``-inf`` exactly), out exactly 0 where lse is ``-inf``, and finite values within
    ``_OUT_TOL * (|out| + max|v|) + score_err * max|v|`` and ``_LSE_TOL * (1 + |lse|) + score_err``.
    ``got`` may be ``out`` alone (a benchmark peer without lse): then ``out`` is compared."""
    (wo, wl) = (t.detach().cpu() for t in want)
    if isinstance(got, torch.Tensor):
        go, gl = got.detach().cpu(), wl
    else:
        go, gl = (t.detach().cpu() for t in got)
    for what, g, w in (("out", go, wo), ("lse", gl, wl)):
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"{what}: {g.dtype}{list(g.shape)} vs reference {w.dtype}{list(w.shape)}"
    if not torch.equal(torch.isfinite(go), torch.isfinite(wo)):
        bad = [int((~torch.isfinite(t)).sum()) for t in (go, wo)]
        return f"out: non-finite at {bad[0]} values, the reference at {bad[1]}"
    for what, mask in (("NaN", torch.isnan), ("-inf", lambda t: t == float("-inf"))):
        if not torch.equal(mask(gl), mask(wl)):
            return f"lse: {what} at {int(mask(gl).sum())} rows, the reference at {int(mask(wl).sum())}"
    empty = (gl == float("-inf")).t()  # [Tq, Hq]
    if go.numel() and not bool((go[empty] == 0).all()):
        return "out: rows that see no key are not 0"
    fo, tol = torch.isfinite(wo), _OUT_TOL[wo.dtype]
    excess = (go.double() - wo.double()).abs() - (tol * (wo.double().abs() + vmax) + score_err * vmax)
    if fo.any() and excess[fo].max() > 0:
        i = int(excess.where(fo, -1).argmax())
        return (f"out: {int((excess[fo] > 0).sum())} values beyond the tolerance, worst {go.flatten()[i].item()!r} vs "
                f"{wo.flatten()[i].item()!r}")
    fl = torch.isfinite(wl)
    lse_excess = (gl.double() - wl.double()).abs() - (_LSE_TOL * (1 + wl.double().abs()) + score_err)
    if fl.any() and lse_excess[fl].max() > 0:
        return (f"lse: {int((lse_excess[fl] > 0).sum())} values beyond the tolerance, worst excess "
                f"{lse_excess[fl].max().item():.3g}")
    return None


# ---------------------------------------------------------------------------------------------
# attention_varlen
# ---------------------------------------------------------------------------------------------

def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale, causal):
    _check_qkv("q", q, "[Tq, Hq, D]", 3)
    _check_qkv("k", k, "[Tk, Hk, D]", 3)
    _check_qkv("v", v, "[Tk, Hk, D]", 3)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if k.shape != v.shape or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k and v must have one shape [Tk, Hk, D] with q's D, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)} and v {tuple(v.shape)}")
    _check_heads(q.shape[1], "k", k.shape[1])
    _check_int32("cu_seqlens_q", cu_seqlens_q, 1, "[B + 1]")
    _check_int32("cu_seqlens_k", cu_seqlens_k, 1, "[B + 1]")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.numel() == 0:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [B + 1] with B >= 0, got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    _check_sm_scale(sm_scale)
    _same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if _real_cpu(cu_seqlens_q):
        _check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", covers=True)
        _check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", covers=False)


def _alloc_states(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((q.shape[1], q.shape[0]), dtype=LSE_DTYPE, device=q.device))


def _varlen_alloc(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale, causal):
    return _alloc_states(q)


def _varlen_launch(outs, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale, causal):
    from triton_ops import attention as ta

    ta.attention(q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k,
                 sm_scale, causal, *outs)


def _varlen_compare(got, want, args) -> str | None:
    q, k, v, *_, sm_scale, causal = args
    return _compare_states(got, want, _finite_absmax(v), _score_error(q, k, sm_scale))


_varlen_op = Op(
    "attention_varlen",
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
    "float sm_scale, bool causal=True) -> (Tensor, Tensor)",
    check=_check_varlen,
    alloc=_varlen_alloc,
    torch_impl=ref.attention_varlen_ref,
    triton_launch=_varlen_launch,
    compare=_varlen_compare,
    samples=tables.varlen_samples,
    errors=tables.varlen_errors,
)

_VARLEN_DEFAULTS = {a.name: a.default for a in _varlen_op.args}  # the schema's, for the wrapper's signature


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    sm_scale: float,
    causal: bool = _VARLEN_DEFAULTS["causal"],
    *,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences (prefill): ``out`` ``[Tq, Hq, D]`` in q's dtype, and with
    ``return_lse`` also ``lse`` fp32 ``[Hq, Tq]``.

    ``q`` ``[Tq, Hq, D]``, ``k``/``v`` ``[Tk, Hk, D]`` (bf16/fp16, fp32 on CPU; unit last stride,
    any other strides: views into a fused QKV output work), ``Hq`` a multiple of ``Hk``, D 64 or
    128; ``cu_seqlens_q``/``_k`` int32 ``[B + 1]`` (``cu_seqlens_q`` from 0 to Tq); ``max_seqlen_*``
    at least every sequence's length (they size the grid: no host sync). Causal attention is
    bottom-right aligned (query ``i`` sees keys ``<= i + Tk_b - Tq_b``); a row that sees no key
    gives out 0 and lse ``-inf``. Definition: :mod:`glm45_ops.reference.attention`.
    """
    out, lse = _varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale, causal,
                          backend=backend)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# attention_paged
# ---------------------------------------------------------------------------------------------

def _check_paged(q, cu_seqlens_q, k_cache, v_cache, block_table, seq_lens, sm_scale, causal, max_seqlen_q,
                 num_splits, k_scale, v_scale):
    _check_qkv("q", q, "[Tq, Hq, D]", 3)
    _check_qkv("k_cache", k_cache, "[num_pages, page_size, Hk, D]", 4, fp8_ok=True)
    _check_qkv("v_cache", v_cache, "[num_pages, page_size, Hk, D]", 4, fp8_ok=True)
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype or k_cache.shape[-1] != q.shape[-1]:
        raise ValueError(f"k_cache and v_cache must share a shape [num_pages, page_size, Hk, D] (q's D) and a dtype, "
                         f"got q {tuple(q.shape)}, k_cache {k_cache.dtype}{list(k_cache.shape)} and "
                         f"v_cache {v_cache.dtype}{list(v_cache.shape)}")
    fp8 = k_cache.dtype == FP8_DTYPE
    if not fp8 and k_cache.dtype != q.dtype:
        raise ValueError(f"k_cache must be q's dtype ({q.dtype}) or float8_e4m3fn, got {k_cache.dtype}")
    page_size = k_cache.shape[1]
    if page_size & (page_size - 1) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size (k_cache.shape[1]) must be a power of two in [1, {MAX_PAGE_SIZE}], got {page_size}")
    _check_heads(q.shape[1], "k_cache", k_cache.shape[2])
    hk = k_cache.shape[2]
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not fp8 and scale is not None:
            raise ValueError(f"{name} is for float8_e4m3fn caches only (the caches are {k_cache.dtype})")
        if fp8 and (scale is None or scale.dtype != torch.float32 or tuple(scale.shape) != (hk,)):
            got = "None" if scale is None else f"{scale.dtype}{list(scale.shape)}"
            raise ValueError(f"{name} must be float32 [Hk = {hk}] for float8_e4m3fn caches, got {got}")
    _check_int32("cu_seqlens_q", cu_seqlens_q, 1, "[B + 1]")
    _check_int32("seq_lens", seq_lens, 1, "[B]")
    _check_int32("block_table", block_table, 2, "[B, max_pages]")
    b = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != b + 1 or block_table.shape[0] != b:
        raise ValueError(f"cu_seqlens_q must be [B + 1] and block_table [B, max_pages] for seq_lens [B = {b}], got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(block_table.shape)}")
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:
        raise ValueError(f"block_table must have a unit last stride, got strides {tuple(block_table.stride())}")
    if max_seqlen_q < -1:
        raise ValueError(f"max_seqlen_q must be -1 (unknown: q.shape[0] bounds it) or >= 0, got {max_seqlen_q}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0: chosen per call, 1: no split), got {num_splits}")
    _check_sm_scale(sm_scale)
    _same_device(q=q, cu_seqlens_q=cu_seqlens_q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                 seq_lens=seq_lens, k_scale=k_scale, v_scale=v_scale)
    if _real_cpu(seq_lens):
        _check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", covers=True)
        capacity = block_table.shape[1] * page_size
        for i, n in enumerate(seq_lens.tolist()):
            if not 0 <= n <= capacity:
                raise ValueError(f"seq_lens must be in [0, max_pages * page_size = {capacity}], got seq_lens[{i}] = {n}")
            used = block_table[i, : -(-n // page_size)]
            if used.numel() and (used.min() < 0 or used.max() >= k_cache.shape[0]):
                raise ValueError(f"block_table[{i}] names pages outside [0, num_pages = {k_cache.shape[0]}) among the "
                                 f"{used.numel()} that seq_lens[{i}] = {n} uses")


def _paged_alloc(q, *args):
    return _alloc_states(q)


def _paged_launch(outs, q, cu_seqlens_q, k_cache, v_cache, block_table, seq_lens, sm_scale, causal, max_seqlen_q,
                  num_splits, k_scale, v_scale):
    from triton_ops import attention as ta

    fp8 = k_scale is not None
    ta.attention(q, k_cache, v_cache, cu_seqlens_q.contiguous(), seq_lens.contiguous(),
                 q.shape[0] if max_seqlen_q < 0 else max_seqlen_q, block_table.shape[1] * k_cache.shape[1], sm_scale,
                 causal, *outs, block_table=block_table, k_scale=k_scale.contiguous() if fp8 else None,
                 v_scale=v_scale.contiguous() if fp8 else None, num_splits=num_splits)


def _paged_compare(got, want, args) -> str | None:
    q, cu_q, k_cache, v_cache, block_table, seq_lens, sm_scale, causal, max_q, splits, k_scale, v_scale = args
    k, v, _ = ref.gather_paged_kv(k_cache, v_cache, block_table, seq_lens, k_scale, v_scale)
    return _compare_states(got, want, _finite_absmax(v.float()), _score_error(q, k.float(), sm_scale))


_paged_op = Op(
    "attention_paged",
    "(Tensor q, Tensor cu_seqlens_q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
    "float sm_scale, bool causal=True, int max_seqlen_q=-1, int num_splits=0, Tensor? k_scale=None, "
    "Tensor? v_scale=None) -> (Tensor, Tensor)",
    check=_check_paged,
    alloc=_paged_alloc,
    torch_impl=ref.attention_paged_ref,
    triton_launch=_paged_launch,
    compare=_paged_compare,
    samples=tables.paged_samples,
    errors=tables.paged_errors,
)

attention_paged = _paged_op.api(
    """Attention of packed queries against a paged KV cache (decode, MTP verify, chunked prefill)
    -> ``(out [Tq, Hq, D] in q's dtype, lse fp32 [Hq, Tq])``.

    ``q`` ``[Tq, Hq, D]`` (bf16/fp16, fp32 on CPU; unit last stride) packed by ``cu_seqlens_q``
    int32 ``[B + 1]`` (from 0 to Tq); ``k_cache``/``v_cache`` ``[num_pages, page_size, Hk, D]``
    in q's dtype, or float8_e4m3fn with fp32 ``k_scale``/``v_scale`` ``[Hk]`` (``k = stored *
    k_scale[h]``); page_size a power of two up to 256; ``block_table`` int32 ``[B, max_pages]``
    (page ids, unit last stride; entries past a sequence's pages are never read); ``seq_lens``
    int32 ``[B]`` counting the new keys too. Causal attention is bottom-right aligned: the Tq_b
    queries are the sequence's last positions. ``max_seqlen_q`` bounds the queries per sequence
    (-1: ``q.shape[0]``, correct but it launches idle programs); ``num_splits`` cuts long contexts
    into up to that many chunks merged afterwards (0: chosen from the grid and the GPU; 1: off;
    at most 64).
    Definition: :mod:`glm45_ops.reference.attention`.
    """
)


# ---------------------------------------------------------------------------------------------
# merge_attn_states
# ---------------------------------------------------------------------------------------------

def _check_merge(out_a, lse_a, out_b, lse_b):
    if out_a.dtype not in (*_GPU_DTYPES, torch.float32):
        raise ValueError(f"out_a must be bfloat16, float16 or float32, got {out_a.dtype}")
    if out_a.dim() != 3 or out_a.shape[-1] == 0:
        raise ValueError(f"out_a must be 3-D [T, H, D] with D >= 1, got shape {tuple(out_a.shape)}")
    if out_b.shape != out_a.shape or out_b.dtype != out_a.dtype:
        raise ValueError(f"out_b must match out_a ({out_a.dtype}{list(out_a.shape)}), got {out_b.dtype}{list(out_b.shape)}")
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {tuple(t.stride())}")
    t_, h = out_a.shape[:2]
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.dtype != LSE_DTYPE or tuple(lse.shape) != (h, t_):
            raise ValueError(f"{name} must be float32 [H, T] = [{h}, {t_}], got {lse.dtype}{list(lse.shape)}")
    _same_device(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)


def _merge_alloc(out_a, lse_a, out_b, lse_b):
    return (torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device),
            torch.empty(lse_a.shape, dtype=LSE_DTYPE, device=out_a.device))


def _merge_launch(outs, out_a, lse_a, out_b, lse_b):
    from triton_ops import attention as ta

    ta.merge_attn_states(out_a, lse_a, out_b, lse_b, *outs)


def _merge_compare(got, want, args) -> str | None:
    out_a, lse_a, out_b, lse_b = args
    return _compare_states(got, want, _finite_absmax(out_a, out_b), 0.0)


_merge_op = Op(
    "merge_attn_states",
    "(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)",
    check=_check_merge,
    alloc=_merge_alloc,
    torch_impl=ref.merge_attn_states_ref,
    triton_launch=_merge_launch,
    compare=_merge_compare,
    samples=tables.merge_samples,
    errors=tables.merge_errors,
)

merge_attn_states = _merge_op.api(
    """Merge two attention states over disjoint key sets -> ``(out [T, H, D] in out_a's dtype,
    lse fp32 [H, T])``, as if all their keys had been attended at once (cascade attention, a
    chunked prefill's cached and new keys, split-KV).

    ``out_a``/``out_b`` ``[T, H, D]`` (bf16/fp16/fp32, one dtype, unit last stride), ``lse_a``/
    ``lse_b`` fp32 ``[H, T]`` (natural log, any strides: the ``lse`` the attention ops return).
    A state with lse ``-inf`` is empty and its ``out`` is ignored; both empty give out 0 and lse
    ``-inf``. Definition: :func:`glm45_ops.reference.attention.merge_attn_states_ref`.
    """
)

OPS = (_varlen_op, _paged_op, _merge_op)
