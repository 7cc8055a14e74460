"""attention_paged: GQA attention of packed queries against a paged KV cache, and split-KV.

On CPU: paged results equal the packed (varlen) results bit for bit on the same backend, with
shuffled pages, spare pages and every unused slot or table entry holding garbage (NaN, huge
values, -1 page ids); decode (1 query), MTP verify (4) and chunked prefill against the float64
oracle for groups 1, 6, 12, head dims 64 / 128, page sizes 1, 16, 64, lengths 0, 1, 17, 129 (1000:
slow); e4m3 caches with per-head scales against the oracle on the dequantized values; k and v
caches in different layouts (NHD / HND); split-KV (the Triton kernel's chunks and merge) against
no split, for paged and packed KV; the host-side checks of the table and the lengths; sabotage:
a top-left causal alignment and a block table read as if unshuffled must fail the comparison.
"""

from __future__ import annotations

import pytest
import torch

from conftest import cpu_backends
from glm45_ops import registered_ops
from glm45_ops.attention import attention_paged, attention_varlen
from glm45_ops.attention.flash_tables import packed, paged
from glm45_ops.reference.attention import attention_paged_ref, attention_varlen_ref, gather_paged_kv
from glm45_ops.reference.quant import FP8_DTYPE
from glm45_ops.testing import assert_bit_equal, poisoned_outputs

OP = registered_ops()["attention_paged"]
VARLEN = registered_ops()["attention_varlen"]
BACKENDS = cpu_backends()
HEADS = {1: (2, 2), 6: (12, 2), 12: (12, 1)}  # GQA group -> (Hq, Hk)


def _args(lens_q, lens_k, group, head_dim, page_size, gen, *, dtype=torch.bfloat16, causal=True, max_q=-1,
          splits=0, **kw):
    hq, hk = HEADS[group]
    cache = paged(lens_q, lens_k, hq, hk, head_dim, page_size, dtype, gen, "cpu", **kw)
    scales = cache[6:] or (None, None)
    return (*cache[:6], head_dim**-0.5, causal, max_q, splits, *scales)


def _check(args, backend):
    with poisoned_outputs():
        got = OP(*args, backend=backend)
    why = OP.compare(got, attention_paged_ref(*args, compute_dtype=torch.float64), args)
    assert why is None, f"{backend}: {why}"
    return got


