// MoE routing on CUDA: the CUDA-key kernel of glm45::moe_route (schema, checks and fake:
// glm45_ops/moe/routing.py; numerical definition: glm45_ops/reference/moe_routing.py), exact:
//
// * the sigmoid is the reference's: float64 (linear below 2^-12), rounded once to fp32;
// * every choice is a warp max over a packed int64 (an order-preserving int32 key of the fp32
//   score, NaN below -inf and -0 == +0, then 0xffffffff - index), so one integer max gives the
//   best score and, among equal scores, the lowest index, in any reduction order;
// * the group score (two fp32 values), the weights' sum (left to right in output order), the
//   division and the factor are single IEEE fp32 operations (_rn intrinsics: no contraction).
//
// Layout: one warp per token, any E <= 512 (no power-of-two restriction): lane l holds experts
// l, l + 32, ... (kItems = ceil(E / 32) registers of keys and scores, loads coalesced along E).
// n_group > 1 takes two warp maxima per group (its best and second-best score) into shared
// memory, then topk_group rounds over the groups; then top_k rounds over the experts, each
// masking its winner. Lane j keeps the j-th weight and id and writes them at the end.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "common/checks.h"

namespace glm45 {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int64_t kMaxExperts = 512;  // glm45_ops.reference.moe_routing.MAX_EXPERTS
constexpr int64_t kMaxTopK = 16;      // MAX_TOP_K
constexpr int kMaxGroups = kMaxExperts / 2;
constexpr int32_t kNanKey = INT32_MIN + 1;  // below every non-NaN key (-inf's is -2139095041)
constexpr int32_t kExcluded = INT32_MIN;    // masked: never chosen
constexpr double kLinearBelow = 0x1p-12;    // SIGMOID_LINEAR_BELOW
constexpr float kRenormEps = 1e-20f;        // RENORM_EPS

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// The reference's sigmoid_scores: float64, the linear term near 0, one rounding to fp32.
__device__ __forceinline__ float sigmoid_score(float x) {
  const double d = static_cast<double>(x);
  const double s = fabs(d) < kLinearBelow ? __dadd_rn(0.5, __dmul_rn(0.25, d)) : __drcp_rn(__dadd_rn(1.0, exp(-d)));
  return __double2float_rn(s);
}

// fp32 -> int32 with the same signed order; -0 == +0; NaN below -inf (order_key).
__device__ __forceinline__ int32_t order_key(float x) {
  if (x != x) return kNanKey;
  if (x == 0.0f) return 0;
  const int32_t bits = __float_as_int(x);
  return bits < 0 ? bits ^ 0x7fffffff : bits;
}

// The value of a key (some NaN for kNanKey): order_key's inverse.
__device__ __forceinline__ float key_value(int32_t key) { return __int_as_float(key < 0 ? key ^ 0x7fffffff : key); }

// Higher key first, then the lower index: one signed max.
__device__ __forceinline__ long long pack(int32_t key, int index) {
  return static_cast<long long>(static_cast<uint64_t>(static_cast<int64_t>(key)) << 32 |
                                (0xffffffffu - static_cast<uint32_t>(index)));
}
__device__ __forceinline__ int unpack_index(long long packed) {
  return static_cast<int>(0xffffffffu - static_cast<uint32_t>(packed & 0xffffffffll));
}
__device__ __forceinline__ int32_t unpack_key(long long packed) { return static_cast<int32_t>(packed >> 32); }

__device__ __forceinline__ long long warp_max(long long v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

struct RouteArgs {
  int64_t T, E, l_st, l_se, b_se;
  int top_k, n_group, topk_group;
  bool renormalize;
  float factor;
};

template <typename T, int kItems>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize) _moe_route_kernel(
    const T* __restrict__ logits, const float* __restrict__ bias, float* __restrict__ weights,
    int32_t* __restrict__ ids, RouteArgs a) {
  __shared__ int32_t group_key[kWarpsPerBlock][kMaxGroups];
  __shared__ bool group_kept[kWarpsPerBlock][kMaxGroups];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= a.T) return;  // whole warps leave together: t is uniform across a warp
  const int E = static_cast<int>(a.E);

