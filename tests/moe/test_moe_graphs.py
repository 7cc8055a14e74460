"""The MoE ops in CUDA graphs (GPU): a decode step's routing, permutation and experts must not
sync the host, so they can be captured (``glm45_ops.bench.timing.capture``, the benchmarks' own:
an eager call with syncs made errors first); the replays, on new inputs copied into the captured
buffers, equal eager calls on those inputs."""

from __future__ import annotations

import pytest
import torch

import glm45_ops
from glm45_ops import moe
from glm45_ops.bench.timing import capture
from glm45_ops.quant import per_block_quant_fp8
from glm45_ops.testing import outputs_differ

pytestmark = pytest.mark.gpu


def _routing(t, e, k, gen):
    logits = torch.randn(t, e, generator=gen, device="cuda").to(torch.bfloat16)
    bias = torch.randn(e, generator=gen, device="cuda") * 0.1
    return logits, bias


@pytest.mark.parametrize("t", [1, 16, 64])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("path", ["fused_moe", "fused_moe_grouped"])
def test_decode_moe_replays_equal_eager_calls(t, fp8, path):
    """GLM-4.5 at TP8 (E=160, I=192; H cut to 1024 to keep it quick): route, then the experts
    (T=1: the split-K gate-up path), captured once and replayed on fresh inputs; the last
    replay also against the torch reference under the op's rule."""
    gen = torch.Generator(device="cuda").manual_seed(t)
    e, k, h, inter = 160, 8, 1024, 192
    w13 = torch.randn(e, 2 * inter, h, generator=gen, device="cuda") * h**-0.5
    w2 = torch.randn(e, h, inter, generator=gen, device="cuda") * inter**-0.5
    if fp8:
        (w13, s13), (w2, s2) = per_block_quant_fp8(w13), per_block_quant_fp8(w2)
    else:
        w13, w2, s13, s2 = w13.bfloat16(), w2.bfloat16(), None, None
    x = torch.randn(t, h, generator=gen, device="cuda").bfloat16()
    logits, bias = _routing(t, e, k, gen)
    experts = getattr(moe, path)
    backend = {"fused_moe": "triton", "fused_moe_grouped": "cuda"}[path]

    def step():
        wts, ids = moe.moe_route(logits, bias, k, 1, 1, True, 2.5, backend="cuda")
        return experts(x, w13, w2, wts, ids, s13, s2, backend=backend)

    outs = []
    graph, why = capture(lambda: outs.append(step()))  # the sync check, the warm-up, then the capture
    assert graph is not None, why
    out = outs[-1]  # the captured call's output: what every replay rewrites
    for _ in range(3):
        x.copy_(torch.randn(t, h, generator=gen, device="cuda"))
        new_logits, new_bias = _routing(t, e, k, gen)
        logits.copy_(new_logits)
        bias.copy_(new_bias)
        graph.replay()
        torch.testing.assert_close(out, step(), rtol=0, atol=0)  # same kernels, same inputs: same bits
    wts, ids = moe.moe_route(logits, bias, k, 1, 1, True, 2.5, backend="torch")
    args = (x, w13, w2, wts, ids, s13, s2)
    op = glm45_ops.registered_ops()["fused_moe"]
    why = outputs_differ(out, moe.fused_moe(*args, backend="torch"), op, op.bind(args, {}))
    assert why is None, why
