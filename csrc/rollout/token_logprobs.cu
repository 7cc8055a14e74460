// Token log-probs and entropy on CUDA: the CUDA-key kernel of glm45::token_logprobs (schema,
// checks and fake: glm45_ops/rollout/logprobs.py; numerical definition:
// glm45_ops/reference/rollout.py; backends agree within that module's tolerance, greedy rows
// exactly).
//
// Memory-bound: at V = 151552 a row is 296 KB of bf16 read once. One CTA per row; each thread
// keeps the online softmax state (m, s, w) of the elements it reads (m the running max, s = sum
// 2^d, w = sum 2^d * d, d = (x - m) * log2(e) / t: base 2, so each element costs one ex2), with
// kUnroll 16-byte loads in flight; a group of kUnroll vectors raises the max (and pays the one
// rescaling exp) at most once. Then warp shuffles and one shared-memory round merge the
// threads' states: merging (m1, s1, w1) and (m2, s2, w2) at M = max(m1, m2) scales each by
// a = 2^delta, delta = (m_k - M) * c, with w_k -> a * (w_k + s_k * delta). The last thread
// converts to nats: logprob = (d_i - log2 s) ln 2, entropy = (log2 s - w / s) ln 2.
//
// Edge values as the reference: -inf logits add exactly 0 (2^-inf = 0 and the 0 * -inf term is
// skipped), a state whose max is -inf subtracts 0 instead of -inf, NaN and +inf reach s and make
// the row NaN. Greedy rows (t <= 0) take an exact argmax instead: a packed int64 max of an
// order-preserving key (NaN above +inf, -0 == +0) and the lowest index.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>

#include "common/checks.h"
#include "common/cuda_utils.cuh"

namespace glm45 {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kUnroll = 4;                   // 16-byte loads in flight per thread
constexpr int64_t kMaxVocab = int64_t(1) << 30;  // glm45_ops.rollout.MAX_VOCAB (the Triton kernels' limit)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kFltMax = 3.4028234663852886e38f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// row[j, j+N) as fp32: one 16-byte load when N > 1 (the host checked every row's alignment).
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* __restrict__ row, int64_t j, float (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = to_float(row[j]);
  } else {
    Vec<T, N> v;
    v.load(row + j);
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = get(v, e);
  }
}

// 2^x by ex2.approx.ftz (2 ulp): a result below 2^-126 flushes to 0, which next to the state's
// largest term (2^0 = 1) changes nothing; exp2f's exact subnormal path would cost 4 more
// instructions per element. 2^-inf = 0, NaN stays NaN.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The max used as the subtrahend: 0 for -inf (a fully masked stretch adds 0, not -inf - -inf).
__device__ __forceinline__ float safe_max(float m) { return m == -INFINITY ? 0.0f : m; }

// Online softmax state in base 2; c2 = log2(e) / t (at most the largest float, NaN for NaN t).
struct Online {
  float m = -INFINITY, s = 0.0f, w = 0.0f;

  // Re-express s and w relative to a new max m_new >= m. A vanished state is exactly 0, and so
  // is one that never saw a value above -inf (s is 0, or NaN from NaN elements, which stays),
  // even where delta is -inf * 0 (t = +inf).
  __device__ __forceinline__ void raise_max(float m_new, float c2) {
    const float delta = (m - safe_max(m_new)) * c2;
    const float a = m == -INFINITY ? 0.0f : fast_exp2(delta);
    w = a == 0.0f ? 0.0f : a * (w + s * delta);
    s *= a;
    m = m_new;
  }
  __device__ __forceinline__ void add(float x, float ms, float c2) {
    const float d = (x - ms) * c2;
    const float e = fast_exp2(d);
    s += e;
    w += e == 0.0f ? 0.0f : e * d;
  }
  __device__ __forceinline__ void merge(Online o, float c2) {
    const float m_new = fmaxf(m, o.m);
    raise_max(m_new, c2);
    o.raise_max(m_new, c2);
    s += o.s;
    w += o.w;
  }
};

