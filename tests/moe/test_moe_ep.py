"""Expert parallelism (glm45_ops/moe/ep.py) under gloo in 2 and 4 processes: every rank's output
against single-process ``fused_moe`` on all ranks' tokens with all experts (bit for bit when the
group is one rank); uneven token counts (a rank with none), fp32 / bf16 / FP8 weights, subgroups,
the Triton backend, determinism, and the checks that run before any communication."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from conftest import run_processes
from glm45_ops import moe
from glm45_ops.moe import ep
from glm45_ops.moe.fused import _fused_op
from glm45_ops.testing import assert_bit_equal, one_thread

TOKENS = {2: [9, 0], 4: [6, 0, 11, 3]}  # per rank: uneven, one rank without tokens
DIST_TIMEOUT_S = 90


@pytest.fixture(autouse=True)
def _one_thread():
    """The expected outputs are computed on one thread, as the workers compute theirs: CPU fp32
    GEMMs block differently per thread count, and a one-rank group is compared bit for bit."""
    with one_thread():
        yield


def make_case(gen, world, e, inter, dtype=torch.bfloat16, fp8=False, h=64, k=4, group_size=None, backend="torch"):
    """GLM-like small shapes; a few slots are -1 (computed nowhere), some tokens have no slot at
    all, and some repeat an expert (routing never does; the op allows it). A rank may hold fewer
    experts than k (E=8 over 4 ranks here): its other slots are -1. ``want``, each
    rank's rows of single-process ``fused_moe`` on its group's tokens, is computed here, once."""
    from glm45_ops.quant import per_block_quant_fp8

    g = group_size or world
    w13 = torch.randn(e, 2 * inter, h, generator=gen) * h**-0.5
    w2 = torch.randn(e, h, inter, generator=gen) * inter**-0.5
    if fp8:
        (w13, s13), (w2, s2) = per_block_quant_fp8(w13), per_block_quant_fp8(w2)
    else:
        w13, w2, s13, s2 = w13.to(dtype), w2.to(dtype), None, None
    xs, wts, ids = [], [], []
    for t in TOKENS[world]:
        xs.append((torch.randn(t, h, generator=gen) * 0.5).to(dtype))
        wts.append(torch.rand(t, k, generator=gen))
        ids.append(torch.rand(t, e, generator=gen).topk(k, dim=1).indices.to(torch.int32))
        ids[-1][::4, -1] = -1
        ids[-1][1::5] = -1
        ids[-1][2::4, 1] = ids[-1][2::4, 0]
    want = []
    for block in range(world // g):
        ranks = range(block * g, (block + 1) * g)
        whole = moe.fused_moe(torch.cat([xs[r] for r in ranks]), w13, w2, torch.cat([wts[r] for r in ranks]),
                              torch.cat([ids[r] for r in ranks]), s13, s2, backend="torch")
        want += whole.split([TOKENS[world][r] for r in ranks])
    return dict(xs=xs, wts=wts, ids=ids, w13=w13, w2=w2, s13=s13, s2=s2, e=e, g=g, backend=backend,
                want=want)


def _run_case(rank, case, groups):
    g = case["g"]
    group = None if g == dist.get_world_size() else groups[g]
    experts = ep.local_experts(case["e"], group)
    assert experts == range(dist.get_rank(group) * len(experts), (dist.get_rank(group) + 1) * len(experts))
    shard = slice(experts.start, experts.stop)
    s13, s2 = (None if s is None else s[shard] for s in (case["s13"], case["s2"]))
    args = (case["xs"][rank], case["w13"][shard], case["w2"][shard], case["wts"][rank], case["ids"][rank])
    got = ep.ep_fused_moe(*args, case["e"], group, s13, s2, backend=case["backend"])
    want = case["want"][rank]
    assert got.shape == want.shape and got.dtype == want.dtype
    if g == 1:
        # one rank: the same rows in the same order through fused_moe, then 0 + partial
        assert_bit_equal(got, want)
    elif want.dtype == torch.float32:
        # the k slots' fp32 sum regrouped by rank: a few ulps (2^-24 relative) of terms <~ 1, so
        # 1e-6 is loose for that and tight against any routing mistake (~1e-1). torch.allclose,
        # not torch.testing, whose first call costs each worker ~1.5 s of imports.
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"max |diff| {(got - want).abs().max()}"
    else:
        # plus one more rounding of each rank's partial into bf16: fused_moe's own table
        why = _fused_op.compare(got, want, (*args, s13, s2))
        assert why is None, why
    again = ep.ep_fused_moe(*args, case["e"], group, s13, s2, backend=case["backend"])
    assert_bit_equal(again, got)


def _check_errors(rank, world, case):
    """Raised before any communication (every rank gets the same error, so none waits)."""
    x, wts, ids = case["xs"][rank], case["wts"][rank], case["ids"][rank]
    w13, w2 = case["w13"], case["w2"]
    per = case["e"] // world
    bad_e = case["e"] - 1
    with pytest.raises(ValueError, match=rf"num_experts \({bad_e}\) must be divisible by the group size \({world}\)"):
        ep.ep_fused_moe(x, w13[:per], w2[:per], wts, ids, bad_e)
    with pytest.raises(ValueError, match=rf"w13_local must hold this rank's {per} experts"):
        ep.ep_fused_moe(x, w13[:per + 1], w2[:per + 1], wts, ids, case["e"])
    with pytest.raises(ValueError, match="topk_weights must be float32"):
        ep.ep_fused_moe(x, w13[:per], w2[:per], wts.double(), ids, case["e"])
    # global ids: E is out of range on every rank (one token each, so a rank without tokens raises too)
    one = torch.zeros(1, x.shape[1], dtype=x.dtype)
    bad = torch.full((1, ids.shape[1]), -1, dtype=torch.int32)
    bad[0, 1] = case["e"]
    with pytest.raises(ValueError, match=rf"topk_ids must be in \[0, num_experts={case['e']}\) or -1 .*got {case['e']}"):
        ep.ep_fused_moe(one, w13[:per], w2[:per], torch.ones(1, ids.shape[1]), bad, case["e"])
    with pytest.raises(ValueError, match="num_experts must be positive, got 0"):
        ep.local_experts(0)
    with pytest.raises(TypeError, match="num_experts must be int, got float"):
        ep.local_experts(8.0)
    solo = dist.new_group([0])  # created by every rank, holding rank 0 only
    if rank:
        with pytest.raises(ValueError, match="group must contain this process"):
            ep.local_experts(8, solo)
    else:
        assert ep.local_experts(8, solo) == range(8)


def _worker(rank, world, init_file, cases):
    torch.set_num_threads(1)  # tiny GEMMs; several processes share 2 cores
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        # every rank creates every subgroup, in the same order (torch.distributed's rule)
        groups = {g: dist.new_subgroups(group_size=g)[0] for g in sorted({c["g"] for c in cases}) if g != world}
        for case in cases:
            _run_case(rank, case, groups)
        _check_errors(rank, world, cases[0])
    finally:
        dist.destroy_process_group()


def _spawn(world, tmp_path, cases):
    run_processes(_worker, world, (world, str(tmp_path / "init"), cases), DIST_TIMEOUT_S, "expert parallelism")


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_single_process(gen, tmp_path, world):
    """fp32 (E=8, I=32), bf16 (E=16, I=192: GLM-4.5's TP8 width), FP8 blocks (E=8, I=192), the
    default group and subgroups (each rank alone; halves at 4), the Triton backend at 2."""
    cases = [
        make_case(gen, world, 8, 32, torch.float32),
        make_case(gen, world, 16, 192),
        make_case(gen, world, 8, 192, fp8=True),
        make_case(gen, world, 8, 32, group_size=1),
    ]
    if world == 4:
        cases.append(make_case(gen, world, 8, 32, group_size=2))
    else:
        cases.append(make_case(gen, world, 8, 32, backend="triton"))
    _spawn(world, tmp_path, cases)
