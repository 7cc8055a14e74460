"""grouped_fp8_block_gemm: the grouped FP8 block GEMM over expert-contiguous rows.

On CPU: the reference against the float64 oracle per group (``glm45_ops.gemm.error_bound``,
fp32 accumulation), padding rows zero; the Triton kernel (interpreter) against the reference
under the op's own rule, outputs poisoned, with several row tiles per group, empty groups and
padding; device offsets out of range clamped by the kernel, never read or written outside the
tensors; and, without a GPU, the CUTLASS kernel's C++ checks and can_implement for GLM-4.5's
shapes (G = 160 / 20 experts, N = 384 / 5120, K = 5120 / 192) through the CUDA dispatch key.

On the GPU: the CUTLASS and Triton kernels against the oracle at GLM-4.5 shapes, and a CUDA graph
replayed with new offsets (no host sync inside the op).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import glm45_ops
from glm45_ops import gemm, registered_ops
from glm45_ops.moe import grouped_bf16_gemm, grouped_fp8_block_gemm
from glm45_ops.moe.grouped import bf16_operands, operands
from glm45_ops.reference.moe_grouped import grouped_bf16_gemm_ref, grouped_fp8_block_gemm_ref
from glm45_ops.reference.quant import FP8_DTYPE
from glm45_ops.testing import check_sm90a_refusal, cuda_kernel_differs, poisoned_outputs

OP = registered_ops()["grouped_fp8_block_gemm"]
BF16_OP = registered_ops()["grouped_bf16_gemm"]
ROOT = Path(__file__).resolve().parents[2]
gpu = pytest.mark.gpu


def _bounds(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    o = offsets.tolist()
    return [(g, lo, hi) for g, (lo, hi) in enumerate(zip(o[:-1], o[1:]))]


# ---------------------------------------------------------------------------------------------
# The reference against the float64 oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes,n,k,lead,tail", [
    ([5, 0, 3, 1], 257, 192, 0, 0),
    ([2, 4], 130, 176, 2, 3),
    ([7], 129, 384, 0, 0),
    ([1, 1, 1], 33, 16, 0, 1),
])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_reference_matches_the_oracle(gen, sizes, n, k, lead, tail, out_dtype):
    a, a_s, b, b_s, off = operands(sizes, n, k, gen, "cpu", lead=lead, tail=tail)
    out = grouped_fp8_block_gemm_ref(a, a_s, b, b_s, off, out_dtype)
    assert out.shape == (a.shape[0], n) and out.dtype == out_dtype
    inside = torch.zeros(a.shape[0], dtype=torch.bool)
    for g, lo, hi in _bounds(off):
        inside[lo:hi] = True
        y, bound = gemm.error_bound(a[lo:hi], a_s[lo:hi], b[g], b_s[g], out_dtype, tensor_cores=False)
        assert ((out[lo:hi].double() - y).abs() <= bound).all(), f"group {g}"
    assert (out[~inside] == 0).all()


def test_reference_ignores_padding_rows(gen):
    """Rows outside every group are zero whatever a holds there (NaN included)."""
    a, a_s, b, b_s, off = operands([3], 64, 128, gen, "cpu", lead=2, tail=2)
    a_s[0] = float("nan")
    a_s[-1] = float("inf")
    out = grouped_fp8_block_gemm_ref(a, a_s, b, b_s, off, torch.float32)
    assert (out[:2] == 0).all() and (out[-2:] == 0).all() and torch.isfinite(out[2:5]).all()


# ---------------------------------------------------------------------------------------------
# Triton (interpreter) against the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes,n,k,lead,tail,mn", [
    ([70, 0, 1, 79], 64, 192, 0, 0, False),    # several 64-row tiles per group, an empty group
    ([0, 33, 0], 192, 176, 5, 40, True),        # padding on both sides, MN-major a_scale
    ([3, 3, 3, 3, 3], 16, 256, 0, 0, False),    # many small groups in one tile's span
    ([0, 0], 8, 128, 0, 9, False),              # every group empty: all rows zeroed
])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_reference(gen, sizes, n, k, lead, tail, mn, out_dtype):
    args = (*operands(sizes, n, k, gen, "cpu", lead=lead, tail=tail, mn=mn), out_dtype)
    want = grouped_fp8_block_gemm(*args, backend="torch")
    with poisoned_outputs():
        got = grouped_fp8_block_gemm(*args, backend="triton")
    assert OP.compare(got, want, OP.bind(args, {})) is None


def test_triton_clamps_bad_device_offsets(gen):
    """The checks read offsets only on CPU; on the device the kernel clamps them into
    [0, M_total], so bad values never address outside the tensors. Here the launcher is called
    directly (past the check) with offsets before 0 and past M_total."""
    from triton_ops import moe_grouped as tg

    a, a_s, b, b_s, _ = operands([4, 4, 4], 32, 128, gen, "cpu")
    bad = torch.tensor([-5, 6, 6, 100], dtype=torch.int32)  # clamped: [0, 6, 6, 12]
    out = torch.full((12, 32), float("nan"))
    tg.grouped_fp8_block_gemm(a, a_s, b, b_s, bad, out)
    clamped = (a, a_s, b, b_s, torch.tensor([0, 6, 6, 12], dtype=torch.int32), torch.float32)
    want = grouped_fp8_block_gemm_ref(*clamped)
    assert OP.compare(out, want, clamped) is None


def test_offsets_out_of_range_are_refused_on_cpu(gen):
    a, a_s, b, b_s, _ = operands([2, 2], 16, 128, gen, "cpu")
    with pytest.raises(ValueError, match=r"nondecreasing within \[0, M_total = 4\], got expert_offsets\[1\] = 5"):
        grouped_fp8_block_gemm(a, a_s, b, b_s, torch.tensor([0, 5, 4], dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# BF16 on CPU: the reference against the oracle, Triton against the reference
# ---------------------------------------------------------------------------------------------

def test_bf16_reference_matches_the_oracle(gen):
    a, b, off = bf16_operands([5, 0, 3, 1], 24, 192, gen, "cpu", lead=1, tail=2)
    out = grouped_bf16_gemm_ref(a, b, off)
    inside = torch.zeros(a.shape[0], dtype=torch.bool)
    for g, lo, hi in _bounds(off):
        inside[lo:hi] = True
        a64, b64 = a[lo:hi].double(), b[g].double()
        y, s = a64 @ b64.t(), a64.abs() @ b64.abs().t()
        bound = 2.0**-8 * y.abs() + (1 + 2.0**-8) * (192 + 8) * 2.0**-24 * s
        assert ((out[lo:hi].double() - y).abs() <= bound).all(), f"group {g}"
    assert (out[~inside] == 0).all()


@pytest.mark.parametrize("sizes,n,k,lead,tail", [
    ([70, 0, 1, 79], 16, 192, 0, 0),    # several 64-row tiles per group, an empty group
    ([0, 33, 0], 40, 136, 5, 40),       # padding on both sides, a partial K slice
    ([3, 3, 3, 3, 3], 8, 64, 0, 0),
])
def test_bf16_triton_matches_reference(gen, sizes, n, k, lead, tail):
    args = bf16_operands(sizes, n, k, gen, "cpu", lead=lead, tail=tail)
    want = grouped_bf16_gemm(*args, backend="torch")
    with poisoned_outputs():
        got = grouped_bf16_gemm(*args, backend="triton")
    assert BF16_OP.compare(got, want, args) is None


# ---------------------------------------------------------------------------------------------
# No GPU needed: the CUTLASS kernel's C++ checks and can_implement through the CUDA key
# ---------------------------------------------------------------------------------------------

def _glm_case(groups, n, k, m=256, out_dtype=torch.bfloat16):
    """Arguments of GLM-4.5's size without the memory: b is one zero row broadcast to [G, N, K]
    (stride 0 passes the 16-byte stride rule), the rows spread evenly over the experts."""
    kb, nb = -(-k // 128), -(-n // 128)
    b = torch.zeros(1, 1, k).to(FP8_DTYPE).expand(groups, n, k)
    offsets = torch.linspace(0, m, groups + 1).round().to(torch.int32)
    return (torch.zeros(m, k).to(FP8_DTYPE), torch.ones(m, kb), b, torch.ones(groups, nb, kb), offsets, out_dtype)


# GLM-4.5: 160 experts (EP1) or 20 (EP8); gate-up N = 384 at TP8 (2 x 192) or down N = 5120;
# K = 5120 (hidden) or 192 (TP8 intermediate: a partial K block); odd N padded for the epilogue.
ACCEPTED = [
    *[_glm_case(g, n, k, out_dtype=dt) for g in (160, 20) for n, k in ((384, 5120), (5120, 192), (5120, 5120))
      for dt in (torch.bfloat16, torch.float32)],
    _glm_case(20, 352, 4096),              # Air at TP8: gate-up 2 x 176
    _glm_case(20, 4096, 176),              # Air at TP8: down, K = 176
    _glm_case(4, 257, 16, m=9),            # odd N, K = 16
    _glm_case(3, 130, 192, m=0),           # no rows
]


@pytest.mark.parametrize("args", ACCEPTED, ids=[f"G{a[2].shape[0]}-N{a[2].shape[1]}-K{a[2].shape[2]}-M{a[0].shape[0]}"
                                                  f"-{str(a[5])[6:]}" for a in ACCEPTED])
def test_cpp_checks_and_can_implement(args):
    """Python accepts these, and the C++ kernel gets past CUTLASS's can_implement (run on the
    host before the device check) to its device error."""
    if not glm45_ops.extension_loaded():
        pytest.skip(f"extension not built: {glm45_ops.extension_error()}")
    if "grouped_fp8_block_gemm" not in glm45_ops.info()["cuda_kernels"]:
        pytest.skip("glm45_ops._C was built without the grouped GEMM")
    OP.check(*OP.bind(args, {}))
    why = cuda_kernel_differs(OP, args)
    assert why is None, why


BF16_ACCEPTED = [
    (torch.zeros(m, k, dtype=torch.bfloat16), torch.zeros(1, 1, k, dtype=torch.bfloat16).expand(g, n, k),
     torch.linspace(0, m, g + 1).round().to(torch.int32))
    for g in (160, 20) for n, k in ((384, 5120), (5120, 192), (352, 4096), (4096, 176)) for m in (0, 256)
]


@pytest.mark.parametrize("args", BF16_ACCEPTED, ids=[
    f"G{a[1].shape[0]}-N{a[1].shape[1]}-K{a[1].shape[2]}-M{a[0].shape[0]}" for a in BF16_ACCEPTED])
def test_bf16_cpp_checks_and_can_implement(args):
    """GLM-4.5 and Air shapes get past the BF16 kernel's checks and CUTLASS's can_implement."""
    if not glm45_ops.extension_loaded() or "grouped_bf16_gemm" not in glm45_ops.info()["cuda_kernels"]:
        pytest.skip("extension without the grouped BF16 GEMM")
    BF16_OP.check(*BF16_OP.bind(args, {}))
    why = cuda_kernel_differs(BF16_OP, args)
    assert why is None, why


def test_cpp_checks_offset_values_of_cpu_tensors():
    """The C++ kernel refuses bad offsets of a CPU tensor in Python's words (on CUDA it clamps)."""
    if not glm45_ops.extension_loaded() or "grouped_fp8_block_gemm" not in glm45_ops.info()["cuda_kernels"]:
        pytest.skip("extension without the grouped GEMM")
    a, a_s, b, b_s, _, dt = _glm_case(2, 128, 128, m=8)
    for bad in ([0, 9, 8], [1, 0, 8], [-1, 4, 8]):
        why = cuda_kernel_differs(OP, (a, a_s, b, b_s, torch.tensor(bad, dtype=torch.int32), dt))
        assert why is None, why


