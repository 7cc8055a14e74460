// MoE token permutation on CUDA: the CUDA-key kernel of glm45::moe_align_block_size (schema,
// checks and output shapes: glm45_ops/moe/permute.py; definition: glm45_ops/reference/moe.py).
// Bit-exact with the reference, with no host sync and no allocation that depends on the ids, so
// a decode step can be captured in a CUDA graph.
//
// Stability without sorting: the pairs are cut into contiguous ranges, one per CTA, and each
// range into contiguous sub-ranges, one per warp. A warp walks its sub-range 32 pairs at a time
// in ascending order and ranks each pair among the same step's pairs of its expert with
// __match_any_sync and a popcount of the lower lanes; a per-(warp, expert) cursor carries the
// rank across steps. Each cursor starts at the expert's segment start plus the counts of that
// expert in the ranges and sub-ranges before it (exclusive scans of integer counts, so any
// atomic order gives the same numbers). Ascending pair order within each segment follows.
//
// Layout:
// * decode (T*k <= kPairsPerCta and a short sorted_ids): one kernel, one CTA (count per warp,
//   scan, scatter, padding).
// * prefill: _moe_align_count_kernel writes one histogram per range ([ranges, E] scratch, sized
//   by the shapes only), then _moe_align_scatter_kernel, in every CTA, reads them all to get the
//   segment starts and its own ranges' offsets, recounts its range per warp and scatters it.
// The padding positions (each segment's tail and everything from num_padded on) are exactly the
// positions the scatter leaves, so the CTAs write them without waiting for one another.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/checks.h"

namespace glm45 {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int64_t kMaxExperts = 1024;    // glm45_ops.moe.permute.MAX_EXPERTS
constexpr int64_t kMaxBlockSize = 1024;  // glm45_ops.moe.permute.MAX_BLOCK_SIZE
// Pairs per CTA: 8 steps of 32 per warp, and at T = 4096, k = 8, 16 CTAs whose scan reads
// 16 x E counts each (more CTAs would scatter faster but read more histograms).
constexpr int64_t kPairsPerCta = 2048;
constexpr int64_t kMaxRanges = 1024;         // past 2M pairs the ranges grow instead
constexpr int64_t kFusedMaxPadded = 32768;   // one CTA writes at most this many sorted_ids
constexpr int64_t kPaddingPerCta = 16384;    // enough CTAs that long padding is written in parallel
constexpr int64_t kMaxPaddingCtas = 264;     // two per H200 SM

struct AlignArgs {
  int64_t n;              // T * k pairs (< 2^31 - E * block_size: the host check)
  int64_t k;
  int64_t stride_t, stride_k;
  bool contiguous;        // pair i at ids[i]
  int E, block_size;
  int64_t padded_len;     // P, the length of sorted_ids (may reach 2^31)
  int64_t num_blocks;     // P / block_size
  int64_t pairs_per_range;  // a multiple of kThreads
  int ranges;             // CTAs with a range of pairs (the count kernel's grid)
};

// The expert of pair i, or -1 outside [0, E): compared in the id's own type, so an int64 id that
// does not fit int32 stays out of range instead of wrapping into it.
template <typename IdT>
__device__ __forceinline__ int expert_of(const IdT* __restrict__ ids, const AlignArgs& a, int64_t i) {
  const int64_t off = a.contiguous ? i : (i / a.k) * a.stride_t + (i % a.k) * a.stride_k;
  const IdT v = ids[off];
  return v >= 0 && v < a.E ? static_cast<int>(v) : -1;
}

// This warp's sub-range [lo, hi) of CTA range [range_lo, range_hi): contiguous, in warp order,
// whole steps of 32 but the last.
__device__ __forceinline__ void warp_range(int64_t range_lo, int64_t range_hi, int64_t& lo, int64_t& hi) {
  const int64_t per_warp = (range_hi - range_lo + kThreads - 1) / kThreads * kWarpSize;
  lo = min(range_hi, range_lo + threadIdx.x / kWarpSize * per_warp);
  hi = min(range_hi, lo + per_warp);
}

// counts[e] += the number of pairs of expert e in [lo, hi): one shared atomic per expert per
// step (its lowest lane adds the step's count), so a step of one expert is one atomic, not 32.
template <typename IdT>
__device__ __forceinline__ void count_pairs(const IdT* __restrict__ ids, const AlignArgs& a, int64_t lo, int64_t hi,
                                            int* counts) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t i0 = lo; i0 < hi; i0 += kWarpSize) {
    const int64_t i = i0 + lane;
    const int e = i < hi ? expert_of(ids, a, i) : -1;
    const unsigned same = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(same) - 1) atomicAdd(&counts[e], __popc(same));
  }
}

