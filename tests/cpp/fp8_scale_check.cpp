// Host check of csrc/quant/fp8_scale.cuh, the scalar math of the CUDA FP8 quantizers, against
// the reference's definitions on IEEE host floats (run by tests/test_quant_cuda.py):
//   ScaleDiv(s)(x) == x / s  (fp32 bits; below 2^-11 in magnitude, where e4m3 rounds to +-0, the
//                             sign only), for |x / s| <= 449: |x| <= amax <= 448 s(1 + 2^-23);
//                             inf and NaN x with the scales a block holding them gets
//   ceil_pow2(s)  == ldexp(1, e) with s = m 2^e, e - 1 when m == 0.5  (torch.frexp / ldexp)
// Scales: every reachable exponent with edge mantissas, subnormals, 0, inf, NaN; x: every bf16, plus random
// fp32 near each scale. Prints the counts; exits 1 on any mismatch.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "quant/fp8_scale.cuh"

using glm45::fp8::bits;
using glm45::fp8::from_bits;

int main() {
  std::vector<float> scales;
  for (uint32_t b = 1; b < 0x800000u; b += 65537u) scales.push_back(from_bits(b));  // subnormal
  for (int e = -126; e <= 120; ++e)  // finite scales are <= FLT_MAX / 448 < 2^120, or 2^120 (UE8M0)
    for (uint32_t m : {0u, 1u, 0x2a5b3cu, 0x400000u, 0x7ffffeu, 0x7fffffu})
      scales.push_back(from_bits(uint32_t(e + 127) << 23 | m));
  std::mt19937_64 rng(0);
  long long checked = 0, bad = 0;
  auto report = [&](const char* what, float s, float x, float want, float got) {
    if (++bad <= 10) std::printf("MISMATCH %s s=%a x=%a want=%a got=%a\n", what, s, x, want, got);
  };

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
  }
  // blocks holding inf or NaN: their scale is 0 (tiny eps), inf, NaN, or a power of two (UE8M0)
  for (float s : {0.0f, INFINITY, NAN, 1.0f, 0x1p-126f, 0x1p120f})
    for (float x : {0.0f, -0.0f, 1.5f, -3.0f, INFINITY, -INFINITY, NAN}) {
      const float want = x / s, got = glm45::fp8::ScaleDiv(s)(x);
      ++checked;
      if (bits(want) != bits(got) && !(std::isnan(want) && std::isnan(got))) report("div special", s, x, want, got);
    }

  scales.insert(scales.end(), {0.0f, 0x1.fffffep127f, INFINITY, NAN});
  for (float s : scales) {
    int e;
    const float m = std::frexp(s, &e);
    const float want = std::ldexp(1.0f, m == 0.5f ? e - 1 : (std::isfinite(s) && s != 0.0f ? e : 0));
    const float got = glm45::fp8::ceil_pow2(s);
    ++checked;
    if (bits(want) != bits(got)) report("ceil_pow2", s, 0.0f, want, got);
  }
  std::printf("checked=%lld mismatches=%lld\n", checked, bad);
  return bad != 0;
}
