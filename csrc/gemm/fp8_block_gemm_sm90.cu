// FP8 block-scaled GEMM on Hopper (sm_90a) with CUTLASS 4.x: the CUDA-key kernel of
//   glm45::fp8_block_gemm(a, a_scale, b, b_scale, out_dtype) -> out
// (schema, checks and fake: glm45_ops/gemm.py; numerical definition: glm45_ops/reference/gemm.py).
//
//   out[m, n] = sum_k a[m,k] a_scale[m, k/128] b[n,k] b_scale[n/128, k/128]
//
// DeepSeek-V3 / DeepGEMM recipe: e4m3 operands through TMA into a warp-specialized wgmma mainloop;
// each 128-wide K slice is accumulated by the tensor cores into a fresh partial (~14 bits kept:
// glm45_ops.gemm.error_bound) that is scaled by a_scale * b_scale and added into the fp32
// accumulator on the CUDA cores (CUTLASS's KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum).
// Stream-K persistent scheduling (it also fills the SMs when the tile count is not a multiple of
// 132, and splits K when there are few tiles), one rounding into bf16 or fp32 by the TMA epilogue.
//
// Two kernels per output dtype, chosen by M:
// * M > 64: 128 x 128 x 128 tiles, two consumer warpgroups (cooperative).
// * M <= 64 (decode): swap-AB, D^T = b a^T: the weight's N fills wgmma's 128-row M side and the
//   few tokens sit on its N side (64), so a tile is one weight block and no wgmma row is wasted
//   on padding tokens; stream-K splits K so every SM streams a share of the weight (DeepGEMM's
//   weak spot at small M is too few CTAs, not the math).
// Tile shapes are a first guess, pending tuning on an H200.
//
// K: any positive multiple of 16 (TMA moves whole 16-byte rows; CUTLASS's can_implement asks
// exactly K % 16 of A and B). The last K tile may be partial (K = 192, 176: GLM-4.5's TP8 expert
// widths): TMA zero-fills the box past K in shared memory, so the tensor cores add zeros there,
// and that tile's scales, block ceil(K/128) - 1 of a_scale and b_scale, multiply the sum of its
// 16..112 valid columns, as the definition says. The scale layouts carry ceil(K/128) K blocks
// (CUTLASS's own tile_atom_to_shape_SFA uses ceil_div too). No host padding, no extra copy.
//
// Layouts: CUTLASS reads a_scale M-major through TMA (16-byte aligned M stride, room for
// round_up(M, 4) rows), which is what per_token_group_quant_fp8(column_major_scales=True) writes:
// no copy. A row-major or unaligned a_scale is first copied into that layout (one small
// transpose: M * K/128 * 4 bytes each way, 1.5 MB at M = 4096, K = 12288). b_scale is read
// K-major as given (cp.async, any row stride). The TMA epilogue needs whole 16-byte vectors per
// output row: N % 8 (bf16) or N % 4 (fp32); other N (never in GLM-4.5) run on padded copies of
// the weight and the output (one extra copy of each: a slow path for odd shapes, not for
// production layers). A row stride means nothing for a single row (M or N = 1, where any stride
// passes the checks), so TMA is then given the row length.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "common/checks.h"
#include "cutlass/arch/config.h"

// CUTLASS compiles the sm90 kernel body only for the 'a' target (wgmma, setmaxnreg): built for
// plain sm_90 (TORCH_CUDA_ARCH_LIST=9.0 or 9.0+PTX, common in container images) the kernel
// prints an error and returns, leaving the output uninitialised while every host check passes.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "fp8_block_gemm_sm90.cu needs sm_90a, not sm_90: build with TORCH_CUDA_ARCH_LIST=9.0a"
#endif

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/numeric_types.h"
#include "cutlass/util/packed_stride.hpp"

#include "common/cutlass_run.cuh"
#endif

