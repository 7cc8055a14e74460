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
#include <set>
#include <string>

#include <cuda_runtime.h>

#include "common/checks.h"
#include "cutlass/arch/config.h"

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

struct GroupedBf16Gemm {
  using Element = cutlass::bfloat16_t;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignE = 8;
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
  using ArchTag = cutlass::arch::Sm90;
  using OpClass = cutlass::arch::OpClassTensorOp;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      ArchTag, OpClass, TileShape, ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto,
      float, float,
      void, LayoutD*, kAlignE,
      Element, LayoutD*, kAlignE,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      ArchTag, OpClass,
      Element, LayoutA*, kAlignE,
      Element, LayoutB*, kAlignE,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
};
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
  const auto clamp_to = [&](int v, int lo) { return min(max(v, lo), p.m_total); };
  if (int(blockIdx.x) < p.groups) {
    if (threadIdx.x != 0) return;
    const int g = blockIdx.x;
    const int lo = clamp_to(p.offsets[g], 0);
    const int hi = clamp_to(p.offsets[g + 1], lo);
    arr.shapes[g] = Cfg::Shape3(hi - lo, p.n, p.k);
    arr.a[g] = p.a + int64_t(lo) * p.lda;
    arr.b[g] = p.b + int64_t(g) * p.b_group_stride;
    arr.d[g] = p.d + int64_t(lo) * p.n;
    arr.stride_a[g] = sa;
    arr.stride_b[g] = sb;
    arr.stride_d[g] = sd;
    return;
  }
  const int first = clamp_to(p.offsets[0], 0);
  const int last = clamp_to(p.offsets[p.groups], first);
  const int outside = first + (p.m_total - last);
  const int64_t vecs = int64_t(p.n) * sizeof(Cfg::Element) / sizeof(uint4);  // n % 8 == 0: whole vectors
  for (int j = blockIdx.x - p.groups; j < outside; j += gridDim.x - p.groups) {
    const int row = j < first ? j : last + (j - first);
    uint4* out = reinterpret_cast<uint4*>(p.d + int64_t(row) * p.n);
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) out[v] = make_uint4(0, 0, 0, 0);
  }
}

