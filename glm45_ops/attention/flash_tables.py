"""Contract tables of :mod:`glm45_ops.attention.flash`: random inputs, samples and bad inputs.

The input builders (:func:`packed`, :func:`paged`, :func:`states`) are shared with the tests.
Samples are small (the Triton interpreter pays per program and per key tile) but cover what
breaks GQA attention kernels: GLM-4.5's 12 query heads over 1 KV head (TP8) and groups of 6 and
1, k/v as strided views into the fused QKV output, k and v (caches, merge states) with strides
unlike each other's, Tq < Tk, Tq > Tk (rows that see no key), decode / MTP verify / chunked
prefill against shuffled pages with garbage (NaN, huge values) in every slot and table entry a
sequence does not use, split-KV, e4m3 caches with per-head scales, empty states in the merge,
and NaN/inf where the reference defines the result.
"""

from __future__ import annotations

import torch

from glm45_ops._registry import ErrorInput, Sample
from glm45_ops.reference.quant import E4M3_MAX, FP8_DTYPE


def cu_seqlens(lens, device="cpu") -> torch.Tensor:
    """int32 ``[B + 1]`` cumulative lengths, from 0."""
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32, device=device)


def packed(lens_q, lens_k, hq, hk, head_dim, dtype, gen, device, *, qkv_buffer=False, v_head_major=False):
    """Random packed ``(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` for the
    given per-sequence lengths; ``qkv_buffer``: k and v are strided views into one fused
    ``[T, Hq + 2 Hk, D]`` QKV output (q too, when the lengths agree); ``v_head_major``: v stored
    as ``[Hk, Tk, D]``, so its token and head strides are not k's (a kernel that addresses v
    with k's strides reads the wrong rows)."""
    tq, tk = sum(lens_q), sum(lens_k)
    rand = lambda *shape: torch.randn(shape, generator=gen, device=gen.device).to(dtype).to(device)  # noqa: E731
    if qkv_buffer:
        buf = rand(max(tq, tk), hq + 2 * hk, head_dim)
        q, k, v = buf[:tq, :hq], buf[:tk, hq:hq + hk], buf[:tk, hq + hk:]
    else:
        q, k, v = rand(tq, hq, head_dim), rand(tk, hk, head_dim), rand(tk, hk, head_dim)
    if v_head_major:
        v = v.transpose(0, 1).contiguous().transpose(0, 1)
    return q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device), max(lens_q, default=0), max(lens_k, default=0)


def _dtype_here(device, dtype: torch.dtype) -> torch.dtype:
    """fp32 samples where fp32 runs (CPU), bf16 elsewhere."""
    return dtype if torch.device(device).type == "cpu" or dtype != torch.float32 else torch.bfloat16


def varlen_samples(device, gen):
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, _dtype_here(device, torch.float32)
    p = lambda *a, **kw: packed(*a, gen, device, **kw)  # noqa: E731
    bad = p([3, 4], [5, 4], 12, 2, 64, fp32)
    bad[0][1, 3, 7] = float("nan")  # one query row NaN
    bad[1][6, 1, 0] = float("inf")  # a seen key: scores +-inf (NaN rows where +inf)
    bad[2][0, 0, 5] = float("nan")  # key 0: seen by every row of sequence 0's first KV head
    tq_gt_tk = p([9, 2], [4, 2], 12, 1, 128, bf16)
    return [
        Sample((*p([1, 17, 5], [1, 17, 20], 12, 1, 128, bf16), 128**-0.5), note="GLM-4.5 TP8 group of 12, Tq < Tk"),
        Sample((*p([17, 6], [17, 40], 12, 2, 64, fp16, qkv_buffer=True), 0.125, False),
               note="group 6, k/v views into a QKV buffer, not causal"),
        Sample((*p([33, 2], [33, 2], 2, 2, 64, fp32), 0.125), note="group 1 (MHA), fp32"),
        Sample((*p([5, 9], [12, 9], 12, 2, 128, bf16, v_head_major=True), 0.09),
               note="k and v with their own strides (v head-major)"),
        Sample((*tq_gt_tk, 0.1), note="Tq > Tk causal: leading rows see no key"),
        Sample((*p([0, 0], [0, 0], 12, 1, 128, bf16), 0.1), tag="empty", note="Tq = Tk = 0"),
        Sample((*p([3, 2], [0, 0], 12, 1, 64, bf16), 0.1, False), tag="empty", note="no keys: out 0, lse -inf"),
        Sample((*bad, 0.125), tag="nonfinite", note="NaN q row, inf in a key, NaN in v at key 0"),
    ]


