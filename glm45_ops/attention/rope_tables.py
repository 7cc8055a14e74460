"""Contract tables of :mod:`glm45_ops.attention.rope`: sample inputs and bad inputs per op.

Samples are small (the Triton interpreter pays per program: one per head here) but cover what
breaks fused RoPE kernels: GLM-4.5's 12 q heads over 1 kv head (TP8), q/k/v as strided views
into the fused QKV projection, partial rotation (R = 64 of 128, and halves that are not a power
of two), no norm (GLM-4.5-Air), one norm only, D = 64, every dtype, int32 and int64 indices,
FP8 caches with per-head scales, caches that are views of one combined buffer, skipped slots.
"""

from __future__ import annotations

import torch

from glm45_ops._registry import ErrorInput, Sample
from glm45_ops.reference.attention_rope import FP8_DTYPE, cos_sin_cache, split_qkv

MAX_POS = 40
THETA = 1e4  # over 40 positions a smaller theta than GLM's 1e6 turns even the slow pairs visibly

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


def qkv_buffer(t: int, hq: int, hk: int, d: int, dtype: torch.dtype, gen: torch.Generator, device,
               extra_cols: int = 0) -> torch.Tensor:
    """A fused QKV projection ``[T, (hq + 2 hk) * d]``, each head at its own scale (1e-2..1e2), as
    a view of a buffer ``extra_cols`` wider (a row stride that is not the width)."""
    heads = hq + 2 * hk
    scale = torch.logspace(-2, 2, heads).repeat_interleave(d)
    buf = torch.randn(t, heads * d + extra_cols, generator=gen) * torch.cat((scale, torch.ones(extra_cols)))
    return buf.to(dtype).to(device)[:, : heads * d]


def norm_weight(d: int, dtype: torch.dtype, gen: torch.Generator, device) -> torch.Tensor:
    return (0.5 + torch.rand(d, generator=gen)).to(dtype).to(device)


def positions(t: int, dtype: torch.dtype, gen: torch.Generator, device, max_pos: int = MAX_POS) -> torch.Tensor:
    """Random positions, the last one ``max_pos - 1`` (the table's last row)."""
    p = torch.randint(0, max_pos, (t,), generator=gen)
    if t:
        p[-1] = max_pos - 1
    return p.to(dtype).to(device)


def _rope_args(t, hq, hk, d, r, dtype, gen, device, norm=(True, True), pos_dtype=torch.int64):
    """(q, k, v, q_norm_weight, k_norm_weight, positions, cos_sin_cache) with q, k, v views of one QKV buffer."""
    q, k, v = split_qkv(qkv_buffer(t, hq, hk, d, dtype, gen, device), hq, hk)
    qw, kw = (norm_weight(d, dtype, gen, device) if n else None for n in norm)
    return q, k, v, qw, kw, positions(t, pos_dtype, gen, device), cos_sin_cache(MAX_POS, r, THETA, device)


def _nonfinite(*heads: torch.Tensor) -> None:
    """NaN in one head, +inf in another, -inf in a third (of the first tensor with enough heads)."""
    q = heads[0]
    q[0, 0, 5] = float("nan")
    q[1, 1, 70 % q.shape[2]] = float("inf")
    heads[-1][2, 0, 3] = -float("inf")


def _slots(t: int, pages: int, page_size: int, dtype: torch.dtype, gen: torch.Generator, device,
           skip: int = 1) -> torch.Tensor:
    """``t`` distinct slots of ``pages * page_size``, the first ``skip`` of them -1 (skipped)."""
    s = torch.randperm(pages * page_size, generator=gen)[:t]
    s[:skip] = -1
    return s.to(dtype).to(device)