__device__ __forceinline__ Online warp_merge(Online st, float c2) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    Online o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, off);
    st.merge(o, c2);
  }
  return st;
}

struct RowArgs {
  int64_t V, l_st, i_st, t_st;
  float temperature;  // fp32(temperature), used when temps is null
  bool ids64;
};

// The lowest index of the row's largest value (NaN largest): exact in any reduction order.
template <typename T>
__device__ int64_t row_argmax(const T* __restrict__ row, int64_t V, long long* scratch) {
  long long best = LLONG_MIN;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) best = max(best, pack_key_index(order_key(to_float(row[j])), j));
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, off));
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) scratch[warp] = best;
  __syncthreads();
  best = lane < kWarps ? scratch[lane] : LLONG_MIN;
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, off));
  return unpack_index(best);
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads) _token_logprobs_kernel(
    const T* __restrict__ logits, const void* __restrict__ ids, const float* __restrict__ temps,
    float* __restrict__ logprobs, float* __restrict__ entropy, RowArgs a) {
  __shared__ float part_m[kWarps], part_s[kWarps], part_w[kWarps];
  __shared__ long long scratch[kWarps];
  const int64_t r = blockIdx.x;
  const T* row = logits + r * a.l_st;
  const float t = temps != nullptr ? temps[r * a.t_st] : a.temperature;
  const int64_t tok = a.ids64 ? static_cast<const int64_t*>(ids)[r * a.i_st]
                              : static_cast<int64_t>(static_cast<const int32_t*>(ids)[r * a.i_st]);
  const bool valid = tok >= 0 && tok < a.V;

  if (t <= 0.0f) {  // greedy (block-uniform); a NaN t takes the softmax path and gives NaN
    const int64_t best = row_argmax(row, a.V, scratch);
    if (threadIdx.x == 0) {
      logprobs[r] = valid && tok == best ? 0.0f : -INFINITY;
      entropy[r] = 0.0f;
    }
    return;
  }
  const float c = isnan(t) ? t : fminf(__frcp_rn(t), kFltMax);
  const float c2 = isnan(c) ? c : fminf(c * kLog2e, kFltMax);

  Online st;
  constexpr int64_t kChunk = int64_t(kThreads) * N * kUnroll;
  int64_t base = 0;
  for (; base + kChunk <= a.V; base += kChunk) {
    float x[kUnroll][N];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_floats<T, N>(row, base + (u * kThreads + threadIdx.x) * N, x[u]);
    float vmax = st.m;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < N; ++e) vmax = fmaxf(vmax, x[u][e]);
    }
    if (vmax > st.m) st.raise_max(vmax, c2);
    const float ms = safe_max(st.m);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < N; ++e) st.add(x[u][e], ms, c2);
    }
  }
  for (int64_t j = base + threadIdx.x; j < a.V; j += kThreads) {  // the tail, element by element
    const float x = to_float(row[j]);
    if (x > st.m) st.raise_max(x, c2);
    st.add(x, safe_max(st.m), c2);
  }

  st = warp_merge(st, c2);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) {
    part_m[warp] = st.m;
    part_s[warp] = st.s;
    part_w[warp] = st.w;
  }
  __syncthreads();
  if (warp == 0) {
    st = Online{};
    if (lane < kWarps) {
      st.m = part_m[lane];
      st.s = part_s[lane];
      st.w = part_w[lane];
    }
    st = warp_merge(st, c2);
    if (lane == 0) {
      const float x_i = valid ? to_float(row[tok]) : 0.0f;
      const float d_i = valid ? (x_i - safe_max(st.m)) * c2 : -INFINITY;
      const float log2_s = log2f(st.s);
      logprobs[r] = (d_i - log2_s) * kLn2;
      entropy[r] = (log2_s - st.w / st.s) * kLn2;
    }
  }
}

