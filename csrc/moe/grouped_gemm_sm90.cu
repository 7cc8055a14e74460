// Grouped FP8 block-scaled GEMM on Hopper (sm_90a), DeepGEMM's "contiguous" layout: the CUDA-key
// kernel of
//   glm45::grouped_fp8_block_gemm(a, a_scale, b, b_scale, expert_offsets, out_dtype) -> out
// (schema, checks: glm45_ops/moe/grouped.py; definition: glm45_ops/reference/moe_grouped.py).
//
//   out[m, n] = sum_k a[m,k] a_scale[m, k/128] b[g,n,k] b_scale[g, n/128, k/128]
//   for offsets[g] <= m < offsets[g+1]; 0 for rows outside every group.
//
// The CUTLASS kernel and the device-side preparation of its per-group arrays (no host sync, CUDA
// graph safe) are in grouped_gemm_sm90.cuh; this unit holds the checks, the operand layouts and
// the bf16 instantiation (fp32: grouped_gemm_sm90_fp32.cu).
//
// K: any positive multiple of 16; a partial last K block (192, 176) is zero-filled by TMA and
// scaled by its own block's scales, as in csrc/gemm/fp8_block_gemm_sm90.cu. N: any; the TMA
// epilogue needs whole 16-byte output rows, so other N (never in GLM-4.5) run on padded copies
// of the weight and the output.
#define GLM45_GROUPED_GEMM_IMPL
#include "moe/grouped_gemm_sm90.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "common/checks.h"
#include "moe/grouped_common.cuh"

GLM45_DEFINE_GROUPED_GEMM(grouped_fp8_gemm_sm90_bf16, cutlass::bfloat16_t)

namespace glm45 {
namespace {

constexpr int64_t kBlock = 128;
constexpr int64_t kAlignBytes = 16;  // TMA: 16-byte strides
constexpr int64_t kKAlign = 16;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Argument checks: glm45_ops/moe/grouped.py's, in its order and words (ValueError in Python)
// ---------------------------------------------------------------------------------------------

void check_grouped(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale,
                   const at::Tensor& offsets, at::ScalarType out_dtype) {
  grouped::check_operands(a, b, at::kFloat8_e4m3fn, "float8_e4m3fn", kAlignBytes, kKAlign);
  const int64_t m = a.size(0), k = a.size(1), g = b.size(0), n = b.size(1);
  TORCH_CHECK_VALUE(n > 0, "b must have at least one row per group (N >= 1)");
  const int64_t kb = cdiv(k, kBlock);
  check_dtype("a_scale", a_scale, {at::kFloat}, "float32");
  TORCH_CHECK_VALUE(a_scale.sizes() == c10::IntArrayRef({m, kb}), "a_scale must have shape ", py_tuple({m, kb}),
                    ", got ", py_tuple(a_scale.sizes()));
  check_dtype("b_scale", b_scale, {at::kFloat}, "float32");
  const int64_t nb = cdiv(n, kBlock);
  TORCH_CHECK_VALUE(b_scale.sizes() == c10::IntArrayRef({g, nb, kb}), "b_scale must have shape ",
                    py_tuple({g, nb, kb}), ", got ", py_tuple(b_scale.sizes()));
  grouped::check_offsets_shape(offsets, g);
  check_dtype("out_dtype", out_dtype, {at::kBFloat16, at::kFloat}, "bfloat16 or float32");
  grouped::check_one_device({&a, &a_scale, &b, &b_scale, &offsets}, "a, a_scale, b, b_scale and expert_offsets");
  grouped::check_offsets_values(offsets, m);
}

// ---------------------------------------------------------------------------------------------
// The op
// ---------------------------------------------------------------------------------------------

at::Tensor grouped_fp8_block_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                  const at::Tensor& b_scale, const at::Tensor& expert_offsets,
                                  at::ScalarType out_dtype) {
  check_grouped(a, a_scale, b, b_scale, expert_offsets, out_dtype);
  const int64_t m = a.size(0), k = a.size(1), g = b.size(0), n = b.size(1);
  // whole 16-byte output rows for the TMA epilogue; never crosses a 128 boundary (n_al - n < 8),
  // so b_scale's block count is unchanged
  const int64_t n_al = (n * int64_t(at::elementSize(out_dtype)) + kAlignBytes - 1) / kAlignBytes * kAlignBytes /
                       int64_t(at::elementSize(out_dtype));
  TORCH_CHECK(m <= INT32_MAX && n_al <= INT32_MAX && k <= INT32_MAX && g < INT32_MAX,
              "grouped_fp8_block_gemm: M, N, K and G must fit in int32, got M=", m, " N=", n, " K=", k, " G=", g);
  GroupedGemmLaunch p{int(g), int(m), int(n_al), int(k), 0, 0, 0, 0, 0};
  const auto implement = out_dtype == at::kBFloat16 ? grouped_fp8_gemm_sm90_bf16 : grouped_fp8_gemm_sm90_fp32;
  implement(p, /*check_only=*/true);
  check_cuda("a", a);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({m, n}, a.options().dtype(out_dtype));
  if (m == 0) return out;

  const int device = a.get_device();
  grouped::check_sm90a(device, "grouped_fp8_block_gemm");

  // TMA reads a and each group of b in place when their bases are 16-byte aligned and their rows
  // distinct (the checks let a zero or short row stride through); otherwise from a copy.
  const bool a_ok = aligned16(a) && (m <= 1 || a.stride(0) >= k);
  const at::Tensor a_ = a_ok ? a : a.clone(at::MemoryFormat::Contiguous);
  at::Tensor b_ = b;
  if (n_al != n) {
    b_ = at::zeros({g, n_al, k}, b.options());
    b_.narrow(1, 0, n).copy_(b);
  } else if (!(aligned16(b) && (n <= 1 || b.stride(1) >= k) && (g <= 1 || b.stride(0) >= n * b.stride(1)))) {
    b_ = b.clone(at::MemoryFormat::Contiguous);
  }
  const at::Tensor bs = b_scale.contiguous();  // the kernel reads group g's scales packed at g * N/128 * K/128
  const at::Tensor offsets = expert_offsets.contiguous();
  at::Tensor d = n_al != n ? at::empty({m, n_al}, out.options()) : out;

  p.lda = m <= 1 ? k : a_.stride(0);
  p.ldb = n_al <= 1 ? k : b_.stride(1);
  p.b_group_stride = g <= 1 ? n_al * p.ldb : b_.stride(0);
  p.sa_row = a_scale.stride(0);
  p.sa_col = a_scale.stride(1);
  p.a = a_.data_ptr();
  p.a_scale = a_scale.data_ptr<float>();
  p.b = b_.data_ptr();
  p.b_scale = bs.data_ptr<float>();
  p.offsets = offsets.data_ptr<int32_t>();
  p.d = d.data_ptr();
  p.device = device;
  p.stream = c10::cuda::getCurrentCUDAStream(device).stream();
  implement(p, /*check_only=*/false);
  if (n_al != n) out.copy_(d.narrow(1, 0, n));
  return out;
}

}  // namespace
}  // namespace glm45

TORCH_LIBRARY_IMPL(glm45, CUDA, m) { m.impl("grouped_fp8_block_gemm", &glm45::grouped_fp8_block_gemm); }
