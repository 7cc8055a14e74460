// Fused QK-Norm + partial NeoX RoPE and the paged KV-cache write on CUDA: the CUDA-key kernels of
// glm45::qk_norm_rope, qk_norm_rope_, kv_cache_write and qk_norm_rope_kv_write (schemas, checks
// and outputs: glm45_ops/attention/rope.py; definition: glm45_ops/reference/attention_rope.py).
//
// Layout: one group of G lanes per (token, head), G = D / kV (8 to 32) where kV elements make
// one 16-byte access, so a warp holds 32 / G heads and each lane loads, normalizes, rotates and
// stores one 16-byte vector. A launch covers every head of every token: q heads, then k heads,
// then (with the cache write) v heads, in that order per token, so consecutive groups touch
// consecutive memory of the fused QKV projection. Tensors that are not 16-byte aligned (or whose
// strides are not multiples of kV) take the same kernel with kV = 1 (G = 32, D / 32 elements a
// lane). No host sync anywhere: positions and slots are read on the device.
//
// Numerics (the reference's, see there): x in fp32; the sum of squares is a per-lane sum plus an
// xor-shuffle tree over the group (its order differs from torch's: NORM_TOL), then an IEEE
// 1 / sqrt(var + eps), y = dt(dt(x * rstd) * w). The rotation pairs element e with e +- R/2,
// held by another lane, so each group stages its y in shared memory; the products and sums are
// _rn intrinsics (no contraction into FMA, as the reference rounds each product) and each output
// is rounded once to the dtype. FP8 caches store cvt.rn.satfinite(x / scale), i.e.
// e4m3(clamp(x / scale, -448, 448)) with NaN kept. A position outside [0, max_pos) gives NaN
// rotated dims; a negative or out-of-range slot writes nothing.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/cuda_utils.cuh"

namespace glm45 {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 128;

struct RopeParams {
  const void* q;  // [T, Hq, D]
  const void* k;  // [T, Hk, D]
  const void* v;  // [T, Hk, D] (the cache write only)
  void* q_out;
  void* k_out;  // null: k goes only to the cache (kv_cache_write)
  const void* q_w;  // [D]; null: no norm
  const void* k_w;
  const void* pos;  // [T] int32 / int64
  const float* cos_sin;  // [max_pos, R]
  void* k_cache;  // [num_pages, page_size, Hk, D]; null: no cache write
  void* v_cache;
  const void* slots;  // [T] int32 / int64
  const float* k_scale;  // [Hk] (FP8 caches)
  const float* v_scale;
  int64_t T, max_pos, num_slots, page_size;
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh, qo_st, qo_sh, ko_st, ko_sh, pos_s, cs_st, slot_s;
  int64_t kc_sp, kc_so, kc_sh, vc_sp, vc_so, vc_sh, ks_s, vs_s;
  int Hq, Hk, Hv, R;  // Hv: Hk with the cache write, else 0
  float eps;
  bool rope, pos64, slots64;
};

__device__ __forceinline__ float round_to(float x, float) { return x; }
__device__ __forceinline__ float round_to(float x, __nv_bfloat16) { return __bfloat162float(__float2bfloat16_rn(x)); }
__device__ __forceinline__ float round_to(float x, __half) { return __half2float(__float2half_rn(x)); }

__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

template <typename T, int kD, int kV, bool kFp8>
__global__ void __launch_bounds__(kThreads) _qk_norm_rope_kernel(const RopeParams p) {
  constexpr int G = kD / kV < kWarpSize ? kD / kV : kWarpSize;  // lanes per (token, head)
  constexpr int C = kD / (G * kV);                             // vectors per lane
  constexpr int kGroups = kThreads / G;
  __shared__ float stage[kGroups][kD];  // a head's y, for the rotation partners

  const int lane = threadIdx.x % kWarpSize, gl = lane % G, group = threadIdx.x / G;
  const unsigned mask = G == kWarpSize ? 0xffffffffu : ((1u << G) - 1u) << (lane - gl);
  const int H = p.Hq + p.Hk + p.Hv;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kGroups + group;
  if (g >= p.T * H) return;  // whole groups leave together
  const int64_t t = g / H;
  const int h = static_cast<int>(g % H);

  // the head's role: q (norm, rope, out), k (norm, rope, out, cache) or v (cache); the output
  // pointers are formed only when storing (kept live across the math, ptxas spilled them)
  const int role = h < p.Hq ? 0 : h < p.Hq + p.Hk ? 1 : 2;
  const int hh = role == 0 ? h : role == 1 ? h - p.Hq : h - p.Hq - p.Hk;
  const T* src = role == 0   ? static_cast<const T*>(p.q) + t * p.q_st + hh * p.q_sh
                 : role == 1 ? static_cast<const T*>(p.k) + t * p.k_st + hh * p.k_sh
                             : static_cast<const T*>(p.v) + t * p.v_st + hh * p.v_sh;
  const T* w = static_cast<const T*>(role == 0 ? p.q_w : role == 1 ? p.k_w : nullptr);

  float x[C][kV];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    Vec<T, kV> in;
    in.load(src + (c * G + gl) * kV);
#pragma unroll
    for (int j = 0; j < kV; ++j) x[c][j] = get(in, j);
  }

