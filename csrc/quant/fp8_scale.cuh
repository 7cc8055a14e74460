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

// Every scale the quantizers make is NaN (a block holding a NaN) or a positive normal number:
// amax is finite (inf does not enter it) and at most FLT_MAX, and check_eps keeps eps / 448 >=
// FLT_MIN, so scale = max(amax, eps) / 448 lies in [FLT_MIN, FLT_MAX / 448 < 2^120].

// Smallest power of two >= s, exactly as the reference's frexp/ldexp: keep the exponent when the
// mantissa is zero, else bump it (at most to 2^120); NaN stays NaN.
GLM45_HD float ceil_pow2(float s) {
  const uint32_t b = bits(s), e = b & 0x7f800000u;
  if (e == 0x7f800000u) return s;
  return from_bits(b & 0x007fffffu ? e + 0x00800000u : e);
}

// amax and eps come as fp32 bits of non-negative floats: their unsigned max is max(amax, eps) and
// keeps a NaN amax, as torch.maximum does.
GLM45_HD float scale_from_amax(uint32_t amax_bits, uint32_t eps_bits, bool ue8m0) {
  const float s = div_rn(from_bits(amax_bits > eps_bits ? amax_bits : eps_bits), kE4M3Max);
  return ue8m0 ? ceil_pow2(s) : s;
}

GLM45_HD bool is_inf(float x) { return (bits(x) & 0x7fffffffu) == 0x7f800000u; }

// x / scale, correctly rounded like the reference's IEEE division, without a division per element
// (scale: NaN or positive normal, see above):
// * kMultiply: x * (1/s), exact when s is a power of two (every UE8M0 scale: 1/s is exact and
//   x * 2^-k rounds the same real as x / 2^k) and for s = NaN (every quotient NaN).
// * kMarkstein: with inv = RN(1/s), q = RN(x inv) is within an ulp of x/s, e = q s - x is exact in
//   one FMA, and RN(q - e inv) is the correctly rounded quotient (Markstein's theorem); written as
//   fma(-e, inv, q), x = -0 keeps its sign. It needs a normal inv (s <= 2^120) and e not to
//   underflow wherever the quotient can reach e4m3's range (|x / s| >= 2^-10), which holds for
//   s >= 2^-90. An infinite x (it saturates: the block's finite values set s) would make e NaN,
//   so it is returned as is: inf / s = inf.
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
    const bool pow2_or_nan = (bits(sc) & 0x007fffffu) == 0 || sc != sc;
    mode = pow2_or_nan ? kMultiply : sc >= 0x1p-90f ? kMarkstein : kLifted;
    s = mode == kLifted ? sc * kLift : sc;
    inv = rcp_rn(s);
  }

  template <Mode kMode>
  GLM45_HD float div(float x) const {
    if constexpr (kMode == kMultiply) return mul_rn(x, inv);
    const float xs = kMode == kLifted ? mul_rn(x, kLift) : x;
    const float q = mul_rn(xs, inv);
    const float e = fma_rn(q, s, -xs);
    return is_inf(x) ? x : fma_rn(-e, inv, q);
  }

  // x / scale in whichever mode this scale needs (host tests; kernels branch once per vector)
  GLM45_HD float operator()(float x) const {
    return mode == kMultiply ? div<kMultiply>(x) : mode == kMarkstein ? div<kMarkstein>(x) : div<kLifted>(x);
  }
};

}  // namespace glm45::fp8
