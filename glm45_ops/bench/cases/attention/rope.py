"""Benchmark cases for the attention prologue (``glm45_ops.attention``: ``qk_norm_rope``, its
in-place and cache-writing variants, ``kv_cache_write``).

Shapes: the preset's heads at TP8 (GLM-4.5: 12 query heads over 1 KV head) and TP1 (96 over
8), head dim 128, R = 64 rotated dims, bf16, the norm where the preset has it (GLM-4.5, not
Air), q/k/v as views into the fused QKV projection, for every ``T`` in ``ctx.tokens``; the cache
writes into pages of 16 (vLLM's default) at random slots, bf16 and e4m3 with per-head scales.
All memory-bound: bytes are q and k (and v) read once, the outputs written once, the positions,
the table rows and the slots (target: >= 85% of HBM bandwidth).

Peers (GPU, when importable): ``torch.compile`` of the reference (headline cases), vLLM's
``fused_qk_norm_rope`` (norm) or ``rotary_embedding`` (no norm), sgl-kernel's
``fused_qk_norm_rope``, FlashInfer's ``apply_rope_with_cos_sin_cache_inplace`` (no norm), and
vLLM's ``reshape_and_cache_flash`` for the cache writes. The in-place peers rewrite their own
copy of the QKV buffer, and vLLM's kernels take the table in the model dtype.
"""

from __future__ import annotations

import functools

import torch

from glm45_ops import attention
from glm45_ops.bench.case import BenchContext, Case, Skip, compile_peer, gpu_only, op_runner, peer_import, randn, smoke
from glm45_ops.config import ModelConfig
from glm45_ops.reference import attention_rope as ref
from glm45_ops.reference import cdiv

FAMILY = "attention"
DTYPE = torch.bfloat16
PAGE_SIZE = 16
MAX_POSITION = 32768  # the table's rows: 8 MB of fp32 at R = 64
FP8 = ref.FP8_DTYPE


