"""``fused_moe_grouped`` (permutation + grouped GEMM ops + combine) against ``fused_moe``'s
reference under ``fused_moe``'s own comparison rule, on every backend of the grouped GEMMs."""

from __future__ import annotations

import pytest
import torch

from conftest import device_backends
from glm45_ops import moe
from glm45_ops.moe.fused import _fused_op
from glm45_ops.reference.moe import QUANT_GROUP, fused_moe_ref
from glm45_ops.reference.quant import per_block_quant_fp8_ref

BACKENDS = device_backends()


def _case(gen, t, h, inter, e, k, fp8=False, ids_lo=0, ids_hi=None, one_expert=False, nan_row=None):
    x = (torch.randn(t, h, generator=gen) * 0.5).to(torch.bfloat16)
    if nan_row is not None:
        x[nan_row, 3] = float("nan")
    w13 = torch.randn(e, 2 * inter, h, generator=gen) * h**-0.5
    w2 = torch.randn(e, h, inter, generator=gen) * inter**-0.5
    if one_expert:
        ids = torch.full((t, k), e - 1, dtype=torch.int32)
    elif ids_hi is None:
        ids = torch.rand(t, e, generator=gen).topk(k, dim=1).indices.to(torch.int32)
    else:  # expert parallelism: slots of other ranks' experts are -1, left out
        ids = torch.randint(ids_lo, ids_hi, (t, k), generator=gen, dtype=torch.int32)
        ids = torch.where((ids >= 0) & (ids < e), ids, -1)
    wts = torch.rand(t, k, generator=gen)
    if fp8:
        (w13, s13), (w2, s2) = (per_block_quant_fp8_ref(w, QUANT_GROUP, 1e-4, False) for w in (w13, w2))
        return x, w13, w2, wts, ids, s13, s2
    return x, w13.to(torch.bfloat16), w2.to(torch.bfloat16), wts, ids, None, None


CASES = {
    "bf16 I=192": dict(t=9, h=128, inter=192, e=6, k=3),
    "fp8 I=192 partial blocks": dict(t=7, h=256, inter=192, e=5, k=2, fp8=True),
    "fp8 I=176 (Air TP8)": dict(t=5, h=128, inter=176, e=4, k=2, fp8=True),
    "expert parallel ids": dict(t=11, h=64, inter=32, e=4, k=3, ids_lo=-2, ids_hi=9),
    "all on one expert": dict(t=6, h=64, inter=48, e=3, k=2, one_expert=True),
    "NaN in one token": dict(t=5, h=128, inter=64, e=4, k=2, fp8=True, nan_row=2),
    "empty": dict(t=0, h=64, inter=32, e=4, k=2),
}


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_grouped_path_matches_fused_moe(gen, device, backend, name):
    args = _case(gen, **CASES[name])
    bound = _fused_op.bind(args, {})
    want = fused_moe_ref(*bound)
    got = moe.fused_moe_grouped(*(a if a is None else a.to(device) for a in args), backend=backend)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    why = _fused_op.compare(got.cpu(), want, bound)
    assert why is None, why


def test_grouped_path_refuses_what_its_gemms_cannot_do(gen):
    x, w13, w2, wts, ids, _, _ = _case(gen, 4, 64, 32, 3, 2)
    with pytest.raises(ValueError, match="x must be bfloat16"):
        moe.fused_moe_grouped(x.half(), w13.half(), w2.half(), wts, ids)
    x, w13, w2, wts, ids, s13, s2 = _case(gen, 4, 128, 64, 3, 2, fp8=True)
    per_row = s13.repeat_interleave(QUANT_GROUP, dim=1)[:, :w13.shape[1]]  # a tensor-parallel shard's layout
    with pytest.raises(ValueError, match="128 x 128 block scales"):
        moe.fused_moe_grouped(x, w13, w2, wts, ids, per_row.contiguous(), s2)
    with pytest.raises(ValueError, match="topk_weights must be float32"):
        moe.fused_moe_grouped(x, w13, w2, wts.double(), ids, s13, s2)
