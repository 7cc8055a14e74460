// MTP speculative verification on CUDA: the CUDA-key kernels of
//   glm45::verify_greedy, glm45::verify_sampling
// (schemas, checks and fakes: glm45_ops/speculative.py; numerical definition:
// glm45_ops/reference/speculative.py). Both are exact, not merely close:
//
// * greedy: argmax = max over a packed int64 (order-preserving int32 key of the fp32 value, then
//   0x7fffffff - index), so one integer max gives the largest value and, among equal values, the
//   lowest index, in any reduction order. -0 == +0 and NaN sorts above +inf, as torch.argmax.
// * sampling: the acceptance test is one fp32 product and compare (u * p(x) < q(x)); the CDF is
//   summed over int64 fixed-point weights trunc(min(d, 1) * 2^40), where addition is exact and
//   associative, so warp shuffles, shared-memory atomics and block scans give the reference's
//   integers; the threshold is one float64 product, truncated.
//
// Layout: greedy runs one CTA per (request, position) row, B * (S+1) CTAs, then one thread per
// request walks the chain (at B = 64, S = 3 that is 256 CTAs streaming rows instead of 64 CTAs
// walking 4 rows each). Sampling runs one CTA per request: it reads only the rows it draws from
// (the draft and target rows at the first rejection, or target row S), once in full to get the
// total mass and the mass of each 8192-id tile (in shared memory), then once more for the single
// tile that holds the threshold (a second full pass only when the residual has no mass).
// 16-byte loads whenever every row is 16-byte aligned.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "common/checks.h"
#include "common/cuda_utils.cuh"

