// Host check of csrc/quant/fp8_scale.cuh, the scalar math of the CUDA FP8 quantizers, against
// the reference's definitions on IEEE host floats (run by tests/quant/test_quant_cuda.py). Scales
// are what the quantizers can make: every normal exponent from 2^-126 to 2^120 with edge
// mantissas, and NaN (a block holding a NaN).
//   ScaleDiv(s)(x) == x / s  (fp32 bits; below 2^-11 in magnitude, where e4m3 rounds to +-0, the
//                             sign only), for |x / s| <= 449 (|x| <= amax <= 448 s(1 + 2^-23)),
//                             for x = +-inf (it saturates: +-inf), and NaN for a NaN scale
//   ceil_pow2(s)  == ldexp(1, e) with s = m 2^e, e - 1 when m == 0.5  (torch.frexp / ldexp); NaN
//   scale_from_amax keeps a NaN amax through the division and the UE8M0 rounding
// x: every bf16, plus random fp32 near each scale. Prints the counts; exits 1 on any mismatch.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "quant/fp8_scale.cuh"

using glm45::fp8::bits;
using glm45::fp8::from_bits;

int main() {
  std::vector<float> scales;
  for (int e = -126; e <= 120; ++e)
    for (uint32_t m : {0u, 1u, 0x2a5b3cu, 0x400000u, 0x7ffffeu, 0x7fffffu})
      scales.push_back(from_bits(uint32_t(e + 127) << 23 | m));
  scales.push_back(0x1.fffffep127f / 448.0f);  // the largest scale: amax = FLT_MAX
  std::mt19937_64 rng(0);
  long long checked = 0, bad = 0;
  auto report = [&](const char* what, float s, float x, float want, float got) {
    if (++bad <= 10) std::printf("MISMATCH %s s=%a x=%a want=%a got=%a\n", what, s, x, want, got);
  };
  auto same = [](float want, float got) { return bits(want) == bits(got) || (std::isnan(want) && std::isnan(got)); };

  for (float s : scales) {
    const glm45::fp8::ScaleDiv d(s);
    auto check = [&](float x) {
      const float want = x / s;
      if (std::isnan(x) || !(std::fabs(want) <= 449.0f)) return;
      const float got = d(x);
      ++checked;
      const bool tiny = std::fabs(want) < 0x1p-11f && std::fabs(got) < 0x1p-11f;
      if (bits(want) != bits(got) && !(tiny && std::signbit(want) == std::signbit(got))) report("div", s, x, want, got);
    };
    for (uint32_t h = 0; h < 0x10000u; ++h) check(from_bits(h << 16));
    std::uniform_real_distribution<double> u(-449.0, 449.0);
    for (int i = 0; i < 2000; ++i) check(from_bits(bits(float(u(rng) * s)) ^ uint32_t(rng() & 0xff)));
    for (float x : {INFINITY, -INFINITY}) {
      ++checked;
      if (!same(x / s, d(x))) report("div inf", s, x, x / s, d(x));
    }
  }
  for (float x : {0.0f, -0.0f, 1.5f, -3.0f, INFINITY, -INFINITY, NAN}) {
    const float got = glm45::fp8::ScaleDiv(NAN)(x);
    ++checked;
    if (!std::isnan(got)) report("div by NaN", NAN, x, NAN, got);
  }

  scales.push_back(NAN);
  for (float s : scales) {
    int e;
    const float m = std::frexp(s, &e);
    const float want = std::isnan(s) ? s : std::ldexp(1.0f, m == 0.5f ? e - 1 : e);
    const float got = glm45::fp8::ceil_pow2(s);
    ++checked;
    if (!same(want, got)) report("ceil_pow2", s, 0.0f, want, got);
  }

  const uint32_t eps = bits(1e-4f);
  for (uint32_t amax : {0x7fc00000u, 0x7f800001u, 0x7fffffffu})  // NaN amaxes
    for (bool ue8m0 : {false, true}) {
      ++checked;
      const float got = glm45::fp8::scale_from_amax(amax, eps, ue8m0);
      if (!std::isnan(got)) report("scale_from_amax(NaN)", 0.0f, from_bits(amax), NAN, got);
    }
  std::printf("checked=%lld mismatches=%lld\n", checked, bad);
  return bad != 0;
}