namespace glm45 {
namespace {

constexpr int64_t kBlock = 128;        // scale granularity along K (and along the weight's N)
constexpr int64_t kRowAlignBytes = 16;  // TMA: 16-byte aligned global strides and base addresses
constexpr int64_t kScaleAlign = 4;      // a_scale M stride in fp32: 16 bytes
constexpr int64_t kSwapAbMaxM = 64;     // at and below this M, the swap-AB decode kernel
constexpr int64_t kKAlign = 16;         // glm45_ops.gemm.K_ALIGN: e4m3 values per 16-byte TMA unit

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Operands as CUTLASS sees them (after the optional swap): A' [Mp, K] with scales sfa, B' [Np, K]
// with scales sfb, D [Mp, Np] (row-major, or column-major when swapped) with leading dim ld_d.
// The tokens' scales are given round_up(M, 4) rows (see mn_major_ld). Shapes and strides are set
// from the tensors' metadata before any device work (so can_implement runs first); the pointers
// once the operands are on the device.
struct Problem {
  int m, n, k;
  int64_t lda;
  int ld_sfa;
  int64_t ldb;
  int ld_sfb;
  int64_t ld_d;
  const void* a = nullptr;
  const float* sfa = nullptr;
  const void* b = nullptr;
  const float* sfb = nullptr;
  void* d = nullptr;

  Problem swapped() const {
    return {n, m, k, ldb, ld_sfb, lda, ld_sfa, ld_d, b, sfb, a, sfa, d};
  }
};

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
using namespace cute;

// One GEMM configuration. Non-swapped: (M, N, K) = (tokens, out features, K), A = activations
// (1 x 128 scales, M-major), B = weights (128 x 128 scales, K-major), D row-major. Swapped: the
// roles of a and b exchange, D^T is column-major, which is the same memory as row-major D.
template <class ElementD_, class TileShape, bool SwapAB>
struct Fp8BlockGemm {
  static constexpr bool kSwapAB = SwapAB;
  using ElementD = ElementD_;
  using ElementAB = cutlass::float_e4m3_t;
  using LayoutA = cutlass::layout::RowMajor;     // [M', K], K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // [N', K], K contiguous (CUTLASS's "TN")
  using LayoutD = std::conditional_t<SwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlignAB = 16;  // elements of 1 byte: 16-byte TMA rows
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

  // (granularity M, N, K; major-ness of A's and B's scales)
  using ScaleConfig = std::conditional_t<
      SwapAB,
      cutlass::detail::Sm90BlockwiseScaleConfig<kBlock, 1, kBlock, cute::GMMA::Major::K, cute::GMMA::Major::MN>,
      cutlass::detail::Sm90BlockwiseScaleConfig<1, kBlock, kBlock, cute::GMMA::Major::MN, cute::GMMA::Major::K>>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using ClusterShape = Shape<_1, _1, _1>;
  using ArchTag = cutlass::arch::Sm90;
  using OpClass = cutlass::arch::OpClassTensorOp;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      ArchTag, OpClass, TileShape, ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto,
      float, float,                    // accumulator, epilogue compute
      void, LayoutD, kAlignD,          // no C operand: D = accumulator
      ElementD, LayoutD, kAlignD,
      cutlass::epilogue::TmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      ArchTag, OpClass,
      ElementAB, cute::tuple<LayoutA, LayoutSFA>, kAlignAB,
      ElementAB, cute::tuple<LayoutB, LayoutSFB>, kAlignAB,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<
      Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue, cutlass::gemm::StreamKScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// Scale layouts with the strides the tensors actually have (CUTLASS's tile_atom_to_shape_* would
// assume packed ones). M-major: mode 0 unit stride, ld between K blocks; K-major: the reverse.
template <class Layout, int GranMN>
Layout mn_major_scales(int mn, int k_blocks, int ld) {
  return make_layout(make_shape(make_shape(Int<GranMN>{}, int(cutlass::ceil_div(mn, GranMN))),
                                make_shape(Int<int(kBlock)>{}, k_blocks), 1),
                     make_stride(make_stride(_0{}, _1{}), make_stride(_0{}, ld), ld * k_blocks));
}

template <class Layout, int GranMN>
Layout k_major_scales(int mn, int k_blocks, int ld) {
  const int blocks = int(cutlass::ceil_div(mn, GranMN));
  return make_layout(make_shape(make_shape(Int<GranMN>{}, blocks), make_shape(Int<int(kBlock)>{}, k_blocks), 1),
                     make_stride(make_stride(_0{}, ld), make_stride(_0{}, _1{}), ld * blocks));
}

template <class Config>
typename Config::Gemm::Arguments make_arguments(const Problem& p, const cutlass::KernelHardwareInfo& hw) {
  using Gemm = typename Config::Gemm;
  using ElementAB = typename Config::ElementAB;
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideC = typename Gemm::GemmKernel::StrideC;
  using StrideD = typename Gemm::GemmKernel::StrideD;
  using LayoutSFA = typename Config::LayoutSFA;
  using LayoutSFB = typename Config::LayoutSFB;
  constexpr bool kSwap = Config::kSwapAB;

  StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, make_shape(p.m, p.k, 1));
  StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, make_shape(p.n, p.k, 1));
  StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(p.m, p.n, 1));
  get<0>(stride_a) = p.lda;
  get<0>(stride_b) = p.ldb;
  if constexpr (kSwap) {
    get<1>(stride_d) = p.ld_d;
  } else {
    get<0>(stride_d) = p.ld_d;
  }
  const int k_blocks = int(cutlass::ceil_div(p.k, int(kBlock)));  // the last one may be partial
  LayoutSFA layout_sfa;
  LayoutSFB layout_sfb;
  if constexpr (kSwap) {  // A' = weights (128 x 128, K-major), B' = activations (1 x 128, M-major)
    layout_sfa = k_major_scales<LayoutSFA, int(kBlock)>(p.m, k_blocks, p.ld_sfa);
    layout_sfb = mn_major_scales<LayoutSFB, 1>(int(round_up(p.n, kScaleAlign)), k_blocks, p.ld_sfb);
  } else {
    layout_sfa = mn_major_scales<LayoutSFA, 1>(int(round_up(p.m, kScaleAlign)), k_blocks, p.ld_sfa);
    layout_sfb = k_major_scales<LayoutSFB, int(kBlock)>(p.n, k_blocks, p.ld_sfb);
  }

  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.m, p.n, p.k, 1},
      {static_cast<const ElementAB*>(p.a), stride_a, static_cast<const ElementAB*>(p.b), stride_b,
       p.sfa, layout_sfa, p.sfb, layout_sfb},
      {{}, nullptr, StrideC{}, static_cast<typename Config::ElementD*>(p.d), stride_d},
      hw};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  return args;
}

