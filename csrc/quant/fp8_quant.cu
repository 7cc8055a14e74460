// FP8 (e4m3fn) block-wise quantization on CUDA: the CUDA-key kernels of
//   glm45::per_token_group_quant_fp8, glm45::per_block_quant_fp8, glm45::dequant_fp8
// (schemas, checks and fakes: glm45_ops/quant.py; numerical definition: glm45_ops/reference/quant.py).
//
//   amax  = max |x| over the finite x of a block B     scale = max(amax, eps) / 448   (IEEE division)
//   scale = 2^ceil(log2 scale) if ue8m0                 x_q   = e4m3(clamp(x / scale, -448, 448))
//
// Bit-exact with the reference, NaN and inf included: fp32 math, an exact amax that skips +-inf
// and keeps NaN (unsigned max of |x|'s bits, cuda_utils.cuh), the scalar math of fp8_scale.cuh
// (IEEE scale, NaN kept through UE8M0, x / scale correctly rounded, +-inf / scale = +-inf), and
// cvt.rn.satfinite to e4m3, whose saturation *is* the reference's clamp (finite overflow and +-inf
// -> +-448 with their sign, NaN stays NaN, which fminf/fmaxf would not keep). So a NaN in a block
// makes its scale and every x_q NaN. Build without --use_fast_math.
// The quantizers are memory-bound: one read of x, one write of x_q, 16-byte vector accesses, and
// x kept in registers between the amax and the quantization. Every launch is a 1-D grid, cut
// into launches of at most 2^31 - 1 CTAs (gridDim.x's limit) where it could exceed it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "quant/fp8_scale.cuh"