// Exclusive prefix sum of v over the CTA's threads; `total` gets the sum. `scratch` holds one
// value per warp; the leading barrier makes back-to-back calls safe.
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int& total) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  int incl = v;
#pragma unroll
  for (int off = 1; off < kWarpSize; off <<= 1) {
    const int up = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += up;
  }
  __syncthreads();
  if (lane == kWarpSize - 1) scratch[warp] = incl;
  __syncthreads();
  int warp_incl = lane < kWarps ? scratch[lane] : 0;
#pragma unroll
  for (int off = 1; off < kWarps; off <<= 1) {
    const int up = __shfl_up_sync(kFullMask, warp_incl, off);
    if (lane >= off) warp_incl += up;
  }
  total = __shfl_sync(kFullMask, warp_incl, kWarps - 1);
  const int warp_before = __shfl_sync(kFullMask, warp_incl, (warp + kWarpSize - 1) % kWarpSize);
  return (warp ? warp_before : 0) + incl - v;
}

// Per range: histogram[blockIdx.x, e] = the number of the range's pairs with expert e.
template <typename IdT>
__global__ void __launch_bounds__(kThreads) _moe_align_count_kernel(const IdT* __restrict__ ids, const AlignArgs a,
                                                                     int* __restrict__ histogram) {
  extern __shared__ int counts[];  // [E]
  for (int e = threadIdx.x; e < a.E; e += kThreads) counts[e] = 0;
  __syncthreads();
  const int64_t range_lo = blockIdx.x * a.pairs_per_range;
  int64_t lo, hi;
  warp_range(range_lo, min(a.n, range_lo + a.pairs_per_range), lo, hi);
  count_pairs(ids, a, lo, hi, counts);
  __syncthreads();
  int* out = histogram + int64_t(blockIdx.x) * a.E;
  for (int e = threadIdx.x; e < a.E; e += kThreads) out[e] = counts[e];
}

