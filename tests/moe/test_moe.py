"""MoE permutation and fused experts: the references against independent per-pair loops, the
permutation's invariants, expert parallelism by dropping remote ids, and every backend on the
token counts the issue names. The generic checks (opcheck, compile, bad input, empty, NaN) are the
contract tests' (tables in glm45_ops/moe/permute.py and fused.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import glm45_ops
from conftest import device_backends
from glm45_ops import moe
from glm45_ops.reference.moe import fused_moe_ref, moe_align_block_size_ref, padded_size
from glm45_ops.testing import assert_bit_equal, calc_diff, outputs_differ, poisoned_outputs

BACKENDS = device_backends()


def _to(v, device):
    return v.to(device) if isinstance(v, torch.Tensor) else v


def align_oracle(ids: torch.Tensor, e: int, bs: int):
    """The definition as a loop over experts and pairs."""
    flat = ids.reshape(-1).tolist()
    n = len(flat)
    p = padded_size(n, e, bs)
    sorted_ids, block_expert, pos = [n] * p, [-1] * (p // bs), 0
    for ex in range(e):
        mine = [i for i, v in enumerate(flat) if v == ex]
        for r, i in enumerate(mine):
            sorted_ids[pos + r] = i
        blocks = -(-len(mine) // bs)
        for b in range(blocks):
            block_expert[pos // bs + b] = ex
        pos += blocks * bs
    return sorted_ids, block_expert, pos


@pytest.mark.parametrize("t,k,e,bs", [(1, 8, 160, 16), (7, 8, 16, 4), (64, 2, 5, 16), (13, 3, 9, 1)])
def test_align_reference_matches_the_loop(gen, t, k, e, bs):
    ids = torch.randint(-2, e + 2, (t, k), generator=gen, dtype=torch.int32)
    s, b, n = moe_align_block_size_ref(ids, e, bs)
    want_s, want_b, want_n = align_oracle(ids, e, bs)
    assert s.tolist() == want_s and b.tolist() == want_b and n.tolist() == [want_n]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("t", [0, 1, 7, 64, 257, 600])  # 600 x 8 pairs: past one program's span (Triton)
def test_align_every_backend(gen, device, backend, t):
    ids = torch.randint(0, 160, (t, 8), generator=gen, dtype=torch.int32)
    want = moe_align_block_size_ref(ids, 160, 16)
    with poisoned_outputs():
        got = moe.moe_align_block_size(ids.to(device), 160, 16, backend=backend)
    for g, w, name in zip(got, want, ("sorted_ids", "block_expert", "num_padded")):
        assert_bit_equal(g.cpu(), w, name)
    # experts without tokens get no block: their weights are never read
    assert set(got[1].cpu().tolist()) - {-1} == set(ids.flatten().tolist())


@pytest.mark.parametrize("device", sorted({d for d, b in BACKENDS if b == "triton"}))
@pytest.mark.parametrize("t,k,e,bs,span", [(300, 8, 160, 16, 128), (200, 8, 16, 64, 64), (90, 4, 12, 4, 64),
                                           (50, 8, 1000, 1, 256)])
def test_triton_align_spans(gen, device, t, k, e, bs, span):
    """The prefill path (count / scan / scatter over spans of pairs) with spans small enough to
    give many programs here: bit-exact, ids outside [0, E) and int64 ids included."""
    from triton_ops import moe as tm

    ids = torch.randint(-3, e + 3, (t, k), generator=gen, dtype=torch.int64)
    want = moe_align_block_size_ref(ids, e, bs)
    p = padded_size(ids.numel(), e, bs)
    got = tuple(torch.full((m,), 12345, dtype=torch.int32, device=device) for m in (p, p // bs, 1))
    tm.moe_align_block_size(ids.to(device), e, bs, *got, span=span)
    for g, w, name in zip(got, want, ("sorted_ids", "block_expert", "num_padded")):
        assert_bit_equal(g.cpu(), w, name)


# ---------------------------------------------------------------------------------------------
# fused_moe
# ---------------------------------------------------------------------------------------------

def moe_oracle(x, w13, w2, wts, ids):
    """float64 per (token, slot) loop, h rounded into x's dtype as the definition says."""
    t, h = x.shape
    inter = w13.shape[1] // 2
    out = torch.zeros(t, h, dtype=torch.float64)
    for ti in range(t):
        for j in range(ids.shape[1]):
            e = int(ids[ti, j])
            if not 0 <= e < w13.shape[0]:
                continue
            gu = w13[e].double() @ x[ti].double()
            act = (F.silu(gu[:inter]) * gu[inter:]).to(x.dtype).double()
            out[ti] += float(wts[ti, j]) * (w2[e].double() @ act)
    return out