namespace glm45 {
namespace {

constexpr int kThreads = 256;
constexpr int kGroupsPerThread = 4;  // activation groups in flight per thread (4 x 16-byte loads)
constexpr int kScaleAlign = 4;       // column-major scales: M stride rounded up to 16 bytes (TMA)

using fp8::ScaleDiv;
using fp8::scale_from_amax;

template <ScaleDiv::Mode kMode, typename T, int N>
__device__ __forceinline__ Vec<uint8_t, N> quantize_vec(const Vec<T, N>& x, const ScaleDiv& d) {
  Vec<uint8_t, N> q;
  fill_e4m3(q, [&](int j) { return d.div<kMode>(get(x, j)); });
  return q;
}

template <typename T, int N>
__device__ __forceinline__ Vec<uint8_t, N> quantize(const Vec<T, N>& x, const ScaleDiv& d) {
  if (d.mode == ScaleDiv::kMarkstein) return quantize_vec<ScaleDiv::kMarkstein>(x, d);
  if (d.mode == ScaleDiv::kMultiply) return quantize_vec<ScaleDiv::kMultiply>(x, d);
  return quantize_vec<ScaleDiv::kLifted>(x, d);
}

// ---------------------------------------------------------------------------------------------
// per_token_group_quant_fp8: one 16-byte vector per lane, a group on `lanes` consecutive lanes
// (group 128: 16 lanes for bf16/fp16, 32 for fp32), amax by xor-shuffles within those lanes. The
// last group of a row may be partial (K = 192, 176 with groups of 128): its lanes past K load
// nothing and add 0 to the amax (the host keeps K a multiple of the vector width).
// ---------------------------------------------------------------------------------------------

struct TokenGroupArgs {
  int64_t n_groups;        // M * groups_per_row
  int64_t groups_per_row;  // ceil(K / group_size)
  int64_t group_size;
  int64_t k;               // row length; x_q is contiguous [M, K]
  int64_t x_row_stride;    // elements
  int64_t s_row_stride, s_col_stride;
  int lanes_log2;          // log2(group_size / vector width), <= 5
  uint32_t eps_bits;
  bool ue8m0;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
_per_token_group_quant_fp8_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ s,
                                  TokenGroupArgs a, int64_t cta0) {
  constexpr int kVec = 16 / sizeof(T);
  const int lanes = 1 << a.lanes_log2;
  const int lane = threadIdx.x & (lanes - 1);
  const int groups_per_step = kThreads >> a.lanes_log2;  // consecutive groups: coalesced 4 KB steps
  const int64_t g0 =
      (cta0 + blockIdx.x) * int64_t(kGroupsPerThread) * groups_per_step + (threadIdx.x >> a.lanes_log2);

  // (row, column group) of each of this thread's groups, walked without dividing per step
  int64_t row[kGroupsPerThread], col[kGroupsPerThread];
  row[0] = g0 / a.groups_per_row;
  col[0] = g0 - row[0] * a.groups_per_row;
  const int64_t drow = groups_per_step / a.groups_per_row, dcol = groups_per_step % a.groups_per_row;
#pragma unroll
  for (int i = 1; i < kGroupsPerThread; ++i) {
    row[i] = row[i - 1] + drow;
    col[i] = col[i - 1] + dcol;
    if (col[i] >= a.groups_per_row) {
      col[i] -= a.groups_per_row;
      ++row[i];
    }
  }
  // this lane's vector of group i starts at column c(i) of its row
  const auto c = [&](int i) { return col[i] * a.group_size + lane * kVec; };

  Vec<T, kVec> v[kGroupsPerThread];
  uint32_t amax[kGroupsPerThread];
  // bit i: group i exists and this lane's vector of it lies within K (a mask, not a predicate
  // recomputed at the store: that kept the 64-bit column offsets alive and spilled)
  unsigned live = 0;
#pragma unroll
  for (int i = 0; i < kGroupsPerThread; ++i) {
    amax[i] = 0;
    if (g0 + i * groups_per_step < a.n_groups && c(i) < a.k) {
      live |= 1u << i;
      v[i].load(x + row[i] * a.x_row_stride + c(i));
      amax[i] = finite_amax_bits(v[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kGroupsPerThread; ++i) amax[i] = group_max_u32(amax[i], lanes);  // all lanes take part
#pragma unroll
  for (int i = 0; i < kGroupsPerThread; ++i) {
    if (g0 + i * groups_per_step >= a.n_groups) continue;
    const ScaleDiv d(scale_from_amax(amax[i], a.eps_bits, a.ue8m0));
    if (live >> i & 1) quantize(v[i], d).store(q + row[i] * a.k + c(i));
    if (lane == 0) s[row[i] * a.s_row_stride + col[i] * a.s_col_stride] = d.scale;
  }
}

// ---------------------------------------------------------------------------------------------
// per_block_quant_fp8 (and per-token groups the warp kernel does not take): one CTA per
// block_rows x block_cols block of a [B, R, C] tensor, amax by warp reduction + shared memory.
// ---------------------------------------------------------------------------------------------

struct BlockArgs {
  int64_t rows, cols;                   // R, C of each matrix
  int64_t block_rows, block_cols;
  int64_t n_block_rows, n_block_cols;
  int64_t x_batch_stride, x_row_stride;  // elements; unit column stride
  int64_t q_batch_stride, q_row_stride;
  int64_t s_batch_stride, s_row_stride, s_col_stride;
  uint32_t eps_bits;
  bool ue8m0;
};

// Block (b, br, bc) of CTA cta0 + blockIdx.x, its extent, and where its x, x_q and scale live.
struct BlockAt {
  int64_t b, br, bc, nrows, ncols;
  __device__ __forceinline__ BlockAt(const BlockArgs& a, int64_t cta0) {
    int64_t blk = cta0 + blockIdx.x;
    bc = blk % a.n_block_cols;
    blk /= a.n_block_cols;
    br = blk % a.n_block_rows;
    b = blk / a.n_block_rows;
    nrows = min(a.block_rows, a.rows - br * a.block_rows);
    ncols = min(a.block_cols, a.cols - bc * a.block_cols);
  }
  __device__ __forceinline__ int64_t x_offset(const BlockArgs& a) const {
    return b * a.x_batch_stride + br * a.block_rows * a.x_row_stride + bc * a.block_cols;
  }
  __device__ __forceinline__ int64_t q_offset(const BlockArgs& a) const {
    return b * a.q_batch_stride + br * a.block_rows * a.q_row_stride + bc * a.block_cols;
  }
  __device__ __forceinline__ int64_t s_offset(const BlockArgs& a) const {
    return b * a.s_batch_stride + br * a.s_row_stride + bc * a.s_col_stride;
  }
};

template <int kThreads>
__device__ __forceinline__ uint32_t block_max(uint32_t v) {
  __shared__ uint32_t warp_max[kThreads / 32];
  v = __reduce_max_sync(0xffffffffu, v);
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = v;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) v = max(v, warp_max[w]);
  return v;
}

// The one-pass kernel: a thread owns one 16-byte column vector of the block (2^k threads per row,
// the next power of two >= the row's vectors) and kBlockRowsPerThread rows, kept in registers
// between the amax and the quantization. 128 x 128 bf16/fp16: 256 threads (16 per row, 8 rows
// each); fp32: 512 threads. 64 registers, so 1024 threads (128 KB of loads in flight) fit an SM.
constexpr int kBlockRowsPerThread = 8;
template <int VEC> constexpr int kBlockThreads = 128 * 128 / (kBlockRowsPerThread * VEC);

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlockThreads<VEC>, 1024 / kBlockThreads<VEC>)
_per_block_quant_fp8_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ s, BlockArgs a,
                            int64_t cta0) {
  constexpr int kThreads = kBlockThreads<VEC>, kRows = kBlockRowsPerThread;
  const BlockAt blk(a, cta0);
  const int vpr = int(blk.ncols / VEC);                // the host picks VEC | block_cols, cols
  const int lanes_log2 = 32 - __clz(vpr - 1);          // the host keeps 2^lanes_log2 <= kThreads
  const int col = threadIdx.x & ((1 << lanes_log2) - 1);
  const int row = threadIdx.x >> lanes_log2;
  const int row_step = kThreads >> lanes_log2;         // the host keeps block_rows <= kRows * row_step
  const bool active = col < vpr;
  const T* xp = x + blk.x_offset(a) + row * a.x_row_stride + col * VEC;
  uint8_t* qp = q + blk.q_offset(a) + row * a.q_row_stride + col * VEC;
  const int64_t x_step = row_step * a.x_row_stride, q_step = row_step * a.q_row_stride;
  auto live = [&](int j) { return active && row + j * row_step < blk.nrows; };

  Vec<T, VEC> buf[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j)
    if (live(j)) buf[j].load(xp + j * x_step);
  uint32_t amax = 0;
#pragma unroll
  for (int j = 0; j < kRows; ++j)
    if (live(j)) amax = max(amax, finite_amax_bits(buf[j]));
  const ScaleDiv d(scale_from_amax(block_max<kThreads>(amax), a.eps_bits, a.ue8m0));
  if (threadIdx.x == 0) s[blk.s_offset(a)] = d.scale;

  auto store_all = [&](auto mode) {
#pragma unroll
    for (int j = 0; j < kRows; ++j)
      if (live(j)) quantize_vec<decltype(mode)::value>(buf[j], d).store(qp + j * q_step);
  };
  if (d.mode == ScaleDiv::kMarkstein) {
    store_all(std::integral_constant<ScaleDiv::Mode, ScaleDiv::kMarkstein>{});
  } else if (d.mode == ScaleDiv::kMultiply) {
    store_all(std::integral_constant<ScaleDiv::Mode, ScaleDiv::kMultiply>{});
  } else {
    store_all(std::integral_constant<ScaleDiv::Mode, ScaleDiv::kLifted>{});
  }
}

// Any block shape and alignment (odd K, misaligned views, blocks over 128 x 128): scalar, two
// reads of x (the second mostly from L2). Correct everywhere, fast nowhere; the GLM-4.5 shapes
// never come here.
constexpr int kAnyThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kAnyThreads)
_per_block_quant_fp8_any_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ s,
                                BlockArgs a, int64_t cta0) {
  const BlockAt blk(a, cta0);
  const T* xb = x + blk.x_offset(a);
  uint8_t* qb = q + blk.q_offset(a);
  const int64_t n = blk.nrows * blk.ncols;
  uint32_t amax = 0;
  for (int64_t i = threadIdx.x; i < n; i += kAnyThreads) {
    const int64_t r = i / blk.ncols;
    Vec<T, 1> v;
    v.load(xb + r * a.x_row_stride + (i - r * blk.ncols));
    amax = max(amax, finite_amax_bits(v));
  }
  const ScaleDiv d(scale_from_amax(block_max<kAnyThreads>(amax), a.eps_bits, a.ue8m0));
  if (threadIdx.x == 0) s[blk.s_offset(a)] = d.scale;
  for (int64_t i = threadIdx.x; i < n; i += kAnyThreads) {
    const int64_t r = i / blk.ncols, c = i - r * blk.ncols;
    Vec<T, 1> v;
    v.load(xb + r * a.x_row_stride + c);
    quantize(v, d).store(qb + r * a.q_row_stride + c);
  }
}

