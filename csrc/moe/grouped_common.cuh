// What the grouped GEMM units share (csrc/moe/grouped_gemm_sm90.cu{,h}: FP8 block-scaled;
// grouped_bf16_gemm_sm90.cu: BF16): the host checks of the operands and expert_offsets common to
// both ops (glm45_ops/moe/grouped.py's, in its order and words), and, under CUTLASS SM90, the
// device-side preparation pieces (clamped group bounds, zeroing the rows outside every group),
// the carving of the per-group arrays out of one device buffer, and the argument setup.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <initializer_list>
#include <set>
#include <string>

#include <cuda_runtime.h>

#include "common/checks.h"
#include "cutlass/arch/config.h"

namespace glm45 {
namespace grouped {

// a [M, K] and b [G, N, K] of `dtype`, TMA-readable (strides multiples of `stride_align`
// elements, K a multiple of `k_align`), with G >= 1. N: the caller's own rule.
inline void check_operands(const at::Tensor& a, const at::Tensor& b, at::ScalarType dtype, const char* dtype_name,
                           int64_t stride_align, int64_t k_align) {
  check_dtype("a", a, {dtype}, dtype_name);
  TORCH_CHECK_VALUE(a.dim() == 2, "a must be 2-D, got shape ", py_tuple(a.sizes()));
  TORCH_CHECK_VALUE(a.stride(1) == 1 && stride_multiple(a, 0, stride_align),
                    "a must have a unit last stride and a row stride that is a multiple of ", stride_align,
                    " (TMA), got strides ", py_tuple(a.strides()));
  check_dtype("b", b, {dtype}, dtype_name);
  TORCH_CHECK_VALUE(b.dim() == 3, "b must be 3-D [G, N, K], got shape ", py_tuple(b.sizes()));
  TORCH_CHECK_VALUE(b.stride(2) == 1 && stride_multiple(b, 0, stride_align) && stride_multiple(b, 1, stride_align),
                    "b must have a unit last stride and other strides that are multiples of ", stride_align,
                    " (TMA), got strides ", py_tuple(b.strides()));
  const int64_t k = a.size(1);
  TORCH_CHECK_VALUE(b.size(2) == k, "a [M, K] and b [G, N, K] must share K, got a ", py_tuple(a.sizes()), " and b ",
                    py_tuple(b.sizes()));
  TORCH_CHECK_VALUE(k > 0 && k % k_align == 0, "K (a.shape[1] = ", k, ") must be a positive multiple of ", k_align,
                    " (TMA)");
  TORCH_CHECK_VALUE(b.size(0) > 0, "b must have at least one group (G >= 1)");
}

inline void check_offsets_shape(const at::Tensor& offsets, int64_t groups) {
  check_dtype("expert_offsets", offsets, {at::kInt}, "int32");
  TORCH_CHECK_VALUE(offsets.sizes() == c10::IntArrayRef({groups + 1}), "expert_offsets must have shape ",
                    py_tuple({groups + 1}), ", got ", py_tuple(offsets.sizes()));
}

// `names`: the tensors' names as the message lists them ("a, b and expert_offsets")
inline void check_one_device(std::initializer_list<const at::Tensor*> tensors, const char* names) {
  std::set<std::string> devices;
  for (const at::Tensor* t : tensors) devices.insert(t->device().str());
  TORCH_CHECK_VALUE(devices.size() == 1, names, " must be on one device, got ",
                    py_str_list({devices.begin(), devices.end()}));
}

// Values cost a host sync on the device: checked on CPU tensors only
inline void check_offsets_values(const at::Tensor& offsets, int64_t m_total) {
  if (!offsets.is_cpu()) return;
  const at::Tensor o = offsets.contiguous();
  const int32_t* v = o.data_ptr<int32_t>();
  int64_t prev = 0;
  for (int64_t i = 0; i < o.numel(); ++i) {
    TORCH_CHECK_VALUE(v[i] >= prev && v[i] <= m_total, "expert_offsets must be nondecreasing within [0, M_total = ",
                      m_total, "], got expert_offsets[", i, "] = ", v[i]);
    prev = v[i];
  }
}

// The kernels are built for sm_90a only: any other GPU gets the Triton backend's name
inline void check_sm90a(int device, const char* op) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(major == 9 && minor == 0, op, "'s CUDA kernel is built for sm_90a (H100/H200), this GPU is sm_", major,
              minor, ": use backend='triton'");
}

}  // namespace grouped
}  // namespace glm45

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "common/cutlass_run.cuh"

