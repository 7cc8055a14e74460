"""Triton kernels for Muon's Newton-Schulz step (definition: glm45_ops/reference/muon.py).

One NS step ``A = X X^T; B = b A + c A A; X' = a X + B X`` is three launches, each batched over
the leading (expert) dim through grid axis 1:

* :func:`sym_gram` computes ``alpha * X X^T (+ beta * C)``. The result is symmetric, so only the
  upper-triangle tiles are computed and each program stores its tile at (i, j) and, transposed,
  at (j, i): half the FLOPs of a full product. With ``X = A`` (symmetric, so ``A A = A A^T``) and
  ``C = A`` it is ``b A + c A A`` with the ``b A`` epilogue fused (Flash-Muon's observation;
  Dion's Triton NS does the same).
* :func:`ns_update` computes ``a X + B X`` with the ``a X`` epilogue fused.

bf16 operands, fp32 accumulation, one rounding to the output dtype after the epilogue (what
cuBLAS's fused ``addmm`` does), so results differ from the reference only by accumulation order.
Under the interpreter (``INTERPRETER``) bf16 ``tl.dot`` is wrong (it multiplies raw bits), so
operands are upcast to fp32 there (bf16 products are exact in fp32: the GPU's arithmetic), and
its fp32 -> bf16 cast truncates, so stores round to nearest even on the fp32 grid first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_ops import CompileSpec, interpreting
from triton_ops._common import as_mask, to_out_dtype

# Hopper tiles: 128x128 outputs, 64-deep K steps, 8 warps (4 warps spill at 128x128, KNOWLEDGE §2).
GPU_BLOCK, GPU_BLOCK_K, GPU_WARPS, GPU_STAGES = 128, 64, 8, 3
GROUP_M = 8  # tile-row grouping of ns_update's grid, for L2 reuse of B's rows
MAX_GRID_BATCH = 65535  # CUDA's limit on grid.y: larger batches launch in chunks
# Interpreter cost is per program and per loop trip: at most 4 tiles per side (but at least 2
# whenever a side exceeds the minimum tile, so the Gram kernel always has tiles to mirror) and K
# in one or two trips.
INTERP_TILES_PER_SIDE, INTERP_MIN_BLOCK, INTERP_MAX_BLOCK_K = 4, 32, 512


@triton.jit
def _upper_tile(t):
    """Linear index t over the upper triangle -> tile (i, j) with i <= j, row-major by j.

    ``j = floor((sqrt(8t + 1) - 1) / 2)`` inverts ``t = j (j + 1) / 2 + i``; the two corrections
    absorb fp32 sqrt rounding."""
    j = ((tl.sqrt_rn((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where((j + 1) * (j + 2) // 2 <= t, j + 1, j)
    j = tl.where(j * (j + 1) // 2 > t, j - 1, j)
    return t - j * (j + 1) // 2, j


@triton.jit
def _sym_gram_kernel(
    x_ptr, c_ptr, o_ptr,
    M, K,
    x_b_stride, x_r_stride, x_k_stride,
    c_b_stride, c_r_stride, c_c_stride,
    o_b_stride, o_r_stride, o_c_stride,
    alpha, beta,
    HAS_C: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRETER: tl.constexpr,
):
    # out = alpha * X X^T (+ beta * C) for one upper tile (ti, tj), stored at both (ti, tj) and
    # (tj, ti). Diagonal tiles are stored once (their mirror is themselves).
    ti, tj = _upper_tile(tl.program_id(0))
    pid_b = tl.program_id(1).to(tl.int64)
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    x_base = x_ptr + pid_b * x_b_stride
    a_ptrs = x_base + rows[:, None].to(tl.int64) * x_r_stride + ks[None, :] * x_k_stride
    b_ptrs = x_base + cols[None, :].to(tl.int64) * x_r_stride + ks[:, None] * x_k_stride
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = ks < K - k0
        a = tl.load(a_ptrs, mask=(rows < M)[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & (cols < M)[None, :], other=0.0)
        if INTERPRETER:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * x_k_stride
        b_ptrs += BLOCK_K * x_k_stride
    acc = acc * alpha
    mask = (rows < M)[:, None] & (cols < M)[None, :]
    if HAS_C:
        c_offs = rows[:, None].to(tl.int64) * c_r_stride + cols[None, :] * c_c_stride
        acc += beta * tl.load(c_ptr + pid_b * c_b_stride + c_offs, mask=mask, other=0.0).to(tl.float32)
    out = to_out_dtype(acc, o_ptr.dtype.element_ty, INTERPRETER)
    o_base = o_ptr + pid_b * o_b_stride
    tl.store(o_base + rows[:, None].to(tl.int64) * o_r_stride + cols[None, :] * o_c_stride, out, mask=mask)
    mirror_mask = as_mask((cols < M)[:, None] & (rows < M)[None, :] & (ti != tj))
    tl.store(
        o_base + cols[:, None].to(tl.int64) * o_r_stride + rows[None, :] * o_c_stride,
        tl.trans(out), mask=mirror_mask,
    )


@triton.jit
def _ns_update_kernel(
    bm_ptr, x_ptr, o_ptr,
    M, N,
    bm_b_stride, bm_r_stride, bm_c_stride,
    x_b_stride, x_r_stride, x_c_stride,
    o_b_stride, o_r_stride, o_c_stride,
    a_coef,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    # out[M, N] = a * X + B X with B [M, M]: a GEMM over K = M with the a*X epilogue.
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    n_pid_m = tl.cdiv(M, BLOCK_M)
    n_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP * n_pid_n
    first_m = (pid // group_size) * GROUP
    group_m = tl.minimum(n_pid_m - first_m, GROUP)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    bm_ptrs = bm_ptr + pid_b * bm_b_stride + rows[:, None].to(tl.int64) * bm_r_stride + ks[None, :] * bm_c_stride
    x_base = x_ptr + pid_b * x_b_stride
    x_ptrs = x_base + ks[:, None].to(tl.int64) * x_r_stride + cols[None, :] * x_c_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        kmask = ks < M - k0
        bm = tl.load(bm_ptrs, mask=(rows < M)[:, None] & kmask[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=kmask[:, None] & (cols < N)[None, :], other=0.0)
        if INTERPRETER:
            bm = bm.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(bm, x, acc)
        bm_ptrs += BLOCK_K * bm_c_stride
        x_ptrs += BLOCK_K * x_r_stride
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x_offs = rows[:, None].to(tl.int64) * x_r_stride + cols[None, :] * x_c_stride
    x_tile = tl.load(x_base + x_offs, mask=mask, other=0.0)
    acc += a_coef * x_tile.to(tl.float32)
    o_offs = rows[:, None].to(tl.int64) * o_r_stride + cols[None, :] * o_c_stride
    tl.store(o_ptr + pid_b * o_b_stride + o_offs, to_out_dtype(acc, o_ptr.dtype.element_ty, INTERPRETER), mask=mask)


def _block(size: int) -> int:
    if not interpreting():
        return GPU_BLOCK
    return max(INTERP_MIN_BLOCK, triton.next_power_of_2(triton.cdiv(size, INTERP_TILES_PER_SIDE)))


def _block_k(k: int) -> int:
    return min(INTERP_MAX_BLOCK_K, max(16, triton.next_power_of_2(k))) if interpreting() else GPU_BLOCK_K


def _batches(nb: int) -> list[slice]:
    return [slice(b, min(nb, b + MAX_GRID_BATCH)) for b in range(0, nb, MAX_GRID_BATCH)]


def sym_gram(
    x: torch.Tensor, out: torch.Tensor, alpha: float = 1.0, c: torch.Tensor | None = None, beta: float = 0.0
) -> None:
    """Fill ``out`` ``[B, M, M]`` with ``alpha * x x^T + beta * c`` (``c`` ``[B, M, M]`` or None),
    ``x`` ``[B, M, K]``; any strides. The result must be symmetric for ``c``'s part to mirror:
    ``c`` must be symmetric (it is ``A`` in NS)."""
    nb, m, k = x.shape
    if out.numel() == 0:
        return
    block = _block(m)
    nt = triton.cdiv(m, block)
    cc = c if c is not None else out
    for b in _batches(nb):
        _sym_gram_kernel[(nt * (nt + 1) // 2, b.stop - b.start)](
            x[b], cc[b], out[b], m, k,
            *x.stride(), *cc.stride(), *out.stride(),
            alpha, beta,
            HAS_C=c is not None, BLOCK=block, BLOCK_K=_block_k(k), INTERPRETER=interpreting(),
            num_warps=GPU_WARPS, num_stages=GPU_STAGES,
        )


def ns_update(bmat: torch.Tensor, x: torch.Tensor, out: torch.Tensor, a: float) -> None:
    """Fill ``out`` ``[B, M, N]`` with ``a * x + bmat @ x`` (``bmat`` ``[B, M, M]``, ``x`` ``[B, M, N]``);
    any strides, ``out`` must not overlap ``x``."""
    nb, m, n = x.shape
    if out.numel() == 0:
        return
    bm, bn = _block(m), _block(n)
    for b in _batches(nb):
        _ns_update_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn), b.stop - b.start)](
            bmat[b], x[b], out[b], m, n,
            *bmat.stride(), *x.stride(), *out.stride(),
            a,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=_block_k(m), GROUP=GROUP_M, INTERPRETER=interpreting(),
            num_warps=GPU_WARPS, num_stages=GPU_STAGES,
        )


# ---------------------------------------------------------------------------------------------
# Default GPU configurations, for `glm45-bench compile-report` (format: triton_ops/__init__.py)
# ---------------------------------------------------------------------------------------------
# The NS buffers are contiguous [B, m, n] bf16 with m, n multiples of 16 at GLM-4.5's shapes
# (1536, 5120, 12288) and 8192: unit column strides are JIT constants, the rest are aligned.
# The last step of a tall bf16 G writes the transposed output (unit row stride instead).

def _gram_spec(has_c: bool) -> CompileSpec:
    return CompileSpec(
        label="b*A + c*A@A" if has_c else "X@X^T",
        kernel=_sym_gram_kernel,
        signature={"x_ptr": "*bf16", "c_ptr": "*bf16", "o_ptr": "*bf16", "M": "i32", "K": "i32",
                   "x_b_stride": "i32", "x_r_stride": "i32", "x_k_stride": "constexpr",
                   "c_b_stride": "i32", "c_r_stride": "i32", "c_c_stride": "constexpr",
                   "o_b_stride": "i32", "o_r_stride": "i32", "o_c_stride": "constexpr",
                   "alpha": "fp32", "beta": "fp32",
                   "HAS_C": "constexpr", "BLOCK": "constexpr", "BLOCK_K": "constexpr", "INTERPRETER": "constexpr"},
        constexprs={"x_k_stride": 1, "c_c_stride": 1, "o_c_stride": 1, "HAS_C": has_c, "BLOCK": GPU_BLOCK,
                    "BLOCK_K": GPU_BLOCK_K, "INTERPRETER": False},
        options={"num_warps": GPU_WARPS, "num_stages": GPU_STAGES},
        aligned=("M", "K", "x_b_stride", "x_r_stride", "c_b_stride", "c_r_stride", "o_b_stride", "o_r_stride"),
    )


def _update_spec(transposed_out: bool) -> CompileSpec:
    unit, strided = ("o_r_stride", "o_c_stride") if transposed_out else ("o_c_stride", "o_r_stride")
    sig = {"bm_ptr": "*bf16", "x_ptr": "*bf16", "o_ptr": "*bf16", "M": "i32", "N": "i32",
           "bm_b_stride": "i32", "bm_r_stride": "i32", "bm_c_stride": "constexpr",
           "x_b_stride": "i32", "x_r_stride": "i32", "x_c_stride": "constexpr",
           "o_b_stride": "i32", "o_r_stride": "i32", "o_c_stride": "i32", "a_coef": "fp32",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP": "constexpr",
           "INTERPRETER": "constexpr"}
    sig[unit] = "constexpr"
    return CompileSpec(
        label="a*X + B@X" + (" transposed out" if transposed_out else ""),
        kernel=_ns_update_kernel,
        signature=sig,
        constexprs={"bm_c_stride": 1, "x_c_stride": 1, unit: 1, "BLOCK_M": GPU_BLOCK, "BLOCK_N": GPU_BLOCK,
                    "BLOCK_K": GPU_BLOCK_K, "GROUP": GROUP_M, "INTERPRETER": False},
        options={"num_warps": GPU_WARPS, "num_stages": GPU_STAGES},
        aligned=("M", "N", "bm_b_stride", "bm_r_stride", "x_b_stride", "x_r_stride", "o_b_stride", strided),
    )


COMPILE_SPECS = [_gram_spec(False), _gram_spec(True), _update_spec(False), _update_spec(True)]
