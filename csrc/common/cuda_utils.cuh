// Small device helpers shared by the CUDA families: vectorised loads/stores, float conversions,
// e4m3 packing, warp reductions. (Host-side checks and the dtype dispatch: common/checks.h.)
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace glm45 {

// N elements of T moved as one access of sizeof(T) * N bytes (16: one LDG.128/STG.128), held as
// 32-bit words so that 16-bit types stay two to a register (an array of T would be unpacked into
// one register per element, doubling the registers a kernel needs to keep data in flight).
template <typename T, int N>
struct Vec {
  static constexpr int kBytes = int(sizeof(T)) * N;
  using Word = std::conditional_t<kBytes % 4 == 0, uint32_t, std::conditional_t<kBytes == 2, uint16_t, uint8_t>>;
  static constexpr int kWords = kBytes / int(sizeof(Word));
  static constexpr int kPerWord = N / kWords;
  alignas(kBytes) Word w[kWords];

  __device__ __forceinline__ void load(const T* p) { *this = *reinterpret_cast<const Vec*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<Vec*>(p) = *this; }
  // the 16-bit half of the word holding element j (16-bit types)
  __device__ __forceinline__ uint32_t bits16(int j) const {
    return kPerWord == 1 ? uint32_t(w[j]) : (uint32_t(w[j / 2]) >> (16 * (j % 2))) & 0xffffu;
  }
};

// Element j of a float vector, as fp32 (exact).
template <int N> __device__ __forceinline__ float get(const Vec<float, N>& v, int j) { return __uint_as_float(v.w[j]); }
template <int N> __device__ __forceinline__ float get(const Vec<__nv_bfloat16, N>& v, int j) {
  if constexpr (Vec<__nv_bfloat16, N>::kPerWord == 1) return __uint_as_float(uint32_t(v.w[j]) << 16);
  const uint32_t w = v.w[j / 2];
  return __uint_as_float(j % 2 ? w & 0xffff0000u : w << 16);
}
template <int N> __device__ __forceinline__ float get(const Vec<__half, N>& v, int j) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(v.bits16(j))));
}

// max |x_j| over the finite x_j as fp32 bits, NaN if any x_j is NaN (the amax of
// glm45_ops/reference/quant.py: +-inf does not enter it). For non-negative floats the unsigned
// order of the bits is the float order and NaN sorts above everything, so an unsigned max of
// |x|'s bits, with inf's bits replaced by 0, is exact and keeps NaN. 16-bit types take it on
// packed pairs: one HSET2 (|x| != inf, unordered, so NaN passes) masks the infinities, one
// VIMNMX.U16x2 per two words takes the max; only the result is converted (exact: monotonic).
template <int N> __device__ __forceinline__ uint32_t finite_amax_bits(const Vec<float, N>& v) {
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const uint32_t a = v.w[i] & 0x7fffffffu;
    m = max(m, a == 0x7f800000u ? 0u : a);
  }
  return m;
}
template <typename T, int N> __device__ __forceinline__ uint32_t finite_amax_bits(const Vec<T, N>& v) {
  static_assert(sizeof(T) == 2);
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  constexpr uint32_t kInf = kBf16 ? 0x7f80u : 0x7c00u;
  uint32_t m = 0;
  if constexpr (Vec<T, N>::kPerWord == 1) {
    const uint32_t a = v.w[0] & 0x7fffu;
    m = a == kInf ? 0u : a;
  } else {
    using T2 = std::conditional_t<kBf16, __nv_bfloat162, __half2>;
    const auto pair = [](uint32_t w) {
      T2 h;
      memcpy(&h, &w, sizeof(h));
      return h;
    };
#pragma unroll
    for (int i = 0; i < Vec<T, N>::kWords; ++i) {
      const uint32_t finite_or_nan = __hneu2_mask(__habs2(pair(v.w[i])), pair(kInf * 0x00010001u));
      m = __vmaxu2(m, v.w[i] & 0x7fff7fffu & finite_or_nan);
    }
    m = max(m & 0xffffu, m >> 16);
  }
  if constexpr (kBf16) return m << 16;
  return __float_as_uint(__half2float(__ushort_as_half(static_cast<unsigned short>(m))));
}