@pytest.mark.parametrize("unit", ["grouped_gemm_sm90.cu", "grouped_gemm_sm90_fp32.cu", "grouped_bf16_gemm_sm90.cu"])
@pytest.mark.parametrize("gencode,refused", [
    ("arch=compute_90a,code=sm_90a", False),
    ("arch=compute_90,code=sm_90", True),           # TORCH_CUDA_ARCH_LIST=9.0
])
def test_build_for_sm90_without_a_is_refused(unit, gencode, refused):
    """CUTLASS compiles the kernel body out for plain sm_90 (the op would leave its output
    unwritten): both units refuse such a build at preprocessing time (seconds, not a build)."""
    check_sm90a_refusal(ROOT / "csrc" / "moe" / unit, gencode, refused)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

def _gpu_backends():
    return [b for b in ("triton", "cuda") if b in OP.backends(torch.device("cuda"))]


@gpu
@pytest.mark.parametrize("groups,n,k", [(20, 384, 5120), (20, 5120, 192), (160, 384, 5120), (8, 257, 176)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gpu_matches_the_oracle(groups, n, k, out_dtype):
    gen = torch.Generator(device="cpu").manual_seed(groups * n + k)
    # uneven groups: empty ones, single rows, several tiles; padding after the last group
    sizes = torch.randint(0, 300, (groups,), generator=gen)
    sizes[::5] = 0
    sizes[1::7] = 1
    args = (*operands(sizes.tolist(), n, k, gen, "cuda", lead=3, tail=17), out_dtype)
    want = grouped_fp8_block_gemm(*args, backend="torch")
    for backend in _gpu_backends():
        with poisoned_outputs():
            got = grouped_fp8_block_gemm(*args, backend=backend)
        assert OP.compare(got, want, OP.bind(args, {})) is None, backend


@gpu
@pytest.mark.parametrize("groups,n,k", [(20, 384, 5120), (20, 5120, 192), (160, 352, 4096)])
def test_gpu_bf16_matches_the_oracle(groups, n, k):
    gen = torch.Generator(device="cpu").manual_seed(groups * n + k)
    sizes = torch.randint(0, 300, (groups,), generator=gen)
    sizes[::5] = 0
    args = bf16_operands(sizes.tolist(), n, k, gen, "cuda", lead=3, tail=17)
    want = grouped_bf16_gemm(*args, backend="torch")
    for backend in [b for b in ("triton", "cuda") if b in BF16_OP.backends(torch.device("cuda"))]:
        with poisoned_outputs():
            got = grouped_bf16_gemm(*args, backend=backend)
        assert BF16_OP.compare(got, want, args) is None, backend


@gpu
def test_gpu_cuda_graph_replays_with_new_offsets():
    """The offsets are read on the device: a captured call replayed after the offsets change
    computes the new grouping (no host copy of the shapes baked into the graph)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a, a_s, b, b_s, off = operands([100, 0, 60, 96], 384, 192, gen, "cuda")
    for backend in _gpu_backends():
        grouped_fp8_block_gemm(a, a_s, b, b_s, off, backend=backend)  # compile / initialize outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = grouped_fp8_block_gemm(a, a_s, b, b_s, off, backend=backend)
        for new in ([0, 100, 100, 160, 256], [10, 10, 200, 200, 250], [0, 256, 256, 256, 256]):
            off.copy_(torch.tensor(new, dtype=torch.int32))
            graph.replay()
            args = (a, a_s, b, b_s, off, torch.bfloat16)
            want = grouped_fp8_block_gemm(*args, backend="torch")
            assert OP.compare(out, want, args) is None, (backend, new)