def _caches(pages: int, page_size: int, hk: int, d: int, dtype: torch.dtype, device, combined: bool = False):
    """k and v caches full of a poison value (a write must replace it); ``combined``: views into
    one ``[pages, 2, page_size, Hk, D]`` buffer."""
    shape = (pages, 2, page_size, hk, d) if combined else (2, pages, page_size, hk, d)
    buf = torch.full(shape, -7.0, device=device).to(dtype)
    return (buf[:, 0], buf[:, 1]) if combined else (buf[0], buf[1])


def _scales(hk: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    return ((torch.rand(hk, generator=gen) * 0.05 + 0.01).to(device),
            (torch.rand(1, generator=gen) * 0.05 + 0.01).to(device).expand(hk))


# ---------------------------------------------------------------------------------------------
# qk_norm_rope
# ---------------------------------------------------------------------------------------------

def qk_norm_rope_samples(device, gen) -> list[Sample]:
    def s(t, hq, hk, d, r, dtype, nonfinite=False, **kw):
        q, k, _, qw, kw_, pos, table = _rope_args(t, hq, hk, d, r, dtype, gen, device, **kw)
        if nonfinite:
            _nonfinite(q, k)
        return (q, k, qw, kw_, pos, table) + (() if r == 64 else (1e-5, r))

    wide = torch.randn(6, 8, 64, generator=gen).to(bf16).to(device)
    head_strided = (wide[:, ::2], wide[:, 1::4], None, norm_weight(64, bf16, gen, device),
                    positions(6, torch.int32, gen, device), cos_sin_cache(MAX_POS, 32, THETA, device), 1e-6, 32)
    return [
        Sample(s(5, 12, 1, 128, 64, bf16), note="GLM-4.5 TP8 heads, views into QKV"),
        Sample(s(7, 4, 2, 128, 64, bf16, norm=(False, False), pos_dtype=torch.int32), note="GLM-4.5-Air: no norm"),
        Sample(s(3, 2, 1, 64, 32, fp16, norm=(True, False)), note="D=64, q norm only"),
        Sample(s(4, 2, 2, 128, 128, fp32, norm=(False, True)), note="full rotation, k norm only"),
        Sample(s(3, 1, 1, 64, 6, fp32), note="R=6: halves of 3"),
        Sample(s(2, 2, 1, 64, 22, bf16, norm=(False, False)), note="R=22 without norm"),
        Sample(head_strided, note="head strides 2D and 4D"),
        Sample(s(0, 12, 1, 128, 64, bf16), tag="empty"),
        Sample(s(0, 2, 2, 64, 64, fp16, norm=(False, False)), tag="empty"),
        Sample(s(4, 3, 2, 128, 64, bf16, nonfinite=True), tag="nonfinite"),
        Sample(s(4, 3, 2, 64, 32, fp32, nonfinite=True, norm=(False, False)), tag="nonfinite"),
    ]


def _qnr_base(device):
    q = torch.randn(4, 2, 128, device=device).to(bf16)
    k = torch.randn(4, 1, 128, device=device).to(bf16)
    w = torch.ones(128, device=device).to(bf16)
    pos = torch.arange(4, device=device)
    return q, k, w, w, pos, cos_sin_cache(MAX_POS, 64, THETA, device)


def qk_norm_rope_errors(device) -> list[ErrorInput]:
    q, k, w, _, pos, table = _qnr_base(device)

    def e(match, exc=ValueError, raw=True, fake=True, **changed):
        names = ("q", "k", "q_norm_weight", "k_norm_weight", "positions", "cos_sin_cache")
        args = dict(zip(names, (q, k, w, w, pos, table)))
        args.update(changed)
        return ErrorInput(tuple(args.values())[:6], {k_: v for k_, v in args.items() if k_ in ("eps", "rotary_dim")},
                          exc=exc, match=match, raw=raw, fake=fake)

    return [
        e("q must be bfloat16, float16 or float32, got torch.int32", q=q.to(torch.int32)),
        e(r"q must be 3-D \[T, Hq, D\], got shape \(4, 256\)", q=q.flatten(1)),
        e("q: the head dim D=96 must be 64 or 128", q=q[..., :96], k=k[..., :96]),
        e("k must have q's dtype torch.bfloat16, got torch.float16", k=k.half()),
        e(r"k must be \[T=4, Hk, D=128\] \(T and D from q\), got shape \(3, 1, 128\)", k=k[:3]),
        e(r"k must be \[T=4, Hk, D=128\]", k=k[..., :64]),
        e("q must be contiguous in its last dim", q=torch.randn(4, 128, 2, device=device).to(bf16).transpose(1, 2)),
        e("k is on meta but q is on", k=k.to("meta")),
        e("q_norm_weight must have q's dtype torch.bfloat16, got torch.float32", q_norm_weight=w.float()),
        e(r"k_norm_weight must have shape \[D=128\], got \[64\]", k_norm_weight=w[:64]),
        e("k_norm_weight must be contiguous in its last dim", k_norm_weight=w.repeat(2)[::2]),
        e("positions must be int32 or int64, got torch.float32", positions=pos.float()),
        e(r"positions must have shape \[T=4\], got \[4, 1\]", positions=pos[:, None]),
        e("cos_sin_cache must be float32, got torch.bfloat16", cos_sin_cache=table.to(bf16)),
        e(r"cos_sin_cache must be 2-D \[max_pos >= 1, rotary_dim\], got shape \(2560,\)",
          cos_sin_cache=table.flatten()),
        e(r"cos_sin_cache must be 2-D \[max_pos >= 1, rotary_dim\], got shape \(0, 64\)", cos_sin_cache=table[:0]),
        e("cos_sin_cache is on meta but q is on", cos_sin_cache=table.to("meta")),
        e(r"rotary_dim must be even and in \[2, D=128\], got 63", rotary_dim=63),
        e(r"rotary_dim must be even and in \[2, D=128\], got 0", rotary_dim=0, cos_sin_cache=table[:, :0]),
        e(r"rotary_dim must be even and in \[2, D=128\], got 130", rotary_dim=130),
        e(r"cos_sin_cache must have rotary_dim=32 columns \(cos, then sin\), got 64", rotary_dim=32),
        e(r"positions must be in \[0, max_pos=40\) \(the rows of cos_sin_cache\), got 40 at index 2", fake=False,
          positions=torch.tensor([0, 1, 40, -1], device=device)),
        e(r"positions must be in \[0, max_pos=40\).*got -1 at index 3", fake=False,
          positions=torch.tensor([0, 1, 39, -1], dtype=torch.int32, device=device)),
        e("q must be torch.Tensor, got str", exc=TypeError, raw=False, q="q"),
        e("rotary_dim must be int, got float", exc=TypeError, raw=False, rotary_dim=64.0),
    ]


# ---------------------------------------------------------------------------------------------
# qk_norm_rope_
# ---------------------------------------------------------------------------------------------

def qk_norm_rope_inplace_samples(device, gen) -> list[Sample]:
    def s(t, hq, hk, d, r, dtype, norm=(True, True), nonfinite=False, extra_cols=0):
        qkv = qkv_buffer(t, hq, hk, d, dtype, gen, device, extra_cols)
        if nonfinite:
            _nonfinite(*split_qkv(qkv, hq, hk)[:2])
        qw, kw = (norm_weight(d, dtype, gen, device) if n else None for n in norm)
        return (qkv, qw, kw, positions(t, torch.int64, gen, device), cos_sin_cache(MAX_POS, r, THETA, device), hq, hk,
                1e-5, r)

    return [
        Sample(s(5, 12, 1, 128, 64, bf16), note="GLM-4.5 TP8"),
        Sample(s(3, 4, 2, 64, 32, fp16, norm=(False, False), extra_cols=64), note="no norm, row stride > width"),
        Sample(s(2, 2, 1, 128, 10, fp32, norm=(False, True)), note="R=10, k norm only"),
        Sample(s(0, 12, 1, 128, 64, bf16), tag="empty"),
        Sample(s(4, 3, 2, 128, 64, bf16, nonfinite=True), tag="nonfinite"),
    ]


def qk_norm_rope_inplace_errors(device) -> list[ErrorInput]:
    qkv = torch.randn(4, 4 * 128, device=device).to(bf16)
    _, _, w, _, pos, table = _qnr_base(device)

    def e(match, qkv=qkv, heads=(2, 1), fake=True, **kw):
        return ErrorInput((qkv, w, w, kw.get("positions", pos), kw.get("cos_sin_cache", table), *heads),
                          {"rotary_dim": kw["rotary_dim"]} if "rotary_dim" in kw else {}, match=match, fake=fake)

    return [
        e("qkv must be bfloat16, float16 or float32, got torch.float64", qkv=qkv.double()),
        e(r"qkv must be 2-D \[T, \(Hq \+ 2 \* Hk\) \* D\], got shape \(4, 4, 128\)", qkv=qkv.view(4, 4, 128)),
        e("num_q_heads and num_kv_heads must be >= 1, got 4 and 0", heads=(4, 0)),
        e(r"qkv must have \(num_q_heads \+ 2 \* num_kv_heads\) \* D = 5 \* D columns with D 64 or 128, got 512",
          heads=(3, 1)),
        e(r"qkv must have \(num_q_heads \+ 2 \* num_kv_heads\) \* D = 16 \* D columns with D 64 or 128, got 512",
          heads=(14, 1)),
        e("qkv must be contiguous in its last dim", qkv=torch.randn(512, 4, device=device).to(bf16).t()),
        e(r"positions must have shape \[T=4\], got \[3\]", positions=pos[:3]),
        e(r"cos_sin_cache must have rotary_dim=128 columns", rotary_dim=128),
        e(r"positions must be in \[0, max_pos=40\)", fake=False, positions=torch.tensor([0, 50, 1, 2], device=device)),
    ]


# ---------------------------------------------------------------------------------------------
# kv_cache_write
# ---------------------------------------------------------------------------------------------

def kv_cache_write_samples(device, gen) -> list[Sample]:
    def s(t, hk, d, dtype, cache_dtype, pages=4, page_size=4, slot_dtype=torch.int64, combined=False,
          nonfinite=False):
        _, k, v = split_qkv(qkv_buffer(t, 2, hk, d, dtype, gen, device), 2, hk)
        if nonfinite:
            _nonfinite(k, v)
        kc, vc = _caches(pages, page_size, hk, d, cache_dtype, device, combined)
        scales = _scales(hk, gen, device) if cache_dtype == FP8_DTYPE else ()
        return (k, v, kc, vc, _slots(t, pages, page_size, slot_dtype, gen, device), *scales)

    return [
        Sample(s(6, 2, 128, bf16, bf16), note="bf16 cache, views into QKV, one skipped token"),
        Sample(s(7, 1, 128, bf16, FP8_DTYPE, slot_dtype=torch.int32), note="FP8, GLM-4.5 TP8 (Hk=1)"),
        Sample(s(5, 2, 64, fp16, FP8_DTYPE, pages=3, page_size=2, combined=True), note="FP8, combined k/v buffer"),
        Sample(s(3, 3, 64, fp32, fp32, pages=2, page_size=16, combined=True), note="fp32, combined k/v buffer"),
        Sample(s(0, 2, 128, bf16, bf16), tag="empty"),
        Sample(s(0, 1, 64, bf16, FP8_DTYPE), tag="empty"),
        Sample(s(4, 2, 128, bf16, FP8_DTYPE, nonfinite=True), tag="nonfinite"),
        Sample(s(4, 2, 64, fp16, fp16, nonfinite=True), tag="nonfinite"),
    ]


def _kv_base(device, cache_dtype=bf16):
    k = torch.randn(4, 2, 128, device=device).to(bf16)
    kc = torch.zeros(3, 4, 2, 128, device=device).to(cache_dtype)
    return k, k.clone(), kc, kc.clone(), torch.tensor([0, 5, -1, 11], device=device)


def _kv_error(args, match, exc=ValueError, raw=True, fake=True, **changed):
    names = ("k", "v", "k_cache", "v_cache", "slot_mapping", "k_scale", "v_scale")
    full = dict(zip(names, args))
    full.update(changed)
    return ErrorInput(tuple(full.get(n) for n in names), exc=exc, match=match, raw=raw, fake=fake)


def kv_cache_write_errors(device) -> list[ErrorInput]:
    base = _kv_base(device)
    k, _, kc, _, slots = base
    fp8 = (*_kv_base(device, FP8_DTYPE), torch.ones(2, device=device), torch.ones(2, device=device))
    e = lambda match, **kw: _kv_error(base, match, **kw)  # noqa: E731
    e8 = lambda match, **kw: _kv_error(fp8, match, **kw)  # noqa: E731
    return [
        e("k must be bfloat16, float16 or float32, got torch.int64", k=k.long()),
        e(r"k must be 3-D \[T, Hk, D\], got shape \(4, 256\)", k=k.flatten(1)),
        e("k: the head dim D=96 must be 64 or 128", k=k[..., :96], v=k[..., :96], k_cache=kc[..., :96],
          v_cache=kc[..., :96]),
        e("v must have k's dtype torch.bfloat16, got torch.float32", v=k.float()),
        e(r"v must have k's shape \(4, 2, 128\), got \(4, 1, 128\)", v=k[:, :1]),
        e("v must be contiguous in its last dim", v=torch.randn(4, 128, 2, device=device).to(bf16).transpose(1, 2)),
        e("v is on meta but k is on", v=k.to("meta")),
        e(r"k_cache must be 4-D \[num_pages, page_size, Hk=2, D=128\], got shape \(12, 2, 128\)",
          k_cache=kc.flatten(0, 1)),
        e(r"k_cache must be 4-D \[num_pages, page_size, Hk=2, D=128\], got shape \(3, 4, 1, 128\)",
          k_cache=kc[:, :, :1]),
        e(r"v_cache must have k_cache's shape \(3, 4, 2, 128\), got \(3, 2, 2, 128\)", v_cache=kc[:, :2]),
        e("k_cache must be k's dtype torch.bfloat16 or torch.float8_e4m3fn, got torch.float16",
          k_cache=kc.half(), v_cache=kc.half()),
        e("v_cache must have k_cache's dtype torch.bfloat16, got torch.float8_e4m3fn", v_cache=kc.to(FP8_DTYPE)),
        e("k_cache must be contiguous in its last dim", k_cache=kc.transpose(2, 3).contiguous().transpose(2, 3)),
        e("v_cache is on meta but k is on", v_cache=kc.to("meta")),
        e("slot_mapping must be int32 or int64, got torch.int16", slot_mapping=slots.short()),
        e(r"slot_mapping must have shape \[T=4\], got \[2\]", slot_mapping=slots[:2]),
        e("k_scale is only for float8_e4m3fn caches, the caches are torch.bfloat16",
          k_scale=torch.ones(2, device=device)),
        e8(r"k_scale is required with float8_e4m3fn caches \(fp32 per-head scales \[Hk\]\)", k_scale=None),
        e8(r"v_scale is required with float8_e4m3fn caches", v_scale=None),
        e8("v_scale must be float32, got torch.bfloat16", v_scale=torch.ones(2, device=device).to(bf16)),
        e8(r"k_scale must have shape \[Hk=2\] \(a per-tensor scale: scale.expand\(2\)\), got \[1\]",
           k_scale=torch.ones(1, device=device)),
        e8("k_scale is on meta but k is on", k_scale=torch.ones(2, device="meta")),
        e(r"slot_mapping must be < num_pages \* page_size = 12 \(negative skips a token\), got 12 at index 1",
          fake=False, slot_mapping=torch.tensor([0, 12, -1, 11], device=device)),
        e("k_cache must be torch.Tensor, got NoneType", exc=TypeError, raw=False, k_cache=None),
    ]


# ---------------------------------------------------------------------------------------------
# qk_norm_rope_kv_write
# ---------------------------------------------------------------------------------------------

def qk_norm_rope_kv_write_samples(device, gen) -> list[Sample]:
    def s(t, hq, hk, d, r, dtype, cache_dtype, norm=(True, True), nonfinite=False, combined=False, pages=4,
          page_size=4):
        q, k, v, qw, kw, pos, table = _rope_args(t, hq, hk, d, r, dtype, gen, device, norm)
        if nonfinite:
            _nonfinite(q, k, v)
        kc, vc = _caches(pages, page_size, hk, d, cache_dtype, device, combined)
        scales = _scales(hk, gen, device) if cache_dtype == FP8_DTYPE else ()
        slots = _slots(t, pages, page_size, torch.int32, gen, device)
        return (q, k, v, qw, kw, pos, table, kc, vc, slots, 1e-5, r, *scales)

    return [
        Sample(s(5, 12, 1, 128, 64, bf16, bf16), note="GLM-4.5 TP8, bf16 cache"),
        Sample(s(6, 4, 2, 128, 64, bf16, FP8_DTYPE, norm=(False, False)), note="Air, FP8 cache"),
        Sample(s(3, 2, 1, 64, 14, fp16, FP8_DTYPE, norm=(True, False), combined=True), note="R=14, combined FP8 cache"),
        Sample(s(4, 2, 2, 64, 64, fp32, fp32, combined=True, pages=2, page_size=8), note="fp32, full rotation"),
        Sample(s(0, 12, 1, 128, 64, bf16, FP8_DTYPE), tag="empty"),
        Sample(s(4, 3, 2, 128, 64, bf16, FP8_DTYPE, nonfinite=True), tag="nonfinite"),
        Sample(s(4, 3, 2, 64, 32, bf16, bf16, norm=(False, False), nonfinite=True), tag="nonfinite"),
    ]


def qk_norm_rope_kv_write_errors(device) -> list[ErrorInput]:
    q, k, w, _, pos, table = _qnr_base(device)
    _, v, kc, vc, slots = _kv_base(device)
    k = k.expand(4, 2, 128)
    args = dict(q=q, k=k, v=v, q_norm_weight=w, k_norm_weight=w, positions=pos, cos_sin_cache=table, k_cache=kc,
                v_cache=vc, slot_mapping=slots, eps=1e-5, rotary_dim=64, k_scale=None, v_scale=None)

    def e(match, fake=True, **changed):
        return ErrorInput(tuple({**args, **changed}.values()), match=match, fake=fake)

    return [
        e("q must be bfloat16, float16 or float32, got torch.float64", q=q.double()),
        e(r"k must be \[T=4, Hk, D=128\] \(T and D from q\), got shape \(4, 2, 64\)", k=k[..., :64]),
        e(r"rotary_dim must be even and in \[2, D=128\], got 3", rotary_dim=3),
        e(r"v must have k's shape \(4, 2, 128\), got \(4, 1, 128\)", v=v[:, :1]),
        e(r"k_cache must be 4-D \[num_pages, page_size, Hk=2, D=128\]", k_cache=kc[0]),
        e("k_scale is required with float8_e4m3fn caches", k_cache=kc.to(FP8_DTYPE), v_cache=vc.to(FP8_DTYPE)),
        e(r"slot_mapping must be < num_pages \* page_size = 12", fake=False,
          slot_mapping=torch.tensor([0, 1, 2, 30], device=device)),
        e(r"positions must be in \[0, max_pos=40\)", fake=False, positions=torch.tensor([0, 1, 2, 40], device=device)),
    ]