namespace glm45 {
namespace {

constexpr int kWarpSize = 32;
constexpr int64_t kMaxVocab = int64_t(1) << 23;      // V * 2^40 < 2^63 (glm45_ops.reference.speculative)
constexpr float kFixedOne = 1099511627776.0f;        // 2^40: probabilities as int64 multiples of 2^-40
constexpr int kArgmaxThreads = 512;
constexpr int kArgmaxUnroll = 4;                     // 16-byte loads in flight per thread
constexpr int kSampleThreads = 512;
constexpr int kTileElemsPerThread = 16;              // 4 x float4 or 2 x 8 x bf16 per thread per tile
constexpr int64_t kTileElems = int64_t(kSampleThreads) * kTileElemsPerThread;  // 8192
constexpr int kMaxTiles = int(kMaxVocab / kTileElems);                        // 1024: 8 KB of tile sums

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// row[j, j+N) as fp32. kChecked: elements at or past n read as 0 (never loaded); otherwise the
// caller guarantees j + N <= n and this is one 16-byte load (the host checks that every row is
// 16-byte aligned when N > 1). Unchecked loads keep unrolled loops free of branches, so all of a
// thread's loads are in flight before the first value is used.
template <typename T, int N, bool kChecked>
__device__ __forceinline__ void load_floats(const T* __restrict__ row, int64_t j, int64_t n, float (&out)[N]) {
  if (!kChecked || j + N <= n) {
    Vec<T, N> v;
    v.load(row + j);
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = get(v, e);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = j + e < n ? to_float(row[j + e]) : 0.0f;
  }
}

// trunc(min(d, 1) * 2^40) for d > 0, else 0 (NaN included): exact scaling, then truncation.
__device__ __forceinline__ long long fixed_point(float d) {
  return d > 0.0f ? __float2ll_rz(fminf(d, 1.0f) * kFixedOne) : 0;
}

__device__ __forceinline__ long long warp_sum(long long v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ long long warp_max(long long v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ long long warp_inclusive_scan(long long v, int lane) {
#pragma unroll
  for (int off = 1; off < kWarpSize; off <<= 1) {
    const long long up = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += up;
  }
  return v;
}

// Block-wide sum (kMax = false) or max (kMax = true) of v, returned to every thread. `scratch`
// holds one value per warp; the leading barrier makes back-to-back calls safe.
template <int kThreads, bool kMax>
__device__ __forceinline__ long long block_reduce(long long v, long long* scratch) {
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : (kMax ? LLONG_MIN : 0);
  return kMax ? warp_max(v) : warp_sum(v);
}

// Exclusive prefix sum of v over the block's threads in order; `total` gets the block's sum.
template <int kThreads>
__device__ __forceinline__ long long block_exclusive_scan(long long v, long long* scratch, long long& total) {
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const long long incl = warp_inclusive_scan(v, lane);
  __syncthreads();
  if (lane == kWarpSize - 1) scratch[warp] = incl;
  __syncthreads();
  const long long warp_incl = warp_inclusive_scan(lane < kWarps ? scratch[lane] : 0, lane);
  total = __shfl_sync(0xffffffffu, warp_incl, kWarps - 1);
  const long long warp_before = __shfl_sync(0xffffffffu, warp_incl, (warp + kWarpSize - 1) % kWarpSize);
  return (warp ? warp_before : 0) + incl - v;
}

// ---------------------------------------------------------------------------------------------
// Greedy
// ---------------------------------------------------------------------------------------------

struct GreedyArgs {
  int64_t rows;  // S + 1
  int64_t V;
  int64_t l_sb, l_ss;
  int64_t o_sb, o_ss;
};

// max of the N values, NaN if any is NaN (max.NaN: one instruction per pair of 16-bit values)
__device__ __forceinline__ float max_nan(float a, float b) {
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

template <typename T, int N>
__device__ __forceinline__ float vec_max_nan(const Vec<T, N>& x) {
  if constexpr (N == 1) {
    return get(x, 0);
  } else if constexpr (std::is_same_v<T, float>) {
    float m = get(x, 0);
#pragma unroll
    for (int e = 1; e < N; ++e) m = max_nan(m, get(x, e));
    return m;
  } else {  // 16-bit pairs, one per 32-bit word
    using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
    const T2* x2 = reinterpret_cast<const T2*>(x.w);
    T2 m = x2[0];
#pragma unroll
    for (int e = 1; e < N / 2; ++e) m = __hmax2_nan(m, x2[e]);
    return max_nan(to_float(m.x), to_float(m.y));
  }
}

// row[j, j+N) as a vector; with kChecked, elements at or past n are -inf (never loaded, never
// the argmax; the round trip through fp32 is exact).
template <typename T, int N, bool kChecked>
__device__ __forceinline__ Vec<T, N> load_or_neg_inf(const T* __restrict__ row, int64_t j, int64_t n) {
  Vec<T, N> x;
  if (!kChecked || j + N <= n) {
    x.load(row + j);
  } else {
    fill(x, [&](int e) { return j + e < n ? to_float(row[j + e]) : -INFINITY; });
  }
  return x;
}

// A thread's running argmax over increasing ids: strict > keeps the first of equal values. Single
// elements are touched only for a vector whose max beats the best so far (rare once the running
// max settles), so a chunk costs about one instruction per element.
struct ArgmaxState {
  float best = -INFINITY;
  int64_t best_j = -1;  // -1: nothing above -inf seen
  bool nan = false;

  template <typename T, int N, bool kChecked>
  __device__ __forceinline__ void scan(const T* __restrict__ row, int64_t base, int64_t V) {
    constexpr int64_t kStep = int64_t(kArgmaxThreads) * N;
    Vec<T, N> x[kArgmaxUnroll];
#pragma unroll
    for (int u = 0; u < kArgmaxUnroll; ++u) {
      x[u] = load_or_neg_inf<T, N, kChecked>(row, base + u * kStep + threadIdx.x * N, V);
    }
#pragma unroll
    for (int u = 0; u < kArgmaxUnroll; ++u) {
      if (!(vec_max_nan(x[u]) <= best)) {  // a larger value, or a NaN
#pragma unroll
        for (int e = 0; e < N; ++e) {
          const float v = get(x[u], e);
          nan |= v != v;
          if (v > best) {
            best = v;
            best_j = base + u * kStep + threadIdx.x * N + e;
          }
        }
      }
    }
  }
};

// One CTA per (request b, position i): out[b, i] = argmax_j logits[b, i, j] (lowest j on ties).
// Fast path: ArgmaxState per thread, then one packed max over the CTA. A NaN, or a row with no
// value above -inf, sends the CTA through the exact order-key loop instead.
template <typename T, int N>
__global__ void __launch_bounds__(kArgmaxThreads) _row_argmax_kernel(const T* __restrict__ logits,
                                                                     int32_t* __restrict__ out, GreedyArgs a) {
  __shared__ long long scratch[kArgmaxThreads / kWarpSize];
  const int64_t b = blockIdx.x / a.rows, i = blockIdx.x % a.rows;
  const T* row = logits + b * a.l_sb + i * a.l_ss;
  constexpr int64_t kChunk = int64_t(kArgmaxThreads) * N * kArgmaxUnroll;
  ArgmaxState st;
  int64_t base = 0;
  for (; base + kChunk <= a.V; base += kChunk) st.scan<T, N, false>(row, base, a.V);
  if (base < a.V) st.scan<T, N, true>(row, base, a.V);
  long long packed = st.nan ? LLONG_MAX : st.best_j >= 0 ? pack_key_index(order_key(st.best), st.best_j) : LLONG_MIN;
  packed = block_reduce<kArgmaxThreads, true>(packed, scratch);
  if (packed == LLONG_MAX || packed == LLONG_MIN) {  // block-uniform: NaN present, or every value is -inf
    packed = LLONG_MIN;
    for (int64_t j = threadIdx.x; j < a.V; j += kArgmaxThreads) {
      packed = max(packed, pack_key_index(order_key(to_float(row[j])), j));
    }
    packed = block_reduce<kArgmaxThreads, true>(packed, scratch);
  }
  if (threadIdx.x == 0) out[b * a.o_sb + i * a.o_ss] = unpack_index(packed);
}

// One thread per request: out[b, :] holds the S+1 argmaxes; keep the accepted prefix and the
// first mismatch (the argmax there is the emitted token), pad with -1.
template <typename IdT>
__global__ void _greedy_chain_kernel(const IdT* __restrict__ draft, int64_t d_sb, int64_t d_ss,
                                     int32_t* __restrict__ out, int64_t o_sb, int64_t o_ss,
                                     int32_t* __restrict__ num_accepted, int64_t B, int64_t S) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  int32_t* o = out + b * o_sb;
  int64_t k = 0;
  while (k < S && static_cast<int64_t>(draft[b * d_sb + k * d_ss]) == o[k * o_ss]) ++k;
  for (int64_t i = k + 1; i <= S; ++i) o[i * o_ss] = -1;
  num_accepted[b] = static_cast<int32_t>(k);
}

// ---------------------------------------------------------------------------------------------
// Sampling
// ---------------------------------------------------------------------------------------------

struct SamplingArgs {
  int64_t S, V;
  int64_t dp_sb, dp_ss, d_sb, d_ss, t_sb, t_ss, u_sb, u_ss, o_sb, o_ss;
};

// The row the draw reads: q = target row k; p = draft row k (kHasDraft and k < S) or none; the
// weights are the residual (relu(q - p), or q without the one-hot draft's token x_k) or, when
// `use_q` (the residual has no mass), q itself.
template <typename T, bool kHasDraft>
struct DrawRow {
  const T* q;
  const T* p;  // nullptr: no draft row (p = 0)
  int64_t x_k;  // -1: no token to remove
  bool use_q;

  __device__ __forceinline__ long long weight(float qv, float pv, int64_t j) const {
    if (use_q) return fixed_point(qv);
    if constexpr (kHasDraft) {
      return fixed_point(qv - pv);
    } else {
      return j == x_k ? 0 : fixed_point(qv);
    }
  }

  // q and p at row offsets [j(v), j(v) + N), j(v) = base + v * stride; p = 0 when not needed.
  template <int N, int kUnroll, bool kChecked>
  __device__ __forceinline__ void load(int64_t base, int64_t stride, int64_t V, float (&qv)[kUnroll][N],
                                       float (&pv)[kUnroll][N]) const {
#pragma unroll
    for (int v = 0; v < kUnroll; ++v) {
      load_floats<T, N, kChecked>(q, base + v * stride, V, qv[v]);
      if (kHasDraft && p != nullptr && !use_q) {
        load_floats<T, N, kChecked>(p, base + v * stride, V, pv[v]);
      } else {
#pragma unroll
        for (int e = 0; e < N; ++e) pv[v][e] = 0.0f;
      }
    }
  }
};

// Tile t's fixed-point mass (8192 ids, read coalesced: vector v of a tile is contiguous across
// the CTA), added into tiles[t] by one shared-memory atomic per warp; returns the warp's sum.
template <typename T, int N, bool kHasDraft, bool kChecked>
__device__ __forceinline__ long long tile_mass(const DrawRow<T, kHasDraft>& row, int64_t t, int64_t V,
                                               unsigned long long* tiles) {
  constexpr int kUnroll = kTileElemsPerThread / N;
  constexpr int64_t kStride = int64_t(kSampleThreads) * N;
  const int64_t base = t * kTileElems + int64_t(threadIdx.x) * N;
  float q[kUnroll][N], p[kUnroll][N];
  row.template load<N, kUnroll, kChecked>(base, kStride, V, q, p);
  long long w = 0;
#pragma unroll
  for (int v = 0; v < kUnroll; ++v) {
#pragma unroll
    for (int e = 0; e < N; ++e) w += row.weight(q[v][e], p[v][e], base + v * kStride + e);
  }
  w = warp_sum(w);
  if (threadIdx.x % kWarpSize == 0) atomicAdd(&tiles[t], static_cast<unsigned long long>(w));
  return w;
}

// Pass over the whole row: tiles[t] = mass of tile t; returns the row's mass to every thread.
template <typename T, int N, bool kHasDraft>
__device__ long long tile_masses(const DrawRow<T, kHasDraft>& row, int64_t V, int64_t n_tiles,
                                 unsigned long long* tiles, long long* scratch) {
  __syncthreads();  // tiles may still be read by a previous search
  for (int64_t t = threadIdx.x; t < n_tiles; t += kSampleThreads) tiles[t] = 0;
  __syncthreads();
  long long total = 0;
  const int64_t full = V / kTileElems;
  for (int64_t t = 0; t < full; ++t) total += tile_mass<T, N, kHasDraft, false>(row, t, V, tiles);
  if (full < n_tiles) total += tile_mass<T, N, kHasDraft, true>(row, full, V, tiles);
  return block_reduce<kSampleThreads, false>(threadIdx.x % kWarpSize == 0 ? total : 0, scratch);
}

// One CTA per request: the acceptance chain, then the inverse-CDF draw at the first rejection.
template <typename T, typename IdT, int N, bool kHasDraft>
__global__ void __launch_bounds__(kSampleThreads, 1) _verify_sampling_kernel(
    const T* __restrict__ draft_probs, const IdT* __restrict__ draft_ids, const T* __restrict__ target_probs,
    const float* __restrict__ uniform, int32_t* __restrict__ out, int32_t* __restrict__ num_accepted,
    SamplingArgs a) {
  constexpr int kUnroll = kTileElemsPerThread / N;
  __shared__ unsigned long long tiles[kMaxTiles];
  __shared__ long long scratch[kSampleThreads / kWarpSize];
  __shared__ int64_t s_k, s_tile, s_before, s_tok;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const IdT* ids = draft_ids + b * a.d_sb;
  const float* u = uniform + b * a.u_sb;
  const int64_t n_tiles = (a.V + kTileElems - 1) / kTileElems;

  // 1. the chain, 32 positions per warp step: k = first rejected position (S if none)
  if (warp == 0) {
    int64_t k = a.S;
    for (int64_t base = 0; base < a.S; base += kWarpSize) {
      const int64_t i = base + lane;
      bool accept = true;
      if (i < a.S) {
        const int64_t x = static_cast<int64_t>(ids[i * a.d_ss]);
        const bool valid = x >= 0 && x < a.V;
        const float q = valid ? to_float(target_probs[b * a.t_sb + i * a.t_ss + x]) : 0.0f;
        const float p = !kHasDraft ? 1.0f : valid ? to_float(draft_probs[b * a.dp_sb + i * a.dp_ss + x]) : 0.0f;
        accept = valid && __fmul_rn(u[i * a.u_ss], p) < q;
      }
      const unsigned rejected = __ballot_sync(0xffffffffu, !accept);
      if (rejected) {
        k = base + __ffs(rejected) - 1;
        break;
      }
    }
    if (lane == 0) s_k = k;
  }
  __syncthreads();
  const int64_t k = s_k;
  DrawRow<T, kHasDraft> row{target_probs + b * a.t_sb + k * a.t_ss,
                            kHasDraft && k < a.S ? draft_probs + b * a.dp_sb + k * a.dp_ss : nullptr, -1, false};
  if (!kHasDraft && k < a.S) {
    const int64_t x = static_cast<int64_t>(ids[k * a.d_ss]);
    if (x >= 0 && x < a.V) row.x_k = x;
  }

  // 2. the mass of each tile of the residual; of q if the residual has none (block-uniform)
  long long total = tile_masses<T, N, kHasDraft>(row, a.V, n_tiles, tiles, scratch);
  if (total == 0) {
    row.use_q = true;
    total = tile_masses<T, N, kHasDraft>(row, a.V, n_tiles, tiles, scratch);
  }
  const long long thr = __double2ll_rz(__dmul_rn(static_cast<double>(u[a.S * a.u_ss]), __ll2double_rn(total)));

  // 3. the tile holding the threshold: the first whose inclusive prefix exceeds thr (none when
  //    the row has no mass at all)
  if (warp == 0) {
    long long running = 0;
    int64_t tile = -1, before = 0;
    for (int64_t base = 0; base < n_tiles; base += kWarpSize) {
      const long long w = base + lane < n_tiles ? static_cast<long long>(tiles[base + lane]) : 0;
      const long long incl = running + warp_inclusive_scan(w, lane);
      const unsigned hit = __ballot_sync(0xffffffffu, incl > thr);
      if (hit) {
        const int f = __ffs(hit) - 1;
        tile = base + f;
        before = __shfl_sync(0xffffffffu, incl - w, f);
        break;
      }
      running = __shfl_sync(0xffffffffu, incl, kWarpSize - 1);
    }
    if (lane == 0) {
      s_tile = tile;
      s_before = before;
      s_tok = a.V - 1;  // the degenerate all-zero row
    }
  }
  __syncthreads();

  // 4. pass 2, one tile: each thread owns 16 consecutive ids; a block scan of the threads' sums
  //    finds the one thread whose range crosses thr, which finds the id
  if (s_tile >= 0) {
    const int64_t j0 = s_tile * kTileElems + int64_t(threadIdx.x) * kTileElemsPerThread;
    float q[kUnroll][N], p[kUnroll][N];
    row.template load<N, kUnroll, true>(j0, N, a.V, q, p);
    long long local = 0;
#pragma unroll
    for (int v = 0; v < kUnroll; ++v) {
#pragma unroll
      for (int e = 0; e < N; ++e) local += row.weight(q[v][e], p[v][e], j0 + v * N + e);
    }
    long long tile_total;
    long long running = s_before + block_exclusive_scan<kSampleThreads>(local, scratch, tile_total);
    if (running <= thr && thr < running + local) {
      int64_t tok = -1;
#pragma unroll
      for (int v = 0; v < kUnroll; ++v) {
#pragma unroll
        for (int e = 0; e < N; ++e) {
          running += row.weight(q[v][e], p[v][e], j0 + v * N + e);
          if (tok < 0 && running > thr) tok = j0 + v * N + e;
        }
      }
      s_tok = tok;
    }
  }
  __syncthreads();

  // 5. out[b] = accepted drafts, the drawn token, -1 padding
  for (int64_t i = threadIdx.x; i <= a.S; i += kSampleThreads) {
    out[b * a.o_sb + i * a.o_ss] =
        i < k ? static_cast<int32_t>(ids[i * a.d_ss]) : i == k ? static_cast<int32_t>(s_tok) : -1;
  }
  if (threadIdx.x == 0) num_accepted[b] = static_cast<int32_t>(k);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// Every row t[b, i, :] starts on a 16-byte boundary (so N-wide vector loads are aligned).
bool rows_aligned(const at::Tensor& t, int64_t n) {
  return aligned16(t) && stride_multiple(t, 0, n) && stride_multiple(t, 1, n);
}

// The checks of glm45_ops/speculative.py, in its order and words (its _check_ids_in_vocab reads
// the ids, a host sync, so it runs for CPU tensors only and has no counterpart here).
void check_tensor(const char* name, const at::Tensor& t, std::initializer_list<at::ScalarType> dtypes,
                  const char* what, int64_t ndim, const char* dims) {
  check_dtype(name, t, dtypes, what);
  TORCH_CHECK_VALUE(t.dim() == ndim, name, " must be ", ndim, "-D ", dims, ", got shape ", py_tuple(t.sizes()));
}

void check_ids(const at::Tensor& draft_ids) {
  check_tensor("draft_ids", draft_ids, {at::kInt, at::kLong}, "int32 or int64", 2, "[B, S]");
}

void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& draft_ids) {
  TORCH_CHECK_VALUE(t.device() == draft_ids.device(), name, " is on ", t.device().str(), " but draft_ids is on ",
                    draft_ids.device().str());
}

// V = t.shape[-1] in [1, kMaxVocab], unit last stride
int64_t check_vocab_rows(const char* name, const at::Tensor& t) {
  const int64_t v = t.size(-1);
  TORCH_CHECK_VALUE(v >= 1 && v <= kMaxVocab, name, ": the vocabulary V=", v, " must be in [1, ", kMaxVocab,
                    "] (int64 fixed-point CDF)");
  check_unit_last_stride(name, t);
  return v;
}

void check_rows(const char* name, const at::Tensor& t, std::vector<int64_t> want, const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == c10::IntArrayRef(want), name, " must have shape ", py_list(want), " (", what,
                    "), got ", py_list(t.sizes()));
}

template <typename F>
void dispatch_ids(const at::Tensor& ids, F&& f) {
  if (ids.scalar_type() == at::kInt) {
    f(static_cast<const int32_t*>(ids.data_ptr()));
  } else {
    f(static_cast<const int64_t*>(ids.data_ptr()));
  }
}

std::tuple<at::Tensor, at::Tensor> verify_greedy(const at::Tensor& draft_ids, const at::Tensor& target_logits) {
  check_ids(draft_ids);
  check_tensor("target_logits", target_logits, {at::kBFloat16, at::kHalf, at::kFloat}, kFloatDtypes, 3,
               "[B, S+1, V]");
  check_same_device("target_logits", target_logits, draft_ids);
  const int64_t B = draft_ids.size(0), S = draft_ids.size(1);
  const int64_t V = check_vocab_rows("target_logits", target_logits);
  check_rows("target_logits", target_logits, {B, S + 1, V}, "B and S+1 from draft_ids [B, S]");
  check_cuda("draft_ids", draft_ids);
  const c10::cuda::CUDAGuard guard(draft_ids.device());
  at::Tensor out = at::empty({B, S + 1}, draft_ids.options().dtype(at::kInt));
  at::Tensor num_accepted = at::empty({B}, draft_ids.options().dtype(at::kInt));
  if (B == 0) return {out, num_accepted};
  TORCH_CHECK_VALUE(B * (S + 1) <= INT32_MAX, "verify_greedy: B * (S+1) = ", B * (S + 1), " rows is too many");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(draft_ids.get_device());
  const GreedyArgs a{S + 1, target_logits.size(2), target_logits.stride(0), target_logits.stride(1), out.stride(0),
                     out.stride(1)};
  dispatch_float(target_logits.scalar_type(), "target_logits", [&]<typename scalar_t>() {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* lp = static_cast<const scalar_t*>(target_logits.data_ptr());
    const unsigned grid = static_cast<unsigned>(B * (S + 1));
    if (rows_aligned(target_logits, kVec)) {
      _row_argmax_kernel<scalar_t, kVec><<<grid, kArgmaxThreads, 0, stream>>>(lp, out.data_ptr<int32_t>(), a);
    } else {
      _row_argmax_kernel<scalar_t, 1><<<grid, kArgmaxThreads, 0, stream>>>(lp, out.data_ptr<int32_t>(), a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  constexpr int kChainThreads = 128;
  dispatch_ids(draft_ids, [&](auto* ids) {
    _greedy_chain_kernel<<<static_cast<unsigned>((B + kChainThreads - 1) / kChainThreads), kChainThreads, 0,
                           stream>>>(ids, draft_ids.stride(0), draft_ids.stride(1), out.data_ptr<int32_t>(),
                                     out.stride(0), out.stride(1), num_accepted.data_ptr<int32_t>(), B, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, num_accepted};
}

std::tuple<at::Tensor, at::Tensor> verify_sampling(const at::Tensor& draft_ids, const at::Tensor& target_probs,
                                                   const at::Tensor& uniform,
                                                   const std::optional<at::Tensor>& draft_probs) {
  check_ids(draft_ids);
  check_tensor("target_probs", target_probs, {at::kBFloat16, at::kHalf, at::kFloat}, kFloatDtypes, 3,
               "[B, S+1, V]");
  check_tensor("uniform", uniform, {at::kFloat}, "float32", 2, "[B, S+1]");
  const bool has_draft = draft_probs.has_value();
  if (has_draft) {
    check_tensor("draft_probs", *draft_probs, {at::kBFloat16, at::kHalf, at::kFloat}, kFloatDtypes, 3, "[B, S, V]");
    TORCH_CHECK_VALUE(draft_probs->scalar_type() == target_probs.scalar_type(), "draft_probs (",
                      py_dtype(draft_probs->scalar_type()), ") and target_probs (",
                      py_dtype(target_probs.scalar_type()), ") must share a dtype");
  }
  check_same_device("target_probs", target_probs, draft_ids);
  check_same_device("uniform", uniform, draft_ids);
  if (has_draft) check_same_device("draft_probs", *draft_probs, draft_ids);
  const int64_t B = draft_ids.size(0), S = draft_ids.size(1);
  const int64_t V = check_vocab_rows("target_probs", target_probs);
  check_rows("target_probs", target_probs, {B, S + 1, V}, "B and S+1 from draft_ids [B, S]");
  if (has_draft) {
    check_vocab_rows("draft_probs", *draft_probs);
    check_rows("draft_probs", *draft_probs, {B, S, V}, "B, S from draft_ids and V from target_probs");
  }
  check_rows("uniform", uniform, {B, S + 1}, "one uniform per draft position plus one for the final draw");
  check_cuda("draft_ids", draft_ids);
  const c10::cuda::CUDAGuard guard(draft_ids.device());
  at::Tensor out = at::empty({B, S + 1}, draft_ids.options().dtype(at::kInt));
  at::Tensor num_accepted = at::empty({B}, draft_ids.options().dtype(at::kInt));
  if (B == 0) return {out, num_accepted};
  TORCH_CHECK_VALUE(B <= INT32_MAX, "verify_sampling: B = ", B, " requests is too many");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(draft_ids.get_device());
  const at::Tensor& dp = has_draft ? *draft_probs : target_probs;  // never read without a draft
  const SamplingArgs a{S,
                       V,
                       has_draft ? dp.stride(0) : 0,
                       has_draft ? dp.stride(1) : 0,
                       draft_ids.stride(0),
                       draft_ids.stride(1),
                       target_probs.stride(0),
                       target_probs.stride(1),
                       uniform.stride(0),
                       uniform.stride(1),
                       out.stride(0),
                       out.stride(1)};
  dispatch_float(target_probs.scalar_type(), "target_probs", [&]<typename scalar_t>() {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = rows_aligned(target_probs, kVec) && (!has_draft || rows_aligned(dp, kVec));
    const auto* tp = static_cast<const scalar_t*>(target_probs.data_ptr());
    const auto* dpp = static_cast<const scalar_t*>(dp.data_ptr());
    dispatch_ids(draft_ids, [&](auto* ids) {
      using IdT = std::remove_const_t<std::remove_pointer_t<decltype(ids)>>;
      const auto launch = [&](auto n_tag, auto draft_tag) {
        _verify_sampling_kernel<scalar_t, IdT, decltype(n_tag)::value, decltype(draft_tag)::value>
            <<<static_cast<unsigned>(B), kSampleThreads, 0, stream>>>(
                dpp, ids, tp, uniform.data_ptr<float>(), out.data_ptr<int32_t>(),
                num_accepted.data_ptr<int32_t>(), a);
      };
      using Vec_ = std::integral_constant<int, kVec>;
      using One = std::integral_constant<int, 1>;
      using Yes = std::true_type;
      using No = std::false_type;
      if (vec) {
        has_draft ? launch(Vec_{}, Yes{}) : launch(Vec_{}, No{});
      } else {
        has_draft ? launch(One{}, Yes{}) : launch(One{}, No{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, num_accepted};
}

}  // namespace
}  // namespace glm45

// Python defines the schemas (glm45_ops/speculative.py); this file only adds their CUDA kernels.
TORCH_LIBRARY_IMPL(glm45, CUDA, m) {
  m.impl("verify_greedy", &glm45::verify_greedy);
  m.impl("verify_sampling", &glm45::verify_sampling);
}