int sm_count(int device) {
  static int cached[64] = {};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (!cached[device]) cached[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return cached[device];
}

Cfg::Gemm::Arguments make_arguments(const Bf16Arrays& arr, int groups, Cfg::Shape3* host_shapes,
                                    const cutlass::KernelHardwareInfo& hw) {
  Cfg::Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                            {groups, arr.shapes, host_shapes},
                            {arr.a, arr.stride_a, arr.b, arr.stride_b},
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

size_t align16(size_t x) { return (x + 15) / 16 * 16; }
#endif  // CUTLASS_ARCH_MMA_SM90_SUPPORTED

// ---------------------------------------------------------------------------------------------
// Argument checks: glm45_ops/moe/grouped.py's, in its order and words (ValueError in Python)
// ---------------------------------------------------------------------------------------------

void check_grouped_bf16(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  check_dtype("a", a, {at::kBFloat16}, "bfloat16");
  TORCH_CHECK_VALUE(a.dim() == 2, "a must be 2-D, got shape ", py_tuple(a.sizes()));
  TORCH_CHECK_VALUE(a.stride(1) == 1 && stride_multiple(a, 0, kAlign),
                    "a must have a unit last stride and a row stride that is a multiple of ", kAlign,
                    " (TMA), got strides ", py_tuple(a.strides()));
  check_dtype("b", b, {at::kBFloat16}, "bfloat16");
  TORCH_CHECK_VALUE(b.dim() == 3, "b must be 3-D [G, N, K], got shape ", py_tuple(b.sizes()));
  TORCH_CHECK_VALUE(b.stride(2) == 1 && stride_multiple(b, 0, kAlign) && stride_multiple(b, 1, kAlign),
                    "b must have a unit last stride and other strides that are multiples of ", kAlign,
                    " (TMA), got strides ", py_tuple(b.strides()));
  const int64_t m = a.size(0), k = a.size(1), g = b.size(0), n = b.size(1);
  TORCH_CHECK_VALUE(b.size(2) == k, "a [M, K] and b [G, N, K] must share K, got a ", py_tuple(a.sizes()), " and b ",
                    py_tuple(b.sizes()));
  TORCH_CHECK_VALUE(k > 0 && k % kAlign == 0, "K (a.shape[1] = ", k, ") must be a positive multiple of ", kAlign,
                    " (TMA)");
  TORCH_CHECK_VALUE(g > 0, "b must have at least one group (G >= 1)");
  TORCH_CHECK_VALUE(n > 0 && n % kAlign == 0, "N (b.shape[1] = ", n, ") must be a positive multiple of ", kAlign,
                    " (TMA)");
  check_dtype("expert_offsets", offsets, {at::kInt}, "int32");
  TORCH_CHECK_VALUE(offsets.sizes() == c10::IntArrayRef({g + 1}), "expert_offsets must have shape ",
                    py_tuple({g + 1}), ", got ", py_tuple(offsets.sizes()));
  std::set<std::string> devices;
  for (const at::Tensor* t : {&a, &b, &offsets}) devices.insert(t->device().str());
  TORCH_CHECK_VALUE(devices.size() == 1, "a, b and expert_offsets must be on one device, got ",
                    py_str_list({devices.begin(), devices.end()}));
  if (offsets.is_cpu()) {  // values cost a host sync on the device: checked on CPU tensors only
    const at::Tensor o = offsets.contiguous();
    const int32_t* v = o.data_ptr<int32_t>();
    int64_t prev = 0;
    for (int64_t i = 0; i <= g; ++i) {
      TORCH_CHECK_VALUE(v[i] >= prev && v[i] <= m, "expert_offsets must be nondecreasing within [0, M_total = ", m,
                        "], got expert_offsets[", i, "] = ", v[i]);
      prev = v[i];
    }
  }
}

at::Tensor grouped_bf16_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets) {
  check_grouped_bf16(a, b, expert_offsets);
  const int64_t m = a.size(0), k = a.size(1), g = b.size(0), n = b.size(1);
  TORCH_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX && g < INT32_MAX,
              "grouped_bf16_gemm: M, N, K and G must fit in int32, got M=", m, " N=", n, " K=", k, " G=", g);
#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
  {
    Cfg::Shape3 host_shape(128, int(n), int(k));  // one representative group: N and K alignment
    const Bf16Arrays none{};
    TORCH_CHECK(Cfg::Gemm::can_implement(make_arguments(none, 1, &host_shape, {})) == cutlass::Status::kSuccess,
                "grouped_bf16_gemm: CUTLASS cannot implement N=", n, " K=", k);
  }
#endif
  check_cuda("a", a);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({m, n}, a.options());
  if (m == 0) return out;
#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
  const int device = a.get_device();
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(major == 9 && minor == 0,
              "grouped_bf16_gemm's CUDA kernel is built for sm_90a (H100/H200), this GPU is sm_", major, minor,
              ": use backend='triton'");
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

  size_t bytes = 0;
  const auto take = [&](size_t each, int64_t count) {
    const size_t at = bytes;
    bytes += align16(each * size_t(count));
    return at;
  };
  const size_t o_shapes = take(sizeof(Cfg::Shape3), g);
  const size_t o_ptrs = take(sizeof(void*), 3 * g);
  const size_t o_sa = take(sizeof(Cfg::StrideA), g);
  const size_t o_sb = take(sizeof(Cfg::StrideB), g);
  const size_t o_sd = take(sizeof(Cfg::StrideD), g);
  at::Tensor meta = at::empty({int64_t(bytes)}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  char* base = static_cast<char*>(meta.data_ptr());
  const auto ptr_array = [&](int i) { return base + o_ptrs + size_t(i) * g * sizeof(void*); };
  Bf16Arrays arr{reinterpret_cast<Cfg::Shape3*>(base + o_shapes),
                 reinterpret_cast<const Cfg::Element**>(ptr_array(0)),
                 reinterpret_cast<const Cfg::Element**>(ptr_array(1)),
                 reinterpret_cast<Cfg::Element**>(ptr_array(2)),
                 reinterpret_cast<Cfg::StrideA*>(base + o_sa),
                 reinterpret_cast<Cfg::StrideB*>(base + o_sb),
                 reinterpret_cast<Cfg::StrideD*>(base + o_sd)};
  auto sa = cutlass::make_cute_packed_stride(Cfg::StrideA{}, make_shape(1, int(k), 1));
  auto sb = cutlass::make_cute_packed_stride(Cfg::StrideB{}, make_shape(int(n), int(k), 1));
  auto sd = cutlass::make_cute_packed_stride(Cfg::StrideD{}, make_shape(1, int(n), 1));
  get<0>(sa) = p.lda;
  get<0>(sb) = p.ldb;
  grouped_bf16_prepare<<<int(g) + 32, 256, 0, stream>>>(arr, p, sa, sb, sd);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_count(device);
  Cfg::Gemm::Arguments args = make_arguments(arr, int(g), nullptr, hw);
  Cfg::Gemm gemm;
  at::Tensor workspace = at::empty({static_cast<int64_t>(Cfg::Gemm::get_workspace_size(args))},
                                   at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  cutlass::Status st = gemm.initialize(args, workspace.data_ptr(), stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "grouped_bf16_gemm: CUTLASS initialize failed: ",
              cutlassGetStatusString(st));
  st = gemm.run(stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "grouped_bf16_gemm: CUTLASS run failed: ", cutlassGetStatusString(st));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
#else
  TORCH_CHECK(false, "grouped_bf16_gemm: glm45_ops._C was built without CUTLASS SM90 support (needs CUDA >= 12)");
#endif
}

}  // namespace
}  // namespace glm45

TORCH_LIBRARY_IMPL(glm45, CUDA, m) { m.impl("grouped_bf16_gemm", &glm45::grouped_bf16_gemm); }
