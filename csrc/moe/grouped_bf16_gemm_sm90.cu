// Grouped BF16 GEMM on Hopper (sm_90a), DeepGEMM's "contiguous" layout: the CUDA-key kernel of
//   glm45::grouped_bf16_gemm(a, b, expert_offsets) -> out
// (schema, checks: glm45_ops/moe/grouped.py; definition: glm45_ops/reference/moe_grouped.py).
//
//   out[m, n] = sum_k a[m,k] b[g,n,k] for offsets[g] <= m < offsets[g+1]; 0 outside every group
//
// CUTLASS's PtrArray TMA warp-specialized cooperative mainloop (bf16 wgmma, fp32 accumulation)
// with the grouped persistent tile scheduler, 128 x 128 x 64 tiles, cluster 1 x 1 x 1, one rounding
// into bf16 by the PtrArray TMA epilogue. As in grouped_gemm_sm90.cuh (the FP8 version), group g's
// problem and pointers are written on the device by grouped_bf16_prepare from expert_offsets
// (bounds clamped into [0, M_total]), which also zeroes the rows outside every group: no host
// sync, CUDA-graph safe. K and N: multiples of 8 (whole 16-byte TMA rows), checked in Python.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include <cuda_runtime.h>

#include "common/checks.h"
#include "cutlass/arch/config.h"
#include "moe/grouped_common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "grouped_bf16_gemm_sm90.cu needs sm_90a, not sm_90: build with TORCH_CUDA_ARCH_LIST=9.0a"
#endif

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
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
#endif

namespace glm45 {
namespace {

constexpr int64_t kAlign = 8;  // bf16 values per 16-byte TMA unit

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
using namespace cute;

struct Bf16Collectives {
  using Element = cutlass::bfloat16_t;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  static constexpr int kAlignE = 8;
  using TileShape = Shape<_128, _128, _64>;

  using CollectiveEpilogue = grouped::PtrArrayEpilogue<TileShape, Element, kAlignE>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA*, kAlignE,
      Element, LayoutB*, kAlignE,
      float, TileShape, grouped::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
};
struct GroupedBf16Gemm : Bf16Collectives, grouped::GemmTypes<Bf16Collectives> {};
using Cfg = GroupedBf16Gemm;

struct Bf16Launch {
  int groups, m_total, n, k;
  int64_t lda, ldb, b_group_stride;
  const Cfg::Element* a;
  const Cfg::Element* b;
  const int32_t* offsets;
  Cfg::Element* d;
};

struct Bf16Arrays {
  Cfg::Shape3* shapes;
  const Cfg::Element** a;
  const Cfg::Element** b;
  Cfg::Element** d;
  Cfg::StrideA* stride_a;
  Cfg::StrideB* stride_b;
  Cfg::StrideD* stride_d;
};

// Blocks [0, G): group g's problem and pointers; blocks [G, gridDim): zero the rows outside every
// group (which the GEMM never writes). Bounds clamped into [0, M_total], hi at least lo.
__global__ void grouped_bf16_prepare(Bf16Arrays arr, Bf16Launch p, Cfg::StrideA sa, Cfg::StrideB sb,
                                     Cfg::StrideD sd) {
  if (int(blockIdx.x) < p.groups) {
    if (threadIdx.x != 0) return;
    const int g = blockIdx.x;
    const int lo = grouped::clamp_row(p.offsets[g], 0, p.m_total);
    const int hi = grouped::clamp_row(p.offsets[g + 1], lo, p.m_total);
    arr.shapes[g] = Cfg::Shape3(hi - lo, p.n, p.k);
    arr.a[g] = p.a + int64_t(lo) * p.lda;
    arr.b[g] = p.b + int64_t(g) * p.b_group_stride;
    arr.d[g] = p.d + int64_t(lo) * p.n;
    arr.stride_a[g] = sa;
    arr.stride_b[g] = sb;
    arr.stride_d[g] = sd;
    return;
  }
  grouped::zero_outside_groups(p.d, p.offsets, p.groups, p.m_total, p.n);  // n % 8 == 0: whole 16-byte rows
}

Cfg::Gemm::Arguments make_arguments(const Bf16Arrays& arr, int groups, Cfg::Shape3* host_shapes,
                                    const cutlass::KernelHardwareInfo& hw) {
  Cfg::Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                            {groups, arr.shapes, host_shapes},
                            {arr.a, arr.stride_a, arr.b, arr.stride_b},
                            {{}, nullptr, nullptr, arr.d, arr.stride_d},
                            hw};
  grouped::plain_epilogue(args.epilogue.thread);
  return args;
}
#endif  // CUTLASS_ARCH_MMA_SM90_SUPPORTED

// ---------------------------------------------------------------------------------------------
// Argument checks: glm45_ops/moe/grouped.py's, in its order and words (ValueError in Python)
// ---------------------------------------------------------------------------------------------

void check_grouped_bf16(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  grouped::check_operands(a, b, at::kBFloat16, "bfloat16", kAlign, kAlign);
  const int64_t n = b.size(1);
  TORCH_CHECK_VALUE(n > 0 && n % kAlign == 0, "N (b.shape[1] = ", n, ") must be a positive multiple of ", kAlign,
                    " (TMA)");
  grouped::check_offsets_shape(offsets, b.size(0));
  grouped::check_one_device({&a, &b, &offsets}, "a, b and expert_offsets");
  grouped::check_offsets_values(offsets, a.size(0));
}

at::Tensor grouped_bf16_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets) {
  check_grouped_bf16(a, b, expert_offsets);
  const int64_t m = a.size(0), k = a.size(1), g = b.size(0), n = b.size(1);
  TORCH_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX && g < INT32_MAX,
              "grouped_bf16_gemm: M, N, K and G must fit in int32, got M=", m, " N=", n, " K=", k, " G=", g);
