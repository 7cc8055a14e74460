"""FP8 fused_moe over the issue's grid: T in {1, 7, 64, 257} x I in {128, 192, 176} on every
backend, against the float64 math on the dequantized weights and the 1 x 128-quantized
activations (DeepGEMM's FP8 metric). Decode T takes the split-K gate-up path on Triton."""

from __future__ import annotations

import pytest
import torch

from conftest import device_backends
from glm45_ops import moe
from glm45_ops.quant import dequant_fp8, per_block_quant_fp8, per_token_group_quant_fp8
from glm45_ops.testing import calc_diff, poisoned_outputs
from test_moe import make


def oracle(x, w13, w2, wts, ids):
    """float64, a loop over experts (test_moe's per-pair loop is too slow at T=257): h rounded
    into x's dtype as the definition says."""
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(w13.shape[0]):
        rows, slots = (ids == e).nonzero(as_tuple=True)
        gu = x[rows].double() @ w13[e].double().T
        act = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype).double()
        out.index_add_(0, rows, wts[rows, slots].double()[:, None] * (act @ w2[e].double().T))
    return out


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("t", [1, 7, 64, 257])
@pytest.mark.parametrize("inter", [128, 192, 176])
def test_fp8_fused_moe_grid(gen, device, backend, t, inter):
    h = 1024 if t <= 7 else 256  # decode: 8 K tiles, so the Triton gate-up GEMM splits K in two
    x, w13, w2, wts, ids = make(t, h, inter, 5, 2, torch.float32, gen)
    (q13, s13), (q2, s2) = per_block_quant_fp8(w13), per_block_quant_fp8(w2)
    xb = x.to(torch.bfloat16)
    with poisoned_outputs():
        got = moe.fused_moe(*(v.to(device) for v in (xb, q13, q2, wts, ids, s13, s2)), backend=backend).cpu()
    deq = [dequant_fp8(q, s, 128, 128, torch.float32) for q, s in ((q13, s13), (q2, s2))]
    xq = dequant_fp8(*per_token_group_quant_fp8(xb), out_dtype=torch.float32).to(torch.bfloat16)
    want = oracle(xq, deq[0], deq[1], wts, ids)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert calc_diff(got, want) < 1e-3


@pytest.mark.parametrize("t,k,e,bm", [(1, 8, 160, 16), (37, 8, 8, 16), (64, 8, 160, 16), (300, 2, 3, 64), (5, 4, 4, 64)])
def test_used_blocks_bounds_the_filled_blocks(gen, t, k, e, bm):
    """The GEMM grids stop at ``used_blocks``: never below the blocks the permutation fills
    (random routing, one pair per expert, everything on one expert), and tight for one token."""
    from glm45_ops.reference.moe import moe_align_block_size_ref
    from triton_ops import moe as tm

    routings = [torch.rand(t, e, generator=gen).topk(k, dim=1).indices, torch.zeros(t, k, dtype=torch.long),
                torch.arange(t * k).remainder(e).view(t, k)]
    for ids in routings:
        _, block_expert, num_padded = moe_align_block_size_ref(ids.int(), e, bm)
        filled = int(num_padded) // bm
        assert filled <= tm.used_blocks(t * k, e, bm, block_expert.numel()) <= block_expert.numel()
        assert (block_expert[filled:] == -1).all()
    assert tm.used_blocks(8, 160, 16) == 9  # GLM-4.5, one token: 9 row blocks, not 150


@pytest.mark.parametrize("device", sorted({d for d, b in device_backends() if b == "triton"}))
@pytest.mark.parametrize("t,h", [(1, 1024), (5, 208), (64, 256)])
def test_x_quantized_in_the_gate_up_kernel_gives_the_same_bits(gen, device, t, h, monkeypatch):
    """FP8 decode sizes quantize x inside the gate-up kernel: the same bytes and scales as
    ``per_token_group_quant_fp8`` (a partial last group at H=208, a NaN and an inf in x), so the
    output is bit-identical to the two-launch path, split K (t=1) or not."""
    from glm45_ops.testing import assert_bit_equal
    from triton_ops import moe as tm

    x, w13, w2, wts, ids = make(t, h, 192, 5, 2, torch.float32, gen)
    x[0, 3], x[-1, 130 % h] = float("inf"), float("nan")
    (q13, s13), (q2, s2) = per_block_quant_fp8(w13), per_block_quant_fp8(w2)
    args = [v.to(device) for v in (x.to(torch.bfloat16), q13, q2, wts, ids, s13, s2)]
    got = {}
    for fused in (True, False):
        monkeypatch.setattr(tm, "quantizes_x", lambda pairs, fused=fused: fused)
        got[fused] = moe.fused_moe(*args, backend="triton").cpu()
    assert_bit_equal(got[True], got[False], "x quantized in the kernel vs per_token_group_quant_fp8")
    assert torch.isnan(got[True][-1]).all() and torch.isfinite(got[True][1:-1]).all()


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_no_slots_give_zeros(gen, device, backend, fp8):
    """k = 0 (every token's experts elsewhere, as a shape): a zero output on every backend."""
    x, w13, w2, _, _ = make(3, 128, 64, 2, 1, torch.float32, gen)
    s13 = s2 = None
    if fp8:
        (w13, s13), (w2, s2) = per_block_quant_fp8(w13), per_block_quant_fp8(w2)
    else:
        w13, w2 = w13.bfloat16(), w2.bfloat16()
    args = (x.bfloat16(), w13, w2, torch.empty(3, 0), torch.empty(3, 0, dtype=torch.int32), s13, s2)
    with poisoned_outputs():
        got = moe.fused_moe(*(None if v is None else v.to(device) for v in args), backend=backend).cpu()
    assert torch.equal(got, torch.zeros(3, 128, dtype=torch.bfloat16))