// ---------------------------------------------------------------------------------------------
// dequant_fp8: out = float(x_q) * scale[row / block_rows, col / block_cols], one rounding (a NaN
// byte or a NaN scale gives NaN: e4m3's NaN converts to NaN and IEEE products keep it)
// ---------------------------------------------------------------------------------------------

struct DequantArgs {
  int64_t rows;            // R
  int64_t vecs_per_row;    // C / VEC
  int64_t n_vecs;          // B * R * C / VEC; out is contiguous [B, R, C]
  int64_t block_rows, block_cols;
  int64_t q_batch_stride, q_row_stride;
  int64_t s_batch_stride, s_row_stride, s_col_stride;
};

template <typename OutT, int VEC>
__global__ void __launch_bounds__(kThreads)
_dequant_fp8_kernel(const uint8_t* __restrict__ x_q, const float* __restrict__ s, OutT* __restrict__ out,
                    DequantArgs a, int64_t cta0) {
  const int64_t i = (cta0 + blockIdx.x) * kThreads + threadIdx.x;
  if (i >= a.n_vecs) return;
  const int64_t row = i / a.vecs_per_row;  // over B * R
  const int64_t c = (i - row * a.vecs_per_row) * VEC;
  const int64_t b = row / a.rows, r = row - b * a.rows;
  // the host picks VEC | block_cols, so the vector shares one scale
  const float scale =
      s[b * a.s_batch_stride + (r / a.block_rows) * a.s_row_stride + (c / a.block_cols) * a.s_col_stride];
  Vec<uint8_t, VEC> in;
  in.load(x_q + b * a.q_batch_stride + r * a.q_row_stride + c);
  float xf[VEC];
  if constexpr (VEC == 1) {
    xf[0] = e4m3_to_f32(in.w[0]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      const float2 p = e4m3x2_to_f32x2(in, j);
      xf[j] = p.x;
      xf[j + 1] = p.y;
    }
  }
  Vec<OutT, VEC> o;
  fill(o, [&](int j) { return __fmul_rn(xf[j], scale); });
  o.store(out + i * VEC);
}

