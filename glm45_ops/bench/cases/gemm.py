"""Benchmark cases for the FP8 block-scaled GEMM family (``glm45_ops.gemm``), at the preset's shapes.

* ``fp8_block_gemm``: the dense linear layers of one GLM-4.5 rank-0 model (no TP), ``[M, K] x
  [N, K]^T`` with 1x128 activation and 128x128 weight scales, bf16 out: QKV (``N = q + 2 kv``,
  ``K = H``), o_proj (``N = H``, ``K = q``), dense gate_up (``N = 2 I``, ``K = H``) and down
  (``N = H``, ``K = I``); shapes that coincide (o_proj and down in GLM-4.5) are run once. M sweeps
  ``ctx.tokens`` plus 4096 and 16 on a GPU (the issue's {1, 16, 64, 512, 4096, 16384}).
* ``fp8_block_gemm experts.* TP8``: one routed expert split over 8 ranks (:func:`tp8_expert_shapes`),
  whose down_proj has K = 192 (GLM-4.5) or 176 (Air), at an expert's share of the prefill
  tokens (``tokens * top_k / E``) and at M = 1.
* ``fp8_linear``: the same dense layers from bf16 activations (quantize 1x128, then the GEMM) at
  M >= 512, to set against the GEMM alone (target: within 10%).

Peers: cuBLAS blockwise through ``torch.nn.functional.scaled_mm`` (``torch._scaled_mm`` on older
torch), bf16 ``torch.matmul`` on the dequantized operands (what FP8 is meant to beat), and
``deep_gemm.fp8_gemm_nt`` when a source install imports. Small M is bound by the weight read
(roofline: memory), large M by FP8 tensor-core throughput (compute:fp8).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from glm45_ops import gemm, quant
from glm45_ops.bench.case import BenchContext, Case, Skip, gpu_only, op_runner, peer_import, randn, require, smoke
from glm45_ops.config import ModelConfig
from glm45_ops.reference import cdiv
from glm45_ops.reference.quant import FP8_DTYPE
from glm45_ops.testing import calc_diff

FAMILY = "gemm"
BLOCK = gemm.GEMM_BLOCK
OUT_DTYPE = torch.bfloat16
GPU_EXTRA_TOKENS = (4096, 16)
MEMORY_BOUND_MAX_M = 128  # at or below: the weight read dominates (intensity < ~256 FLOP/B)
LINEAR_MIN_M = 512
SIMILARITY_LIMIT = 1e-4



def linear_shapes(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """``(name, N, K)`` of the dense FP8 linear layers, shapes that coincide merged into one name."""
    h = cfg.hidden_size
    layers = [
        ("qkv_proj", cfg.q_size + 2 * cfg.kv_size, h),
        ("o_proj", h, cfg.q_size),
        ("gate_up_proj", 2 * cfg.intermediate_size, h),
        ("down_proj", h, cfg.intermediate_size),
    ]
    merged: dict[tuple[int, int], list[str]] = {}
    for name, n, k in layers:
        merged.setdefault((n, k), []).append(name)
    return [("/".join(names), n, k) for (n, k), names in merged.items()]


def tp8_expert_shapes(cfg: ModelConfig, tp: int = 8) -> list[tuple[str, int, int]]:
    """``(name, N, K)`` of one routed expert split over ``tp`` ranks (tensor-parallel experts):
    gate_up ``[2 I/tp, H]`` and down ``[H, I/tp]``. GLM-4.5's down has K = 1536/8 = 192 and
    GLM-4.5-Air's K = 1408/8 = 176, not multiples of 128: the widths vLLM's block-FP8 path and
    DeepGEMM refuse, and the partial last K block our GEMM accepts (K % 16 == 0)."""
    i = cfg.moe_intermediate_size
    return [("experts.gate_up_proj TP8", 2 * i // tp, cfg.hidden_size),
            ("experts.down_proj TP8", cfg.hidden_size, i // tp)]


def close(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """fp8_linear's rule (a composition, so no op ``compare`` of its own applies; the
    fp8_block_gemm cases use that op's). Both are fp32 sums of the same products rounded once
    to bf16: DeepGEMM's similarity
    (:func:`glm45_ops.testing.calc_diff`) below 1e-4, and no element off by more than two bf16
    ulps of the largest output (summation order can move a cancelling element by more than its
    own ulp, never by more than that)."""
    if out.shape != ref.shape:
        return f"shape {list(out.shape)} vs reference {list(ref.shape)}"
    if not torch.isfinite(out).all():
        return "non-finite outputs"
    diff = calc_diff(out, ref)
    worst = (out.double() - ref.double()).abs().max().item()
    limit = 2.0**-7 * ref.double().abs().max().item()
    if diff >= SIMILARITY_LIMIT or worst > limit:
        return f"similarity diff {diff:.2e} (limit {SIMILARITY_LIMIT:.0e}), max error {worst:.3g} (limit {limit:.3g})"
    return None


def _operands(m: int, n: int, k: int):
    """Activations quantized 1x128 with MN-major scales (what fp8_linear feeds the GEMM), and a
    weight quantized 128x128 like an FP8 checkpoint's."""
    def inputs(device: torch.device, gen: torch.Generator):
        x = randn((m, k), torch.bfloat16, device, gen)
        w = randn((n, k), torch.bfloat16, device, gen, std=0.02)
        a, a_scale = quant.per_token_group_quant_fp8(x, BLOCK, column_major_scales=True)
        b, b_scale = quant.per_block_quant_fp8(w, BLOCK)
        return a, a_scale, b, b_scale

    return inputs