#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
  grouped::check_can_implement<Cfg>(128, int(n), int(k), "grouped_bf16_gemm", [](Cfg::Shape3* host_shapes) {
    return make_arguments(Bf16Arrays{}, 1, host_shapes, {});
  });
#endif
  check_cuda("a", a);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({m, n}, a.options());
  if (m == 0) return out;
#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
  const int device = a.get_device();
  grouped::check_sm90a(device, "grouped_bf16_gemm");
  // TMA reads in place when bases are 16-byte aligned and rows distinct; otherwise from a copy
  const bool a_ok = aligned16(a) && (m <= 1 || a.stride(0) >= k);
  const at::Tensor a_ = a_ok ? a : a.clone(at::MemoryFormat::Contiguous);
  const bool b_ok = aligned16(b) && (n <= 1 || b.stride(1) >= k) && (g <= 1 || b.stride(0) >= n * b.stride(1));
  const at::Tensor b_ = b_ok ? b : b.clone(at::MemoryFormat::Contiguous);
  const at::Tensor offsets = expert_offsets.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  Bf16Launch p{int(g), int(m), int(n), int(k), m <= 1 ? k : a_.stride(0), n <= 1 ? k : b_.stride(1), 0,
               static_cast<const Cfg::Element*>(a_.data_ptr()), static_cast<const Cfg::Element*>(b_.data_ptr()),
               offsets.data_ptr<int32_t>(), static_cast<Cfg::Element*>(out.data_ptr())};
  p.b_group_stride = g <= 1 ? n * p.ldb : b_.stride(0);

  grouped::DeviceArena meta;
  const size_t o_shapes = meta.take(sizeof(Cfg::Shape3), g);
  const size_t o_ptrs = meta.take(sizeof(void*), 3 * g);
  const size_t o_sa = meta.take(sizeof(Cfg::StrideA), g);
  const size_t o_sb = meta.take(sizeof(Cfg::StrideB), g);
  const size_t o_sd = meta.take(sizeof(Cfg::StrideD), g);
  meta.allocate(device);
  // three pointer arrays of g entries each: a, b, d
  const auto ptr_array = [&](int i) { return meta.ptr<char>(o_ptrs + size_t(i) * g * sizeof(void*)); };
  Bf16Arrays arr{meta.ptr<Cfg::Shape3>(o_shapes),
                 reinterpret_cast<const Cfg::Element**>(ptr_array(0)),
                 reinterpret_cast<const Cfg::Element**>(ptr_array(1)),
                 reinterpret_cast<Cfg::Element**>(ptr_array(2)),
                 meta.ptr<Cfg::StrideA>(o_sa),
                 meta.ptr<Cfg::StrideB>(o_sb),
                 meta.ptr<Cfg::StrideD>(o_sd)};
  const grouped::GroupStrides<Cfg> st(int(n), int(k), p.lda, p.ldb);
  grouped_bf16_prepare<<<int(g) + grouped::kZeroBlocks, grouped::kPrepareThreads, 0, stream>>>(arr, p, st.a, st.b,
                                                                                               st.d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  run_cutlass_gemm<Cfg::Gemm>(make_arguments(arr, int(g), nullptr, hardware_info(device)), device, stream,
                              "grouped_bf16_gemm");
  return out;
#else
  TORCH_CHECK(false, "grouped_bf16_gemm: glm45_ops._C was built without CUTLASS SM90 support (needs CUDA >= 12)");
#endif
}

}  // namespace
}  // namespace glm45

TORCH_LIBRARY_IMPL(glm45, CUDA, m) { m.impl("grouped_bf16_gemm", &glm45::grouped_bf16_gemm); }