  float s[kItems];
  int32_t key[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int e = lane + i * kWarpSize;
    s[i] = 0.0f;
    key[i] = kExcluded;
    if (e < E) {
      s[i] = sigmoid_score(to_float(logits[t * a.l_st + e * a.l_se]));
      key[i] = order_key(bias != nullptr ? __fadd_rn(s[i], bias[e * a.b_se]) : s[i]);
    }
  }

  if (a.n_group > 1) {
    const int gsize = E / a.n_group;
    int32_t* gkey = group_key[warp];
    bool* kept = group_kept[warp];
    int group[kItems];  // each item's group, -1 past E (divided once, not once per group)
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int e = lane + i * kWarpSize;
      group[i] = e < E ? e / gsize : -1;
    }
    for (int g = 0; g < a.n_group; ++g) {  // the group's best two scores (the second may tie the first)
      long long best = pack(kExcluded, 0);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int e = lane + i * kWarpSize;
        if (group[i] == g) best = max(best, pack(key[i], e));
      }
      best = warp_max(best);
      const int first = unpack_index(best);
      long long second = pack(kExcluded, 0);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int e = lane + i * kWarpSize;
        if (group[i] == g && e != first) second = max(second, pack(key[i], e));
      }
      second = warp_max(second);
      if (lane == 0) {
        gkey[g] = order_key(__fadd_rn(key_value(unpack_key(best)), key_value(unpack_key(second))));
        kept[g] = false;
      }
    }
    __syncwarp();
    for (int r = 0; r < a.topk_group; ++r) {
      long long best = pack(kExcluded, 0);
      for (int g = lane; g < a.n_group; g += kWarpSize) best = max(best, pack(gkey[g], g));
      best = warp_max(best);
      __syncwarp();  // every lane has read gkey before lane 0 masks the winner
      if (lane == 0) {
        gkey[unpack_index(best)] = kExcluded;
        kept[unpack_index(best)] = true;
      }
      __syncwarp();
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (group[i] >= 0 && !kept[group[i]]) key[i] = kExcluded;
    }
  }

  float my_weight = 0.0f, total = 0.0f;
  int my_id = 0;
  for (int j = 0; j < a.top_k; ++j) {
    long long best = pack(kExcluded, 0);
#pragma unroll
    for (int i = 0; i < kItems; ++i) best = max(best, pack(key[i], lane + i * kWarpSize));
    best = warp_max(best);
    const int id = unpack_index(best);
    float mine = 0.0f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (lane + i * kWarpSize == id) {
        mine = s[i];
        key[i] = kExcluded;
      }
    }
    const float w = __shfl_sync(0xffffffffu, mine, id % kWarpSize);
    total = __fadd_rn(total, w);  // left to right; 0 + w_0 is w_0 (scores are never -0)
    if (lane == j) {
      my_weight = w;
      my_id = id;
    }
  }
  if (lane < a.top_k) {
    float w = a.renormalize ? __fdiv_rn(my_weight, __fadd_rn(total, kRenormEps)) : my_weight;
    weights[t * a.top_k + lane] = __fmul_rn(w, a.factor);
    ids[t * a.top_k + lane] = my_id;
  }
}