// kFused: one CTA, one range (the whole input), no histograms. Otherwise the CTAs past
// a.ranges have no pairs and only share the padding.
template <typename IdT, bool kFused>
__global__ void __launch_bounds__(kThreads) _moe_align_scatter_kernel(
    const IdT* __restrict__ ids, const AlignArgs a, const int* __restrict__ histogram, int* __restrict__ sorted_ids,
    int* __restrict__ block_expert, int* __restrict__ num_padded) {
  extern __shared__ int smem[];
  int* cursor = smem;                            // [kWarps, E]: this warp's next slot per expert
  int* seg_start = smem + kWarps * a.E;          // [E]
  int* seg_count = seg_start + a.E;              // [E]
  __shared__ int scratch[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int E = a.E, bs = a.block_size;

  for (int j = threadIdx.x; j < kWarps * E; j += kThreads) cursor[j] = 0;
  __syncthreads();
  const int64_t range_lo = blockIdx.x < a.ranges ? blockIdx.x * a.pairs_per_range : a.n;
  int64_t lo, hi;
  warp_range(range_lo, min(a.n, range_lo + a.pairs_per_range), lo, hi);
  int* my_cursor = cursor + warp * E;
  count_pairs(ids, a, lo, hi, my_cursor);
  __syncthreads();

  // Segments in expert order (padded counts, scanned), then each warp's first slot per expert:
  // the segment start, plus the expert's pairs in earlier ranges, plus those of earlier warps.
  int total = 0;
  for (int e0 = 0; e0 < E; e0 += kThreads) {
    const int e = e0 + threadIdx.x;
    int count = 0, before = 0;
    if (e < E) {
      if constexpr (kFused) {
        for (int w = 0; w < kWarps; ++w) count += cursor[w * E + e];
      } else {
        const int own = min(int(blockIdx.x), a.ranges);
#pragma unroll 4
        for (int c = 0; c < a.ranges; ++c) {
          const int v = histogram[int64_t(c) * E + e];
          count += v;
          before += c < own ? v : 0;
        }
      }
    }
    int round_total;
    const int start = total + block_exclusive_scan((count + bs - 1) / bs * bs, scratch, round_total);
    total += round_total;
    if (e < E) {
      seg_start[e] = start;
      seg_count[e] = count;
      int next = start + before;
      for (int w = 0; w < kWarps; ++w) {
        const int c = cursor[w * E + e];
        cursor[w * E + e] = next;
        next += c;
      }
    }
  }
  __syncthreads();

  // Scatter: a step's pairs of one expert take consecutive slots in lane order; the lowest lane
  // reads and advances the cursor (within a warp each expert has one such lane per step).
  const unsigned lower_lanes = (1u << lane) - 1;
  for (int64_t i0 = lo; i0 < hi; i0 += kWarpSize) {
    const int64_t i = i0 + lane;
    const int e = i < hi ? expert_of(ids, a, i) : -1;
    const unsigned same = __match_any_sync(kFullMask, e);
    const int leader = __ffs(same) - 1;
    int base = 0;
    if (e >= 0 && lane == leader) {
      base = my_cursor[e];
      my_cursor[e] = base + __popc(same);
    }
    base = __shfl_sync(kFullMask, base, leader);
    if (e >= 0) sorted_ids[base + __popc(same & lower_lanes)] = static_cast<int>(i);
    __syncwarp();
  }

  // Padding: the positions the scatter leaves. A warp per expert writes its segment's tail and
  // its blocks' ids; the whole grid writes everything from `total` on.
  const int sentinel = static_cast<int>(a.n);
  for (int e = blockIdx.x * kWarps + warp; e < E; e += gridDim.x * kWarps) {
    const int64_t start = seg_start[e], used = start + seg_count[e];
    const int64_t end = start + (seg_count[e] + bs - 1) / bs * bs;
    for (int64_t p = used + lane; p < end; p += kWarpSize) sorted_ids[p] = sentinel;
    for (int64_t b = start / bs + lane; b < end / bs; b += kWarpSize) block_expert[b] = e;
  }
  const int64_t thread = int64_t(blockIdx.x) * kThreads + threadIdx.x, threads = int64_t(gridDim.x) * kThreads;
  for (int64_t p = total + thread; p < a.padded_len; p += threads) sorted_ids[p] = sentinel;
  for (int64_t b = total / bs + thread; b < a.num_blocks; b += threads) block_expert[b] = -1;
  if (blockIdx.x == 0 && threadIdx.x == 0) *num_padded = total;
}

template <typename IdT>
void launch_align(const at::Tensor& topk_ids, const AlignArgs& a, at::Tensor& sorted_ids, at::Tensor& block_expert,
                  at::Tensor& num_padded, cudaStream_t stream) {
  const auto* ids = topk_ids.data_ptr<IdT>();
  const size_t scatter_smem = size_t(kWarps + 2) * a.E * sizeof(int);  // 40 KB at E = 1024
  if (a.ranges == 1 && a.padded_len <= kFusedMaxPadded) {
    _moe_align_scatter_kernel<IdT, true><<<1, kThreads, scatter_smem, stream>>>(
        ids, a, nullptr, sorted_ids.data_ptr<int>(), block_expert.data_ptr<int>(), num_padded.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Shapes only: the same scratch size on every call with these shapes (CUDA-graph safe).
  at::Tensor histogram = at::empty({a.ranges, a.E}, topk_ids.options().dtype(at::kInt));
  _moe_align_count_kernel<IdT><<<a.ranges, kThreads, size_t(a.E) * sizeof(int), stream>>>(
      ids, a, histogram.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t padding_ctas = std::min((a.padded_len + kPaddingPerCta - 1) / kPaddingPerCta, kMaxPaddingCtas);
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(a.ranges, padding_ctas));
  _moe_align_scatter_kernel<IdT, false><<<grid, kThreads, scatter_smem, stream>>>(
      ids, a, histogram.data_ptr<int>(), sorted_ids.data_ptr<int>(), block_expert.data_ptr<int>(),
      num_padded.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size(const at::Tensor& topk_ids, int64_t num_experts,
                                                                    int64_t block_size) {
  check_dtype("topk_ids", topk_ids, {at::kInt, at::kLong}, "int32 or int64");
  TORCH_CHECK_VALUE(topk_ids.dim() == 2, "topk_ids must be 2-D [T, k], got shape ", py_tuple(topk_ids.sizes()));
  check_size("num_experts", num_experts, kMaxExperts);
  check_size("block_size", block_size, kMaxBlockSize);
  TORCH_CHECK_VALUE(topk_ids.numel() < (int64_t(1) << 31) - num_experts * block_size,
                    "topk_ids has too many entries for int32 positions: ", topk_ids.numel());
  check_cuda("topk_ids", topk_ids);
  const c10::cuda::CUDAGuard guard(topk_ids.device());

  const int64_t T = topk_ids.size(0), k = topk_ids.size(1), n = T * k;
  const int64_t padded_len = (n + num_experts * (block_size - 1) + block_size - 1) / block_size * block_size;
  const auto opts = topk_ids.options().dtype(at::kInt);
  at::Tensor sorted_ids = at::empty({padded_len}, opts);
  at::Tensor block_expert = at::empty({padded_len / block_size}, opts);
  at::Tensor num_padded = at::empty({1}, opts);

  const int64_t min_per_range = (n + kMaxRanges - 1) / kMaxRanges;
  const int64_t per_range = std::max(kPairsPerCta, (min_per_range + kThreads - 1) / kThreads * kThreads);
  AlignArgs a{};
  a.n = n;
  a.k = k;
  a.stride_t = topk_ids.stride(0);
  a.stride_k = topk_ids.stride(1);
  a.contiguous = (T <= 1 || a.stride_t == k) && (k <= 1 || a.stride_k == 1);
  a.E = static_cast<int>(num_experts);
  a.block_size = static_cast<int>(block_size);
  a.padded_len = padded_len;
  a.num_blocks = padded_len / block_size;
  a.pairs_per_range = per_range;
  a.ranges = static_cast<int>(std::max<int64_t>(1, (n + per_range - 1) / per_range));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(topk_ids.get_device());
  if (topk_ids.scalar_type() == at::kInt) {
    launch_align<int32_t>(topk_ids, a, sorted_ids, block_expert, num_padded, stream);
  } else {
    launch_align<int64_t>(topk_ids, a, sorted_ids, block_expert, num_padded, stream);
  }
  return {sorted_ids, block_expert, num_padded};
}

}  // namespace
}  // namespace glm45

// Python defines the schema (glm45_ops/moe/permute.py); this file only adds its CUDA kernel.
TORCH_LIBRARY_IMPL(glm45, CUDA, m) { m.impl("moe_align_block_size", &glm45::moe_align_block_size); }