def make(t, h, inter, e, k, dtype, gen):
    x = (torch.randn(t, h, generator=gen) * 0.5).to(dtype)
    w13 = (torch.randn(e, 2 * inter, h, generator=gen) * h**-0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=gen) * inter**-0.5).to(dtype)
    ids = torch.rand(t, e, generator=gen).topk(k, dim=1).indices.to(torch.int32)
    return x, w13, w2, torch.rand(t, k, generator=gen), ids


def test_reference_matches_float64_loop(gen):
    x, w13, w2, wts, ids = make(9, 32, 48, 6, 3, torch.float32, gen)
    ids[0, 1] = -1  # a remote expert
    got = fused_moe_ref(x, w13, w2, wts, ids, None, None, 0)
    want = moe_oracle(x, w13, w2, wts, ids)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 7, 64, 257])
@pytest.mark.parametrize("inter", [128, 192, 176])
def test_fused_moe_every_backend(gen, device, backend, t, inter):
    """T from the issue, I = 128 and the TP8 shard widths, against the float64 loop."""
    x, w13, w2, wts, ids = make(t, 32, inter, 4, 2, torch.bfloat16, gen)
    with poisoned_outputs():
        got = moe.fused_moe(*(v.to(device) for v in (x, w13, w2, wts, ids)), backend=backend).cpu()
    want = moe_oracle(x, w13, w2, wts, ids)
    assert calc_diff(got, want) < 1e-4
    assert (got.double() - want).abs().max() <= 2**-6 * want.abs().max()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_fp8_fused_moe_against_dequantized_math(gen, device, backend):
    """FP8 blocks at I = 192 (scale blocks straddle the gate/up boundary): the dequantized
    float64 math, DeepGEMM's FP8 threshold."""
    from glm45_ops.quant import dequant_fp8, per_block_quant_fp8

    x, w13, w2, wts, ids = make(11, 256, 192, 5, 2, torch.float32, gen)
    (q13, s13), (q2, s2) = per_block_quant_fp8(w13), per_block_quant_fp8(w2)
    xb = x.to(torch.bfloat16)
    got = moe.fused_moe(*(v.to(device) for v in (xb, q13, q2, wts, ids, s13, s2)), backend=backend).cpu()
    deq = [dequant_fp8(q, s, 128, 128, torch.float32) for q, s in ((q13, s13), (q2, s2))]
    want = moe_oracle(xb.float(), deq[0], deq[1], wts, ids)
    assert calc_diff(got, want) < 1e-3


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_expert_parallel_shards_sum_to_the_whole(gen, device, backend):
    """Two ranks with half the experts each (local ids, the other rank's slots -1): their
    outputs sum to the single-process result."""
    x, w13, w2, wts, ids = make(10, 32, 64, 6, 3, torch.float32, gen)
    whole = moe.fused_moe(x, w13, w2, wts, ids, backend="torch")

    def part(r):
        local = torch.where((ids >= 3 * r) & (ids < 3 * (r + 1)), ids - 3 * r, -1)
        args = (x, w13[r * 3:(r + 1) * 3], w2[r * 3:(r + 1) * 3], wts, local)
        return moe.fused_moe(*(v.to(device) for v in args), backend=backend).cpu()

    torch.testing.assert_close(part(0) + part(1), whole, rtol=1e-5, atol=1e-5)