// Two fp32 -> two e4m3 (low byte = a) in one cvt.rn.satfinite.e4m3x2.f32: round-to-nearest-even,
// finite overflow and +-inf saturate to +-448, NaN stays NaN.
__device__ __forceinline__ uint32_t f32x2_to_e4m3x2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}
__device__ __forceinline__ uint8_t f32_to_e4m3(float a) { return __nv_cvt_float_to_fp8(a, __NV_SATFINITE, __NV_E4M3); }

// Fills e4m3 vector q from f(j), the fp32 value of element j, two elements per cvt.
template <int N, typename F>
__device__ __forceinline__ void fill_e4m3(Vec<uint8_t, N>& q, F&& f) {
  if constexpr (N == 1) {
    q.w[0] = f32_to_e4m3(f(0));
  } else if constexpr (N == 2) {
    q.w[0] = static_cast<uint16_t>(f32x2_to_e4m3x2(f(0), f(1)));
  } else {
#pragma unroll
    for (int i = 0; i < N / 4; ++i)
      q.w[i] = f32x2_to_e4m3x2(f(4 * i), f(4 * i + 1)) | (f32x2_to_e4m3x2(f(4 * i + 2), f(4 * i + 3)) << 16);
  }
}

// e4m3 elements j, j+1 (j even) of a vector -> fp32, exact (every e4m3 value is an fp16 value).
template <int N>
__device__ __forceinline__ float2 e4m3x2_to_f32x2(const Vec<uint8_t, N>& q, int j) {
  const uint32_t pair = N >= 4 ? (uint32_t(q.w[j / 4]) >> (8 * (j % 4))) & 0xffffu : uint32_t(q.w[0]);
  return __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), __NV_E4M3)));
}
__device__ __forceinline__ float e4m3_to_f32(uint8_t b) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(b, __NV_E4M3)));
}

// Fills vector o from f(j) (fp32), rounding to nearest even as torch's casts do; 16-bit types are
// packed two per cvt.
template <int N, typename F> __device__ __forceinline__ void fill(Vec<float, N>& o, F&& f) {
#pragma unroll
  for (int j = 0; j < N; ++j) o.w[j] = __float_as_uint(f(j));
}
template <typename T, int N, typename F> __device__ __forceinline__ void fill(Vec<T, N>& o, F&& f) {
  static_assert(sizeof(T) == 2);
  if constexpr (N == 1) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) o.w[0] = __bfloat16_as_ushort(__float2bfloat16_rn(f(0)));
    else o.w[0] = __half_as_ushort(__float2half_rn(f(0)));
  } else {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const float a = f(2 * i), b = f(2 * i + 1);
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        const __nv_bfloat162 p = __floats2bfloat162_rn(a, b);
        o.w[i] = *reinterpret_cast<const uint32_t*>(&p);
      } else {
        const __half2 p = __floats2half2_rn(a, b);
        o.w[i] = *reinterpret_cast<const uint32_t*>(&p);
      }
    }
  }
}

// Max over the `lanes` (a power of two <= 32) consecutive lanes of a warp that share a value;
// every lane of the warp must call it.
__device__ __forceinline__ uint32_t group_max_u32(uint32_t v, int lanes) {
  for (int off = lanes >> 1; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Argmax as one integer max (torch.argmax's rule): order_key maps fp32 to int32 with the same
// signed order (-0 == +0, NaN above +inf); pack_key_index makes (key, index) an int64 whose max
// is the largest key, then the lowest index, so a max-reduction (warp shuffles, atomicMax) gives
// the first argmax. unpack_index recovers the index.
__device__ __forceinline__ int32_t order_key(float x) {
  const int32_t b = __float_as_int(x);
  int32_t key = b < 0 ? (b ^ 0x7fffffff) : b;
  if (x == 0.0f) key = 0;
  if (x != x) key = INT32_MAX;
  return key;
}

__device__ __forceinline__ long long pack_key_index(int32_t key, int64_t j) {
  const unsigned long long hi = static_cast<unsigned long long>(static_cast<uint32_t>(key)) << 32;
  return static_cast<long long>(hi | static_cast<uint32_t>(INT32_MAX - j));
}

__device__ __forceinline__ int64_t unpack_index(long long packed) {
  return INT32_MAX - static_cast<int64_t>(static_cast<uint32_t>(packed));
}

template <typename T>
__host__ __device__ constexpr T cdiv(T a, T b) { return (a + b - 1) / b; }

}  // namespace glm45
