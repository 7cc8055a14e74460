// The CUTLASS sm90 grouped FP8 block-scaled GEMM behind glm45::grouped_fp8_block_gemm
// (op and checks: csrc/moe/grouped_gemm_sm90.cu; definition: glm45_ops/reference/moe_grouped.py).
//
// One template per output dtype, each instantiated in its own translation unit
// (grouped_gemm_sm90.cu: bf16, grouped_gemm_sm90_fp32.cu: fp32), so that no single nvcc process
// holds two CUTLASS kernels: CI builds with MAX_JOBS=2 on 2 cores and 24 GiB next to the dense
// GEMM's 8.4 GB unit.
//
// Kernel: CUTLASS's PtrArray TMA warp-specialized cooperative FP8 blockwise mainloop (two consumer
// warpgroups, each 128-wide K slice promoted into fp32 with a_scale * b_scale on the CUDA cores)
// with the grouped persistent tile scheduler, 128 x 128 x 128 tiles, cluster 1 x 1 x 1 (groups of
// a few rows are common in MoE, and a 1x1 cluster never pairs tiles of different groups), one
// rounding into the output by the PtrArray TMA epilogue.
//
// No host sync: group g's problem (M_g = offsets[g+1] - offsets[g], N, K) and its pointers are
// written into device arrays by grouped_prepare (one CTA per group) from the device's
// expert_offsets, and the kernel is launched with those arrays only (no host copy of the
// shapes), so a CUDA graph can capture it. The grouped mainloop reads each group's scales
// through CUTLASS's packed layouts (ScaleConfig::tile_atom_to_shape_SF*, whatever layout_SF* says):
// a_scale M-major [ceil(K/128), M_g] per group, which grouped_prepare writes from a_scale of any
// strides (M_total * K/128 floats, small next to A), and b_scale K-major [ceil(N/128), K/128] per
// group, which a contiguous b_scale already is.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace glm45 {

// Everything the kernel needs, as plain values (no CUTLASS type, so the op's unit can call
// either dtype's instantiation). Element strides; n is the kernel's N (rounded up so that an
// output row is whole 16-byte vectors); b_scale is [G, ceil(n/128), ceil(k/128)] contiguous.
struct GroupedGemmLaunch {
  int groups;
  int m_total;
  int n;
  int k;
  int64_t lda;
  int64_t ldb;
  int64_t b_group_stride;
  int64_t sa_row;  // a_scale's strides: any (read once by grouped_prepare)
  int64_t sa_col;
  const void* a = nullptr;
  const float* a_scale = nullptr;
  const void* b = nullptr;
  const float* b_scale = nullptr;
  const int32_t* offsets = nullptr;
  void* d = nullptr;  // [m_total, n] row-major
  int device = 0;
  cudaStream_t stream = nullptr;
};

// check_only: CUTLASS's can_implement for (N, K) on the host (no pointer is read, no device
// needed); TORCH_CHECK fails with the shape if it refuses. Otherwise also run the GEMM.
void grouped_fp8_gemm_sm90_bf16(const GroupedGemmLaunch& p, bool check_only);
void grouped_fp8_gemm_sm90_fp32(const GroupedGemmLaunch& p, bool check_only);

}  // namespace glm45

#ifdef GLM45_GROUPED_GEMM_IMPL
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include "cutlass/arch/config.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "grouped_gemm_sm90 needs sm_90a, not sm_90: build with TORCH_CUDA_ARCH_LIST=9.0a"
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
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/numeric_types.h"
#include "cutlass/util/packed_stride.hpp"