// ---------------------------------------------------------------------------------------------
// Host side: the checks of glm45_ops/quant.py (same order, same messages, ValueError), then the
// device check; output allocation matching the Python alloc; launches on the current stream.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kMaxGroupSize = 4096;          // glm45_ops.quant.MAX_GROUP_SIZE
constexpr int64_t kMaxBlockSize = 256;           // glm45_ops.quant.MAX_BLOCK_SIZE
constexpr int64_t kMaxDequantBlock = INT32_MAX;  // glm45_ops.quant._MAX_DEQUANT_BLOCK
constexpr int64_t kMaxGrid = INT32_MAX;          // gridDim.x

// glm45_ops.quant._check_eps: float32(eps) / 448 must be a positive normal fp32 (the scale of an
// all-zero block), computed as Python does: eps rounded to fp32, then divided in double.
void check_eps(double eps) {
  constexpr double kFp32MinNormal = 1.1754943508222875e-38;  // torch.finfo(torch.float32).tiny
  const double e32 = std::isfinite(eps) ? double(static_cast<float>(eps)) : eps;
  if (std::isfinite(e32) && e32 > 0 && e32 / double(fp8::kE4M3Max) >= kFp32MinNormal) return;
  char least[32];
  std::snprintf(least, sizeof(least), "%.3g", double(fp8::kE4M3Max) * kFp32MinNormal);
  TORCH_CHECK_VALUE(false, "eps must be finite and at least ", least,
                    " (so eps / 448 is a positive normal fp32 number: the scale of an all-zero block), got ",
                    py_repr(eps));
}

