"""The paged KV-cache write (``kv_cache_write``) and the fused ``qk_norm_rope_kv_write``: every
backend writes exactly the reference's bytes at ``slot = page * page_size + offset`` and nothing
else (caches poisoned first: untouched slots, skipped tokens and the other half of a combined
k/v buffer keep their poison bit for bit), FP8 caches dequantize to within e4m3's error and
saturate, and the fused op equals ``qk_norm_rope`` followed by ``kv_cache_write``.
The generic contract tests (tests/test_contract.py) cannot see mutated arguments; these do."""

from __future__ import annotations

import pytest
import torch

from conftest import device_backends
from glm45_ops import attention
from glm45_ops.attention.rope import heads_differ
from glm45_ops.attention.rope_tables import norm_weight, positions, qkv_buffer
from glm45_ops.reference import attention_rope as ref
from glm45_ops.reference.attention_rope import FP8_DTYPE, split_qkv
from glm45_ops.testing import assert_bit_equal

BACKENDS = device_backends()
POISON = 0x7B  # a byte pattern no write produces by chance at every byte


def poisoned_caches(pages, page_size, hk, d, dtype, device, combined=False):
    """(k_cache, v_cache, the whole buffer): ``combined`` makes them views of one
    ``[pages, 2, page_size, Hk, D]`` buffer, as many engines allocate it."""
    shape = (pages, 2, page_size, hk, d) if combined else (2, pages, page_size, hk, d)
    buf = torch.empty(shape, dtype=dtype, device=device)
    buf.view(torch.uint8).fill_(POISON)
    return (buf[:, 0], buf[:, 1], buf) if combined else (buf[0], buf[1], buf)


def slot_mapping(t, pages, page_size, gen, device, skip=(0,), dtype=torch.int64):
    s = torch.randperm(pages * page_size, generator=gen)[:t]
    s[list(skip)] = -1
    return s.to(dtype).to(device)


def expected_cache(cache, x, slots, scale):
    """``cache`` (cloned) with each kept token's ``x`` (or its e4m3 quantization) at its slot."""
    out = cache.clone().cpu()
    ref.kv_cache_write_ref(x.cpu(), x.cpu(), out, out.clone(), slots.cpu(), scale, scale)
    return out