namespace glm45 {
namespace grouped_sm90 {

using namespace cute;

constexpr int kBlock = 128;

template <class ElementD_>
struct GroupedFp8Gemm {
  using ElementD = ElementD_;
  using ElementAB = cutlass::float_e4m3_t;
  using LayoutA = cutlass::layout::RowMajor;     // [M_g, K], K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // [N, K], K contiguous ("TN")
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kBlock, kBlock, cute::GMMA::Major::MN,
                                                                cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using TileShape = Shape<_128, _128, _128>;
  using ClusterShape = Shape<_1, _1, _1>;
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
  using ArchTag = cutlass::arch::Sm90;
  using OpClass = cutlass::arch::OpClassTensorOp;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      ArchTag, OpClass, TileShape, ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto,
      float, float,
      void, LayoutD*, kAlignD,  // no C operand: D = accumulator
      ElementD, LayoutD*, kAlignD,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      ArchTag, OpClass,
      ElementAB, cute::tuple<LayoutA*, LayoutSFA*>, kAlignAB,
      ElementAB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignAB,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
};

// The per-group arrays the kernel reads, carved out of one device buffer.
template <class Config>
struct GroupArrays {
  typename Config::Shape3* shapes;
  const typename Config::ElementAB** a;
  const typename Config::ElementAB** b;
  const float** sfa;
  const float** sfb;
  typename Config::ElementD** d;
  typename Config::StrideA* stride_a;
  typename Config::StrideB* stride_b;
  typename Config::StrideD* stride_d;
  typename Config::LayoutSFA* layout_sfa;
  typename Config::LayoutSFB* layout_sfb;
  float* sfa_packed;  // [M_total * ceil(K/128)]: group g's M-major scales at offsets[g] * K/128
};

struct Strides {
  int64_t a, b, d;
};

// Blocks [0, G): group g's problem, pointers and packed a_scale. Blocks [G, gridDim): zero the
// output rows no group covers ([0, offsets[0]) and [offsets[G], M_total)), which the GEMM never
// writes. Each group's bounds are clamped into [0, M_total] (hi at least lo), so bad device
// offsets (the Python check sees only CPU values) never address outside the tensors; the rows
// they compute are then unspecified (overlapping groups write them twice).
template <class Config>
__global__ void grouped_prepare(GroupArrays<Config> arr, GroupedGemmLaunch p, typename Config::StrideA sa,
                                typename Config::StrideB sb, typename Config::StrideD sd) {
  using ElementAB = typename Config::ElementAB;
  using ElementD = typename Config::ElementD;
  const int k_blocks = (p.k + kBlock - 1) / kBlock;
  const int n_blocks = (p.n + kBlock - 1) / kBlock;
  const auto clamp_to = [&](int v, int lo) { return min(max(v, lo), p.m_total); };
  if (int(blockIdx.x) < p.groups) {
    const int g = blockIdx.x;
    const int lo = clamp_to(p.offsets[g], 0);
    const int hi = clamp_to(p.offsets[g + 1], lo);
    const int mg = hi - lo;
    if (threadIdx.x == 0) {
      arr.shapes[g] = typename Config::Shape3(mg, p.n, p.k);
      arr.a[g] = static_cast<const ElementAB*>(p.a) + int64_t(lo) * p.lda;
      arr.b[g] = static_cast<const ElementAB*>(p.b) + int64_t(g) * p.b_group_stride;
      arr.sfa[g] = arr.sfa_packed + int64_t(lo) * k_blocks;
      arr.sfb[g] = p.b_scale + int64_t(g) * n_blocks * k_blocks;
      arr.d[g] = static_cast<ElementD*>(p.d) + int64_t(lo) * p.n;
      arr.stride_a[g] = sa;
      arr.stride_b[g] = sb;
      arr.stride_d[g] = sd;
      arr.layout_sfa[g] = Config::ScaleConfig::tile_atom_to_shape_SFA(make_shape(mg, p.n, p.k, 1));
      arr.layout_sfb[g] = Config::ScaleConfig::tile_atom_to_shape_SFB(make_shape(mg, p.n, p.k, 1));
    }
    float* dst = arr.sfa_packed + int64_t(lo) * k_blocks;
    for (int64_t i = threadIdx.x; i < int64_t(mg) * k_blocks; i += blockDim.x) {
      const int64_t kb = i / mg, r = i - kb * mg;
      dst[i] = p.a_scale[(lo + r) * p.sa_row + kb * p.sa_col];
    }
    return;
  }
  const int first = clamp_to(p.offsets[0], 0);
  const int last = clamp_to(p.offsets[p.groups], first);
  const int outside = first + (p.m_total - last);
  const int64_t vecs = int64_t(p.n) * sizeof(ElementD) / sizeof(uint4);  // whole: n is rounded up to 16 bytes
  for (int j = blockIdx.x - p.groups; j < outside; j += gridDim.x - p.groups) {
    const int row = j < first ? j : last + (j - first);
    uint4* out = reinterpret_cast<uint4*>(static_cast<ElementD*>(p.d) + int64_t(row) * p.n);
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) out[v] = make_uint4(0, 0, 0, 0);
  }
}

constexpr int kZeroBlocks = 32;
constexpr int kPrepareThreads = 256;

inline size_t align16(size_t x) { return (x + 15) / 16 * 16; }

inline int sm_count(int device) {
  static int cached[64] = {};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (!cached[device]) cached[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return cached[device];
}

template <class Config>
typename Config::Gemm::Arguments make_arguments(const GroupArrays<Config>& arr, int groups,
                                                typename Config::Shape3* host_shapes,
                                                const cutlass::KernelHardwareInfo& hw) {
  typename Config::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {groups, arr.shapes, host_shapes},
      {arr.a, arr.stride_a, arr.b, arr.stride_b, arr.sfa, arr.layout_sfa, arr.sfb, arr.layout_sfb},
      {{}, nullptr, nullptr, arr.d, arr.stride_d},
      hw};
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  fusion.alpha_ptr_array = nullptr;
  fusion.beta_ptr_array = nullptr;
  fusion.dAlpha = {_0{}, _0{}, 0};
  fusion.dBeta = {_0{}, _0{}, 0};
  return args;
}

template <class ElementD>
void grouped_fp8_gemm(const GroupedGemmLaunch& p, bool check_only) {
  using Config = GroupedFp8Gemm<ElementD>;
  using Gemm = typename Config::Gemm;
  if (check_only) {
    // One representative group: alignment of N and K is all a group's M cannot change.
    typename Config::Shape3 host_shape(kBlock, p.n, p.k);
    GroupArrays<Config> none{};
    TORCH_CHECK(Gemm::can_implement(make_arguments<Config>(none, 1, &host_shape, {})) == cutlass::Status::kSuccess,
                "grouped_fp8_block_gemm: CUTLASS cannot implement N=", p.n, " K=", p.k);
    return;
  }
  const int g = p.groups;
  const int k_blocks = (p.k + kBlock - 1) / kBlock;
  size_t bytes = 0;
  const auto take = [&](size_t each, int64_t count) {
    const size_t at = bytes;
    bytes += align16(each * size_t(count));
    return at;
  };
  const size_t o_shapes = take(sizeof(typename Config::Shape3), g);
  const size_t o_ptrs = take(sizeof(void*), 5 * int64_t(g));
  const size_t o_sa = take(sizeof(typename Config::StrideA), g);
  const size_t o_sb = take(sizeof(typename Config::StrideB), g);
  const size_t o_sd = take(sizeof(typename Config::StrideD), g);
  const size_t o_lsfa = take(sizeof(typename Config::LayoutSFA), g);
  const size_t o_lsfb = take(sizeof(typename Config::LayoutSFB), g);
  const size_t o_sfa = take(sizeof(float), int64_t(p.m_total) * k_blocks);
  // from the caching allocator on the current stream: no sync, graph-capturable
  at::Tensor meta = at::empty({int64_t(bytes)}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, p.device));
  char* base = static_cast<char*>(meta.data_ptr());
  // five pointer arrays of g entries each: a, b, sfa, sfb, d
  const auto ptr_array = [&](int i) { return base + o_ptrs + size_t(i) * g * sizeof(void*); };
  GroupArrays<Config> arr{
      reinterpret_cast<typename Config::Shape3*>(base + o_shapes),
      reinterpret_cast<const typename Config::ElementAB**>(ptr_array(0)),
      reinterpret_cast<const typename Config::ElementAB**>(ptr_array(1)),
      reinterpret_cast<const float**>(ptr_array(2)),
      reinterpret_cast<const float**>(ptr_array(3)),
      reinterpret_cast<ElementD**>(ptr_array(4)),
      reinterpret_cast<typename Config::StrideA*>(base + o_sa),
      reinterpret_cast<typename Config::StrideB*>(base + o_sb),
      reinterpret_cast<typename Config::StrideD*>(base + o_sd),
      reinterpret_cast<typename Config::LayoutSFA*>(base + o_lsfa),
      reinterpret_cast<typename Config::LayoutSFB*>(base + o_lsfb),
      reinterpret_cast<float*>(base + o_sfa)};

