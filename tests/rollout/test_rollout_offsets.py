"""Element offsets past int32 in the Triton kernels (GLM-4.5's ``[16384, 151552]`` logits span
2.5e9 elements, past 2^31): every row is addressed as ``row * stride`` in int64.

The interpreter computes int32 as numpy int32, which wraps, so a kernel multiplying in int32
reads another address here too. The operands are 3-row views with a row stride of
``2^30 + 64`` elements (an int32 argument, as a real stride is) whose last row starts past
2^31 elements. They live in one 8 GB ``torch.empty`` allocation of which only the written rows
are ever touched (virtual memory otherwise), and they begin 2^31 elements into it, so a wrapped
offset lands inside the allocation: a wrong answer, not a crash.
"""

from __future__ import annotations

import pytest
import torch

import glm45_ops
from conftest import cpu_backends

STRIDE = 2**30 + 64
BASE = 2**31
OPS = glm45_ops.registered_ops()

pytestmark = pytest.mark.skipif("triton" not in cpu_backends(), reason="no Triton interpreter here")


@pytest.fixture(scope="module")
def storage():
    try:
        return torch.empty(BASE + 2 * STRIDE + 4096, dtype=torch.bfloat16)
    except RuntimeError as e:  # a machine that does not overcommit
        pytest.skip(f"cannot reserve 8 GB of address space: {e}")


def far_rows(storage: torch.Tensor, values: torch.Tensor, column: int) -> torch.Tensor:
    """``values`` ``[3, n]`` written into rows ``STRIDE`` elements apart, from ``BASE + column``."""
    view = storage.as_strided(values.shape, (STRIDE, 1), BASE + column)
    view.copy_(values)
    return view


def agree(name: str, args: tuple) -> None:
    op = OPS[name]
    want = op(*args, backend="torch")
    got = op(*args, backend="triton")
    why = op.compare(got, want, op.bind(args, {}))
    assert why is None, why


def test_token_logprobs(storage, gen):
    logits = far_rows(storage, torch.randn(3, 300, generator=gen) * 3, 0)
    agree("token_logprobs", (logits, torch.randint(0, 300, (3,), generator=gen), 0.7))


def test_linear_logprobs_and_backward(storage, gen):
    hidden = far_rows(storage, torch.randn(3, 32, generator=gen), 0)
    weight = far_rows(storage, torch.randn(3, 32, generator=gen) * 0.3, 1024)  # V = 3 rows as far apart
    ids = torch.randint(0, 3, (3,), generator=gen)
    agree("linear_logprobs", (hidden, weight, ids, 0.7))
    _, ent, lse = OPS["linear_logprobs"](hidden, weight, ids, 0.7, backend="torch")
    grads = tuple(torch.randn(3, generator=gen) for _ in range(3))
    agree("linear_logprobs_backward", (*grads, hidden, weight, ids, ent, lse, 0.7))