# ---------------------------------------------------------------------------------------------
# Peers: factory(device, gen, a, a_scale, b, b_scale) -> runner, or Skip.
# ---------------------------------------------------------------------------------------------

def _matmul_bf16(device, gen, a, a_scale, b, b_scale) -> Callable[[], Any]:
    """The bf16 layer FP8 replaces: the same values, dequantized, no scales in the loop."""
    x = quant.dequant_fp8(a, a_scale, 1, BLOCK, torch.bfloat16, backend="torch")
    w_t = quant.dequant_fp8(b, b_scale, BLOCK, BLOCK, torch.bfloat16, backend="torch").t()
    return smoke("torch.matmul bf16", lambda: torch.matmul(x, w_t))


def _scaled_mm(device, gen, a, a_scale, b, b_scale) -> Callable[[], Any]:
    """cuBLAS blockwise; it wants the 1x128 scales outer-dim (M) major and the weight as a
    column-major [K, N]."""
    gpu_only("scaled_mm", device)
    sa = a_scale.t().contiguous().t()
    sb = b_scale.t()
    f = getattr(torch.nn.functional, "scaled_mm", None)
    if f is not None and hasattr(torch.nn.functional, "ScalingType"):
        st = torch.nn.functional.ScalingType
        return smoke("scaled_mm", lambda: f(a, b.t(), sa, st.BlockWise1x128, sb, st.BlockWise128x128,
                                            output_dtype=OUT_DTYPE))
    return smoke("scaled_mm", lambda: torch._scaled_mm(a, b.t(), sa, sb, out_dtype=OUT_DTYPE))


def _deep_gemm(device, gen, a, a_scale, b, b_scale) -> Callable[[], Any]:
    gpu_only("deep_gemm", device)
    dg = peer_import("deep_gemm (source install)", "deep_gemm")
    fn = getattr(dg, "fp8_gemm_nt", None) or getattr(dg, "gemm_fp8_fp8_bf16_nt", None)
    if fn is None:
        raise Skip("deep_gemm has neither fp8_gemm_nt nor gemm_fp8_fp8_bf16_nt")
    out = torch.empty(a.shape[0], b.shape[0], dtype=OUT_DTYPE, device=device)

    def run():
        fn((a, a_scale), (b, b_scale), out)
        return out

    return smoke("deep_gemm", run)