namespace glm45 {
namespace grouped {

// Groups of a few rows are common in MoE, and a 1 x 1 cluster never pairs tiles of different groups
using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;

// The PtrArray TMA epilogue of both units: D (row-major, per-group pointers) = the fp32
// accumulator rounded once into ElementD, no C operand
template <class TileShape, class ElementD, int kAlignD>
using PtrArrayEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto,
    float, float,
    void, cutlass::layout::RowMajor*, kAlignD,
    ElementD, cutlass::layout::RowMajor*, kAlignD,
    cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
    cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;

// The kernel of Collectives' CollectiveMainloop and CollectiveEpilogue, and the per-group types
// of its arrays. A unit's configuration derives from both: struct Cfg : C, GemmTypes<C> {}.
template <class Collectives>
struct GemmTypes {
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, typename Collectives::CollectiveMainloop,
                                                      typename Collectives::CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
};

// The prepare kernels' launch: one block per group, then kZeroBlocks zeroing the other rows
constexpr int kZeroBlocks = 32;
constexpr int kPrepareThreads = 256;

// A group bound clamped into [lo, m_total]: bad device offsets (the Python check sees only CPU
// values) never address outside the tensors
__device__ inline int clamp_row(int v, int lo, int m_total) { return min(max(v, lo), m_total); }

// Run by the prepare kernel's blocks [groups, gridDim): zero d's rows outside every group
// ([0, offsets[0]) and [offsets[groups], m_total)), which the GEMM never writes. A row of d is
// n elements, whole 16-byte vectors.
template <class Element>
__device__ void zero_outside_groups(Element* d, const int32_t* offsets, int groups, int m_total, int n) {
  const int first = clamp_row(offsets[0], 0, m_total);
  const int last = clamp_row(offsets[groups], first, m_total);
  const int outside = first + (m_total - last);
  const int64_t vecs = int64_t(n) * sizeof(Element) / sizeof(uint4);
  for (int j = blockIdx.x - groups; j < outside; j += gridDim.x - groups) {
    const int row = j < first ? j : last + (j - first);
    uint4* out = reinterpret_cast<uint4*>(d + int64_t(row) * n);
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) out[v] = make_uint4(0, 0, 0, 0);
  }
}

// The per-group arrays, as 16-byte-aligned pieces of one buffer from the caching allocator on
// the current stream (no sync, graph-capturable): take() each piece's offset, allocate(),
// then ptr<T>(offset).
struct DeviceArena {
  size_t bytes = 0;
  char* base = nullptr;
  at::Tensor buffer;

  size_t take(size_t each, int64_t count) {
    const size_t offset = bytes;
    bytes += (each * size_t(count) + 15) / 16 * 16;
    return offset;
  }
  void allocate(int device) {
    buffer = at::empty({int64_t(bytes)}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
    base = static_cast<char*>(buffer.data_ptr());
  }
  template <class T>
  T* ptr(size_t offset) const {
    return reinterpret_cast<T*>(base + offset);
  }
};

// Every group's strides: packed, but for a's and b's row strides (lda, ldb elements)
template <class Config>
struct GroupStrides {
  typename Config::StrideA a;
  typename Config::StrideB b;
  typename Config::StrideD d;

  GroupStrides(int n, int k, int64_t lda, int64_t ldb)
      : a(cutlass::make_cute_packed_stride(typename Config::StrideA{}, cute::make_shape(1, k, 1))),
        b(cutlass::make_cute_packed_stride(typename Config::StrideB{}, cute::make_shape(n, k, 1))),
        d(cutlass::make_cute_packed_stride(typename Config::StrideD{}, cute::make_shape(1, n, 1))) {
    cute::get<0>(a) = lda;
    cute::get<0>(b) = ldb;
  }
};

// D = accumulator: alpha 1, beta 0 (no C operand), no per-group or device-side scalars
template <class Fusion>
void plain_epilogue(Fusion& fusion) {
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  fusion.alpha_ptr_array = nullptr;
  fusion.beta_ptr_array = nullptr;
  fusion.dAlpha = {cute::_0{}, cute::_0{}, 0};
  fusion.dBeta = {cute::_0{}, cute::_0{}, 0};
}

// CUTLASS's can_implement for (N, K) on the host, from one representative group of `rows` rows
// (no pointer is read, no device needed): alignment of N and K is all a group's M cannot change.
// make_args(host_shapes) builds the arguments with no device arrays.
template <class Config, class MakeArgs>
void check_can_implement(int rows, int n, int k, const char* op, MakeArgs&& make_args) {
  typename Config::Shape3 host_shape(rows, n, k);
  TORCH_CHECK(Config::Gemm::can_implement(make_args(&host_shape)) == cutlass::Status::kSuccess, op,
              ": CUTLASS cannot implement N=", n, " K=", k);
}

}  // namespace grouped
}  // namespace glm45
#endif  // CUTLASS_ARCH_MMA_SM90_SUPPORTED