  if (w != nullptr) {  // HF RMSNorm: dt(dt(x * rstd) * w)
    float ss = 0.0f;
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int j = 0; j < kV; ++j) ss = __fadd_rn(ss, __fmul_rn(x[c][j], x[c][j]));
#pragma unroll
    for (int off = G / 2; off > 0; off /= 2) ss = __fadd_rn(ss, __shfl_xor_sync(mask, ss, off));
    const float rstd = __frcp_rn(__fsqrt_rn(__fadd_rn(__fmul_rn(ss, 1.0f / kD), p.eps)));  // 1/D: exact (D = 64, 128)
#pragma unroll
    for (int c = 0; c < C; ++c) {
      Vec<T, kV> wv;
      wv.load(w + (c * G + gl) * kV);
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        const float y = round_to(__fmul_rn(x[c][j], rstd), T());
        x[c][j] = round_to(__fmul_rn(y, get(wv, j)), T());  // one dt multiply: exact in fp32, rounded once
      }
    }
  }

  if (p.rope && role != 2) {
    float* st = stage[group];
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int j = 0; j < kV; ++j) st[(c * G + gl) * kV + j] = x[c][j];
    __syncwarp(mask);
    const int64_t pos = load_index(p.pos, p.pos64, t * p.pos_s);
    const bool valid = pos >= 0 && pos < p.max_pos;
    const float* row = p.cos_sin + (valid ? pos : 0) * p.cs_st;
    const int half = p.R / 2;
    const float nan = __int_as_float(0x7fc00000);
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        const int e = (c * G + gl) * kV + j;
        if (e >= p.R) continue;  // passed through
        const bool first = e < half;
        const int i = first ? e : e - half;
        const float cs = valid ? __ldg(row + i) : nan, sn = valid ? __ldg(row + half + i) : nan;
        const float partner = st[first ? e + half : e - half];
        const float a = __fmul_rn(x[c][j], cs), b = __fmul_rn(partner, sn);
        x[c][j] = first ? __fsub_rn(a, b) : __fadd_rn(a, b);  // y1 c - y2 s | y2 c + y1 s
      }
  }

  T* out = role == 0 ? static_cast<T*>(p.q_out) + t * p.qo_st + hh * p.qo_sh
           : role == 1 && p.k_out != nullptr ? static_cast<T*>(p.k_out) + t * p.ko_st + hh * p.ko_sh
                                              : nullptr;
  if (out != nullptr) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      Vec<T, kV> o;
      fill(o, [&](int j) { return x[c][j]; });
      o.store(out + (c * G + gl) * kV);
    }
  }

  void* cache = role == 1 ? p.k_cache : role == 2 ? p.v_cache : nullptr;
  if (cache == nullptr) return;
  const int64_t slot = load_index(p.slots, p.slots64, t * p.slot_s);
  if (slot < 0 || slot >= p.num_slots) return;
  const int64_t page = slot / p.page_size, off = slot % p.page_size;
  const int64_t base = role == 1 ? page * p.kc_sp + off * p.kc_so + hh * p.kc_sh
                                 : page * p.vc_sp + off * p.vc_so + hh * p.vc_sh;
  if constexpr (kFp8) {
    const float s = role == 1 ? p.k_scale[hh * p.ks_s] : p.v_scale[hh * p.vs_s];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      Vec<uint8_t, kV> q;  // of k_out as rounded to the dtype
      fill_e4m3(q, [&](int j) { return __fdiv_rn(round_to(x[c][j], T()), s); });
      q.store(static_cast<uint8_t*>(cache) + base + (c * G + gl) * kV);
    }
  } else {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      Vec<T, kV> o;
      fill(o, [&](int j) { return x[c][j]; });
      o.store(static_cast<T*>(cache) + base + (c * G + gl) * kV);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The checks of glm45_ops/attention/rope.py, in its order and words
// ---------------------------------------------------------------------------------------------

void check_device(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device().str(), " but ", ref_name, " is on ",
                    ref.device().str());
}

