"""The CUDA kernel of moe_align_block_size (csrc/moe/align.cu): bit-exact with the reference
(stable pair order within each expert, ids outside [0, E) left out, padding T*k, -1 blocks) on
both of its paths (one CTA for decode sizes, count + scatter over many CTAs for prefill), for any
E up to 1024, int32 and int64 ids, strided ids, and under CUDA-graph capture and replay.

Without a GPU this still checks, when the extension is built, the C++ argument checks beyond the
error table that tests/test_extension.py runs: each limit on both sides, through
``glm45_ops.testing.cuda_kernel_differs`` (Python's ValueError word for word, or, for arguments
Python accepts, only the device error).
"""

from __future__ import annotations

import pytest
import torch

import glm45_ops
from glm45_ops import moe
from glm45_ops.moe.permute import MAX_BLOCK_SIZE, MAX_EXPERTS
from glm45_ops.reference.moe import moe_align_block_size_ref, padded_size
from glm45_ops.testing import assert_bit_equal, cuda_kernel_differs, poison_cuda_cache

OP = glm45_ops.registered_ops()["moe_align_block_size"]
gpu = pytest.mark.gpu
NAMES = ("sorted_ids", "block_expert", "num_padded")


def check_align(ids: torch.Tensor, num_experts: int, block_size: int) -> None:
    """The CUDA kernel's outputs (allocated over garbage) equal the reference's bit for bit, with
    the shapes, dtypes and strides Python's alloc gives."""
    want = moe_align_block_size_ref(ids.cpu(), num_experts, block_size)
    for w in want:
        poison_cuda_cache(w.numel() * w.element_size())
    got = moe.moe_align_block_size(ids, num_experts, block_size, backend="cuda")
    allocated = OP.alloc(ids, num_experts, block_size)
    for g, w, a, name in zip(got, want, allocated, NAMES):
        assert (g.shape, g.dtype, g.stride()) == (a.shape, a.dtype, a.stride()), name
        assert_bit_equal(g.cpu(), w, name)


def random_ids(t: int, k: int, e: int, gen: torch.Generator, dtype=torch.int32, outside: float = 0.0) -> torch.Tensor:
    """Ids in [0, e), a fraction `outside` of them replaced by ids just outside (remote experts)."""
    ids = torch.randint(0, e, (t, k), generator=gen)
    below = torch.randint(-4, 0, (t, k), generator=gen)
    above = torch.randint(e, e + 4, (t, k), generator=gen)
    far = torch.where(torch.rand((t, k), generator=gen) < 0.5, below, above)
    ids = torch.where(torch.rand((t, k), generator=gen) < outside, far, ids)
    return ids.to(dtype).cuda()


# ---------------------------------------------------------------------------------------------
# No GPU needed: the C++ checks through the CUDA key
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel():
    if not OP.has_cuda_kernel():
        pytest.skip("glm45_ops._C has no moe_align_block_size kernel here")


def _huge(numel: int) -> torch.Tensor:
    """A [numel, 1] int32 tensor that owns one element (the limit on T*k without the memory)."""
    return torch.zeros(1, 1, dtype=torch.int32).expand(numel, 1)


@pytest.mark.parametrize("args", [
    (torch.zeros(4, 8, dtype=torch.uint8), 8, 16),
    (torch.zeros(4, 8, dtype=torch.int16), 8, 16),
    (torch.zeros(2, 4, 8, dtype=torch.int32), 8, 16),
    (torch.zeros((), dtype=torch.int64), 8, 16),
    (torch.zeros(4, 8, dtype=torch.int64), -1, 16),
    (torch.zeros(4, 8, dtype=torch.int64), MAX_EXPERTS + 1, 16),
    (torch.zeros(4, 8, dtype=torch.int32), MAX_EXPERTS, MAX_BLOCK_SIZE + 1),
    (torch.zeros(4, 8, dtype=torch.int32), 8, -5),
    (_huge(2**31 - 160 * 64), 160, 64),
    (_huge(2**31 - 160 * 64 - 1), 160, 64),
    (_huge(2**31 - 1024 * 1024), 1024, 1024),
    (_huge(2**31 - 1024 * 1024 - 1), 1024, 1024),
    (torch.zeros(8, 4, dtype=torch.int64).t(), MAX_EXPERTS, MAX_BLOCK_SIZE),
    (torch.zeros(0, 8, dtype=torch.int32), 1, 1),
    (torch.zeros(5, 0, dtype=torch.int64), 160, 64),
], ids=lambda a: f"{tuple(a.shape)}-{a.dtype}" if isinstance(a, torch.Tensor) else None)
def test_cpp_checks_match_python_at_the_limits(kernel, args):
    why = cuda_kernel_differs(OP, args)
    assert why is None, why