def varlen_errors(device):
    q, k, v, cq, ck, mq, mk = packed([3, 5], [4, 6], 12, 2, 64, torch.bfloat16, torch.Generator(), device)
    ok = (q, k, v, cq, ck, mq, mk, 0.125)

    def with_(**kw):
        names = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "sm_scale")
        return tuple(kw.get(n, a) for n, a in zip(names, ok))

    errors = [
        ErrorInput(with_(q=q.to(torch.int32)), match="q must be bfloat16, float16, float32, got torch.int32"),
        ErrorInput(with_(q=q[0]), match=r"q must be 3-D \[Tq, Hq, D\], got shape \(12, 64\)"),
        ErrorInput(with_(q=torch.zeros(8, 12, 96, dtype=torch.bfloat16, device=device)),
                   match=r"q: head dim 96 is not supported \(choose from \(64, 128\)\)"),
        ErrorInput(with_(k=torch.zeros(64, 2, 10, dtype=torch.bfloat16, device=device).transpose(0, 2)),
                   match="k must be contiguous in its last dim"),
        ErrorInput(with_(v=v.half()), match="q, k and v must share a dtype"),
        ErrorInput(with_(v=v[:-1]), match=r"k and v must have one shape \[Tk, Hk, D\]"),
        ErrorInput(with_(k=torch.zeros(10, 5, 64, dtype=torch.bfloat16, device=device),
                         v=torch.zeros(10, 5, 64, dtype=torch.bfloat16, device=device)),
                   match=r"the query heads \(q.shape\[1\] = 12\) must be a multiple of k's KV heads \(k.shape\[-2\] = 5\)"),
        ErrorInput(with_(cu_seqlens_q=cq.long()), match="cu_seqlens_q must be int32, got torch.int64"),
        ErrorInput(with_(cu_seqlens_k=ck[None]), match=r"cu_seqlens_k must be 1-D \[B \+ 1\]"),
        ErrorInput(with_(cu_seqlens_k=ck[:2]), match=r"cu_seqlens_q and cu_seqlens_k must both be \[B \+ 1\]"),
        ErrorInput(with_(max_seqlen_q=-1), match="max_seqlen_q must be >= 0, got -1"),
        ErrorInput(with_(sm_scale=float("nan")), match="sm_scale must be finite, got nan"),
        ErrorInput(with_(cu_seqlens_k=ck.to("meta")), match="q, k, v, cu_seqlens_q, cu_seqlens_k must be on one device"),
        ErrorInput(with_(q="q"), exc=TypeError, match="q must be torch.Tensor, got str", raw=False),
        ErrorInput((*ok, 1), exc=TypeError, match="causal must be bool, got int", raw=False),
    ]
    if torch.device(device).type == "cpu":
        cu = lambda *vals: torch.tensor(vals, dtype=torch.int32)  # noqa: E731
        errors += [ErrorInput(with_(**kw), match=m, fake=False) for kw, m in (
            ({"cu_seqlens_q": cu(0, 3, 7)}, r"cu_seqlens_q must run from 0 to 8 \(every query row in one sequence\)"),
            ({"cu_seqlens_q": cu(0, 9, 8)}, r"nondecreasing within \[0, 8\], got cu_seqlens_q\[1\] = 9"),
            ({"cu_seqlens_k": cu(0, 5, 4)}, r"nondecreasing within \[0, 10\], got cu_seqlens_k\[2\] = 4"),
            ({"cu_seqlens_k": cu(0, 4, 11)}, r"got cu_seqlens_k\[2\] = 11"),
            ({"max_seqlen_q": 4}, r"max_seqlen_q = 4 is below sequence 1's length 5 \(cu_seqlens_q\)"),
            ({"max_seqlen_k": 5}, r"max_seqlen_k = 5 is below sequence 1's length 6 \(cu_seqlens_k\)"),
        )]
    return errors