# ---------------------------------------------------------------------------------------------
# Paged == packed
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("garbage", [float("nan"), 3e38, -7.0], ids=["nan", "huge", "finite"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_paged_equals_packed_bit_for_bit(gen, backend, garbage, page_size):
    """The same keys through a shuffled block table or packed: identical results on one
    backend (same tiles, same order), whatever the unused slots and table entries hold."""
    lens_q, lens_k = [1, 4, 17, 0, 2], [1, 40, 17, 3, 0]
    args = _args(lens_q, lens_k, 12, 128, page_size, gen, garbage=garbage, max_q=17)
    q, cu_q, k_cache, v_cache, table, seq_lens = args[:6]
    k, v, cu_k = gather_paged_kv(k_cache, v_cache, table, seq_lens, None, None)
    with poisoned_outputs():
        got = attention_paged(*args, backend=backend)
        want = attention_varlen(q, k, v, cu_q, cu_k, 17, max(lens_k), args[6], True, return_lse=True, backend=backend)
    for g, w, what in zip(got, want, ("out", "lse")):
        assert_bit_equal(g, w, f"{backend} {what}")
    assert OP.compare(got, attention_paged_ref(*args, compute_dtype=torch.float64), args) is None


# ---------------------------------------------------------------------------------------------
# Against the float64 oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 6, 12])
@pytest.mark.parametrize("queries", [1, 4], ids=["decode", "mtp_verify"])
def test_decode_and_mtp_verify(gen, backend, head_dim, group, queries):
    """Every sequence's last ``queries`` positions (1 for decode, S+1 = 4 for MTP verification)
    against contexts of 1 (fewer keys than queries in MTP: empty leading rows), 17 and 129."""
    lens_k = [1, 17, 129]
    _check(_args([queries] * 3, lens_k, group, head_dim, 16, gen, max_q=queries), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_chunked_prefill(gen, backend, dtype, causal):
    """Chunks of 17 and 5 new queries after cached keys, an empty chunk, a chunk without any
    key; max_seqlen_q left at -1 (q.shape[0] bounds it)."""
    _check(_args([17, 5, 0, 2], [40, 5, 3, 0], 6, 128, 16, gen, dtype=dtype, causal=causal), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splits", [1, 3])
def test_fp8_caches(gen, backend, splits):
    """e4m3 caches with per-KV-head scales (as kv_cache_write stores them): the oracle attends
    the dequantized values ``stored * scale``."""
    args = _args([1, 4, 9], [37, 70, 9], 6, 128, 16, gen, cache_dtype=FP8_DTYPE, garbage=448.0, max_q=9,
                 splits=splits)
    assert args[2].dtype == FP8_DTYPE and args[10].shape == (2,)
    _check(args, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_context_decode_and_verify(gen, backend):
    _check(_args([1, 4], [1000, 1000], 12, 128, 16, gen, max_q=4, splits=4), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_and_v_caches_with_their_own_layouts(gen, backend):
    """v_cache in HND pages (with a spare head) while k_cache is NHD: page, slot and head strides
    all differ, so a kernel that addresses v with k's strides must fail (elsewhere the two
    caches are laid out alike)."""
    args = _args([1, 4, 2], [20, 33, 40], 6, 128, 16, gen, max_q=4, v_head_major=True)
    assert all(a != b for a, b in zip(args[2].stride()[:3], args[3].stride()[:3]))
    _check(args, backend)


# ---------------------------------------------------------------------------------------------
# Split-KV
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("splits", [2, 5])
def test_split_kv_agrees_with_no_split(gen, splits):
    """Keys cut into chunks computed by separate programs, then merged: the same result as one
    pass within the op's tolerance (only the summation order differs), and chunks that hold no
    key of a sequence (contexts shorter than the table) are empty states the merge ignores."""
    if "triton" not in BACKENDS:
        pytest.skip("Triton interpreter unavailable")
    args = _args([1, 4, 2], [150, 200, 3], 12, 128, 16, gen, max_q=4)
    one = OP(*args[:9], 1, *args[10:], backend="triton")
    with poisoned_outputs():
        cut = OP(*args[:9], splits, *args[10:], backend="triton")
    assert OP.compare(cut, one, args) is None
    assert OP.compare(cut, attention_paged_ref(*args, compute_dtype=torch.float64), args) is None


def test_split_kv_on_packed_keys(gen):
    """The packed path shares the kernel's split logic: a causal prefill chunk cut in 3."""
    if "triton" not in BACKENDS:
        pytest.skip("Triton interpreter unavailable")
    from triton_ops import attention as ta

    q, k, v, cq, ck, mq, mk = packed([6, 1], [130, 77], 12, 1, 128, torch.bfloat16, gen, "cpu")
    args = (q, k, v, cq, ck, mq, mk, 0.088, True)
    out, lse = VARLEN.alloc(*args)
    ta.attention(*args, out, lse, num_splits=3)
    assert VARLEN.compare((out, lse), attention_varlen_ref(*args, compute_dtype=torch.float64), args) is None


def test_num_kv_splits_on_the_gpu_grid():
    """The automatic choice: about two waves of programs, chunks of at least MIN_SPLIT_KEYS keys
    (multiples of the key tile), no empty trailing chunk; one split on the CPU."""
    from triton_ops.attention import MIN_SPLIT_KEYS, NO_SPLIT_CHUNK, num_kv_splits

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert num_kv_splits(1, 32768, 64, cpu, 0) == (1, NO_SPLIT_CHUNK)
    assert num_kv_splits(64, 8192, 64, cpu, 3) == (3, 2752)
    assert num_kv_splits(64, 100, 64, cpu, 8) == (2, 64)
    assert num_kv_splits(64, 64, 64, cpu, 8) == (1, NO_SPLIT_CHUNK)
    if torch.cuda.is_available():
        splits, chunk = num_kv_splits(64, 32768, 64, gpu, 0)
        assert splits > 1 and chunk % 64 == 0 and chunk >= MIN_SPLIT_KEYS


# ---------------------------------------------------------------------------------------------
# Host-side checks and sabotage
# ---------------------------------------------------------------------------------------------

def test_table_and_lengths_are_checked_on_cpu(gen):
    args = list(_args([1, 1], [20, 5], 12, 128, 16, gen))
    table = args[4].clone()
    table[0, 1] = -1  # a page seq_lens[0] = 20 needs
    with pytest.raises(ValueError, match=r"block_table\[0\] names pages outside \[0, num_pages = \d+\) among the 2"):
        attention_paged(*args[:4], table, *args[5:])
    args[5] = torch.tensor([20, 5 + 10**6], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seq_lens must be in \[0, max_pages \* page_size"):
        attention_paged(*args)


def test_top_left_alignment_and_unshuffled_pages_fail(gen):
    """MTP verify with top-left alignment (query i sees keys <= i) and a table read as if the
    pages were in order must both fail the comparison."""
    args = _args([4, 4], [30, 9], 12, 128, 16, gen, max_q=4)
    got = OP(*args, backend=BACKENDS[-1])
    assert OP.compare(got, attention_paged_ref(*args, compute_dtype=torch.float64), args) is None
    q, cu_q, k_cache, v_cache, table, seq_lens = args[:6]
    k, v, cu_k = gather_paged_kv(k_cache, v_cache, table, seq_lens, None, None)
    first = torch.cat([torch.arange(cu_k[b].item(), cu_k[b].item() + 4) for b in range(2)])
    top_left = attention_varlen_ref(q, k[first], v[first], cu_q, cu_q, 4, 4, args[6], True,
                                    compute_dtype=torch.float64)
    assert OP.compare(got, top_left, args) is not None
    in_order = torch.arange(table.numel(), dtype=torch.int32).view(table.shape) % k_cache.shape[0]
    unshuffled = attention_paged_ref(q, cu_q, k_cache.nan_to_num(0), v_cache.nan_to_num(0), in_order, *args[5:],
                                     compute_dtype=torch.float64)
    assert OP.compare(got, unshuffled, args) is not None


def test_bench_cases_build_and_agree():
    """The benchmark's attention cases at the CPU context (small preset): names unique, every op
    represented, and the cheapest decode and MTP cases agree across the CPU backends."""
    from glm45_ops.bench.case import BenchContext
    from glm45_ops.bench.cases.attention import flash as bench
    from glm45_ops.config import preset

    ctx = BenchContext(preset("small"), torch.device("cpu"), (64, 8, 1))
    cases = bench.cases(ctx)
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    assert {n.split()[0] for n in names} == {"attention_varlen", "attention_paged", "merge_attn_states"}
    for case in (c for c in cases if c.params.get("B") == 1 and c.params.get("kv_dtype") == "bf16"):
        runs = [case.make(b, torch.device("cpu"), torch.Generator().manual_seed(0)) for b in BACKENDS]
        want = runs[0]()
        for run in runs[1:]:
            assert OP.compare(run(), want, run.args) is None, case.name


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_cache_written_by_kv_cache_write(gen, backend):
    """End to end with the cache writer: keys and values written through kv_cache_write into
    shuffled e4m3 pages (its per-head scales), then attended: the oracle on the dequantized cache,
    and within e4m3's resolution of attention on the unquantized keys (calc_diff)."""
    from glm45_ops.attention import kv_cache_write
    from glm45_ops.testing import calc_diff

    lens_q, lens_k, hq, hk, d, page = [1, 4], [37, 20], 12, 2, 128, 16
    q, k, v, cu_q, cu_k, *_ = packed(lens_q, lens_k, hq, hk, d, torch.bfloat16, gen, "cpu")
    pages = [-(-n // page) for n in lens_k]
    table = torch.randperm(sum(pages) + 2, generator=gen)[:sum(pages)].to(torch.int32)
    table = torch.nn.utils.rnn.pad_sequence(table.split(pages), batch_first=True, padding_value=-1).to(torch.int32)
    slots = torch.cat([table[b, torch.arange(n) // page].long() * page + torch.arange(n) % page
                       for b, n in enumerate(lens_k)])
    scales = [t.float().abs().amax(dim=(0, 2)) / 448 for t in (k, v)]
    caches = [torch.zeros(sum(pages) + 2, page, hk, d).to(FP8_DTYPE) for _ in range(2)]
    kv_cache_write(k, v, *caches, slots, *scales, backend=backend)
    args = (q, cu_q, *caches, table, torch.tensor(lens_k, dtype=torch.int32), d**-0.5, True, 4, 0, *scales)
    got = _check(args, backend)
    exact = attention_varlen(q, k, v, cu_q, cu_k, 4, 37, d**-0.5, backend="torch")
    assert calc_diff(got[0], exact) < 1e-3