// What CUTLASS accepts: shapes, strides and scale layouts only (no pointer, no device), so it is
// checked before the operands are touched, and for CPU tensors called through the CUDA key.
template <class Config>
void check_can_implement(const Problem& p) {
  TORCH_CHECK(Config::Gemm::can_implement(make_arguments<Config>(p, {})) == cutlass::Status::kSuccess,
              "fp8_block_gemm: CUTLASS cannot implement M=", p.m, " N=", p.n, " K=", p.k, " with these strides");
}

template <class Config>
void run(const Problem& p, int device, cudaStream_t stream) {
  run_cutlass_gemm<typename Config::Gemm>(make_arguments<Config>(p, hardware_info(device)), device, stream,
                                         "fp8_block_gemm");
}

// f.template operator()<Config>() with the kernel configuration for this output dtype and M, and
// the problem as that configuration sees it (weights first when swapped).
template <class F>
void with_config(at::ScalarType out_dtype, int64_t m, F&& f) {
  const auto for_dtype = [&]<class ElementD>() {
    if (m <= kSwapAbMaxM) {
      f.template operator()<Fp8BlockGemm<ElementD, Shape<_128, _64, _128>, true>>();
    } else {
      f.template operator()<Fp8BlockGemm<ElementD, Shape<_128, _128, _128>, false>>();
    }
  };
  if (out_dtype == at::kBFloat16) {
    for_dtype.template operator()<cutlass::bfloat16_t>();
  } else {
    for_dtype.template operator()<float>();
  }
}
#endif  // CUTLASS_ARCH_MMA_SM90_SUPPORTED

// ---------------------------------------------------------------------------------------------
// Argument checks: glm45_ops/gemm.py's, in its order and words (ValueError in Python)
// ---------------------------------------------------------------------------------------------

void check_fp8_matrix(const char* name, const at::Tensor& t) {
  check_dtype(name, t, {at::kFloat8_e4m3fn}, "float8_e4m3fn");
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got shape ", py_tuple(t.sizes()));
  TORCH_CHECK_VALUE(t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) % kRowAlignBytes == 0), name,
                    " must have a unit last stride and a row stride that is a multiple of ", kRowAlignBytes,
                    " (TMA), got strides ", py_tuple(t.strides()));
}