def scales(hk, gen, device):
    return (torch.rand(hk, generator=gen) * 0.02 + 0.005).to(device)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,cache_dtype,combined,slot_dtype", [
    (torch.bfloat16, torch.bfloat16, False, torch.int64),
    (torch.float16, FP8_DTYPE, True, torch.int32),
    (torch.bfloat16, FP8_DTYPE, False, torch.int64),
    (torch.float32, torch.float32, True, torch.int32),
])
def test_writes_exactly_the_kept_slots(device, backend, dtype, cache_dtype, combined, slot_dtype, gen):
    t, hk, d, pages, page_size = 9, 2, 128, 5, 4
    _, k, v = split_qkv(qkv_buffer(t, 4, hk, d, dtype, gen, device), 4, hk)
    kc, vc, _ = poisoned_caches(pages, page_size, hk, d, cache_dtype, device, combined)
    slots = slot_mapping(t, pages, page_size, gen, device, skip=(0, 5), dtype=slot_dtype)
    fp8 = cache_dtype == FP8_DTYPE
    ks, vs = (scales(hk, gen, device), scales(1, gen, device).expand(hk)) if fp8 else (None, None)
    want_k = expected_cache(kc, k, slots, None if ks is None else ks.cpu())
    want_v = expected_cache(vc, v, slots, None if vs is None else vs.cpu())
    attention.kv_cache_write(k, v, kc, vc, slots, ks, vs, backend=backend)
    assert_bit_equal(kc.cpu(), want_k, "k_cache")
    assert_bit_equal(vc.cpu(), want_v, "v_cache")
    # every byte outside the written (page, offset) rows is still the poison
    written = torch.zeros(pages * page_size, dtype=torch.bool)
    written[slots.cpu()[slots.cpu() >= 0].long()] = True
    for cache in (kc, vc):
        rows = cache.cpu().reshape(pages * page_size, -1)
        assert (rows[~written].view(torch.uint8) == POISON).all()
        assert not (rows[written].view(torch.uint8) == POISON).all(dim=1).any()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_page_and_offset_layout(device, backend, gen):
    """Token i at slot s lands in cache[s // page_size, s % page_size] (not a flat reading of
    some other layout): checked index by index."""
    t, hk, d, pages, page_size = 6, 1, 64, 3, 8
    k = torch.randn(t, hk, d, generator=gen).to(torch.bfloat16).to(device)
    kc, vc, _ = poisoned_caches(pages, page_size, hk, d, torch.bfloat16, device)
    slots = torch.tensor([3, 8, 23, -1, 16, 9], device=device)
    attention.kv_cache_write(k, -k, kc, vc, slots, backend=backend)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert_bit_equal(kc[s // page_size, s % page_size], k[i], f"k token {i}")
            assert_bit_equal(vc[s // page_size, s % page_size], -k[i], f"v token {i}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_fp8_dequantizes_within_e4m3_error_and_saturates(device, backend, gen):
    """x ~= e4m3 * scale: within half an e4m3 ulp (2^-4 relative) above 2^-6 * scale, within
    half the subnormal step (2^-10 * scale) below; |x / scale| > 448 saturates to +-448; NaN
    stays NaN; exactly the reference's bytes."""
    t, hk, d = 8, 2, 128
    ks = torch.tensor([0.01, 0.5], device=device)
    k = (torch.randn(t, hk, d, generator=gen) * torch.logspace(-3, 1, d)).to(torch.bfloat16).to(device)
    k[0, 0, :4] = torch.tensor([10.0, -10.0, 4.48, float("nan")])  # 1000 and 448 times the scale, NaN
    kc, vc, _ = poisoned_caches(2, 4, hk, d, FP8_DTYPE, device)
    slots = torch.arange(t, device=device)
    attention.kv_cache_write(k, k, kc, vc, slots, ks, ks, backend=backend)
    q = kc.reshape(t, hk, d)
    assert_bit_equal(q.cpu(), ref.quantize_kv_ref(k.cpu(), ks.cpu()), "the reference's bytes")
    deq = q.float() * ks[:, None]
    x = k.float()
    assert deq[0, 0, :3].tolist() == pytest.approx([4.48, -4.48, 4.48])
    assert deq[0, 0, 3].isnan()
    ok = x.isfinite() & ((x / ks[:, None]).abs() <= 448)
    # (1 + 2^-20: the fp32 roundings of x / scale and of q * scale around an exact half-ulp tie)
    step = torch.where((x / ks[:, None]).abs() >= 2**-6, x.abs() * 2**-4, 2**-10 * ks[:, None].expand_as(x))
    step = step * (1 + 2**-20)
    assert ((deq - x).abs() <= step)[ok].all()


# ---------------------------------------------------------------------------------------------
# The fused op
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("hq,hk,d,r,cache_dtype,norm", [
    (12, 1, 128, 64, torch.bfloat16, (True, True)),  # GLM-4.5 TP8
    (4, 2, 128, 64, FP8_DTYPE, (False, False)),  # Air, FP8 cache
    (2, 1, 64, 18, FP8_DTYPE, (True, False)),
])
def test_fused_equals_the_separate_ops(device, backend, hq, hk, d, r, cache_dtype, norm, gen):
    """``qk_norm_rope_kv_write`` == ``qk_norm_rope`` then ``kv_cache_write(k_out, v)`` on the same
    backend, bit for bit: outputs and both caches (poisoned alike, some tokens skipped)."""
    t, pages, page_size = 7, 3, 4
    q, k, v = split_qkv(qkv_buffer(t, hq, hk, d, torch.bfloat16, gen, device), hq, hk)
    qw, kw = (norm_weight(d, torch.bfloat16, gen, device) if n else None for n in norm)
    pos = positions(t, torch.int64, gen, device, 32)
    table = ref.cos_sin_cache(32, r, 1e6, device)
    slots = slot_mapping(t, pages, page_size, gen, device, skip=(2,), dtype=torch.int32)
    fp8 = cache_dtype == FP8_DTYPE
    ks, vs = (scales(hk, gen, device), scales(hk, gen, device)) if fp8 else (None, None)
    fused_k, fused_v, _ = poisoned_caches(pages, page_size, hk, d, cache_dtype, device, combined=True)
    sep_k, sep_v, _ = poisoned_caches(pages, page_size, hk, d, cache_dtype, device, combined=True)
    got = attention.qk_norm_rope_kv_write(q, k, v, qw, kw, pos, table, fused_k, fused_v, slots, 1e-5, r, ks, vs,
                                          backend=backend)
    want = attention.qk_norm_rope(q, k, qw, kw, pos, table, 1e-5, r, backend=backend)
    attention.kv_cache_write(want[1], v, sep_k, sep_v, slots, ks, vs, backend=backend)
    for g, w, name in zip((*got, fused_k, fused_v), (*want, sep_k, sep_v), ("q_out", "k_out", "k_cache", "v_cache")):
        assert_bit_equal(g, w, f"{backend} {name}")
    ref_out = ref.qk_norm_rope_ref(*(x.cpu() if x is not None else None for x in (q, k, qw, kw, pos, table)), 1e-5, r)
    for g, w, wt in zip(got, ref_out, (qw, kw)):
        assert heads_differ(g.cpu(), w, normed=wt is not None) is None
