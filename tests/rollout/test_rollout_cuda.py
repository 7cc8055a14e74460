"""The CUDA kernel of token_logprobs (csrc/rollout/token_logprobs.cu).

Without a GPU (extension built): the C++ checks beyond the error table tests/test_extension.py
runs, through ``glm45_ops.testing.cuda_kernel_differs`` (Python's ValueError word for word, or
for arguments Python accepts only the device error): the vocabulary limit on both sides, float
formatting of temperatures, every float and id dtype.

On a GPU: against the torch reference within the op's rule (greedy rows exactly) on both load
paths (16-byte vectors; element loads for rows that are not 16-byte aligned), at GLM-4.5's
vocabulary, with per-row temperatures, greedy rows, masked vocabulary and NaN/inf rows, outputs
allocated over garbage, and under CUDA-graph capture.
"""

from __future__ import annotations

import pytest
import torch

import glm45_ops
from glm45_ops.rollout import token_logprobs
from glm45_ops.rollout.logprobs import MAX_VOCAB
from glm45_ops.testing import cuda_kernel_differs, poison_cuda_cache

OP = glm45_ops.registered_ops()["token_logprobs"]
gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def kernel():
    if not OP.has_cuda_kernel():
        pytest.skip("glm45_ops._C has no token_logprobs kernel here")


def _wide(v: int, dtype=torch.bfloat16) -> torch.Tensor:
    """A [1, v] tensor owning one element (a vocabulary limit without the memory): stride 0."""
    return torch.zeros(1, 1, dtype=dtype).expand(1, v)


IDS = torch.zeros(1, dtype=torch.int64)


@pytest.mark.parametrize("args", [
    (_wide(MAX_VOCAB + 1), IDS),
    (_wide(MAX_VOCAB), IDS),  # accepted V, refused stride
    (torch.zeros(1, 8, dtype=torch.float64), IDS),
    (torch.zeros(1, 8, dtype=torch.float8_e4m3fn), IDS),
    (torch.zeros(1, 8), IDS.to(torch.int16)),
    (torch.zeros(1, 8), IDS.to(torch.uint8)),
    (torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.int32)),
    (torch.zeros(1, 8), IDS, 1e-5, torch.ones(1)),
    (torch.zeros(1, 8), IDS, 123456789.125, torch.ones(1)),
    (torch.zeros(1, 8), IDS, -0.0, torch.ones(1)),
    (torch.zeros(1, 8), IDS, 1.0, torch.ones(1, dtype=torch.bfloat16)),
    (torch.zeros(3, 8), torch.zeros(3, dtype=torch.int32), 1.0, torch.ones(6)[::2]),  # strided: accepted
    (torch.zeros(3, 8, dtype=torch.float16), torch.zeros(6, dtype=torch.int32)[::2], 0.0),
    (torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64), float("inf")),
])
def test_cpp_checks_match_python(kernel, args):
    why = cuda_kernel_differs(OP, args)
    assert why is None, why


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

def _check(logits, ids, temperature=1.0, temperatures=None):
    """The CUDA kernel (outputs over garbage) against the torch reference on CPU."""
    kw = {"temperature": temperature} if temperatures is None else {"temperatures": temperatures}
    want = OP(logits.cpu(), ids.cpu(), backend="torch", **{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                           for k, v in kw.items()})
    poison_cuda_cache(1 << 24)
    got = OP(logits, ids, backend="cuda", **kw)
    why = OP.compare(tuple(g.cpu() for g in got), want, OP.bind((logits.cpu(), ids.cpu()), {
        k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}))
    assert why is None, why


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("v", [1, 7, 4099, 151552])
@pytest.mark.parametrize("aligned", [True, False])
def test_against_reference(dtype, v, aligned, gen):
    # rows 16-byte aligned (a row stride of whole 16-byte vectors) or not (offset by one element)
    wide = (torch.randn(33, -(-v // 8) * 8 + 8, generator=gen) * 4).to(dtype).cuda()
    logits = wide[:, :v] if aligned else wide[:, 1:v + 1]
    ids = torch.randint(0, v, (33,), generator=gen).cuda()
    _check(logits, ids, 0.8)
    t = torch.rand(33, generator=gen) + 0.3
    t[[3, 9]] = torch.tensor([0.0, -1.0])
    _check(logits, ids.int(), temperatures=t.cuda())


@gpu
def test_edge_rows(gen):
    x = torch.randn(8, 151552, generator=gen) * 3
    x[0, 1000:100000] = float("-inf")
    x[1, 5] = float("nan")
    x[2, 6] = float("inf")
    x[3] = float("-inf")
    x[4, 7:9] = x[4].max() + 1
    ids = torch.randint(0, 151552, (8,), generator=gen)
    ids[0] = 2000
    t = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e-30, float("inf"), float("nan"), 0.0])
    _check(x.cuda(), ids.cuda(), temperatures=t.cuda())


@gpu
def test_cuda_graph_replay(gen):
    logits = (torch.randn(64, 151552, generator=gen) * 3).bfloat16().cuda()
    ids = torch.randint(0, 151552, (64,), generator=gen).cuda()
    t = torch.full((64,), 0.9, device="cuda")
    token_logprobs(logits, ids, t)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lp, ent = token_logprobs(logits, ids, t)
    logits.copy_((torch.randn(64, 151552, generator=gen) * 3).bfloat16())
    graph.replay()
    want = token_logprobs(logits.cpu(), ids.cpu(), t.cpu(), backend="torch")
    assert OP.compare((lp.cpu(), ent.cpu()), want, (logits.cpu(), ids.cpu(), 1.0, t.cpu())) is None