def _layouts(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """``(name, Hq, Hk)`` of one GPU: TP8 where the KV heads split over 8 GPUs, and TP1."""
    hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    return ([("TP8", hq // 8, hk // 8)] if hk % 8 == 0 else []) + [("TP1", hq, hk)]


class _Shape:
    """One layer's attention prologue on one GPU."""

    def __init__(self, cfg: ModelConfig, t: int, hq: int, hk: int):
        self.t, self.hq, self.hk, self.d = t, hq, hk, cfg.head_dim
        self.r = int(cfg.head_dim * cfg.partial_rotary_factor)
        self.theta, self.eps, self.norm = cfg.rope_theta, cfg.rms_norm_eps, cfg.use_qk_norm
        self.pages = cdiv(t, PAGE_SIZE) + 1

    def head_bytes(self, heads: int) -> int:
        return self.t * heads * self.d * DTYPE.itemsize

    def rope_bytes(self) -> int:
        """q and k read and written once, positions (int64) and one table row per token."""
        return 2 * self.head_bytes(self.hq + self.hk) + self.t * (8 + 4 * self.r)

    def cache_bytes(self, cache_dtype: torch.dtype) -> int:
        """k and v read once and written once into the cache, int32 slots."""
        return 2 * self.head_bytes(self.hk) + 2 * self.t * self.hk * self.d * cache_dtype.itemsize + 4 * self.t

    def qkv(self, device, gen):
        heads = self.hq + 2 * self.hk
        return randn((self.t, heads * self.d), DTYPE, device, gen)

    def rope_inputs(self, device, gen):
        """(qkv, q_norm_weight, k_norm_weight, positions, cos_sin_cache)."""
        w = [(1 + randn((self.d,), torch.float32, device, gen, 0.1)).to(DTYPE) if self.norm else None for _ in "qk"]
        pos = torch.randint(0, MAX_POSITION, (self.t,), generator=gen, device=device)
        return (self.qkv(device, gen), *w, pos, ref.cos_sin_cache(MAX_POSITION, self.r, self.theta, device))

    def cache_inputs(self, cache_dtype, device, gen):
        """(k_cache, v_cache, slot_mapping, k_scale, v_scale)."""
        shape = (self.pages, PAGE_SIZE, self.hk, self.d)
        caches = [torch.zeros(shape, dtype=cache_dtype, device=device) for _ in "kv"]
        slots = torch.randperm(self.pages * PAGE_SIZE, generator=gen, device=device)[: self.t].int()
        scales = [torch.rand(self.hk, generator=gen, device=device) * 0.01 + 0.01 if cache_dtype == FP8 else None
                  for _ in "kv"]
        return (*caches, slots, *scales)

    def split(self, qkv):
        return ref.split_qkv(qkv, self.hq, self.hk)


# ---------------------------------------------------------------------------------------------
# Peers: factory(device, gen, *inputs, s=shape) -> runner, or Skip
# ---------------------------------------------------------------------------------------------

def _rope_compiled(device, gen, qkv, qw, kw, pos, table, *, s):
    fn = compile_peer(functools.partial(ref.qk_norm_rope_ref, eps=s.eps, rotary_dim=s.r), device)
    q, k, _ = s.split(qkv)
    return smoke("torch.compile", lambda: fn(q, k, qw, kw, pos, table))


def _rope_vllm(device, gen, qkv, qw, kw, pos, table, *, s):
    gpu_only("vllm", device)
    ops = peer_import("vllm", "vllm._custom_ops")
    own, cache = qkv.clone(), table.to(qkv.dtype)
    if s.norm:
        return smoke("vllm", lambda: ops.fused_qk_norm_rope(own, s.hq, s.hk, s.hk, s.d, s.eps, qw, kw, cache, True,
                                                             pos))
    q, k = own[:, : s.hq * s.d], own[:, s.hq * s.d : (s.hq + s.hk) * s.d]
    return smoke("vllm", lambda: ops.rotary_embedding(pos, q, k, s.d, cache, True))


def _rope_sgl_kernel(device, gen, qkv, qw, kw, pos, table, *, s):
    gpu_only("sgl_kernel", device)
    if not s.norm:
        raise Skip("sgl_kernel's fused_qk_norm_rope always applies the norm")
    fn = peer_import("sgl_kernel", "sgl_kernel", "fused_qk_norm_rope")
    own = qkv.clone()
    # (qkv, heads q/k/v, head_dim, eps, weights, base, is_neox, positions, yarn factor, low, high,
    # attention factor, rotary_dim): plain RoPE is factor 1 with attention factor 1
    return smoke("sgl_kernel", lambda: fn(own, s.hq, s.hk, s.hk, s.d, s.eps, qw, kw, s.theta, True, pos, 1.0, 0.0,
                                          0.0, 1.0, s.r))


def _rope_flashinfer(device, gen, qkv, qw, kw, pos, table, *, s):
    gpu_only("flashinfer", device)
    if s.norm:
        raise Skip("flashinfer's RoPE has no QK-Norm")
    fn = peer_import("flashinfer", "flashinfer.rope", "apply_rope_with_cos_sin_cache_inplace")
    own = qkv.clone()
    q, k = own[:, : s.hq * s.d], own[:, s.hq * s.d : (s.hq + s.hk) * s.d]
    return smoke("flashinfer", lambda: fn(pos, q, k, s.d, table, True))


def _cache_vllm(device, gen, k, v, k_cache, v_cache, slots, k_scale, v_scale):
    gpu_only("vllm", device)
    fn = peer_import("vllm", "vllm._custom_ops", "reshape_and_cache_flash")
    fp8 = k_cache.dtype == FP8
    # vLLM takes one scale per tensor: the first head's
    ks, vs = (k_scale[:1], v_scale[:1]) if fp8 else (torch.ones(1, device=device),) * 2
    kc, vc = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if fp8 else (k_cache, v_cache)
    return smoke("vllm", lambda: fn(k, v, kc, vc, slots.long(), "fp8" if fp8 else "auto", ks, vs))


def _peers(factories: dict, headline: bool, s: _Shape) -> dict:
    """Bound to the case's shape; torch.compile (an inductor compile per case) on headline cases only."""
    return {n: functools.partial(f, s=s) for n, f in factories.items() if headline or n != "torch.compile"}


_ROPE_PEERS = {"torch.compile": _rope_compiled, "vllm": _rope_vllm, "sgl_kernel": _rope_sgl_kernel,
               "flashinfer": _rope_flashinfer}


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def _fmt(s: _Shape, what: str) -> str:
    return f"T={s.t} {s.hq}/{s.hk} heads D={s.d} R={s.r}{'' if s.norm else ' no norm'} {what}"


def _rope_case(s: _Shape, layout: str, headline: bool) -> Case:
    def run(backend, device, qkv, qw, kw, pos, table):
        q, k, _ = s.split(qkv)
        return op_runner(attention.qk_norm_rope, backend, device, q, k, qw, kw, pos, table, s.eps, s.r)

    return Case(
        family=FAMILY, name=f"qk_norm_rope {layout} T={s.t}", shape=_fmt(s, "bf16 views into QKV"),
        inputs=s.rope_inputs, run=run, bytes_moved=s.rope_bytes(),
        peers=_peers(_ROPE_PEERS, headline, s),
        params={"T": s.t, "Hq": s.hq, "Hk": s.hk, "D": s.d, "rotary_dim": s.r, "norm": s.norm},
    )


def _inplace_case(s: _Shape, layout: str) -> Case:
    def run(backend, device, qkv, qw, kw, pos, table):
        return op_runner(attention.qk_norm_rope_, backend, device, qkv, qw, kw, pos, table, s.hq, s.hk, s.eps, s.r)

    return Case(
        family=FAMILY, name=f"qk_norm_rope_ {layout} T={s.t}", shape=_fmt(s, "bf16 in place on QKV"),
        inputs=s.rope_inputs, run=run, bytes_moved=s.rope_bytes(),
        params={"T": s.t, "Hq": s.hq, "Hk": s.hk, "D": s.d, "rotary_dim": s.r, "norm": s.norm},
    )


def _cache_case(s: _Shape, layout: str, cache_dtype: torch.dtype) -> Case:
    kind = "e4m3" if cache_dtype == FP8 else "bf16"

    def inputs(device, gen):
        _, k, v = s.split(s.qkv(device, gen))
        return (k, v, *s.cache_inputs(cache_dtype, device, gen))

    return Case(
        family=FAMILY, name=f"kv_cache_write {layout} {kind} T={s.t}", shape=_fmt(s, f"bf16 -> {kind} pages of 16"),
        inputs=inputs, run=lambda backend, device, *args: op_runner(attention.kv_cache_write, backend, device, *args),
        bytes_moved=s.cache_bytes(cache_dtype), peers={"vllm": _cache_vllm},
        params={"T": s.t, "Hk": s.hk, "D": s.d, "page_size": PAGE_SIZE, "cache": kind},
    )


def _fused_case(s: _Shape, layout: str, cache_dtype: torch.dtype) -> Case:
    kind = "e4m3" if cache_dtype == FP8 else "bf16"

    def inputs(device, gen):
        return (*s.rope_inputs(device, gen), *s.cache_inputs(cache_dtype, device, gen))

    def run(backend, device, qkv, qw, kw, pos, table, kc, vc, slots, ks, vs):
        q, k, v = s.split(qkv)
        return op_runner(attention.qk_norm_rope_kv_write, backend, device, q, k, v, qw, kw, pos, table, kc, vc, slots,
                         s.eps, s.r, ks, vs)

    return Case(
        family=FAMILY, name=f"qk_norm_rope_kv_write {layout} {kind} T={s.t}", shape=_fmt(s, f"bf16 -> {kind} cache"),
        inputs=inputs, run=run, bytes_moved=s.rope_bytes() + s.cache_bytes(cache_dtype) - s.head_bytes(s.hk),
        params={"T": s.t, "Hq": s.hq, "Hk": s.hk, "D": s.d, "rotary_dim": s.r, "norm": s.norm, "cache": kind},
        notes="k is read once for both its output and its cache row",
    )


def cases(ctx: BenchContext) -> list[Case]:
    out: list[Case] = []
    for layout, hq, hk in _layouts(ctx.model):
        for i, t in enumerate(ctx.tokens):
            s = _Shape(ctx.model, t, hq, hk)
            out += [_rope_case(s, layout, headline=i == 0), _inplace_case(s, layout),
                    _cache_case(s, layout, DTYPE), _cache_case(s, layout, FP8), _fused_case(s, layout, FP8)]
    return out