def paged(lens_q, lens_k, hq, hk, head_dim, page_size, dtype, gen, device, *, cache_dtype=None, spare_pages=3,
          garbage=float("nan"), v_head_major=False):
    """Random ``(q, cu_seqlens_q, k_cache, v_cache, block_table, seq_lens)`` (plus ``k_scale``,
    ``v_scale`` for an e4m3 ``cache_dtype``): pages shuffled, ``spare_pages`` never used, table
    entries past each sequence's pages and every unused slot filled with ``garbage`` (-1 in the
    table). ``v_head_major``: v_cache a ``[num_pages, page_size, Hk, D]`` view of a ``[num_pages,
    Hk + 1, page_size, D]`` buffer (HND pages with a spare head), so its page, slot and head
    strides all differ from k_cache's."""
    rand = lambda *shape: torch.randn(shape, generator=gen, device=gen.device)  # noqa: E731
    b = len(lens_q)
    pages_per = [-(-n // page_size) for n in lens_k]
    num_pages = sum(pages_per) + spare_pages
    max_pages = max(pages_per, default=0) + 1
    order = torch.randperm(num_pages, generator=gen, device=gen.device)
    table = torch.full((b, max_pages), -1, dtype=torch.int32)
    k_cache = torch.full((num_pages, page_size, hk, head_dim), garbage)
    v_cache = torch.full((num_pages, page_size, hk, head_dim), garbage)
    k, v = rand(sum(lens_k), hk, head_dim), rand(sum(lens_k), hk, head_dim)
    scales = None
    if cache_dtype == FP8_DTYPE:  # per-head scales as kv_cache_write computes them
        scales = [t.abs().amax(dim=(0, 2)).clamp(min=1e-4) / E4M3_MAX if t.numel() else torch.ones(hk) for t in (k, v)]
        k, v = ((t / s[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).float() for t, s in zip((k, v), scales))
    start, used = 0, 0
    for i, n in enumerate(lens_k):
        for p in range(pages_per[i]):
            page = int(order[used])
            table[i, p] = page
            rows = slice(start + p * page_size, start + min(n, (p + 1) * page_size))
            k_cache[page, : rows.stop - rows.start] = k[rows]
            v_cache[page, : rows.stop - rows.start] = v[rows]
            used += 1
        start += n
    store = cache_dtype or dtype
    d = lambda t: t.to(device)  # noqa: E731
    k_cache, v_cache = d(k_cache.to(store)), d(v_cache.to(store))
    if v_head_major:  # built on the device: moving a view there would make it contiguous
        hnd = torch.full((num_pages, hk + 1, page_size, head_dim), garbage, device=device).to(store)
        v_cache = hnd[:, :hk].permute(0, 2, 1, 3).copy_(v_cache)
    q = rand(sum(lens_q), hq, head_dim).to(dtype)
    args = (d(q), cu_seqlens(lens_q, device), k_cache, v_cache, d(table), d(torch.tensor(lens_k, dtype=torch.int32)))
    return args if scales is None else (*args, *map(d, scales))


def paged_samples(device, gen):
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, _dtype_here(device, torch.float32)
    p = lambda *a, **kw: paged(*a, gen, device, **kw)  # noqa: E731
    bad = p([3, 1], [10, 20], 12, 2, 64, 16, fp32)
    bad[0][1, 4, 3] = float("nan")  # one query row NaN
    page = int(bad[4][1, 0])
    bad[2][page, 2, 1, 0] = float("inf")  # key 2 of sequence 1, seen by its query
    fp8 = p([1, 4], [37, 70], 12, 1, 128, 16, bf16, cache_dtype=FP8_DTYPE, garbage=1e4)
    return [
        Sample((*p([1, 1, 1], [1, 17, 40], 12, 1, 128, 16, bf16), 128**-0.5),
               note="decode, GLM-4.5 TP8 group of 12, NaN in unused slots"),
        Sample((*p([4, 4], [4, 50], 12, 2, 64, 32, fp16), 0.125, True, 4), note="MTP verify: 4 queries, group 6"),
        Sample((*p([17, 5, 0], [40, 5, 3], 2, 2, 64, 16, fp32, garbage=1e30), 0.125, True, 17),
               note="chunked prefill, group 1, fp32, huge garbage"),
        Sample((*p([2, 1], [150, 200], 12, 1, 128, 16, bf16), 0.09, True, 2, 3), note="split-KV in 3"),
        Sample((*p([3], [9], 12, 1, 128, 64, bf16), 0.09, False), note="not causal, one partial page of 64"),
        Sample((*p([1, 4], [20, 33], 12, 2, 64, 16, bf16, v_head_major=True), 0.125, True, 4),
               note="v_cache HND pages: page, slot and head strides unlike k_cache's"),
        Sample((*fp8[:6], 0.09, True, 4, 2, *fp8[6:]), note="e4m3 caches, per-head scales, split in 2"),
        Sample((*p([0, 0], [0, 5], 12, 1, 128, 16, bf16), 0.1), tag="empty", note="no queries"),
        Sample((*p([2], [0], 12, 1, 64, 16, bf16), 0.1, False), tag="empty", note="no keys: out 0, lse -inf"),
        Sample((*bad, 0.125, True), tag="nonfinite", note="NaN q row, inf in a seen key"),
    ]


def paged_errors(device):
    gen = torch.Generator()
    q, cq, kc, vc, bt, sl = paged([2, 1], [5, 20], 12, 2, 64, 16, torch.bfloat16, gen, device, garbage=0.0)
    ok = (q, cq, kc, vc, bt, sl, 0.125)
    names = ("q", "cu_seqlens_q", "k_cache", "v_cache", "block_table", "seq_lens", "sm_scale")

    def with_(**kw):
        return tuple(kw.get(n, a) for n, a in zip(names, ok))

    f8 = kc.to(FP8_DTYPE)
    ones = torch.ones(2, device=device)
    errors = [
        ErrorInput(with_(q=q.to(torch.float64)), match="q must be bfloat16, float16, float32, got torch.float64"),
        ErrorInput(with_(k_cache=kc[0]), match=r"k_cache must be 4-D \[num_pages, page_size, Hk, D\], got shape"),
        ErrorInput(with_(v_cache=vc[:, :8]), match=r"k_cache and v_cache must share a shape"),
        ErrorInput(with_(k_cache=kc.half(), v_cache=vc.half()), match="k_cache must be q's dtype"),
        ErrorInput(with_(k_cache=kc[:, :12], v_cache=vc[:, :12]),
                   match=r"page_size \(k_cache.shape\[1\]\) must be a power of two in \[1, 256\], got 12"),
        ErrorInput(with_(k_cache=kc.repeat(1, 1, 3, 1)[:, :, :5], v_cache=vc.repeat(1, 1, 3, 1)[:, :, :5]),
                   match=r"the query heads \(q.shape\[1\] = 12\) must be a multiple of k_cache's KV heads"),
        ErrorInput((*with_(k_cache=f8, v_cache=f8), True, -1, 0, None, ones),
                   match=r"k_scale must be float32 \[Hk = 2\] for float8_e4m3fn caches, got None"),
        ErrorInput((*with_(k_cache=f8, v_cache=f8), True, -1, 0, ones, ones[:1]),
                   match=r"v_scale must be float32 \[Hk = 2\] for float8_e4m3fn caches, got torch.float32\[1\]"),
        ErrorInput((*ok, True, -1, 0, ones, ones), match="k_scale is for float8_e4m3fn caches only"),
        ErrorInput(with_(seq_lens=sl.long()), match="seq_lens must be int32, got torch.int64"),
        ErrorInput(with_(block_table=bt[0]), match=r"block_table must be 2-D \[B, max_pages\]"),
        ErrorInput(with_(seq_lens=sl[:1]), match=r"cu_seqlens_q must be \[B \+ 1\] and block_table \[B, max_pages\] "
                                                 r"for seq_lens \[B = 1\]"),
        ErrorInput(with_(block_table=bt.t().contiguous().t()), match="block_table must have a unit last stride"),
        ErrorInput((*ok, True, -2), match="max_seqlen_q must be -1"),
        ErrorInput((*ok, True, -1, -1), match=r"num_splits must be >= 0 \(0: chosen per call, 1: no split\), got -1"),
        ErrorInput(with_(sm_scale=float("inf")), match="sm_scale must be finite"),
        ErrorInput(with_(block_table=bt.to("meta")), match="must be on one device"),
        ErrorInput(with_(block_table=[1]), exc=TypeError, match="block_table must be torch.Tensor, got list", raw=False),
    ]
    if torch.device(device).type == "cpu":
        i32 = lambda *vals: torch.tensor(vals, dtype=torch.int32)  # noqa: E731
        bad_table = bt.clone()
        bad_table[1, 1] = kc.shape[0]
        cap = bt.shape[1] * kc.shape[1]
        errors += [ErrorInput(with_(**kw), match=m, fake=False) for kw, m in (
            ({"cu_seqlens_q": i32(0, 1, 2)}, r"cu_seqlens_q must run from 0 to 3"),
            ({"seq_lens": i32(5, cap + 1)},
             rf"seq_lens must be in \[0, max_pages \* page_size = {cap}\], got seq_lens\[1\] = {cap + 1}"),
            ({"block_table": bad_table}, rf"block_table\[1\] names pages outside \[0, num_pages = {kc.shape[0]}\)"),
        )]
        errors.append(ErrorInput((*ok, True, 1), match=r"max_seqlen_q = 1 is below sequence 0's length 2", fake=False))
    return errors


def states(t, h, d, dtype, gen, device, *, empty_rows=0):
    """Two random partial states ``(out_a, lse_a, out_b, lse_b)``; the first ``empty_rows`` tokens
    of state a are empty (lse -inf, out NaN: ignored)."""
    rand = lambda *shape: torch.randn(shape, generator=gen, device=gen.device)  # noqa: E731
    oa, ob = rand(t, h, d), rand(t, h, d)
    la, lb = rand(h, t) * 3, rand(h, t) * 3
    la[:, :empty_rows] = float("-inf")
    oa[:empty_rows] = float("nan")
    return oa.to(dtype).to(device), la.to(device), ob.to(dtype).to(device), lb.to(device)


def merge_samples(device, gen):
    fp32 = _dtype_here(device, torch.float32)
    s = lambda *a, **kw: states(*a, gen, device, **kw)  # noqa: E731
    both_empty = s(3, 12, 64, torch.bfloat16)
    both_empty[1][:, 1] = float("-inf")
    both_empty[3][:, 1] = float("-inf")
    nan = s(4, 2, 128, fp32)
    nan[1][0, 1] = float("nan")
    nan[3][1, 2] = float("inf")
    nan[2][3, 1, 7] = float("nan")
    strided = s(5, 24, 128, torch.float16)
    b_head_major = strided[2].transpose(0, 1).contiguous().transpose(0, 1)
    return [
        Sample(s(7, 12, 128, torch.bfloat16, empty_rows=2), note="GLM-4.5 TP8 heads, state a empty on 2 tokens"),
        Sample(both_empty, note="both states empty on token 1"),
        Sample((strided[0][:, ::2], strided[1][::2], b_head_major[:, 1::2], strided[3][1::2]),
               note="fp16, every other head: strided views, out_b head-major (strides unlike out_a's)"),
        Sample(s(3, 3, 64, fp32)),
        Sample(s(0, 12, 128, torch.bfloat16), tag="empty"),
        Sample((*s(4, 2, 128, fp32)[:2], *nan[2:]), tag="nonfinite", note="NaN in out_b"),
        Sample(nan, tag="nonfinite", note="NaN and +inf lse, NaN out"),
    ]


def merge_errors(device):
    oa, la, ob, lb = states(3, 4, 64, torch.bfloat16, torch.Generator(), device)
    return [
        ErrorInput((oa.to(torch.int8), la, ob, lb), match="out_a must be bfloat16, float16 or float32, got torch.int8"),
        ErrorInput((oa[0], la, ob, lb), match=r"out_a must be 3-D \[T, H, D\]"),
        ErrorInput((oa, la, ob.half(), lb), match="out_b must match out_a"),
        ErrorInput((oa, la, ob[:2], lb), match="out_b must match out_a"),
        ErrorInput((oa, la.t(), ob, lb), match=r"lse_a must be float32 \[H, T\] = \[4, 3\], got torch.float32\[3, 4\]"),
        ErrorInput((oa, la, ob, lb.double()), match=r"lse_b must be float32 \[H, T\]"),
        ErrorInput((oa.transpose(1, 2).contiguous().transpose(1, 2), la, ob, lb),
                   match="out_a must be contiguous in its last dim"),
        ErrorInput((oa, la, ob, lb.to("meta")), match="out_a, lse_a, out_b, lse_b must be on one device"),
        ErrorInput((oa, None, ob, lb), exc=TypeError, match="lse_a must be torch.Tensor, got NoneType", raw=False),
    ]
