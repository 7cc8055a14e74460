"""FP8 block-scaled GEMM (DeepSeek-V3 / DeepGEMM recipe): the numerical definition.

    out[m, n] = sum_k a[m, k] * a_scale[m, k // 128] * b[n, k] * b_scale[n // 128, k // 128]

``a`` e4m3 ``[M, K]`` is quantized 1 x 128 (per token and group of 128 channels), ``b`` e4m3
``[N, K]`` (the nn.Linear / DeepGEMM "NT" layout) 128 x 128. K is any positive multiple of 16:
when 128 does not divide it, the last K block is partial (``K - 128 * (ceil(K/128) - 1)``
columns, GLM-4.5's TP8 expert width 192 and Air's 176) and its scales apply to those columns
only; every element reads its block's scale by index. The reference dequantizes both operands
exactly in fp32 (an e4m3 value times an fp32 scale is exact unless the scale is extreme) and
runs one fp32 matmul, rounding once into ``out_dtype``.

The kernels instead promote per 128-wide K slice: a partial ``sum_{k in slice} a*b`` from the
tensor cores, times ``a_scale * b_scale``, added into an fp32 accumulator (DeepGEMM). Both are
sums of the same products in different orders; how far apart they may be (fp32 accumulation
here and in the interpreter, a narrower accumulator inside each slice on Hopper's tensor cores)
is the tolerance in ``glm45_ops.gemm``.

Non-finite values (each output reads only its row of ``a`` and its column of ``b``, so what
follows touches those outputs and no others):

* **NaN** in ``a`` (the e4m3 NaN byte) or in ``a_scale`` makes every output of that row NaN; in
  ``b`` or ``b_scale``, every output of the columns it scales (one column for a byte, the
  128-column block for a scale). ``per_token_group_quant_fp8`` gives a group holding a NaN a
  NaN scale, so a NaN activation reaches its output row.
* **+-inf** in a scale makes every output it touches non-finite. Whether each is ``+inf``,
  ``-inf`` or NaN (``inf * 0``, ``inf - inf``) depends on the order of summation, so it is not
  part of the contract; finiteness is.

Empty ``a`` (M = 0) gives an empty ``[0, N]`` output.
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
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``a`` e4m3 ``[M, K]``, ``a_scale`` fp32 ``[M, ceil(K/128)]`` (any strides), ``b`` e4m3
    ``[N, K]``, ``b_scale`` fp32 ``[ceil(N/128), ceil(K/128)]`` -> ``out_dtype`` ``[M, N]`` =
    ``deq(a) @ deq(b)^T`` in fp32."""
    a_f = dequant_fp8_ref(a, a_scale, 1, GEMM_BLOCK, torch.float32)
    b_f = dequant_fp8_ref(b, b_scale, GEMM_BLOCK, GEMM_BLOCK, torch.float32)
    return (a_f @ b_f.t()).to(out_dtype)