void check_index(const char* name, const at::Tensor& t, int64_t n, const char* like, const at::Tensor& like_t) {
  check_dtype(name, t, {at::kInt, at::kLong}, "int32 or int64");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape [T=", n, "], got ", py_list(t.sizes()));
  check_device(name, t, like, like_t);
}

void check_heads(const at::Tensor& q, const at::Tensor& k) {
  check_float("q", q);
  TORCH_CHECK_VALUE(q.dim() == 3, "q must be 3-D [T, Hq, D], got shape ", py_tuple(q.sizes()));
  const int64_t t = q.size(0), d = q.size(2);
  TORCH_CHECK_VALUE(d == 64 || d == 128, "q: the head dim D=", d, " must be 64 or 128");
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type(), "k must have q's dtype ", py_dtype(q.scalar_type()), ", got ",
                    py_dtype(k.scalar_type()));
  TORCH_CHECK_VALUE(k.dim() == 3 && k.size(0) == t && k.size(2) == d, "k must be [T=", t, ", Hk, D=", d,
                    "] (T and D from q), got shape ", py_tuple(k.sizes()));
  check_unit_last_stride("q", q);
  check_unit_last_stride("k", k);
  check_device("k", k, "q", q);
}

void check_norm_rope(const char* heads, const at::Tensor& x, int64_t t, int64_t d,
                     const std::optional<at::Tensor>& q_norm_weight, const std::optional<at::Tensor>& k_norm_weight,
                     const at::Tensor& positions, const at::Tensor& cache, int64_t rotary_dim) {
  for (const auto& [name, w] :
       {std::pair{"q_norm_weight", &q_norm_weight}, std::pair{"k_norm_weight", &k_norm_weight}}) {
    if (!w->has_value()) continue;
    const at::Tensor& wt = **w;
    TORCH_CHECK_VALUE(wt.scalar_type() == x.scalar_type(), name, " must have ", heads, "'s dtype ",
                      py_dtype(x.scalar_type()), ", got ", py_dtype(wt.scalar_type()));
    TORCH_CHECK_VALUE(wt.dim() == 1 && wt.size(0) == d, name, " must have shape [D=", d, "], got ",
                      py_list(wt.sizes()));
    check_unit_last_stride(name, wt);
    check_device(name, wt, heads, x);
  }
  check_index("positions", positions, t, heads, x);
  check_dtype("cos_sin_cache", cache, {at::kFloat}, "float32");
  TORCH_CHECK_VALUE(cache.dim() == 2 && cache.size(0) >= 1,
                    "cos_sin_cache must be 2-D [max_pos >= 1, rotary_dim], got shape ", py_tuple(cache.sizes()));
  check_unit_last_stride("cos_sin_cache", cache);
  check_device("cos_sin_cache", cache, heads, x);
  TORCH_CHECK_VALUE(rotary_dim % 2 == 0 && rotary_dim >= 2 && rotary_dim <= d, "rotary_dim must be even and in [2, D=",
                    d, "], got ", rotary_dim);
  TORCH_CHECK_VALUE(cache.size(1) == rotary_dim, "cos_sin_cache must have rotary_dim=", rotary_dim,
                    " columns (cos, then sin), got ", cache.size(1));
}

