// The scalar math of the FP8 quantizers, bit-exact with glm45_ops/reference/quant.py: the scale
// from the amax, UE8M0 rounding, and x / scale without a division per element. Host compilers see
// the same code on IEEE host floats, so tests/cpp/fp8_scale_check.cpp checks it on the CPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GLM45_HD __host__ __device__ __forceinline__
#else
#define GLM45_HD inline
#endif

namespace glm45::fp8 {

constexpr float kE4M3Max = 448.0f;  // largest finite float8_e4m3fn

// IEEE round-to-nearest fp32 operations, never contracted or flushed.
GLM45_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GLM45_HD float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
GLM45_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
GLM45_HD float rcp_rn(float a) {
#ifdef __CUDA_ARCH__
  return __frcp_rn(a);
#else
  return 1.0f / a;
#endif
}
GLM45_HD int clz32(uint32_t v) {  // v > 0
#ifdef __CUDA_ARCH__
  return __clz(v);
#else
  return __builtin_clz(v);
#endif
}
GLM45_HD uint32_t bits(float f) {
  uint32_t b;
  memcpy(&b, &f, sizeof(b));
  return b;
}
GLM45_HD float from_bits(uint32_t b) {
  float f;
  memcpy(&f, &b, sizeof(f));
  return f;
}

// Smallest power of two >= s, exactly as the reference's frexp/ldexp: keep the exponent when the
// mantissa is zero, else bump it; a subnormal s rounds its mantissa up to a power of two; and 0,
// inf and NaN give 1 (frexp's exponent is 0 for them).
GLM45_HD float ceil_pow2(float s) {
  const uint32_t b = bits(s);
  const uint32_t e = b & 0x7f800000u, m = b & 0x007fffffu;
  if (e == 0x7f800000u || b == 0) return 1.0f;
  if (e == 0) return from_bits(m == 1 ? 1u : 2u << (31 - clz32(m - 1)));
  return from_bits(m ? e + 0x00800000u : e);
}

// amax and eps come as fp32 bits of non-negative floats: their unsigned max is max(amax, eps) and
// keeps a NaN amax, as torch.maximum does.
GLM45_HD float scale_from_amax(uint32_t amax_bits, uint32_t eps_bits, bool ue8m0) {
  const float s = div_rn(from_bits(amax_bits > eps_bits ? amax_bits : eps_bits), kE4M3Max);
  return ue8m0 ? ceil_pow2(s) : s;
}

// x / scale, correctly rounded like the reference's IEEE division, without a division per element:
// * kMultiply: x * (1/s), exact when s is a normal power of two (every UE8M0 scale: 1/s is exact
//   and x * 2^-k rounds the same real as x / 2^k) and for s = 0, inf or NaN. A block holding an
//   inf or NaN always lands here (its scale is inf, NaN, or 1 after UE8M0).
// * kMarkstein: with inv = RN(1/s), q = RN(x inv) is within an ulp of x/s, e = q s - x is exact in
//   one FMA, and RN(q - e inv) is the correctly rounded quotient (Markstein's theorem); written as
//   fma(-e, inv, q), x = -0 keeps its sign. It needs a finite x, a normal inv (every finite scale
//   here is <= FLT_MAX / 448 < 2^120), and e not to underflow wherever the quotient can reach
//   e4m3's range (|x / s| >= 2^-10), which holds for s >= 2^-90.
// * kLifted: a smaller scale (a tiny eps) is lifted by 2^100 together with x, exactly (|x| <= 448 s
//   cannot overflow), then kMarkstein.
// The mode is uniform over a group or block, so branching on it never diverges.
struct ScaleDiv {
  enum Mode { kMultiply, kMarkstein, kLifted };
  static constexpr float kLift = 0x1p100f;
  float scale;  // what is stored
  float s, inv;
  Mode mode;

  GLM45_HD explicit ScaleDiv(float sc) {
    scale = sc;
    const uint32_t b = bits(sc), exponent = b >> 23;  // sc >= 0 or NaN
    const bool normal_pow2 = (b & 0x007fffffu) == 0 && exponent >= 1 && exponent <= 254;
    const bool finite_positive = sc > 0.0f && exponent <= 254;
    mode = normal_pow2 || !finite_positive ? kMultiply : sc >= 0x1p-90f ? kMarkstein : kLifted;
    s = mode == kLifted ? sc * kLift : sc;
    inv = rcp_rn(s);
  }

  template <Mode kMode>
  GLM45_HD float div(float x) const {
    if constexpr (kMode == kMultiply) return mul_rn(x, inv);
    if constexpr (kMode == kLifted) x = mul_rn(x, kLift);
    const float q = mul_rn(x, inv);
    const float e = fma_rn(q, s, -x);
    return fma_rn(-e, inv, q);
  }

  // x / scale in whichever mode this scale needs (host tests; kernels branch once per vector)
  GLM45_HD float operator()(float x) const {
    return mode == kMultiply ? div<kMultiply>(x) : mode == kMarkstein ? div<kMarkstein>(x) : div<kLifted>(x);
  }
};

}  // namespace glm45::fp8
