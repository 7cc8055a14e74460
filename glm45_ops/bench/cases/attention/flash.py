"""Benchmark cases for GQA flash attention (``glm45_ops.attention``: varlen, paged, merge).

Shapes: the preset's heads at TP1 (GLM-4.5: 96 query heads over 8 KV heads) and TP8 (12 over 1,
the group of 12 in one M tile; only when the KV heads split over 8 GPUs), head dim 128, bf16.

* ``attention_varlen`` prefill: one causal sequence of each ``T`` in ``ctx.tokens`` (above 1) and
  the issue's headline, B = 1 at 8192 tokens, causal and not, q/k/v views into a fused QKV
  buffer. FLOPs: ``4 D`` per (query head, key) pair seen, ``T (T + 1) / 2`` pairs causal,
  ``T^2`` not; compute-bound (target >= 550 TFLOP/s and >= 1.0x torch SDPA).
* ``attention_paged`` decode (1 query per sequence) and MTP verify (4 queries, bottom-right
  causal) for the decode batch sizes of ``ctx.tokens`` at 4k and 32k contexts (plus B = 64 at
  8k, the issue's decode target: >= 85% of HBM bandwidth on the KV read; verify within 10% of
  decode), a page size of 16 (vLLM's default) with shuffled pages, and e4m3 caches at B = 64 x 8k.
  Memory-bound: bytes are the K/V read once plus q, out and lse. Cases whose cache would pass
  ``KV_BUDGET_BYTES`` are left out.
* ``merge_attn_states`` at the prefill T: three [T, Hq, D] bf16 tensors and their lse moved once.

On a CPU (``small`` preset) the contexts shrink to the prefill T. Peers (GPU, when importable):
torch SDPA (``enable_gqa``; the paged cases' K/V gathered contiguous outside the timed region,
MTP's bottom-right mask explicit), FlashInfer (single prefill, ``BatchPrefillWithPagedKVCacheWrapper``
for every paged case, its base-2 lse converted) and flash-attn (``flash_attn_varlen_func``,
``flash_attn_with_kvcache``, which refuses pages smaller than 256 in FA2: reported as a skip).
Peers without an lse are compared on ``out`` only.
"""

from __future__ import annotations

import functools
import math

import torch

from glm45_ops import registered_ops
from glm45_ops.attention import attention_paged, attention_varlen, merge_attn_states
from glm45_ops.bench.case import BenchContext, Case, OpRun, Skip, gpu_only, peer_import, randn, require, smoke
from glm45_ops.config import ModelConfig
from glm45_ops.reference.quant import E4M3_MAX, FP8_DTYPE

FAMILY = "attention"
DTYPE = torch.bfloat16
PAGE_SIZE = 16
HEADLINE_PREFILL = 8192
GPU_CONTEXTS = (4096, 32768)
DECODE_TARGET = (64, 8192)  # (B, context) of the decode and MTP targets
MTP_QUERIES = 4  # S + 1 with S = 3 drafts
KV_BUDGET_BYTES = 16 << 30
LN2 = math.log(2)