// The checks of glm45_ops/moe/routing.py, in its order and words.
void check_route(const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t top_k, int64_t n_group,
                 int64_t topk_group) {
  check_float("router_logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 2, "router_logits must be 2-D [T, E], got shape ", py_tuple(logits.sizes()));
  const int64_t e = logits.size(1);
  TORCH_CHECK_VALUE(e >= 1 && e <= kMaxExperts, "router_logits: the expert count E=", e, " must be in [1, ",
                    kMaxExperts, "]");
  if (bias.has_value()) {
    check_dtype("correction_bias", *bias, {at::kFloat}, "float32");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == e, "correction_bias must have shape [", e,
                      "] (E from router_logits), got ", py_list(bias->sizes()));
    TORCH_CHECK_VALUE(bias->device() == logits.device(), "correction_bias is on ", bias->device().str(),
                      " but router_logits is on ", logits.device().str());
  }
  const int64_t k_top = std::min(kMaxTopK, e);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= k_top, "top_k must be in [1, ", k_top, "] (at most ", kMaxTopK,
                    " and E=", e, "), got ", top_k);
  TORCH_CHECK_VALUE(n_group >= 1 && e % n_group == 0, "n_group must be a positive divisor of E=", e, ", got ",
                    n_group);
  TORCH_CHECK_VALUE(n_group == 1 || e / n_group >= 2, "n_group=", n_group, " leaves ", e / n_group,
                    " expert per group; a group's score sums its top 2, so groups need at least 2");
  TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group, "topk_group must be in [1, n_group=", n_group,
                    "], got ", topk_group);
  TORCH_CHECK_VALUE(topk_group * (e / n_group) >= top_k, "topk_group=", topk_group, " groups of ", e / n_group,
                    " experts hold fewer than top_k=", top_k, " experts");
}

template <typename T, int kItems>
void launch(const at::Tensor& logits, const float* bias, at::Tensor& weights, at::Tensor& ids, const RouteArgs& a,
            cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((a.T + kWarpsPerBlock - 1) / kWarpsPerBlock);
  _moe_route_kernel<T, kItems><<<blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(
      static_cast<const T*>(logits.data_ptr()), bias, weights.data_ptr<float>(), ids.data_ptr<int32_t>(), a);
}

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& router_logits,
                                             const std::optional<at::Tensor>& correction_bias, int64_t top_k,
                                             int64_t n_group, int64_t topk_group, bool renormalize,
                                             double routed_scaling_factor) {
  check_route(router_logits, correction_bias, top_k, n_group, topk_group);
  check_cuda("router_logits", router_logits);
  const c10::cuda::CUDAGuard guard(router_logits.device());
  const int64_t T = router_logits.size(0), E = router_logits.size(1);
  at::Tensor weights = at::empty({T, top_k}, router_logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({T, top_k}, router_logits.options().dtype(at::kInt));
  if (T == 0) return {weights, ids};
  TORCH_CHECK_VALUE((T + kWarpsPerBlock - 1) / kWarpsPerBlock <= INT32_MAX, "moe_route: T = ", T,
                    " tokens is too many");

  const bool has_bias = correction_bias.has_value();
  const RouteArgs a{T,
                    E,
                    router_logits.stride(0),
                    router_logits.stride(1),
                    has_bias ? correction_bias->stride(0) : 0,
                    static_cast<int>(top_k),
                    static_cast<int>(n_group),
                    static_cast<int>(topk_group),
                    renormalize,
                    static_cast<float>(routed_scaling_factor)};  // fp32(factor), as the reference
  const float* bias = has_bias ? correction_bias->data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(router_logits.get_device());
  dispatch_float(router_logits.scalar_type(), "router_logits", [&]<typename scalar_t>() {
    // registers per lane: ceil(E / 32) scores and keys, in the few sizes GLM-4.5 (160: 5),
    // Air (128: 4) and DeepSeek-V3 (256: 8) need, and 512 (16)
    if (E <= 4 * kWarpSize) {
      launch<scalar_t, 4>(router_logits, bias, weights, ids, a, stream);
    } else if (E <= 5 * kWarpSize) {
      launch<scalar_t, 5>(router_logits, bias, weights, ids, a, stream);
    } else if (E <= 8 * kWarpSize) {
      launch<scalar_t, 8>(router_logits, bias, weights, ids, a, stream);
    } else {
      launch<scalar_t, 16>(router_logits, bias, weights, ids, a, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, ids};
}

}  // namespace
}  // namespace glm45

// Python defines the schema (glm45_ops/moe/routing.py); this file only adds the CUDA kernel.
TORCH_LIBRARY_IMPL(glm45, CUDA, m) { m.impl("moe_route", &glm45::moe_route); }
