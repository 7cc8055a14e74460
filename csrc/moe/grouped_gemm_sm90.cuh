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

#include "moe/grouped_common.cuh"

namespace glm45 {
namespace grouped_sm90 {

using namespace cute;

constexpr int kBlock = 128;

template <class ElementD_>
struct GroupedFp8Collectives {
  using ElementD = ElementD_;
  using ElementAB = cutlass::float_e4m3_t;
  using LayoutA = cutlass::layout::RowMajor;     // [M_g, K], K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // [N, K], K contiguous ("TN")
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kBlock, kBlock, cute::GMMA::Major::MN,
                                                                cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using TileShape = Shape<_128, _128, _128>;

  using CollectiveEpilogue = grouped::PtrArrayEpilogue<TileShape, ElementD, kAlignD>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementAB, cute::tuple<LayoutA*, LayoutSFA*>, kAlignAB,
      ElementAB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignAB,
      float, TileShape, grouped::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;
};
template <class ElementD>
struct GroupedFp8Gemm : GroupedFp8Collectives<ElementD>, grouped::GemmTypes<GroupedFp8Collectives<ElementD>> {};

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
  if (int(blockIdx.x) < p.groups) {
    const int g = blockIdx.x;
    const int lo = grouped::clamp_row(p.offsets[g], 0, p.m_total);
    const int hi = grouped::clamp_row(p.offsets[g + 1], lo, p.m_total);
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
  // whole 16-byte rows: n is rounded up to 16 bytes
  grouped::zero_outside_groups(static_cast<ElementD*>(p.d), p.offsets, p.groups, p.m_total, p.n);
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
  grouped::plain_epilogue(args.epilogue.thread);
  return args;
}

template <class ElementD>
void grouped_fp8_gemm(const GroupedGemmLaunch& p, bool check_only) {
  using Config = GroupedFp8Gemm<ElementD>;
  if (check_only) {
    grouped::check_can_implement<Config>(kBlock, p.n, p.k, "grouped_fp8_block_gemm", [](auto* host_shapes) {
      return make_arguments<Config>(GroupArrays<Config>{}, 1, host_shapes, {});
    });
    return;
  }
  const int g = p.groups;
  const int k_blocks = (p.k + kBlock - 1) / kBlock;
  grouped::DeviceArena meta;
  const size_t o_shapes = meta.take(sizeof(typename Config::Shape3), g);
  const size_t o_ptrs = meta.take(sizeof(void*), 5 * int64_t(g));
  const size_t o_sa = meta.take(sizeof(typename Config::StrideA), g);
  const size_t o_sb = meta.take(sizeof(typename Config::StrideB), g);
  const size_t o_sd = meta.take(sizeof(typename Config::StrideD), g);
  const size_t o_lsfa = meta.take(sizeof(typename Config::LayoutSFA), g);
  const size_t o_lsfb = meta.take(sizeof(typename Config::LayoutSFB), g);
  const size_t o_sfa = meta.take(sizeof(float), int64_t(p.m_total) * k_blocks);
  meta.allocate(p.device);
  // five pointer arrays of g entries each: a, b, sfa, sfb, d
  const auto ptr_array = [&](int i) { return meta.ptr<char>(o_ptrs + size_t(i) * g * sizeof(void*)); };
  GroupArrays<Config> arr{
      meta.ptr<typename Config::Shape3>(o_shapes),
      reinterpret_cast<const typename Config::ElementAB**>(ptr_array(0)),
      reinterpret_cast<const typename Config::ElementAB**>(ptr_array(1)),
      reinterpret_cast<const float**>(ptr_array(2)),
      reinterpret_cast<const float**>(ptr_array(3)),
      reinterpret_cast<ElementD**>(ptr_array(4)),
      meta.ptr<typename Config::StrideA>(o_sa),
      meta.ptr<typename Config::StrideB>(o_sb),
      meta.ptr<typename Config::StrideD>(o_sd),
      meta.ptr<typename Config::LayoutSFA>(o_lsfa),
      meta.ptr<typename Config::LayoutSFB>(o_lsfb),
      meta.ptr<float>(o_sfa)};

  const grouped::GroupStrides<Config> st(p.n, p.k, p.lda, p.ldb);
  grouped_prepare<Config><<<g + grouped::kZeroBlocks, grouped::kPrepareThreads, 0, p.stream>>>(arr, p, st.a, st.b,
                                                                                               st.d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  run_cutlass_gemm<typename Config::Gemm>(make_arguments<Config>(arr, g, nullptr, hardware_info(p.device)), p.device,
                                          p.stream, "grouped_fp8_block_gemm");
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