_PEERS = {"scaled_mm": _scaled_mm, "torch.matmul bf16": _matmul_bf16, "deep_gemm": _deep_gemm}


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def _gemm_bytes(m: int, n: int, k: int, in_bytes_a: int) -> int:
    scales = 4 * (m + cdiv(n, BLOCK)) * cdiv(k, BLOCK)
    return m * k * in_bytes_a + n * k + scales + m * n * OUT_DTYPE.itemsize


def _gemm_case(layer: str, m: int, n: int, k: int) -> Case:
    # no compare here: the op's own (float64 oracle, tensor-core bound on CUDA) applies
    return Case(
        family=FAMILY,
        name=f"fp8_block_gemm {layer} M={m}",
        shape=f"[{m}, {k}] x [{n}, {k}] e4m3 -> bf16",
        inputs=_operands(m, n, k),
        run=lambda backend, device, *ops: op_runner(gemm.fp8_block_gemm, backend, device, *ops, OUT_DTYPE),
        bytes_moved=_gemm_bytes(m, n, k, FP8_DTYPE.itemsize),
        flops=2 * m * n * k,
        roofline="memory" if m <= MEMORY_BOUND_MAX_M else "compute:fp8",
        peers=_PEERS,
        params={"M": m, "N": n, "K": k, "layer": layer, "a_scale": "mn-major"},
    )


def _linear_case(layer: str, m: int, n: int, k: int) -> Case:
    def inputs(device: torch.device, gen: torch.Generator):
        x = randn((m, k), torch.bfloat16, device, gen)
        w_q, w_s = quant.per_block_quant_fp8(randn((n, k), torch.bfloat16, device, gen, std=0.02), BLOCK)
        return x, w_q, w_s

    def run(backend: str, device: torch.device, x, w_q, w_s):
        # fp8_linear is a composition of two ops, not an op: both must run on this backend
        require(quant.per_token_group_quant_fp8, backend, device)
        require(gemm.fp8_block_gemm, backend, device)
        return lambda: gemm.fp8_linear(x, w_q, w_s, backend=backend)

    return Case(
        family=FAMILY,
        name=f"fp8_linear {layer} M={m}",
        shape=f"[{m}, {k}] bf16 x [{n}, {k}] e4m3 -> bf16",
        inputs=inputs,
        run=run,
        bytes_moved=_gemm_bytes(m, n, k, torch.bfloat16.itemsize),
        flops=2 * m * n * k,
        roofline="memory" if m <= MEMORY_BOUND_MAX_M else "compute:fp8",
        compare=close,
        notes="quantize 1x128 + GEMM; compare with the fp8_block_gemm row of the same layer and M",
        params={"M": m, "N": n, "K": k, "layer": layer},
    )


def cases(ctx: BenchContext) -> list[Case]:
    cfg = ctx.model
    tokens = list(ctx.tokens)
    if ctx.on_gpu and cfg.name != "small":
        tokens = sorted(set(tokens) | set(GPU_EXTRA_TOKENS), reverse=True)
    layers = linear_shapes(cfg)
    out = [_gemm_case(name, m, n, k) for m in tokens for name, n, k in layers]
    # an expert sees its share of a prefill chunk's routed tokens, or one decode token
    expert_ms = sorted({max(1, ctx.tokens[0] * cfg.num_experts_per_tok // cfg.n_routed_experts), 1}, reverse=True)
    out += [_gemm_case(name, m, n, k) for m in expert_ms for name, n, k in tp8_expert_shapes(cfg)]
    linear_ms = [m for m in tokens if m >= LINEAR_MIN_M] or tokens[:1]
    out += [_linear_case(name, m, n, k) for m in linear_ms for name, n, k in layers]
    return out