void check_scale(const char* name, const at::Tensor& t, int64_t rows, int64_t cols) {
  check_dtype(name, t, {at::kFloat}, "float32");
  TORCH_CHECK_VALUE(t.sizes() == c10::IntArrayRef({rows, cols}), name, " must have shape ", py_tuple({rows, cols}),
                    ", got ", py_tuple(t.sizes()));
}

// glm45_ops.gemm.scale_layout: a_scale [M, G] is "mn" (unit M stride, G stride >= M; checked
// first) or "row" (unit G stride, M stride >= G); size-1 dims have no meaningful stride.
bool scale_is_mn_major(const at::Tensor& s) {
  const int64_t m = s.size(0), g = s.size(1);
  return m == 0 || ((m == 1 || s.stride(0) == 1) && (g == 1 || s.stride(1) >= m));
}

bool scale_is_row_major(const at::Tensor& s) {
  const int64_t m = s.size(0), g = s.size(1);
  return (g == 1 || s.stride(1) == 1) && (m == 1 || s.stride(0) >= g);
}

void check_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale,
                at::ScalarType out_dtype) {
  check_fp8_matrix("a", a);
  check_fp8_matrix("b", b);
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0);
  TORCH_CHECK_VALUE(b.size(1) == k, "a [M, K] and b [N, K] must share K, got a ", py_tuple(a.sizes()), " and b ",
                    py_tuple(b.sizes()));
  TORCH_CHECK_VALUE(k > 0 && k % kKAlign == 0, "K (a.shape[1] = ", k, ") must be a positive multiple of ", kKAlign,
                    " (TMA)");
  TORCH_CHECK_VALUE(n > 0, "b must have at least one row (N >= 1)");
  const int64_t groups = (k + kBlock - 1) / kBlock;
  check_scale("a_scale", a_scale, m, groups);
  TORCH_CHECK_VALUE(scale_is_mn_major(a_scale) || scale_is_row_major(a_scale),
                    "a_scale must be row-major (unit stride along K/128) or MN-major (unit stride along M, "
                    "M stride >= M), got strides ", py_tuple(a_scale.strides()));
  check_scale("b_scale", b_scale, (n + kBlock - 1) / kBlock, groups);
  TORCH_CHECK_VALUE(groups == 1 || b_scale.stride(1) == 1, "b_scale must have a unit last stride, got strides ",
                    py_tuple(b_scale.strides()));
  check_dtype("out_dtype", out_dtype, {at::kBFloat16, at::kFloat}, "bfloat16 or float32");
  std::set<std::string> devices;  // Python: sorted(map(str, {t.device for t in (a, a_scale, b, b_scale)}))
  for (const at::Tensor* t : {&a, &a_scale, &b, &b_scale}) devices.insert(t->device().str());
  TORCH_CHECK_VALUE(devices.size() == 1, "a, a_scale, b and b_scale must be on one device, got ",
                    py_str_list({devices.begin(), devices.end()}));
}

// ---------------------------------------------------------------------------------------------
// Operand layouts for the kernel
// ---------------------------------------------------------------------------------------------

// The row stride TMA walks: the row length when there is one row (its stride is arbitrary).
int64_t row_stride(const at::Tensor& t) { return t.size(0) == 1 ? t.size(1) : t.stride(0); }

// An operand TMA can read in place: a 16-byte aligned base and distinct rows. The checks let a
// row stride below K through when it is a multiple of 16 (0 included: a broadcast row);
// such rows are copied rather than handed to a descriptor as overlapping strides.
bool tma_ready(const at::Tensor& t) { return aligned16(t) && (t.size(0) <= 1 || t.stride(0) >= t.size(1)); }

// a_scale as the kernels read it through TMA: M-major, 16-byte aligned base, M stride `ld` a
// multiple of 4, and memory behind it for round_up(M, 4) = m4 rows in every K block: CUTLASS's
// can_implement wants the TMA'd scale extent to be a whole number of 16-byte vectors, so the
// kernel is given m4 scale rows (the extra ones only ever scale rows of A that TMA zero-filled
// and the epilogue never stores). The M stride a_scale can be read with in place, or 0 when it
// needs a copy into such a buffer (the quantizer's column_major_scales output never does).
int64_t mn_major_ld(const at::Tensor& s, int64_t m4) {
  const int64_t m = s.size(0), g = s.size(1);
  const int64_t ld = g == 1 ? m4 : s.stride(1);
  const int64_t storage_elems = static_cast<int64_t>(s.storage().nbytes() / sizeof(float));
  const bool ok = (m <= 1 || s.stride(0) == 1) && ld % kScaleAlign == 0 && ld >= m4 && aligned16(s) &&
                  s.storage_offset() + (g - 1) * ld + m4 <= storage_elems;
  return ok ? ld : 0;
}

