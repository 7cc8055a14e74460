"""The CUDA extension: built for sm_90a and registering its kernels (required in CI, which sets
GLM45_REQUIRE_EXTENSION=1; elsewhere these tests run only when the extension is present).

Every C++ kernel's host checks are Python's, for every op present and future: called through the
CUDA dispatch key with CPU tensors, each kernel refuses the raw bad inputs of its op's error table
with Python's exception type and message, and lets every sample input through to its device
check (no GPU needed). Each family's extra cases (size limits, eps values, dtype names, CUTLASS's
can_implement) live in its own tests, through the same ``glm45_ops.testing.cuda_kernel_differs``.
"""

import os
import subprocess

import pytest
import torch

import glm45_ops
from glm45_ops.testing import cuda_kernel_differs

OPS = glm45_ops.registered_ops()

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
    for name in ("per_token_group_quant_fp8", "per_block_quant_fp8", "dequant_fp8", "fp8_block_gemm", "verify_greedy",
                 "verify_sampling", "moe_route", "moe_align_block_size", "grouped_fp8_block_gemm", "grouped_bf16_gemm",
                 "qk_norm_rope", "qk_norm_rope_", "kv_cache_write", "qk_norm_rope_kv_write", "token_logprobs"):
        assert name in kernels, kernels
    assert set(kernels) <= set(glm45_ops.registered_ops()), "C++ registered a kernel for an op Python did not define"


def _table(op, table: str) -> list[tuple[str, tuple, dict]]:
    """(label, args, kwargs) of the op's raw bad inputs or of its samples, on CPU tensors. Bad
    inputs with ``fake=False`` are left out: their check reads tensor values, which Python does
    only for CPU tensors and the C++ kernel, given CUDA ones, never does (a host sync)."""
    cpu = torch.device("cpu")
    if table == "errors":
        return [(f"errors[{i}] ({e.match!r})", e.args, e.kwargs)
                for i, e in enumerate(op.errors(cpu)) if e.raw and e.fake]
    return [(f"samples[{i}] ({s.tag or 'sample'} {s.note})", s.args, s.kwargs)
            for i, s in enumerate(op.samples(cpu, torch.Generator().manual_seed(0)))]


@pytest.mark.parametrize("table", ["errors", "samples"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_cpp_checks_match_python(ext, name, table):
    """The C++ kernel raises what Python's check raises on each raw bad input of the op's error
    table, and lets each sample through to its device error (a C++ check stricter than
    Python's would refuse on CUDA what runs on CPU)."""
    op = OPS[name]
    if not op.has_cuda_kernel():
        pytest.skip(f"{name} has no C++ kernel")
    wrong = []
    for label, args, kwargs in _table(op, table):
        why = cuda_kernel_differs(op, args, kwargs)
        if why is not None:
            wrong.append(f"{label}: {why}")
    assert not wrong, "\n".join(wrong)


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