def test_expert_ids_outside_the_contract_raise_on_cpu(gen):
    """Ids are [0, E) or -1: any other id raises for a CPU tensor, naming it (int64 ids that int32
    would wrap into range included); a fake tensor has no values to check (torch.compile's
    tracing), and on the GPU ids are not read on the host."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w13, w2, wts, ids = make(4, 32, 16, 5, 2, torch.float32, gen)
    for bad in (5, -2, 2**32 + 3, -(2**63)):
        wrong = ids.long()
        wrong[3, 1] = bad
        with pytest.raises(ValueError, match=rf"topk_ids must be in \[0, E=5\) or -1 .*got {bad} at \[3, 1\]"):
            moe.fused_moe(x, w13, w2, wts, wrong)
        with pytest.raises(ValueError, match=rf"must be in \[0, num_experts=5\) or -1 .*got {bad} at \[3, 1\]"):
            moe.moe_align_block_size(wrong, 5, 16)
        with FakeTensorMode(allow_non_fake_inputs=True):  # the raw ops, as torch.compile's tracing calls them
            assert torch.ops.glm45.fused_moe(x, w13, w2, wts, wrong).shape == x.shape
            assert torch.ops.glm45.moe_align_block_size(wrong, 5, 16)[1].shape == (padded_size(8, 5, 16) // 16,)
    ids[0] = -1  # -1 is a slot computed elsewhere: allowed, contributes nothing
    torch.testing.assert_close(moe.fused_moe(x, w13, w2, wts, ids)[0], torch.zeros(32))
    # more slots than local experts: an expert-parallel rank (the rest -1), or a repeated expert
    many = torch.full((4, 6), -1, dtype=torch.int32)
    many[:, 0], many[:, 1] = 2, 2
    w6 = torch.rand(4, 6)
    want = moe.fused_moe(x, w13, w2, (w6[:, 0] + w6[:, 1])[:, None], many[:, :1])
    torch.testing.assert_close(moe.fused_moe(x, w13, w2, w6, many), want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Tensor-parallel shards of block-FP8 experts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("inter,tp", [(384, 2), (352, 2), (1536, 8)], ids=["I=192 per rank", "I=176 per rank", "GLM-4.5 TP8"])
def test_tp_shards_keep_the_checkpoint_and_sum_to_the_layer(gen, device, backend, inter, tp):
    """Shard boundaries inside scale blocks: each shard dequantizes to exactly its slice of the
    dequantized checkpoint (no requantization), and the ranks' outputs sum to the float64 math
    of the whole layer within DeepGEMM's FP8 threshold."""
    from glm45_ops.moe.shard import shard_fp8_experts
    from glm45_ops.quant import dequant_fp8, per_block_quant_fp8
    from glm45_ops.reference.moe import _w2, _w13

    h, e, k, t = 128, 3, 2, 5
    x, w13, w2, wts, ids = make(t, h, inter, e, k, torch.float32, gen)
    # every 64-wide chunk (half a scale block: shard boundaries fall at multiples of 16) at its own
    # magnitude, three decades apart, so a column paired with a neighbouring block's scale shows
    def chunked(n):
        chunks = -(-n // 64)
        return torch.logspace(-1.5, 1.5, chunks)[torch.randperm(chunks, generator=gen)].repeat_interleave(64)[:n]

    w13 = w13 * chunked(2 * inter)[:, None]
    w2 = w2 * chunked(inter)
    (q13, s13), (q2, s2) = per_block_quant_fp8(w13), per_block_quant_fp8(w2)
    full13, full2 = dequant_fp8(q13, s13, 128, 128, torch.float32), dequant_fp8(q2, s2, 128, 128, torch.float32)
    width = inter // tp
    total = torch.zeros(t, h, dtype=torch.float64)
    xb = x.to(torch.bfloat16)
    for rank in range(tp):
        sh = shard_fp8_experts(q13, s13, q2, s2, tp, rank)
        cols = slice(rank * width, (rank + 1) * width)
        for ex in range(e):
            want13 = torch.cat([full13[ex, cols], full13[ex, inter:][cols]])
            assert_bit_equal(_w13(sh.w13, sh.w13_scale, ex), want13, f"w13 rank {rank}")
            assert_bit_equal(_w2(sh.w2, sh.w2_scale, ex, sh.i_offset), full2[ex, :, cols], f"w2 rank {rank}")
        args = (xb, sh.w13, sh.w2, wts, ids, sh.w13_scale, sh.w2_scale, sh.i_offset)
        out = moe.fused_moe(*(_to(v, device) for v in args), backend=backend).cpu()
        # the backend against the reference on this very shard (scales paired with the wrong
        # block for a shard starting mid-block give ~6e-3 here)
        op = glm45_ops.registered_ops()["fused_moe"]
        why = outputs_differ(out, moe.fused_moe(*args, backend="torch"), op, args)
        assert why is None, f"rank {rank}: {why}"
        total += out.double()
    # the float64 math on the dequantized checkpoint and activations; what remains is each
    # rank's 1 x 128 quantization of its own slice of the intermediate
    from glm45_ops.quant import per_token_group_quant_fp8

    xq = dequant_fp8(*per_token_group_quant_fp8(xb), out_dtype=torch.float32).to(torch.bfloat16)
    want = moe_oracle(xq, full13, full2, wts, ids)
    assert calc_diff(total, want) < 1e-3


def test_tp_shard_bad_input(gen):
    """Each bad argument of ``shard_fp8_experts`` raises naming it (a BF16 weight, a 2-D one, a w2
    that does not match w13, a width that is not a multiple of 16, a rank past tp_size)."""
    from glm45_ops.moe.shard import shard_fp8_experts
    from glm45_ops.quant import per_block_quant_fp8

    _, w13, w2, _, _ = make(1, 128, 192, 2, 1, torch.float32, gen)
    (q13, s13), (q2, s2) = per_block_quant_fp8(w13), per_block_quant_fp8(w2)
    for args, exc, match in [
        ((w13, s13, q2, s2, 2, 0), ValueError, "w13 must be torch.float8_e4m3fn"),
        ((q13, s13, w2.bfloat16(), s2, 2, 0), ValueError, "w2 must be torch.float8_e4m3fn"),
        ((q13, s13.double(), q2, s2, 2, 0), ValueError, "w13_scale must be torch.float32"),
        ((q13[0], s13, q2, s2, 2, 0), ValueError, r"w13 must be 3-D \[E, \.\.\.\], got shape \(384, 128\)"),
        ((q13, s13, q2[..., :96], s2, 2, 0), ValueError, r"w13 must be \[E, 2I, H\] and w2 \[E, H, I\]"),
        ((q13, s13, q2.transpose(1, 2), s2, 2, 0), ValueError, r"w2 \[E, H, I\] with the same E, H and I"),
        ((q13, s13, q2[:1], s2[:1], 2, 0), ValueError, r"with the same E"),
        ((q13, s13, q2, s2, 0, 0), ValueError, "tp_size must be a positive divisor of I=192"),
        ((q13, s13, q2, s2, 5, 0), ValueError, "tp_size must be a positive divisor of I=192"),
        ((q13, s13, q2, s2, 8, 0), ValueError, r"leaving shards a multiple of 16 wide .*got 8"),
        ((q13, s13, q2, s2, 2.0, 0), TypeError, "tp_size must be int, got float"),
        ((q13, s13, q2, s2, 2, True), TypeError, "rank must be int, got bool"),
        ((q13, s13, q2, s2, 2, 2), ValueError, r"rank must be in \[0, tp_size=2\), got 2"),
        ((q13, s13, q2, s2, 2, -1), ValueError, r"rank must be in \[0, tp_size=2\), got -1"),
        ((q13, s13[:, :1], q2, s2, 2, 0), ValueError, "w13_scale and w2_scale must be the block grids"),
        ((q13, s13, q2, s2.to("meta"), 2, 0), ValueError, "w2_scale is on meta but w13 is on cpu"),
        ((q13, "s13", q2, s2, 2, 0), TypeError, "w13_scale must be a torch.Tensor, got str"),
    ]:
        with pytest.raises(exc, match=match):
            shard_fp8_experts(*args)
    assert shard_fp8_experts(q13, s13, q2, s2, 12, 11).w13.shape == (2, 32, 128)  # 16 wide: the smallest


# ---------------------------------------------------------------------------------------------
# Split-K gate-up GEMM (decode sizes)
# ---------------------------------------------------------------------------------------------

TRITON_DEVICES = sorted({d for d, b in BACKENDS if b == "triton"})


def test_split_k_heuristic_splits_decode_only():
    """GLM-4.5 at TP8, one token: 8 experts x 2 I tiles = 16 programs, split to ~2 waves of a
    H200 (4 K tiles per slice at least); from a batch that fills the GPU on its own, no split;
    the partials stay under their byte cap."""
    from triton_ops import moe as tm

    cpu = torch.device("cpu")
    split = lambda pairs, e, n_tiles, k_tiles, bn=128: tm.gate_up_split_k(pairs, e, 16, bn, n_tiles, k_tiles, cpu)
    assert split(8, 160, 2, 40) == 10  # GLM-4.5 TP8, FP8 (H = 5120: 40 K tiles)
    assert split(8, 128, 2, 32) == 8  # Air TP8 (H = 4096): capped by 4 K tiles per slice
    assert split(8, 160, 12, 40) == 3  # TP1 (I = 1536)
    assert split(8 * 64, 160, 2, 40) == 1  # 64 tokens: enough programs
    assert split(8, 160, 2, 7) == 1  # too short a K loop to cut
    big = split(64, 2, 1, 4096, bn=2**14)  # few programs, huge partials
    assert big * 64 * 2 * 2**14 * 4 <= tm.SPLIT_K_MAX_BYTES


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_split_k_gate_up_matches_the_reference(gen, device, splits, fp8, monkeypatch):
    """The split gate-up GEMM (forced; 5 K tiles: uneven slices, and 7 splits leave some empty
    ones to drop) and its SwiGLU/quantize pass against the reference and the float64 loop, at
    I = 192 (a partial tile), with a remote expert and all of one token's slots on one expert."""
    from glm45_ops.quant import dequant_fp8, per_block_quant_fp8
    from triton_ops import moe as tm

    monkeypatch.setattr(tm, "gate_up_split_k", lambda *a: splits)
    x, w13, w2, wts, ids = make(5, 5 * (128 if fp8 else 64) - 16, 192, 6, 3, torch.float32, gen)
    ids[1] = 4
    ids[2, 0] = -1
    if fp8:
        (w13, s13), (w2, s2) = per_block_quant_fp8(w13), per_block_quant_fp8(w2)
        deq = [dequant_fp8(q, s, 128, 128, torch.float32) for q, s in ((w13, s13), (w2, s2))]
    else:
        w13, w2, s13, s2 = w13.bfloat16(), w2.bfloat16(), None, None
        deq = [w13.float(), w2.float()]
    args = (x.bfloat16(), w13, w2, wts, ids, s13, s2)
    with poisoned_outputs():
        got = moe.fused_moe(*(_to(v, device) for v in args), backend="triton").cpu()
    op = glm45_ops.registered_ops()["fused_moe"]
    why = outputs_differ(got, moe.fused_moe(*args, backend="torch"), op, args)
    assert why is None, why
    if not fp8:
        assert calc_diff(got, moe_oracle(args[0], *deq, wts, ids)) < 1e-4


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_split_k_with_a_tensor_parallel_shard(gen, device, monkeypatch):
    """The split path on a block-FP8 shard starting inside a scale block (i_offset, one scale
    per w13 row): the reference on the same shard."""
    from glm45_ops.moe.shard import shard_fp8_experts
    from glm45_ops.quant import per_block_quant_fp8
    from triton_ops import moe as tm

    monkeypatch.setattr(tm, "gate_up_split_k", lambda *a: 2)
    x, w13, w2, wts, ids = make(3, 512, 384, 3, 2, torch.float32, gen)
    (q13, s13), (q2, s2) = per_block_quant_fp8(w13), per_block_quant_fp8(w2)
    sh = shard_fp8_experts(q13, s13, q2, s2, 2, 1)
    assert sh.i_offset
    args = (x.bfloat16(), sh.w13, sh.w2, wts, ids, sh.w13_scale, sh.w2_scale, sh.i_offset)
    got = moe.fused_moe(*(_to(v, device) for v in args), backend="triton").cpu()
    why = outputs_differ(got, moe.fused_moe(*args, backend="torch"), glm45_ops.registered_ops()["fused_moe"], args)
    assert why is None, why