// The checks of glm45_ops/rollout/logprobs.py (_check), in its order and words.
void check_token_logprobs(const at::Tensor& logits, const at::Tensor& token_ids, double temperature,
                          const std::optional<at::Tensor>& temperatures) {
  check_float("logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [T, V], got shape ", py_tuple(logits.sizes()));
  const int64_t n = logits.size(0), v = logits.size(1);
  TORCH_CHECK_VALUE(v >= 1 && v <= kMaxVocab, "logits: the vocabulary V=", v, " must be in [1, ", kMaxVocab, "]");
  check_unit_last_stride("logits", logits);
  const auto check_rows = [&](const char* name, const at::Tensor& x) {
    TORCH_CHECK_VALUE(x.dim() == 1 && x.size(0) == n, name, " must have shape [", n, "] ([T] from logits), got ",
                      py_list(x.sizes()));
    TORCH_CHECK_VALUE(x.device() == logits.device(), name, " is on ", x.device().str(), " but logits is on ",
                      logits.device().str());
  };
  check_dtype("token_ids", token_ids, {at::kInt, at::kLong}, "int32 or int64");
  check_rows("token_ids", token_ids);
  TORCH_CHECK_VALUE(!std::isnan(temperature),
                    "temperature must not be NaN (a NaN entry of temperatures gives its row NaN outputs)");
  if (temperatures.has_value()) {
    check_dtype("temperatures", *temperatures, {at::kFloat}, "float32");
    check_rows("temperatures", *temperatures);
    TORCH_CHECK_VALUE(temperature == 1.0, "temperature must be 1.0 (the default) when temperatures is given, got ",
                      py_repr(temperature));
  }
}

template <typename T, int N>
void launch(const at::Tensor& logits, const at::Tensor& ids, const float* temps, at::Tensor& lp, at::Tensor& ent,
            const RowArgs& a, cudaStream_t stream) {
  _token_logprobs_kernel<T, N><<<static_cast<unsigned>(logits.size(0)), kThreads, 0, stream>>>(
      static_cast<const T*>(logits.data_ptr()), ids.data_ptr(), temps, lp.data_ptr<float>(), ent.data_ptr<float>(), a);
}

std::tuple<at::Tensor, at::Tensor> token_logprobs(const at::Tensor& logits, const at::Tensor& token_ids,
                                                  double temperature, const std::optional<at::Tensor>& temperatures) {
  check_token_logprobs(logits, token_ids, temperature, temperatures);
  check_cuda("logits", logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0);
  at::Tensor lp = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor ent = at::empty({n}, logits.options().dtype(at::kFloat));
  if (n == 0) return {lp, ent};
  TORCH_CHECK_VALUE(n <= INT32_MAX, "token_logprobs: T = ", n, " rows is too many (one CTA per row)");
  const bool has_t = temperatures.has_value();
  const RowArgs a{logits.size(1),
                  logits.stride(0),
                  token_ids.stride(0),
                  has_t ? temperatures->stride(0) : 0,
                  static_cast<float>(temperature),  // fp32(temperature), as the reference
                  token_ids.scalar_type() == at::kLong};
  const float* temps = has_t ? temperatures->data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.get_device());
  dispatch_float(logits.scalar_type(), "logits", [&]<typename scalar_t>() {
    constexpr int kVec = 16 / int(sizeof(scalar_t));
    // 16-byte loads need every row 16-byte aligned: the base pointer and the row stride
    if (aligned16(logits) && stride_multiple(logits, 0, kVec)) {
      launch<scalar_t, kVec>(logits, token_ids, temps, lp, ent, a, stream);
    } else {
      launch<scalar_t, 1>(logits, token_ids, temps, lp, ent, a, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {lp, ent};
}

}  // namespace
}  // namespace glm45

// Python defines the schema (glm45_ops/rollout/logprobs.py); this file only adds the CUDA kernel.
TORCH_LIBRARY_IMPL(glm45, CUDA, m) { m.impl("token_logprobs", &glm45::token_logprobs); }
