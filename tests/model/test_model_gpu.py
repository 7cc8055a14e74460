"""The tiny reference model on a GPU: every backend's ops assembled, BF16 and FP8, against the
torch backend on the same device (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from glm45_ops.model import Glm45Config, Glm45ForCausalLM
from glm45_ops.testing import calc_diff

pytestmark = pytest.mark.gpu
TINY = Glm45Config.preset("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Glm45ForCausalLM(TINY, dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("backend", [None, "triton"])
def test_forward_matches_torch_backend(model, backend):
    ids = torch.randint(0, TINY.vocab_size, (3, 37), device="cuda")
    model.backend = "torch"
    want = model(ids).float()
    model.backend = backend
    got = model(ids).float()
    assert calc_diff(got, want) < 1e-3


def test_paged_chunks_match_full_forward(model):
    model.backend = None
    ids = torch.randint(0, TINY.vocab_size, (2, 40), device="cuda")
    full = model(ids).float()
    cache = model.new_cache(2, 40, page_size=16)
    start = torch.zeros(2, dtype=torch.int32, device="cuda")
    parts = []
    for lo, hi in ((0, 33), (33, 34), (34, 40)):
        parts.append(model.extend(ids[:, lo:hi], cache, start)[0].float())
        start += hi - lo
    assert calc_diff(torch.cat(parts, 1), full) < 1e-3


def test_fp8_close_to_bf16_and_speculative_runs():
    torch.manual_seed(1)
    m = Glm45ForCausalLM(TINY, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, TINY.vocab_size, (2, 29), device="cuda")
    bf16 = m(ids).float()
    m.quantize_fp8_()
    assert calc_diff(m(ids).float(), bf16) < 1e-2
    out, stats = m.generate(ids, 8, speculative="mtp", num_draft_tokens=3, return_stats=True)
    assert out.shape == (2, 8) and stats["rounds"] >= 1


@pytest.mark.parametrize("spec", [None, "mtp"])
def test_cuda_graph_decode_gives_the_same_tokens(model, spec):
    """Every decode-time step captured in a CUDA graph (capture fails on a host sync in any op)
    and replayed: the same greedy tokens as eager."""
    model.backend = None
    ids = torch.randint(0, TINY.vocab_size, (3, 11), device="cuda")
    eager = model.generate(ids, 12, speculative=spec, num_draft_tokens=3)
    graphed = model.generate(ids, 12, speculative=spec, num_draft_tokens=3, cuda_graph=True)
    assert torch.equal(graphed, eager)
