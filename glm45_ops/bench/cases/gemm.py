"""Benchmark cases for the FP8 block-scaled GEMM family (``glm45_ops.gemm``), at the preset's shapes.

* ``fp8_block_gemm``: the dense linear layers of one GLM-4.5 rank-0 model (no TP), ``[M, K] x
  [N, K]^T`` with 1x128 activation and 128x128 weight scales, bf16 out: QKV (``N = q + 2 kv``,
  ``K = H``), o_proj (``N = H``, ``K = q``), dense gate_up (``N = 2 I``, ``K = H``) and down
  (``N = H``, ``K = I``); shapes that coincide (o_proj and down in GLM-4.5) are run once. M sweeps
  ``ctx.tokens`` plus 4096 and 16 on a GPU (the issue's {1, 16, 64, 512, 4096, 16384}).
* ``fp8_linear``: the same layers from bf16 activations (quantize 1x128, then the GEMM) at
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
from glm45_ops.bench.case import BenchContext, Case, Skip, op_runner, randn, require
from glm45_ops.config import ModelConfig
from glm45_ops.reference.quant import FP8_DTYPE

FAMILY = "gemm"
BLOCK = gemm.GEMM_BLOCK
OUT_DTYPE = torch.bfloat16
GPU_EXTRA_TOKENS = (4096, 16)
MEMORY_BOUND_MAX_M = 128  # at or below: the weight read dominates (intensity < ~256 FLOP/B)
LINEAR_MIN_M = 512
_PEERS = ("scaled_mm", "torch.matmul bf16", "deep_gemm")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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


def close(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """Both are fp32 sums of the same products rounded once to bf16: DeepGEMM's similarity
    ``1 - 2 sum(xy) / sum(x^2 + y^2)`` below 1e-4, and no element off by more than two bf16
    ulps of the largest output (summation order can move a cancelling element by more than its
    own ulp, never by more than that)."""
    if out.shape != ref.shape:
        return f"shape {list(out.shape)} vs reference {list(ref.shape)}"
    x, y = out.double(), ref.to(out.device).double()
    if not torch.isfinite(x).all():
        return "non-finite outputs"
    diff = 1 - 2 * (x * y).sum().item() / max((x * x + y * y).sum().item(), 1e-300)
    worst = (x - y).abs().max().item()
    limit = 2.0**-7 * y.abs().max().item()
    if diff >= 1e-4 or worst > limit:
        return f"similarity diff {diff:.2e} (limit 1e-4), max error {worst:.3g} (limit {limit:.3g})"
    return None


def _operands(m: int, n: int, k: int, device: torch.device, gen: torch.Generator):
    """Activations quantized 1x128 with MN-major scales (what fp8_linear feeds the GEMM), and a
    weight quantized 128x128 like an FP8 checkpoint's."""
    x = randn((m, k), torch.bfloat16, device, gen)
    w = randn((n, k), torch.bfloat16, device, gen, std=0.02)
    a, a_scale = quant.per_token_group_quant_fp8(x, BLOCK, column_major_scales=True)
    b, b_scale = quant.per_block_quant_fp8(w, BLOCK)
    return a, a_scale, b, b_scale


# ---------------------------------------------------------------------------------------------
# Peers: each returns a runner or raises Skip; ``_smoke`` calls it once so API drift is a skip.
# ---------------------------------------------------------------------------------------------