uint32_t eps_bits(double eps) { return fp8::bits(static_cast<float>(eps)); }  // fp32, as in the reference

int64_t next_pow2(int64_t v) { return v <= 1 ? 1 : int64_t(1) << (64 - __builtin_clzll(uint64_t(v - 1))); }

// launch(grid, cta0) for consecutive slices of n_ctas CTAs, each within gridDim.x's limit
template <typename F>
void launch_1d(int64_t n_ctas, F&& launch) {
  for (int64_t cta0 = 0; cta0 < n_ctas; cta0 += kMaxGrid) {
    launch(static_cast<unsigned>(std::min(kMaxGrid, n_ctas - cta0)), cta0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// x [B, R, C] (unit column stride) -> q (contiguous [B, R, C]) and s [B, ceil(R/bm), ceil(C/bn)].
void launch_block_quant(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t bm, int64_t bn,
                        double eps, bool ue8m0) {
  const int64_t B = x.size(0), R = x.size(1), C = x.size(2);
  BlockArgs a{R, C, bm, bn, cdiv(R, bm), cdiv(C, bn), x.stride(0), x.stride(1), q.stride(0), q.stride(1),
              s.stride(0), s.stride(1), s.stride(2), eps_bits(eps), ue8m0};
  const int64_t n_blocks = B * a.n_block_rows * a.n_block_cols;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device());
  dispatch_float(x.scalar_type(), "x", [&]<typename scalar_t>() {
    constexpr int kVec = 16 / sizeof(scalar_t), kThreads = kBlockThreads<kVec>;
    // one-pass kernel: 16-byte aligned rows and blocks, and the block fits its CTA
    const int64_t lanes = next_pow2(bn / kVec);
    const bool one_pass = aligned16(x) && C % kVec == 0 && bn % kVec == 0 && stride_multiple(x, 0, kVec) &&
                          stride_multiple(x, 1, kVec) && lanes <= kThreads &&
                          bm <= kBlockRowsPerThread * (kThreads / lanes);
    const auto* xp = static_cast<const scalar_t*>(x.data_ptr());
    auto* qp = static_cast<uint8_t*>(q.data_ptr());
    auto* sp = s.data_ptr<float>();
    launch_1d(n_blocks, [&](unsigned grid, int64_t cta0) {
      if (one_pass) {
        _per_block_quant_fp8_kernel<scalar_t, kVec><<<grid, kThreads, 0, stream>>>(xp, qp, sp, a, cta0);
      } else {
        _per_block_quant_fp8_any_kernel<scalar_t><<<grid, kAnyThreads, 0, stream>>>(xp, qp, sp, a, cta0);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> per_token_group_quant_fp8(const at::Tensor& x, int64_t group_size, double eps,
                                                             bool scale_ue8m0, bool column_major_scales) {
  check_float("x", x);
  check_size("group_size", group_size, kMaxGroupSize);
  check_eps(eps);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dim [..., K]");
  check_unit_last_stride("x", x);
  TORCH_CHECK_VALUE(!column_major_scales || x.dim() == 2, "column_major_scales=True needs a 2-D x [M, K], got ",
                    x.dim(), "-D");
  check_cuda("x", x);
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t k = x.size(-1), groups = cdiv(k, group_size);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor x_q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scale;
  if (column_major_scales) {  // glm45_ops.quant._alloc_ptgq: M stride rounded up to 16 bytes (TMA)
    const int64_t m = x.size(0);
    scale = at::empty({groups, cdiv(m, int64_t(kScaleAlign)) * kScaleAlign}, f32).t().slice(0, 0, m);
  } else {
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = groups;
    scale = at::empty(shape, f32);
  }
  if (x.numel() == 0) return {x_q, scale};

  const at::Tensor x2 = x.reshape({-1, k});  // a view unless the leading dims cannot be flattened
  const int64_t m = x2.size(0);
  const at::Tensor q2 = x_q.view({m, k});
  const at::Tensor s2 = column_major_scales ? scale : scale.view({m, groups});

  const int64_t vec = 16 / x.element_size();
  const int64_t lanes = group_size / vec;
  const bool warp_path = group_size % vec == 0 && k % vec == 0 && lanes <= 32 && (lanes & (lanes - 1)) == 0 &&
                         aligned16(x2) && stride_multiple(x2, 0, vec);
  if (!warp_path) {  // odd group sizes, widths or alignments: one CTA per 1 x group_size block
    launch_block_quant(x2.unsqueeze(0), q2.unsqueeze(0), s2.unsqueeze(0), 1, group_size, eps, scale_ue8m0);
    return {x_q, scale};
  }
  const TokenGroupArgs a{m * groups,   groups,       group_size,          k, x2.stride(0), s2.stride(0),
                         s2.stride(1), __builtin_ctzll(lanes), eps_bits(eps), scale_ue8m0};
  const int64_t groups_per_cta = kGroupsPerThread * kThreads / lanes;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device());
  dispatch_float(x.scalar_type(), "x", [&]<typename scalar_t>() {
    launch_1d(cdiv(a.n_groups, groups_per_cta), [&](unsigned grid, int64_t cta0) {
      _per_token_group_quant_fp8_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          static_cast<const scalar_t*>(x2.data_ptr()), static_cast<uint8_t*>(q2.data_ptr()), s2.data_ptr<float>(),
          a, cta0);
    });
  });
  return {x_q, scale};
}

std::tuple<at::Tensor, at::Tensor> per_block_quant_fp8(const at::Tensor& w, int64_t block_size, double eps,
                                                       bool scale_ue8m0) {
  check_float("w", w);
  check_size("block_size", block_size, kMaxBlockSize);
  check_eps(eps);
  TORCH_CHECK_VALUE(w.dim() == 2 || w.dim() == 3, "w must be [N, K] or [E, N, K], got ", w.dim(), "-D shape ",
                    py_tuple(w.sizes()));
  check_unit_last_stride("w", w);
  check_cuda("w", w);
  const c10::cuda::CUDAGuard guard(w.device());

  const int64_t n = w.size(-2), k = w.size(-1);
  at::Tensor w_q = at::empty(w.sizes(), w.options().dtype(at::kFloat8_e4m3fn));
  std::vector<int64_t> s_shape = w.sizes().vec();
  s_shape[w.dim() - 2] = cdiv(n, block_size);
  s_shape[w.dim() - 1] = cdiv(k, block_size);
  at::Tensor scale = at::empty(s_shape, w.options().dtype(at::kFloat));
  if (w.numel() == 0) return {w_q, scale};
  const auto as3 = [](const at::Tensor& t) { return t.dim() == 3 ? t : t.unsqueeze(0); };
  launch_block_quant(as3(w), as3(w_q), as3(scale), block_size, block_size, eps, scale_ue8m0);
  return {w_q, scale};
}

at::Tensor dequant_fp8(const at::Tensor& x_q, const at::Tensor& scale, int64_t block_m, int64_t block_n,
                       at::ScalarType out_dtype) {
  check_dtype("x_q", x_q, {at::kFloat8_e4m3fn}, "a float8_e4m3fn tensor");
  check_dtype("scale", scale, {at::kFloat}, "a float32 tensor");
  check_size("block_m", block_m, kMaxDequantBlock);
  check_size("block_n", block_n, kMaxDequantBlock);
  check_dtype("out_dtype", out_dtype, {at::kBFloat16, at::kHalf, at::kFloat}, kFloatDtypes);
  TORCH_CHECK_VALUE(x_q.dim() >= 2, "x_q must be at least 2-D [..., R, C], got shape ", py_tuple(x_q.sizes()));
  TORCH_CHECK_VALUE(x_q.device() == scale.device(), "x_q and scale must be on the same device, got ",
                    x_q.device().str(), " and ", scale.device().str());
  const int64_t r = x_q.size(-2), c = x_q.size(-1);
  std::vector<int64_t> want(x_q.sizes().begin(), x_q.sizes().end() - 2);
  want.push_back(cdiv(r, block_m));
  want.push_back(cdiv(c, block_n));
  TORCH_CHECK_VALUE(scale.sizes() == c10::IntArrayRef(want), "scale must have shape ", py_tuple(want), " for x_q ",
                    py_tuple(x_q.sizes()), " with blocks ", block_m, "x", block_n, ", got ", py_tuple(scale.sizes()));
  check_unit_last_stride("x_q", x_q);
  check_cuda("x_q", x_q);
  const c10::cuda::CUDAGuard guard(x_q.device());

  at::Tensor out = at::empty(x_q.sizes(), x_q.options().dtype(out_dtype));
  if (x_q.numel() == 0) return out;
  const at::Tensor q3 = x_q.reshape({-1, r, c});  // views unless the leading dims cannot be flattened
  const at::Tensor s3 = scale.reshape({-1, want[want.size() - 2], want.back()});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_q.get_device());
  constexpr int kVec = 16;  // 16 e4m3 in, 16 outputs (2 or 4 16-byte stores)
  const bool vec = aligned16(q3) && c % kVec == 0 && block_n % kVec == 0 && stride_multiple(q3, 0, kVec) &&
                   stride_multiple(q3, 1, kVec);
  dispatch_float(out_dtype, "out_dtype", [&]<typename scalar_t>() {
    const auto launch = [&]<int V>() {
      const DequantArgs a{r, c / V, q3.numel() / V, block_m, block_n, q3.stride(0), q3.stride(1),
                          s3.stride(0), s3.stride(1), s3.stride(2)};
      launch_1d(cdiv(a.n_vecs, int64_t(kThreads)), [&](unsigned grid, int64_t cta0) {
        _dequant_fp8_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(
            static_cast<const uint8_t*>(q3.data_ptr()), s3.data_ptr<float>(), static_cast<scalar_t*>(out.data_ptr()),
            a, cta0);
      });
    };
    if (vec) {
      launch.template operator()<kVec>();
    } else {
      launch.template operator()<1>();
    }
  });
  return out;
}

}  // namespace
}  // namespace glm45

// Python defines the schemas (glm45_ops/quant.py); this file only adds their CUDA kernels.
TORCH_LIBRARY_IMPL(glm45, CUDA, m) {
  m.impl("per_token_group_quant_fp8", &glm45::per_token_group_quant_fp8);
  m.impl("per_block_quant_fp8", &glm45::per_block_quant_fp8);
  m.impl("dequant_fp8", &glm45::dequant_fp8);
}
