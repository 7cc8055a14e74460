"""Helpers shared by the Triton kernels of several families."""

from __future__ import annotations

import triton
import triton.language as tl

from triton_ops import interpreting

E4M3_MAX = 448.0  # largest finite float8_e4m3fn


@triton.jit
def round_to_e4m3_grid(x):
    """fp32 -> fp32 exactly representable in e4m3fn: round-to-nearest-even, saturating at 448.

    The interpreter's own fp32 -> fp8 cast drops the rounding carry, does not tie to even and
    truncates subnormals, so we round on the fp32 grid first; the cast that follows is then
    exact on every backend. Normal range: add half an e4m3 ulp (2**19 in fp32 mantissa bits,
    plus the parity bit for ties-to-even) and clear the 20 low bits. Subnormal range
    (|x| < 2**-6): RTNE to multiples of 2**-9 with the usual add-and-subtract trick.
    """
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    ax = tl.abs(x)
    sub = (ax + 16384.0) - 16384.0
    sub = tl.where(bits < 0, sub * -1.0, sub)  # not -sub: triton 3.6 lowers it to 0 - sub (+0, not -0)
    return tl.minimum(tl.maximum(tl.where(ax < 0.015625, sub, normal), -448.0), 448.0)


@triton.jit
def e4m3_bits(y, ROUND_ON_GRID: tl.constexpr):
    """fp32 ``y`` (already on the e4m3 grid or NaN) -> its e4m3fn byte as uint8.

    The interpreter's fp32 -> fp8 cast turns NaN into a finite byte; the NaN byte 0x7f is put
    back from the fp32 value there. On the GPU, ``cvt.rn.satfinite`` keeps NaN and the bitcast is free.
    """
    bits = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    if ROUND_ON_GRID:
        bits = tl.where(y != y, 0x7F, bits).to(tl.uint8)
    return bits


@triton.jit
def to_out_dtype(x, DTYPE: tl.constexpr, ROUND_ON_GRID: tl.constexpr):
    """fp32 -> DTYPE with round-to-nearest-even on every backend.

    The interpreter truncates fp32 -> bf16 (about half of random values come out one ulp low);
    rounding on the fp32 grid first (add 0x7FFF plus the parity bit, clear 16 bits) makes the
    cast exact. The GPU's cvt.rn.bf16.f32 already rounds to nearest even, and fp16 is right in
    both places.
    """
    if ROUND_ON_GRID and DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def order_key(x, NAN_KEY: tl.constexpr):
    """fp32 -> int32 whose signed order is x's (-0 == +0), NaN mapped to ``NAN_KEY``: argmax and
    top-k over the keys are exact integer maxima, the same in any reduction order."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(x == 0.0, 0, key)
    return tl.where(x != x, NAN_KEY, key)


@triton.jit
def as_mask(m):
    """``m`` as a load/store mask whose data is boolean in the interpreter too.

    The interpreter types a scalar comparison (``p == 0``, ``ti != tj``) like its int32 operand,
    so combining it with a block (``(i < n) & (p == 0)``) splats it to int32 data, which the
    interpreter's load/store reject from triton 3.9 on ("mask has unsupported dtype"). ``!= 0``
    is a fresh comparison with boolean data; on the GPU it is an i1 compare that folds away.
    """
    return m != 0


@triton.jit
def ceil_pow2(x):
    """Smallest power of two >= x for positive normal fp32 x (UE8M0 scales), exactly:
    keep the exponent when the mantissa is zero, else bump it."""
    bits = x.to(tl.int32, bitcast=True)
    exp_bits = bits & 0x7F800000
    bump = tl.where((bits & 0x7FFFFF) != 0, 0x800000, 0)
    return (exp_bits + bump).to(tl.float32, bitcast=True)


def num_programs_cap() -> int:
    """Interpreter cost is per program: use few, large programs there."""
    return 64 if interpreting() else 1 << 30