def _smoke(peer: str, run: Callable[[], Any]) -> Callable[[], Any]:
    try:
        run()
    except Exception as e:  # a peer's API drift must not stop the benchmark
        raise Skip(f"{peer} call failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return run


def _scaled_mm(a, a_scale, b, b_scale) -> Callable[[], Any]:
    # cuBLAS wants the 1x128 scales outer-dim (M) major and the weight as a column-major [K, N]
    sa = a_scale.t().contiguous().t()
    sb = b_scale.t()
    f = getattr(torch.nn.functional, "scaled_mm", None)
    if f is not None and hasattr(torch.nn.functional, "ScalingType"):
        st = torch.nn.functional.ScalingType
        return lambda: f(a, b.t(), sa, st.BlockWise1x128, sb, st.BlockWise128x128, output_dtype=OUT_DTYPE)
    return lambda: torch._scaled_mm(a, b.t(), sa, sb, out_dtype=OUT_DTYPE)


def _deep_gemm(a, a_scale, b, b_scale) -> Callable[[], Any]:
    try:
        import deep_gemm
    except Exception as e:
        raise Skip(f"deep_gemm (source install) not importable ({type(e).__name__})") from None
    out = torch.empty(a.shape[0], b.shape[0], dtype=OUT_DTYPE, device=a.device)
    fn = getattr(deep_gemm, "fp8_gemm_nt", None) or getattr(deep_gemm, "gemm_fp8_fp8_bf16_nt")

    def run():
        fn((a, a_scale), (b, b_scale), out)
        return out

    return run


def _peer(peer: str, a, a_scale, b, b_scale) -> Callable[[], Any]:
    if peer == "torch.matmul bf16":  # the bf16 layer FP8 replaces: same values, no scales
        x = quant.dequant_fp8(a, a_scale, 1, BLOCK, torch.bfloat16, backend="torch")
        w_t = quant.dequant_fp8(b, b_scale, BLOCK, BLOCK, torch.bfloat16, backend="torch").t()
        return _smoke(peer, lambda: torch.matmul(x, w_t))
    if a.device.type != "cuda":
        raise Skip(f"{peer} runs on GPU only")
    if peer == "scaled_mm":
        return _smoke(peer, _scaled_mm(a, a_scale, b, b_scale))
    if peer == "deep_gemm":
        return _smoke(peer, _deep_gemm(a, a_scale, b, b_scale))
    raise Skip(f"unknown peer {peer!r}")


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def _gemm_bytes(m: int, n: int, k: int, in_bytes_a: int) -> int:
    scales = 4 * (m + _cdiv(n, BLOCK)) * (k // BLOCK)
    return m * k * in_bytes_a + n * k + scales + m * n * OUT_DTYPE.itemsize


def _gemm_case(layer: str, m: int, n: int, k: int) -> Case:
    def make(backend: str, device: torch.device, gen: torch.Generator):
        ops = _operands(m, n, k, device, gen)
        if backend in _PEERS:
            return _peer(backend, *ops)
        return op_runner(gemm.fp8_block_gemm, backend, device, *ops, OUT_DTYPE)

    return Case(
        family=FAMILY,
        name=f"fp8_block_gemm {layer} M={m}",
        shape=f"[{m}, {k}] x [{n}, {k}] e4m3 -> bf16",
        make=make,
        bytes_moved=_gemm_bytes(m, n, k, FP8_DTYPE.itemsize),
        flops=2 * m * n * k,
        roofline="memory" if m <= MEMORY_BOUND_MAX_M else "compute:fp8",
        peers=_PEERS,
        compare=close,
        params={"M": m, "N": n, "K": k, "layer": layer, "a_scale": "mn-major"},
    )


def _linear_case(layer: str, m: int, n: int, k: int) -> Case:
    def make(backend: str, device: torch.device, gen: torch.Generator):
        x = randn((m, k), torch.bfloat16, device, gen)
        w_q, w_s = quant.per_block_quant_fp8(randn((n, k), torch.bfloat16, device, gen, std=0.02), BLOCK)
        # fp8_linear is a composition of two ops, not an op: both must run on this backend
        require(quant.per_token_group_quant_fp8, backend, device)
        require(gemm.fp8_block_gemm, backend, device)
        return lambda: gemm.fp8_linear(x, w_q, w_s, backend=backend)

    return Case(
        family=FAMILY,
        name=f"fp8_linear {layer} M={m}",
        shape=f"[{m}, {k}] bf16 x [{n}, {k}] e4m3 -> bf16",
        make=make,
        bytes_moved=_gemm_bytes(m, n, k, torch.bfloat16.itemsize),
        flops=2 * m * n * k,
        roofline="memory" if m <= MEMORY_BOUND_MAX_M else "compute:fp8",
        compare=close,
        notes="quantize 1x128 + GEMM; compare with the fp8_block_gemm row of the same layer and M",
        params={"M": m, "N": n, "K": k, "layer": layer},
    )


def cases(ctx: BenchContext) -> list[Case]:
    tokens = list(ctx.tokens)
    if ctx.on_gpu and ctx.model.name != "small":
        tokens = sorted(set(tokens) | set(GPU_EXTRA_TOKENS), reverse=True)
    layers = linear_shapes(ctx.model)
    out = [_gemm_case(name, m, n, k) for m in tokens for name, n, k in layers]
    linear_ms = [m for m in tokens if m >= LINEAR_MIN_M] or tokens[:1]
    out += [_linear_case(name, m, n, k) for m in linear_ms for name, n, k in layers]
    return out