def _layouts(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """``(name, Hq, Hk)`` of one GPU: TP1, and TP8 where the KV heads split over 8 GPUs."""
    hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    return [("TP1", hq, hk)] + ([("TP8", hq // 8, hk // 8)] if hk % 8 == 0 else [])


def _with_lse(fn):
    """A runner of the op's own arguments that returns ``(out, lse)`` (attention_varlen's Python
    API returns ``out`` unless asked), so ``--refcheck`` compares both."""

    def run(backend, device, *args):
        require(fn, backend, device)
        op = registered_ops()[fn.__name__]
        return OpRun(functools.partial(fn, return_lse=True) if fn is attention_varlen else fn, op, op.bind(args, {}),
                     backend)

    return run


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------

def _sdpa(q, k, v, mask, causal, scale):
    """torch SDPA on ``[B, H, T, D]`` views, GQA by ``enable_gqa``; the result as ``[B*Tq, Hq, D]``."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                           enable_gqa=True)
    return out.transpose(1, 2).flatten(0, 1)


def _varlen_sdpa(device, gen, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    t = lambda x: x.transpose(0, 1)[None]  # noqa: E731  one sequence, Tq == Tk: SDPA's top-left causal agrees
    return smoke("torch SDPA", lambda: _sdpa(t(q), t(k), t(v), None, causal, scale))


def _varlen_flashinfer(device, gen, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    gpu_only("flashinfer", device)
    fn = peer_import("flashinfer", "flashinfer", "single_prefill_with_kv_cache_return_lse")

    def run():
        out, lse = fn(q, k, v, causal=causal, sm_scale=scale)
        return out, (lse.float() * LN2).t()  # FlashInfer's lse is base 2, [T, H]

    return smoke("flashinfer", run)


def _varlen_flash_attn(device, gen, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    gpu_only("flash_attn", device)
    fn = peer_import("flash_attn", "flash_attn", "flash_attn_varlen_func")

    def run():
        out, lse, _ = fn(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal, return_attn_probs=True)
        return out, lse

    return smoke("flash_attn", run)


def _contiguous_kv(k_cache, v_cache, block_table, context):
    """The paged K/V as ``[B, Hk, context, D]`` (every sequence ``context`` keys), for SDPA."""
    b = block_table.shape[0]
    gather = lambda c: c[block_table.long()].reshape(b, -1, *c.shape[2:])[:, :context].transpose(1, 2)  # noqa: E731
    return gather(k_cache).contiguous(), gather(v_cache).contiguous()


def _paged_sdpa(device, gen, q, cu_q, k_cache, v_cache, block_table, seq_lens, scale, causal, max_q, splits, *scales):
    gpu_only("torch SDPA", device)
    if scales:
        raise Skip("torch SDPA has no e4m3 KV cache")
    b, context = block_table.shape[0], k_cache.shape[1] * block_table.shape[1]
    k, v = _contiguous_kv(k_cache, v_cache, block_table, context)
    qb = q.view(b, max_q, *q.shape[1:]).transpose(1, 2)
    i, j = torch.arange(max_q, device=device)[:, None], torch.arange(context, device=device)[None]
    mask = j <= i + context - max_q if max_q > 1 else None  # bottom-right, as SDPA's is_causal is not
    return smoke("torch SDPA", lambda: _sdpa(qb, k, v, mask, False, scale))


def _paged_flashinfer(device, gen, q, cu_q, k_cache, v_cache, block_table, seq_lens, scale, causal, max_q, splits,
                      *scales):
    gpu_only("flashinfer", device)
    wrapper_cls = peer_import("flashinfer", "flashinfer", "BatchPrefillWithPagedKVCacheWrapper")
    b, pages = block_table.shape
    page = k_cache.shape[1]
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=device)
    wrapper = wrapper_cls(workspace, "NHD")
    indptr = torch.arange(b + 1, dtype=torch.int32, device=device) * pages
    last = (seq_lens - (pages - 1) * page).to(torch.int32)
    try:
        wrapper.plan(cu_q, indptr, block_table.flatten(), last, q.shape[1], k_cache.shape[2], q.shape[2], page,
                     causal=causal, sm_scale=scale, q_data_type=q.dtype, kv_data_type=k_cache.dtype)
    except Exception as e:
        raise Skip(f"flashinfer plan failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    kw = {"k_scale": scales[0], "v_scale": scales[1]} if scales else {}

    def run():
        out, lse = wrapper.run(q, (k_cache, v_cache), return_lse=True, **kw)
        return out, (lse.float() * LN2).t()

    return smoke("flashinfer", run)


def _paged_flash_attn(device, gen, q, cu_q, k_cache, v_cache, block_table, seq_lens, scale, causal, max_q, splits,
                      *scales):
    gpu_only("flash_attn", device)
    if scales:
        raise Skip("flash_attn_with_kvcache: no per-head e4m3 scales")
    fn = peer_import("flash_attn", "flash_attn", "flash_attn_with_kvcache")
    qb = q.view(block_table.shape[0], max_q, *q.shape[1:])

    def run():
        out, lse = fn(qb, k_cache, v_cache, cache_seqlens=seq_lens, block_table=block_table, softmax_scale=scale,
                      causal=causal, return_softmax_lse=True)
        return out.flatten(0, 1), lse.transpose(0, 1).flatten(1)

    return smoke("flash_attn", run)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def _prefill_case(layout: str, hq: int, hk: int, d: int, t: int, causal: bool, headline: bool) -> Case:
    def inputs(device: torch.device, gen: torch.Generator):
        qkv = randn((t, hq + 2 * hk, d), DTYPE, device, gen)
        cu = torch.tensor([0, t], dtype=torch.int32, device=device)
        return qkv[:, :hq], qkv[:, hq:hq + hk], qkv[:, hq + hk:], cu, cu, t, t, d**-0.5, causal

    pairs = t * (t + 1) // 2 if causal else t * t
    peers = {"torch SDPA": _varlen_sdpa}
    if headline:
        peers.update({"flashinfer": _varlen_flashinfer, "flash_attn": _varlen_flash_attn})
    return Case(
        family=FAMILY,
        name=f"attention_varlen {layout} prefill T={t}{'' if causal else ' non-causal'}",
        shape=f"q [{t}, {hq}, {d}], kv [{t}, {hk}, {d}] bf16 (QKV views), B=1",
        inputs=inputs,
        run=_with_lse(attention_varlen),
        bytes_moved=2 * t * d * (2 * hq + 2 * hk) + 4 * hq * t,
        flops=4 * d * hq * pairs,
        roofline="compute:bf16",
        peers=peers,
        params={"T": t, "Hq": hq, "Hk": hk, "D": d, "causal": causal, "layout": layout},
    )


def _paged_case(layout: str, hq: int, hk: int, d: int, b: int, context: int, queries: int, fp8: bool) -> Case:
    pages = -(-context // PAGE_SIZE)

    def inputs(device: torch.device, gen: torch.Generator):
        num_pages = b * pages
        k_cache = randn((num_pages, PAGE_SIZE, hk, d), torch.float32, device, gen)
        v_cache = randn((num_pages, PAGE_SIZE, hk, d), torch.float32, device, gen)
        table = torch.randperm(num_pages, generator=gen, device=device).to(torch.int32).view(b, pages)
        seq_lens = torch.full((b,), context, dtype=torch.int32, device=device)
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=device) * queries
        q = randn((b * queries, hq, d), DTYPE, device, gen)
        head = (q, cu_q)
        if not fp8:
            return (*head, k_cache.to(DTYPE), v_cache.to(DTYPE), table, seq_lens, d**-0.5, True, queries, 0)
        scales = [c.abs().amax(dim=(0, 1, 3)) / E4M3_MAX for c in (k_cache, v_cache)]
        k_q, v_q = ((c / s[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE) for c, s in zip((k_cache, v_cache), scales))
        return (*head, k_q, v_q, table, seq_lens, d**-0.5, True, queries, 0, *scales)

    kv_bytes = 2 * b * context * hk * d * (1 if fp8 else DTYPE.itemsize)
    pairs = b * sum(context - queries + 1 + i for i in range(queries))
    kind = "decode" if queries == 1 else f"MTP verify {queries}q"
    return Case(
        family=FAMILY,
        name=f"attention_paged {layout} {kind} B={b} ctx={context}{' e4m3' if fp8 else ''}",
        shape=f"q [{b * queries}, {hq}, {d}], {'e4m3' if fp8 else 'bf16'} cache pages of {PAGE_SIZE}, Hk={hk}",
        inputs=inputs,
        run=_with_lse(attention_paged),
        bytes_moved=kv_bytes + 2 * 2 * b * queries * hq * d + 4 * hq * b * queries,
        flops=4 * d * hq * pairs,
        roofline="memory",
        peers={"torch SDPA": _paged_sdpa, "flashinfer": _paged_flashinfer, "flash_attn": _paged_flash_attn},
        params={"B": b, "context": context, "queries": queries, "Hq": hq, "Hk": hk, "D": d, "page_size": PAGE_SIZE,
                "kv_dtype": "e4m3" if fp8 else "bf16", "layout": layout},
    )


def _merge_case(layout: str, hq: int, d: int, t: int) -> Case:
    def inputs(device: torch.device, gen: torch.Generator):
        return (randn((t, hq, d), DTYPE, device, gen), randn((hq, t), torch.float32, device, gen, std=3.0),
                randn((t, hq, d), DTYPE, device, gen), randn((hq, t), torch.float32, device, gen, std=3.0))

    return Case(
        family=FAMILY,
        name=f"merge_attn_states {layout} T={t}",
        shape=f"2 x out [{t}, {hq}, {d}] bf16 + lse [{hq}, {t}]",
        inputs=inputs,
        run=_with_lse(merge_attn_states),
        bytes_moved=3 * (2 * t * hq * d + 4 * hq * t),
        params={"T": t, "H": hq, "D": d, "layout": layout},
    )


def cases(ctx: BenchContext) -> list[Case]:
    cfg, d = ctx.model, ctx.model.head_dim
    prefill = sorted({t for t in ctx.tokens if t > 1} | ({HEADLINE_PREFILL} if ctx.on_gpu else set()), reverse=True)
    contexts = GPU_CONTEXTS if ctx.on_gpu else (ctx.tokens[0],)
    batches = [t for t in ctx.tokens[1:] if t > 0] or [1]
    out: list[Case] = []
    for layout, hq, hk in _layouts(cfg):
        out += [_prefill_case(layout, hq, hk, d, t, True, t == prefill[0]) for t in prefill]
        out.append(_prefill_case(layout, hq, hk, d, prefill[0], False, True))
        shapes = sorted({(b, c) for b in batches for c in contexts} | ({DECODE_TARGET} if ctx.on_gpu else set()))
        for b, c in shapes:
            if 2 * b * c * hk * d * DTYPE.itemsize <= KV_BUDGET_BYTES:
                out += [_paged_case(layout, hq, hk, d, b, c, q, False) for q in (1, MTP_QUERIES)]
        b, c = DECODE_TARGET if ctx.on_gpu else (batches[0], contexts[0])
        out.append(_paged_case(layout, hq, hk, d, b, c, 1, True))
        out.append(_merge_case(layout, hq, d, prefill[0]))
    return out