void check_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const at::Tensor& slot_mapping, const std::optional<at::Tensor>& k_scale,
              const std::optional<at::Tensor>& v_scale) {
  check_float("k", k);
  TORCH_CHECK_VALUE(k.dim() == 3, "k must be 3-D [T, Hk, D], got shape ", py_tuple(k.sizes()));
  const int64_t t = k.size(0), hk = k.size(1), d = k.size(2);
  TORCH_CHECK_VALUE(d == 64 || d == 128, "k: the head dim D=", d, " must be 64 or 128");
  TORCH_CHECK_VALUE(v.scalar_type() == k.scalar_type(), "v must have k's dtype ", py_dtype(k.scalar_type()), ", got ",
                    py_dtype(v.scalar_type()));
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have k's shape ", py_tuple(k.sizes()), ", got ",
                    py_tuple(v.sizes()));
  check_unit_last_stride("k", k);
  check_unit_last_stride("v", v);
  check_device("v", v, "k", k);
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.size(2) == hk && k_cache.size(3) == d,
                    "k_cache must be 4-D [num_pages, page_size, Hk=", hk, ", D=", d, "], got shape ",
                    py_tuple(k_cache.sizes()));
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ",
                    py_tuple(k_cache.sizes()), ", got ", py_tuple(v_cache.sizes()));
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK_VALUE(fp8 || k_cache.scalar_type() == k.scalar_type(), "k_cache must be k's dtype ",
                    py_dtype(k.scalar_type()), " or torch.float8_e4m3fn, got ", py_dtype(k_cache.scalar_type()));
  TORCH_CHECK_VALUE(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache must have k_cache's dtype ",
                    py_dtype(k_cache.scalar_type()), ", got ", py_dtype(v_cache.scalar_type()));
  check_unit_last_stride("k_cache", k_cache);
  check_unit_last_stride("v_cache", v_cache);
  check_device("k_cache", k_cache, "k", k);
  check_device("v_cache", v_cache, "k", k);
  check_index("slot_mapping", slot_mapping, t, "k", k);
  for (const auto& [name, s] : {std::pair{"k_scale", &k_scale}, std::pair{"v_scale", &v_scale}}) {
    TORCH_CHECK_VALUE(!fp8 || s->has_value(), name,
                      " is required with float8_e4m3fn caches (fp32 per-head scales [Hk])");
    TORCH_CHECK_VALUE(fp8 || !s->has_value(), name, " is only for float8_e4m3fn caches, the caches are ",
                      py_dtype(k_cache.scalar_type()));
    if (!s->has_value()) continue;
    const at::Tensor& st = **s;
    check_dtype(name, st, {at::kFloat}, "float32");
    TORCH_CHECK_VALUE(st.dim() == 1 && st.size(0) == hk, name, " must have shape [Hk=", hk,
                      "] (a per-tensor scale: scale.expand(", hk, ")), got ", py_list(st.sizes()));
    check_device(name, st, "k", k);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------

// Whether t can be read (written) kV elements at a time: the data pointer aligned to a vector,
// every stride but the last a multiple of kV.
bool vectorizable(const at::Tensor& t, int64_t kv) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % (kv * t.element_size()) != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if (!stride_multiple(t, i, kv)) return false;
  return true;
}

struct Launch {
  RopeParams p;
  at::ScalarType dtype;
  int64_t d;
  bool fp8 = false;
  std::vector<at::Tensor> vector_io;  // every tensor the kernel reads or writes a vector at a time
};