  auto sa = cutlass::make_cute_packed_stride(typename Config::StrideA{}, make_shape(1, p.k, 1));
  auto sb = cutlass::make_cute_packed_stride(typename Config::StrideB{}, make_shape(p.n, p.k, 1));
  auto sd = cutlass::make_cute_packed_stride(typename Config::StrideD{}, make_shape(1, p.n, 1));
  get<0>(sa) = p.lda;
  get<0>(sb) = p.ldb;
  grouped_prepare<Config><<<g + kZeroBlocks, kPrepareThreads, 0, p.stream>>>(arr, p, sa, sb, sd);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  cutlass::KernelHardwareInfo hw;
  hw.device_id = p.device;
  hw.sm_count = sm_count(p.device);
  typename Gemm::Arguments args = make_arguments<Config>(arr, g, nullptr, hw);
  Gemm gemm;
  at::Tensor workspace = at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))},
                                   at::TensorOptions().dtype(at::kByte).device(at::kCUDA, p.device));
  cutlass::Status st = gemm.initialize(args, workspace.data_ptr(), p.stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "grouped_fp8_block_gemm: CUTLASS initialize failed: ",
              cutlassGetStatusString(st));
  st = gemm.run(p.stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "grouped_fp8_block_gemm: CUTLASS run failed: ",
              cutlassGetStatusString(st));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace grouped_sm90
}  // namespace glm45

#define GLM45_DEFINE_GROUPED_GEMM(NAME, ELEMENT_D)                           \
  void glm45::NAME(const GroupedGemmLaunch& p, bool check_only) {            \
    grouped_sm90::grouped_fp8_gemm<ELEMENT_D>(p, check_only);                \
  }
#else
#define GLM45_DEFINE_GROUPED_GEMM(NAME, ELEMENT_D)                                                  \
  void glm45::NAME(const GroupedGemmLaunch&, bool) {                                                \
    TORCH_CHECK(false, "grouped_fp8_block_gemm: glm45_ops._C was built without CUTLASS SM90 support"); \
  }
#endif  // CUTLASS_ARCH_MMA_SM90_SUPPORTED
#endif  // GLM45_GROUPED_GEMM_IMPL
