"""Shape fuzzing of the activation quantizer: every backend bit-exact with the reference
(a module of its own so the rest of the quant tests run where hypothesis is not installed)."""

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import device_backends  # noqa: E402
from glm45_ops import quant  # noqa: E402
from glm45_ops.testing import assert_bit_equal  # noqa: E402
from test_quant import wide_range  # noqa: E402


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 40),
    k=st.integers(1, 520),
    group=st.sampled_from([32, 64, 96, 128]),
    ue8m0=st.booleans(),
    eps=st.sampled_from([1e-4, 1e-10]),
)
def test_per_token_group_quant_fuzz(rows, k, group, ue8m0, eps):
    """Any K (the last group partial), power-of-two or not group sizes."""
    x = wide_range((rows, k), torch.bfloat16, torch.Generator().manual_seed(rows * 31 + k))
    want = quant.per_token_group_quant_fp8(x, group, eps, ue8m0, backend="torch")
    for device, backend in device_backends():
        got = quant.per_token_group_quant_fp8(x.to(device), group, eps, ue8m0, backend=backend)
        assert_bit_equal(got[0], want[0], "x_q")
        assert_bit_equal(got[1], want[1], "scale")