// ---------------------------------------------------------------------------------------------
// The op
// ---------------------------------------------------------------------------------------------

at::Tensor fp8_block_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                          const at::Tensor& b_scale, at::ScalarType out_dtype) {
  check_gemm(a, a_scale, b, b_scale, out_dtype);
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0);
  // CUTLASS's TMA epilogue wants whole 16-byte vectors along each output row, so N is rounded
  // up to n_al for the kernel: the weight and the output get n_al rows in padded temporaries
  // (uninitialized: the extra rows only produce the extra columns, which are dropped) and the
  // output one extra copy. Never taken for GLM-4.5 (every N a multiple of 128).
  const int64_t n_al = round_up(n, 16 / static_cast<int64_t>(at::elementSize(out_dtype)));
  const bool padded = n_al != n;
  const bool copy_b = padded || !tma_ready(b);
  const bool copy_a = !tma_ready(a);
  const int64_t m4 = round_up(std::max<int64_t>(m, 1), kScaleAlign);
  const int64_t ld_sa_in_place = mn_major_ld(a_scale, m4);
  TORCH_CHECK(m4 <= INT32_MAX && n_al <= INT32_MAX && k <= INT32_MAX,
              "fp8_block_gemm: M, N and K must fit in int32, got M=", m, " N=", n, " K=", k);
  Problem tokens_major{int(m),
                       int(n_al),
                       int(k),
                       copy_a ? k : row_stride(a),  // copies are contiguous
                       int(ld_sa_in_place ? ld_sa_in_place : m4),
                       copy_b ? k : row_stride(b),
                       int(b_scale.size(0) == 1 ? b_scale.size(1) : b_scale.stride(0)),
                       n_al};
#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
  if (m > 0) {
    with_config(out_dtype, m, [&]<class Config>() {
      check_can_implement<Config>(Config::kSwapAB ? tokens_major.swapped() : tokens_major);
    });
  }
#endif
  check_cuda("a", a);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({m, n}, a.options().dtype(out_dtype));
  if (m == 0) return out;

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
  const int device = a.get_device();
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(major == 9 && minor == 0, "fp8_block_gemm's CUDA kernel is built for sm_90a (H100/H200), this GPU is sm_",
              major, minor, ": use backend='triton'");

  at::Tensor b_ = b;
  if (padded) {
    b_ = at::empty({n_al, k}, b.options());
    b_.narrow(0, 0, n).copy_(b);
  } else if (copy_b) {
    b_ = b.clone(at::MemoryFormat::Contiguous);
  }
  const at::Tensor a_ = copy_a ? a.clone(at::MemoryFormat::Contiguous) : a;
  at::Tensor sa = a_scale;
  if (!ld_sa_in_place) {
    sa = at::empty({a_scale.size(1), m4}, a_scale.options()).t().narrow(0, 0, m);
    sa.copy_(a_scale);
  }
  at::Tensor d = padded ? at::empty({m, n_al}, out.options()) : out;
  tokens_major.a = a_.data_ptr();
  tokens_major.sfa = sa.data_ptr<float>();
  tokens_major.b = b_.data_ptr();
  tokens_major.sfb = b_scale.data_ptr<float>();
  tokens_major.d = d.data_ptr();

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  with_config(out_dtype, m, [&]<class Config>() {
    run<Config>(Config::kSwapAB ? tokens_major.swapped() : tokens_major, device, stream);
  });
  if (padded) out.copy_(d.narrow(1, 0, n));
  return out;
#else
  TORCH_CHECK(false, "fp8_block_gemm: glm45_ops._C was built without CUTLASS SM90 support (needs CUDA >= 12)");
#endif
}

}  // namespace
}  // namespace glm45

TORCH_LIBRARY_IMPL(glm45, CUDA, m) { m.impl("fp8_block_gemm", &glm45::fp8_block_gemm); }
