"""FP8 block-scaled GEMM (DeepSeek-V3 / DeepGEMM recipe): the numerical definition.

    out[m, n] = sum_k a[m, k] * a_scale[m, k // 128] * b[n, k] * b_scale[n // 128, k // 128]

``a`` e4m3 ``[M, K]`` is quantized 1 x 128 (per token and group of 128 channels), ``b`` e4m3
``[N, K]`` (the nn.Linear / DeepGEMM "NT" layout) 128 x 128. The reference dequantizes both
operands exactly in fp32 (an e4m3 value times an fp32 scale is exact unless the scale is
extreme) and runs one fp32 matmul, rounding once into ``out_dtype``.

The kernels instead promote per 128-wide K slice: an fp32 partial ``sum_{k in slice} a*b`` from
the tensor cores, times ``a_scale * b_scale``, added into an fp32 accumulator (DeepGEMM). Both
are fp32 sums of the same products in different orders; they agree to fp32 accumulation error,
far below the bf16 output rounding.
"""

from __future__ import annotations

import torch

from glm45_ops.reference.quant import dequant_fp8_ref

GEMM_BLOCK = 128  # the K (and weight N) granularity of the scales


def fp8_block_gemm_ref(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``a`` e4m3 ``[M, K]``, ``a_scale`` fp32 ``[M, K/128]`` (any strides), ``b`` e4m3 ``[N, K]``,
    ``b_scale`` fp32 ``[ceil(N/128), K/128]`` -> ``out_dtype`` ``[M, N]`` = ``deq(a) @ deq(b)^T`` in fp32."""
    a_f = dequant_fp8_ref(a, a_scale, 1, GEMM_BLOCK, torch.float32)
    b_f = dequant_fp8_ref(b, b_scale, GEMM_BLOCK, GEMM_BLOCK, torch.float32)
    return (a_f @ b_f.t()).to(out_dtype)
