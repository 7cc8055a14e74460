"""The CUDA extension: built for sm_90a and registering its kernels (required in CI, which sets
GLM45_REQUIRE_EXTENSION=1; elsewhere these tests run only when the extension is present)."""

import os
import subprocess

import pytest
import torch

import glm45_ops

REQUIRED = os.environ.get("GLM45_REQUIRE_EXTENSION") == "1"


@pytest.fixture(scope="module")
def ext():
    if not glm45_ops.extension_loaded():
        if REQUIRED:
            pytest.fail(f"glm45_ops._C must be built here: {glm45_ops.extension_error()}")
        pytest.skip(f"extension not built: {glm45_ops.extension_error()}")
    from glm45_ops import _C

    return _C


def test_registers_cuda_kernels_for_python_schemas(ext):
    kernels = glm45_ops.info()["cuda_kernels"]
    for name in ("per_token_group_quant_fp8", "per_block_quant_fp8", "dequant_fp8"):
        assert name in kernels, kernels
    assert set(kernels) <= set(glm45_ops.registered_ops()), "C++ registered a kernel for an op Python did not define"


def test_cpu_tensors_still_run_the_reference(ext):
    x = torch.randn(3, 256)
    q, s = torch.ops.glm45.per_token_group_quant_fp8(x)
    want = glm45_ops.quant.per_token_group_quant_fp8(x, backend="torch")
    assert torch.equal(q.view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(s, want[1])


def test_built_for_sm90a(ext):
    """The .so carries sm_90a machine code (wgmma needs the 'a' target)."""
    try:
        from triton.knobs import nvidia

        cuobjdump = nvidia.cuobjdump.path
    except Exception:
        pytest.skip("no cuobjdump available to inspect the binary")
    out = subprocess.run([cuobjdump, "--list-elf", ext.__file__], capture_output=True, text=True, timeout=120)
    assert "sm_90a" in out.stdout, out.stdout + out.stderr