# ---------------------------------------------------------------------------------------------
# GPU: against the reference
# ---------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("bs", [16, 64, 1])
@pytest.mark.parametrize("e", [8, 128, 160, 256, 1024])
@pytest.mark.parametrize("t", [0, 1, 7, 64, 257, 4096, 16384])
def test_matches_reference(gen, t, e, bs):
    check_align(random_ids(t, 8, e, gen, outside=0.05), e, bs)


@gpu
@pytest.mark.parametrize("t", [1, 300, 4096])
def test_int64_ids_beyond_int32_are_out_of_range(gen, t):
    """2^32 + 3 narrowed to int32 would be expert 3: it must stay out of range, as must the
    int64 extremes."""
    e = 160
    ids = random_ids(t, 8, e, gen, dtype=torch.int64)
    wrap = torch.tensor([2**32 + 3, -(2**32) + 5, 2**31, -(2**31) - 1, 2**63 - 1, -(2**63)], device="cuda")
    pick = torch.randint(0, ids.numel(), (max(1, ids.numel() // 4),), generator=gen).cuda()
    ids.view(-1)[pick] = wrap[pick % wrap.numel()]
    check_align(ids, e, 16)


@gpu
@pytest.mark.parametrize("t", [5, 4096])
def test_arbitrary_int32_ids(gen, t):
    ids = torch.randint(-(2**31), 2**31 - 1, (t, 8), generator=gen, dtype=torch.int32)
    ids[::3, 0] = 7  # some in range
    check_align(ids.cuda(), 160, 16)


@gpu
@pytest.mark.parametrize("bs", [1, 16, 128])
@pytest.mark.parametrize("t", [1, 200, 16384])
def test_all_pairs_on_one_expert(t, bs):
    check_align(torch.full((t, 8), 159, dtype=torch.int32, device="cuda"), 160, bs)


@gpu
@pytest.mark.parametrize("t", [7, 4096])
def test_all_ids_out_of_range(t):
    check_align(torch.full((t, 8), -1, dtype=torch.int64, device="cuda"), 256, 64)


@gpu
@pytest.mark.parametrize("t", [9, 3000])
def test_strided_ids(gen, t):
    """A slice of a wider routing tensor and a transposed view: read through their strides."""
    wide = random_ids(t, 12, 160, gen)
    check_align(wide[:, 2:10], 160, 16)
    check_align(random_ids(8, t, 160, gen).t(), 160, 64)


@gpu
@pytest.mark.parametrize("e,bs", [(1, 1), (1, 1024), (1024, 1024), (1024, 64), (7, 3)])
@pytest.mark.parametrize("t", [0, 1, 64, 2048])
def test_extreme_experts_and_blocks(gen, t, e, bs):
    """Long padding (E * (block_size - 1) up to ~1M slots) past the single-CTA path's limit, odd
    block sizes, one expert."""
    check_align(random_ids(t, 8, e, gen, outside=0.1), e, bs)


@gpu
@pytest.mark.parametrize("t", [8, 4096])
def test_cuda_graph_replay_with_new_ids(gen, t):
    """Captured once (both paths: one CTA at t = 8, count + scatter at 4096), replayed on new ids
    copied into the same buffer: no host sync, no data-dependent allocation."""
    e, bs = 160, 64
    ids = random_ids(t, 8, e, gen)
    moe.moe_align_block_size(ids, e, bs, backend="cuda")  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = moe.moe_align_block_size(ids, e, bs, backend="cuda")
    for _ in range(3):
        ids.copy_(random_ids(t, 8, e, gen, outside=0.05))
        for o in outs:
            o.fill_(0x7F)
        graph.replay()
        torch.cuda.synchronize()
        for g, w, name in zip(outs, moe_align_block_size_ref(ids.cpu(), e, bs), NAMES):
            assert_bit_equal(g.cpu(), w, name)
    assert outs[0].numel() == padded_size(t * 8, e, bs)
