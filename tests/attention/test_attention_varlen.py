"""attention_varlen and merge_attn_states: GQA flash attention over packed sequences.

On CPU: the fp32 reference against torch SDPA (the definition is SDPA's math, lse included);
the torch and Triton (interpreter) backends against a float64 oracle under the op's own
tolerance, outputs poisoned, over causal / not, Tq == Tk and Tq < Tk (and Tq > Tk), lengths 0, 1,
17, 129 (1000: slow), GQA groups 1, 6, 12 (and groups above 128, packed in pieces), head dims
64 / 128, bf16 / fp16 / fp32, k/v as strided views into a QKV buffer, k and v with strides unlike
each other's (GLM-4.5's rotated k and QKV-view v); sabotage: a top-left causal alignment and a
wrong GQA head mapping must fail the comparison; the merge of two partial states against the
joint softmax (a cached prefix plus a causal chunk), empty states.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_backends
from glm45_ops import registered_ops
from glm45_ops.attention import attention_varlen, merge_attn_states
from glm45_ops.attention.flash_tables import cu_seqlens, packed, states
from glm45_ops.reference.attention import attention_varlen_ref, merge_attn_states_ref
from glm45_ops.testing import poisoned_outputs

OP = registered_ops()["attention_varlen"]
MERGE = registered_ops()["merge_attn_states"]
BACKENDS = cpu_backends()
HEADS = {1: (2, 2), 6: (12, 2), 12: (12, 1)}  # GQA group -> (Hq, Hk)
# Every length the issue names, in one batch: an empty sequence, one with no keys (its rows: out
# 0, lse -inf), 1, 17 queries on 40 keys (Tq < Tk), 129 on 129 (Tq == Tk, several key tiles).
LENS_Q = [1, 0, 17, 129, 5]
LENS_K = [1, 3, 40, 129, 0]


def _oracle(args):
    """The float64 oracle, rounded as the op's outputs are (out to q's dtype, lse to fp32)."""
    return attention_varlen_ref(*args, compute_dtype=torch.float64)


def _check(args, backend):
    with poisoned_outputs():
        got = OP(*args, backend=backend)
    why = OP.compare(got, _oracle(args), args)
    assert why is None, f"{backend}: {why}"
    return got


# ---------------------------------------------------------------------------------------------
# The definition
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_reference_is_sdpa_math(gen, causal):
    """Per sequence: SDPA with an explicit bottom-right mask and the GQA heads repeated; lse is
    torch.logsumexp of the seen scores, laid out [Hq, Tq]."""
    hq, hk = 12, 2
    q, k, v, cq, ck, mq, mk = packed([5, 17, 3], [9, 17, 30], hq, hk, 64, torch.float32, gen, "cpu")
    out, lse = attention_varlen_ref(q, k, v, cq, ck, mq, mk, 0.125, causal)
    assert lse.shape == (hq, q.shape[0]) and lse.dtype == torch.float32
    for b in range(3):
        q0, q1, k0, k1 = cq[b].item(), cq[b + 1].item(), ck[b].item(), ck[b + 1].item()
        qb = q[q0:q1].transpose(0, 1)
        kb, vb = (t[k0:k1].transpose(0, 1).repeat_interleave(hq // hk, 0) for t in (k, v))
        i, j = torch.arange(q1 - q0)[:, None], torch.arange(k1 - k0)[None]
        mask = j <= i + (k1 - k0) - (q1 - q0) if causal else torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        want = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=0.125)
        torch.testing.assert_close(out[q0:q1], want.transpose(0, 1), rtol=1e-5, atol=1e-5)
        scores = (qb @ kb.transpose(1, 2) * 0.125).masked_fill(~mask, float("-inf"))
        torch.testing.assert_close(lse[:, q0:q1], torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)


def test_rows_without_keys_are_zero_with_lse_minus_inf(gen):
    """Tq > Tk (causal): the leading Tq - Tk rows see no key; a sequence without keys; a row
    whose seen scores are all -inf (q = -inf against positive keys)."""
    q, k, v, cq, ck, mq, mk = packed([6, 2, 1], [2, 0, 3], 12, 1, 64, torch.float32, gen, "cpu")
    k[2:] = k[2:].abs() + 0.1  # sequence 2's keys: its -inf query scores -inf everywhere
    q[8] = float("-inf")
    for backend in BACKENDS:
        with poisoned_outputs():  # so a kernel that leaves these rows unwritten fails
            out, lse = attention_varlen(q, k, v, cq, ck, mq, mk, 0.1, return_lse=True, backend=backend)
        empty = torch.zeros(q.shape[0], dtype=torch.bool)
        empty[[0, 1, 2, 3, 6, 7, 8]] = True
        assert (lse[:, empty] == float("-inf")).all() and (out[empty] == 0).all(), backend
        assert torch.isfinite(lse[:, ~empty]).all(), backend


def test_return_lse(gen):
    args = packed([3], [5], 12, 1, 64, torch.float32, gen, "cpu")
    out = attention_varlen(*args, 0.1)
    out2, lse = attention_varlen(*args, 0.1, return_lse=True)
    assert isinstance(out, torch.Tensor) and torch.equal(out, out2) and lse.shape == (12, 3)


# ---------------------------------------------------------------------------------------------
# Backends against the float64 oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 6, 12])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_the_oracle(gen, backend, head_dim, group, causal):
    hq, hk = HEADS[group]
    args = (*packed(LENS_Q, LENS_K, hq, hk, head_dim, torch.bfloat16, gen, "cpu"), head_dim**-0.5, causal)
    _check(args, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_dtypes_on_a_qkv_buffer(gen, backend, dtype, causal):
    """fp16 and fp32, with q, k and v strided views into one fused QKV output."""
    args = (*packed([17, 4, 9], [17, 4, 30], 12, 1, 128, dtype, gen, "cpu", qkv_buffer=True), 0.088, causal)
    assert args[1].stride(0) == 14 * 128 and not args[1].is_contiguous()
    _check(args, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v_head_major", [False, True], ids=["v_qkv_view", "v_head_major"])
def test_k_and_v_with_their_own_strides(gen, backend, v_head_major):
    """GLM-4.5's prefill: q and k come new and contiguous out of qk_norm_rope while v is still a
    view into the fused QKV output (or head-major, so its head stride differs too): a kernel
    that addresses v with k's strides must fail (elsewhere k and v are laid out alike)."""
    q, k, v, *rest = packed([7, 12], [7, 20], 24, 2, 128, torch.bfloat16, gen, "cpu", qkv_buffer=True,
                            v_head_major=v_head_major)
    q, k = q.contiguous(), k.contiguous()
    assert k.stride(0) != v.stride(0) and (k.stride(1) != v.stride(1)) == v_head_major
    _check((q, k, v, *rest, 0.088, True), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_kv_heads_of_twelve_and_large_groups(gen, backend):
    """GLM-4.5 at TP4 (24 query heads over 2 KV heads: two packed groups of 12) and a group of
    160 (one KV head), which the kernel packs as two tiles of 80 heads."""
    _check((*packed([7, 12], [7, 20], 24, 2, 128, torch.bfloat16, gen, "cpu"), 0.088, True), backend)
    _check((*packed([3, 2], [5, 2], 160, 1, 64, torch.bfloat16, gen, "cpu"), 0.125, True), backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_long_sequence(gen, backend, causal):
    _check((*packed([1000, 3], [1000, 1003], 12, 1, 128, torch.bfloat16, gen, "cpu"), 0.088, causal), backend)


# ---------------------------------------------------------------------------------------------
# Sabotage: the comparison must catch a misaligned mask and a wrong head mapping
# ---------------------------------------------------------------------------------------------

def test_top_left_causal_alignment_fails(gen):
    """Top-left alignment (query i sees keys <= i) is the attention over each sequence's first
    Tq keys: it must be told apart from the bottom-right result when Tq < Tk."""
    q, k, v, cq, ck, mq, mk = packed([5, 17], [9, 40], 12, 1, 64, torch.bfloat16, gen, "cpu")
    args = (q, k, v, cq, ck, mq, mk, 0.125, True)
    got = OP(*args, backend=BACKENDS[-1])
    assert OP.compare(got, _oracle(args), args) is None
    first = torch.cat([torch.arange(ck[b].item(), ck[b].item() + (cq[b + 1] - cq[b]).item()) for b in range(2)])
    top_left = attention_varlen_ref(q, k[first], v[first], cq, cq, mq, mq, 0.125, True, compute_dtype=torch.float64)
    assert OP.compare(got, top_left, args) is not None


def test_wrong_gqa_head_mapping_fails(gen):
    """Query head h reads KV head h // G; h % Hk (heads interleaved) must fail."""
    q, k, v, cq, ck, mq, mk = packed([6], [10], 12, 2, 64, torch.bfloat16, gen, "cpu")
    args = (q, k, v, cq, ck, mq, mk, 0.125, False)
    got = OP(*args, backend=BACKENDS[-1])
    swap = torch.arange(12).view(6, 2).t().flatten()  # query heads reordered so h reads KV head h % 2
    wrong = attention_varlen_ref(q[:, swap], k, v, cq, ck, mq, mk, 0.125, False, compute_dtype=torch.float64)
    inverse = swap.argsort()
    assert OP.compare(got, (wrong[0][:, inverse], wrong[1][inverse]), args) is not None


# ---------------------------------------------------------------------------------------------
# merge_attn_states
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_of_prefix_and_causal_chunk_is_joint_attention(gen, backend, dtype):
    """A chunked prefill: the queries attend a cached prefix (every query sees it: not causal)
    and their own chunk (causal); merging the two states equals causal attention over both."""
    hq, hk, d = 12, 1, 128
    lens_q, prefix = [5, 17, 1], [9, 0, 40]
    q, k, v, cq, ck, mq, mk = packed(lens_q, [p + n for p, n in zip(prefix, lens_q)], hq, hk, d, dtype, gen, "cpu")
    cached = torch.cat([torch.arange(ck[b].item(), ck[b].item() + prefix[b]) for b in range(3)])
    new = torch.cat([torch.arange(ck[b].item() + prefix[b], ck[b + 1].item()) for b in range(3)])
    a = attention_varlen(q, k[cached], v[cached], cq, cu_seqlens(prefix), mq, max(prefix), 0.088, False, return_lse=True,
                         backend=backend)
    b = attention_varlen(q, k[new], v[new], cq, cq, mq, mq, 0.088, True, return_lse=True, backend=backend)
    args = (*a, *b)
    with poisoned_outputs():
        merged = merge_attn_states(*args, backend=backend)
    joint = attention_varlen_ref(q, k, v, cq, ck, mq, mk, 0.088, True, compute_dtype=torch.float64)
    assert OP.compare(merged, joint, (q, k, v, cq, ck, mq, mk, 0.088, True)) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_matches_the_oracle_with_empty_states(gen, backend):
    """Empty states (lse -inf) are ignored whatever their out holds (NaN here); both empty give
    out 0, lse -inf; lse_b given as a transposed view ([T, H] storage, FlashInfer's layout) and
    out_b head-major, so neither state can be read with the other's strides."""
    oa, la, ob, lb = states(6, 12, 128, torch.bfloat16, gen, "cpu", empty_rows=2)
    lb[3, 1] = float("-inf")
    la[3, 1] = float("-inf")
    ob[1, 3] = float("nan")
    lb_view = lb.t().contiguous().t()
    ob_head_major = ob.transpose(0, 1).contiguous().transpose(0, 1)
    args = (oa, la, ob_head_major, lb_view)
    with poisoned_outputs():
        out, lse = merge_attn_states(*args, backend=backend)
    assert out[1, 3].eq(0).all() and lse[3, 1] == float("-inf")
    assert torch.isfinite(out[:2]).all(), "an empty state's NaN out leaked into the merge"
    want = merge_attn_states_ref(*args, compute_dtype=torch.float64)
    assert MERGE.compare((out, lse), want, args) is None