template <typename T, int kD, int kV>
void launch_typed(const Launch& l, cudaStream_t stream) {
  constexpr int G = kD / kV < kWarpSize ? kD / kV : kWarpSize;
  constexpr int kGroups = kThreads / G;
  const int64_t groups = l.p.T * (l.p.Hq + l.p.Hk + l.p.Hv);
  const int64_t blocks = (groups + kGroups - 1) / kGroups;
  TORCH_CHECK_VALUE(blocks <= INT32_MAX, "qk_norm_rope: ", l.p.T, " tokens are too many");
  if (l.fp8) {
    _qk_norm_rope_kernel<T, kD, kV, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(l.p);
  } else {
    _qk_norm_rope_kernel<T, kD, kV, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(l.p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch(const Launch& l, const at::Tensor& like) {
  if (l.p.T == 0 || l.p.Hq + l.p.Hk + l.p.Hv == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(like.get_device());
  dispatch_float(l.dtype, "q", [&]<typename scalar_t>() {
    constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
    bool vec = true;
    for (const at::Tensor& t : l.vector_io) vec = vec && vectorizable(t, kVec);
    const auto run = [&]<int kD>() {
      if (vec) {
        launch_typed<scalar_t, kD, kVec>(l, stream);
      } else {
        launch_typed<scalar_t, kD, 1>(l, stream);
      }
    };
    if (l.d == 64) {
      run.template operator()<64>();
    } else {
      run.template operator()<128>();
    }
  });
}

// The head tensors, norm weights, positions and table of a rope launch.
void set_rope(Launch& l, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& q_norm_weight,
              const std::optional<at::Tensor>& k_norm_weight, const at::Tensor& positions,
              const at::Tensor& cos_sin_cache, double eps, int64_t rotary_dim) {
  RopeParams& p = l.p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.q_w = q_norm_weight.has_value() ? q_norm_weight->data_ptr() : nullptr;
  p.k_w = k_norm_weight.has_value() ? k_norm_weight->data_ptr() : nullptr;
  p.pos = positions.data_ptr();
  p.pos64 = positions.scalar_type() == at::kLong;
  p.pos_s = positions.stride(0);
  p.cos_sin = cos_sin_cache.data_ptr<float>();
  p.cs_st = cos_sin_cache.stride(0);
  p.max_pos = cos_sin_cache.size(0);
  p.T = q.size(0);
  p.Hq = static_cast<int>(q.size(1));
  p.Hk = static_cast<int>(k.size(1));
  p.q_st = q.stride(0), p.q_sh = q.stride(1), p.k_st = k.stride(0), p.k_sh = k.stride(1);
  p.R = static_cast<int>(rotary_dim);
  p.eps = static_cast<float>(eps);  // fp32(eps), as torch adds it to the fp32 variance
  p.rope = true;
  l.dtype = q.scalar_type();
  l.d = q.size(2);
  l.vector_io.insert(l.vector_io.end(), {q, k});
  for (const auto* w : {&q_norm_weight, &k_norm_weight})
    if (w->has_value()) l.vector_io.push_back(**w);
}

void set_outputs(Launch& l, const at::Tensor& q_out, const at::Tensor& k_out) {
  l.p.q_out = q_out.data_ptr();
  l.p.k_out = k_out.data_ptr();
  l.p.qo_st = q_out.stride(0), l.p.qo_sh = q_out.stride(1), l.p.ko_st = k_out.stride(0), l.p.ko_sh = k_out.stride(1);
  l.vector_io.insert(l.vector_io.end(), {q_out, k_out});
}

void set_cache(Launch& l, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
               const at::Tensor& slot_mapping, const std::optional<at::Tensor>& k_scale,
               const std::optional<at::Tensor>& v_scale) {
  RopeParams& p = l.p;
  l.fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  p.v = v.data_ptr();
  p.v_st = v.stride(0), p.v_sh = v.stride(1);
  p.Hv = static_cast<int>(v.size(1));
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.kc_sp = k_cache.stride(0), p.kc_so = k_cache.stride(1), p.kc_sh = k_cache.stride(2);
  p.vc_sp = v_cache.stride(0), p.vc_so = v_cache.stride(1), p.vc_sh = v_cache.stride(2);
  p.page_size = k_cache.size(1);
  p.num_slots = k_cache.size(0) * k_cache.size(1);
  p.slots = slot_mapping.data_ptr();
  p.slots64 = slot_mapping.scalar_type() == at::kLong;
  p.slot_s = slot_mapping.stride(0);
  if (l.fp8) {
    p.k_scale = k_scale->data_ptr<float>(), p.ks_s = k_scale->stride(0);
    p.v_scale = v_scale->data_ptr<float>(), p.vs_s = v_scale->stride(0);
  }
  l.vector_io.insert(l.vector_io.end(), {v, k_cache, v_cache});
}

at::Tensor empty_like_heads(const at::Tensor& x) { return at::empty(x.sizes(), x.options()); }

std::tuple<at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& q, const at::Tensor& k,
                                                const std::optional<at::Tensor>& q_norm_weight,
                                                const std::optional<at::Tensor>& k_norm_weight,
                                                const at::Tensor& positions, const at::Tensor& cos_sin_cache,
                                                double eps, int64_t rotary_dim) {
  check_heads(q, k);
  check_norm_rope("q", q, q.size(0), q.size(2), q_norm_weight, k_norm_weight, positions, cos_sin_cache, rotary_dim);
  check_cuda("q", q);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor q_out = empty_like_heads(q), k_out = empty_like_heads(k);
  Launch l{};
  set_rope(l, q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps, rotary_dim);
  set_outputs(l, q_out, k_out);
  launch(l, q);
  return {q_out, k_out};
}

void qk_norm_rope_inplace(at::Tensor& qkv, const std::optional<at::Tensor>& q_norm_weight,
                          const std::optional<at::Tensor>& k_norm_weight, const at::Tensor& positions,
                          const at::Tensor& cos_sin_cache, int64_t num_q_heads, int64_t num_kv_heads, double eps,
                          int64_t rotary_dim) {
  check_float("qkv", qkv);
  TORCH_CHECK_VALUE(qkv.dim() == 2, "qkv must be 2-D [T, (Hq + 2 * Hk) * D], got shape ", py_tuple(qkv.sizes()));
  TORCH_CHECK_VALUE(num_q_heads >= 1 && num_kv_heads >= 1, "num_q_heads and num_kv_heads must be >= 1, got ",
                    num_q_heads, " and ", num_kv_heads);
  const int64_t heads = num_q_heads + 2 * num_kv_heads, width = qkv.size(1);
  TORCH_CHECK_VALUE(width % heads == 0 && (width / heads == 64 || width / heads == 128),
                    "qkv must have (num_q_heads + 2 * num_kv_heads) * D = ", heads,
                    " * D columns with D 64 or 128, got ", width);
  check_unit_last_stride("qkv", qkv);
  const int64_t d = width / heads;
  check_norm_rope("qkv", qkv, qkv.size(0), d, q_norm_weight, k_norm_weight, positions, cos_sin_cache, rotary_dim);
  check_cuda("qkv", qkv);
  const c10::cuda::CUDAGuard guard(qkv.device());
  // q and k as views into qkv, rewritten in place: each group reads its head before writing it
  const at::Tensor q = qkv.narrow(1, 0, num_q_heads * d).unflatten(1, {num_q_heads, d});
  const at::Tensor k = qkv.narrow(1, num_q_heads * d, num_kv_heads * d).unflatten(1, {num_kv_heads, d});
  Launch l{};
  set_rope(l, q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps, rotary_dim);
  set_outputs(l, q, k);
  launch(l, qkv);
}

void kv_cache_write(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping, const std::optional<at::Tensor>& k_scale,
                    const std::optional<at::Tensor>& v_scale) {
  check_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale);
  check_cuda("k", k);
  const c10::cuda::CUDAGuard guard(k.device());
  Launch l{};
  l.p.k = k.data_ptr();
  l.p.k_st = k.stride(0), l.p.k_sh = k.stride(1);
  l.p.T = k.size(0);
  l.p.Hk = static_cast<int>(k.size(1));
  l.dtype = k.scalar_type();
  l.d = k.size(2);
  l.vector_io.push_back(k);
  set_cache(l, v, k_cache, v_cache, slot_mapping, k_scale, v_scale);
  launch(l, k);
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_kv_write(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& q_norm_weight,
    const std::optional<at::Tensor>& k_norm_weight, const at::Tensor& positions, const at::Tensor& cos_sin_cache,
    at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping, double eps, int64_t rotary_dim,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  check_heads(q, k);
  check_norm_rope("q", q, q.size(0), q.size(2), q_norm_weight, k_norm_weight, positions, cos_sin_cache, rotary_dim);
  check_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale);
  check_cuda("q", q);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor q_out = empty_like_heads(q), k_out = empty_like_heads(k);
  Launch l{};
  set_rope(l, q, k, q_norm_weight, k_norm_weight, positions, cos_sin_cache, eps, rotary_dim);
  set_outputs(l, q_out, k_out);
  set_cache(l, v, k_cache, v_cache, slot_mapping, k_scale, v_scale);
  launch(l, q);
  return {q_out, k_out};
}

}  // namespace
}  // namespace glm45

// Python defines the schemas (glm45_ops/attention/rope.py); this file only adds the CUDA kernels.
TORCH_LIBRARY_IMPL(glm45, CUDA, m) {
  m.impl("qk_norm_rope", &glm45::qk_norm_rope);
  m.impl("qk_norm_rope_", &glm45::qk_norm_rope_inplace);
  m.impl("kv_cache_write", &glm45::kv_cache_write);
  m.impl("qk_norm_rope_kv_write", &glm45::qk_norm_rope_kv_write);
}
