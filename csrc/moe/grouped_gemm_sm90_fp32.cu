// The fp32-output instantiation of the grouped FP8 GEMM (grouped_gemm_sm90.cuh), in a unit of its
// own so that the bf16 and fp32 CUTLASS kernels compile in separate nvcc processes.
#define GLM45_GROUPED_GEMM_IMPL
#include "moe/grouped_gemm_sm90.cuh"

GLM45_DEFINE_GROUPED_GEMM(grouped_fp8_gemm_sm90_fp32, float)
