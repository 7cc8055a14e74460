"""Benchmark cases for the FP8 quant family (``glm45_ops.quant``), at the preset's shapes.

* ``per_token_group_quant_fp8``: activations ``[M, H]`` bf16 for every ``M`` in ``ctx.tokens``;
  at the prefill ``M`` also column-major scales, UE8M0 scales, and both (DeepGEMM's layout).
* ``per_block_quant_fp8``: one MoE layer's experts ``[E, 2I, H]`` (gate_up) and ``[E, H, I]``
  (down), and the dense MLP's fused gate_up ``[2 * intermediate, H]``; UE8M0 on gate_up.
* ``dequant_fp8``: 1x128 activations and 128x128 expert weights.
* ``requant_fp8_weights``: every quantized weight of one TP8 rank (see :func:`tp8_shard_shapes`).

All are memory-bound (a few FLOPs per element): the ceiling is copy bandwidth. Every backend
must match the torch reference bit for bit (the ops declare no looser ``compare``). Peers:
``torch.compile`` of the reference (headline cases), vLLM, sgl-kernel and DeepGEMM's quantizers.
"""

from __future__ import annotations

import functools
from math import prod
from typing import Callable

import torch

from glm45_ops import quant
from glm45_ops.bench.case import (BenchContext, Case, PeerFactory, Skip, compile_peer, gpu_only, op_outputs, op_runner,
                                  peer_import, randn, require, smoke)
from glm45_ops.config import ModelConfig
from glm45_ops.reference import cdiv, quant as ref

FAMILY = "quant"
GROUP = 128
EPS = 1e-4
ACT_DTYPE = torch.bfloat16



def _fmt(shape, dtype=ACT_DTYPE) -> str:
    return f"[{', '.join(map(str, shape))}] {str(dtype).removeprefix('torch.')}"


# ---------------------------------------------------------------------------------------------
# Peers: other libraries' implementations of the same computation, found when importable.
# Each is factory(device, gen, *inputs) -> runner, or raises Skip.
# ---------------------------------------------------------------------------------------------

def _ptgq_compiled(device, gen, x, *, ue8m0: bool, column_major: bool):
    fn = compile_peer(functools.partial(ref.per_token_group_quant_fp8_ref, group_size=GROUP, eps=EPS,
                                        scale_ue8m0=ue8m0), device)
    return smoke("torch.compile", lambda: fn(x))


def _ptgq_vllm(device, gen, x, *, ue8m0: bool, column_major: bool):
    gpu_only("vllm", device)
    fn = peer_import("vllm", "vllm.model_executor.layers.quantization.utils.fp8_utils", "per_token_group_quant_fp8")
    return smoke("vllm", lambda: fn(x, GROUP, eps=EPS, column_major_scales=column_major, use_ue8m0=ue8m0))


def _ptgq_sgl_kernel(device, gen, x, *, ue8m0: bool, column_major: bool):
    gpu_only("sgl_kernel", device)
    fn = peer_import("sgl_kernel", "sgl_kernel", "sgl_per_token_group_quant_fp8")
    x_q, scale = op_outputs(quant.per_token_group_quant_fp8, x, GROUP, EPS, ue8m0, column_major)

    def run():
        fn(x, x_q, scale, GROUP, EPS, -quant.E4M3_MAX, quant.E4M3_MAX, ue8m0)
        return x_q, scale

    return smoke("sgl_kernel", run)


def _ptgq_deep_gemm(device, gen, x, *, ue8m0: bool, column_major: bool):
    gpu_only("deep_gemm", device)
    fn = peer_import("deep_gemm (source install)", "deep_gemm.utils", "per_token_cast_to_fp8")
    return smoke("deep_gemm", lambda: fn(x, use_ue8m0=ue8m0))


def _pbq_compiled(device, gen, w, *, ue8m0: bool):
    fn = compile_peer(functools.partial(ref.per_block_quant_fp8_ref, block_size=GROUP, eps=EPS, scale_ue8m0=ue8m0),
                      device)
    return smoke("torch.compile", lambda: fn(w))


def _pbq_deep_gemm(device, gen, w, *, ue8m0: bool):
    gpu_only("deep_gemm", device)
    if w.dim() != 2:
        raise Skip("deep_gemm's per_block_cast_to_fp8 takes one 2-D weight")
    fn = peer_import("deep_gemm (source install)", "deep_gemm.utils", "per_block_cast_to_fp8")
    return smoke("deep_gemm", lambda: fn(w, use_ue8m0=ue8m0))


def _peers(factories: dict[str, Callable], headline: bool, **params) -> dict[str, PeerFactory]:
    """The factories with this case's parameters bound. torch.compile costs an inductor
    compile per case (seconds): only headline cases get it."""
    return {name: functools.partial(f, **params) for name, f in factories.items()
            if headline or name != "torch.compile"}


_PTGQ_PEERS = {"torch.compile": _ptgq_compiled, "vllm": _ptgq_vllm, "sgl_kernel": _ptgq_sgl_kernel,
               "deep_gemm": _ptgq_deep_gemm}
_PBQ_PEERS = {"torch.compile": _pbq_compiled, "deep_gemm": _pbq_deep_gemm}


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def _ptgq_case(m: int, k: int, ue8m0: bool, column_major: bool, headline: bool = False) -> Case:
    variant = "".join((" col-major" if column_major else "", " ue8m0" if ue8m0 else ""))
    return Case(
        family=FAMILY,
        name=f"per_token_group_quant_fp8 M={m}{variant}",
        shape=_fmt((m, k)),
        inputs=lambda device, gen: (randn((m, k), ACT_DTYPE, device, gen),),
        run=lambda backend, device, x: op_runner(quant.per_token_group_quant_fp8, backend, device, x, GROUP, EPS,
                                                 ue8m0, column_major),
        bytes_moved=m * k * (ACT_DTYPE.itemsize + 1) + 4 * m * cdiv(k, GROUP),
        peers=_peers(_PTGQ_PEERS, headline, ue8m0=ue8m0, column_major=column_major),
        params={"M": m, "K": k, "group_size": GROUP, "scale_ue8m0": ue8m0, "column_major_scales": column_major},
    )


def _pbq_case(label: str, shape: tuple[int, ...], ue8m0: bool = False, headline: bool = False) -> Case:
    n, k = shape[-2:]
    n_scales = prod(shape[:-2]) * cdiv(n, GROUP) * cdiv(k, GROUP)
    return Case(
        family=FAMILY,
        name=f"per_block_quant_fp8 {label}{' ue8m0' if ue8m0 else ''}",
        shape=_fmt(shape),
        inputs=lambda device, gen: (randn(shape, ACT_DTYPE, device, gen, std=0.02),),
        run=lambda backend, device, w: op_runner(quant.per_block_quant_fp8, backend, device, w, GROUP, EPS, ue8m0),
        bytes_moved=prod(shape) * (ACT_DTYPE.itemsize + 1) + 4 * n_scales,
        peers=_peers(_PBQ_PEERS, headline, ue8m0=ue8m0),
        params={"shape": list(shape), "block_size": GROUP, "scale_ue8m0": ue8m0},
    )


def _dequant_case(label: str, shape: tuple[int, ...], block: tuple[int, int]) -> Case:
    bm, bn = block
    scale_shape = (*shape[:-2], cdiv(shape[-2], bm), cdiv(shape[-1], bn))

    def inputs(device: torch.device, gen: torch.Generator):
        x_q = randn(shape, torch.float32, device, gen, std=64.0).clamp(-448, 448).to(quant.FP8_DTYPE)
        scale = torch.rand(scale_shape, generator=gen, device=device) * 1e-2 + 1e-4
        return x_q, scale

    return Case(
        family=FAMILY,
        name=f"dequant_fp8 {label} {bm}x{bn}",
        shape=_fmt(shape, quant.FP8_DTYPE),
        inputs=inputs,
        run=lambda backend, device, x_q, scale: op_runner(quant.dequant_fp8, backend, device, x_q, scale, bm, bn,
                                                          ACT_DTYPE),
        bytes_moved=prod(shape) * (1 + ACT_DTYPE.itemsize) + 4 * prod(scale_shape),
        params={"shape": list(shape), "block_m": bm, "block_n": bn},
    )


def tp8_shard_shapes(cfg: ModelConfig, tp: int = 8) -> list[tuple[str, tuple[int, ...], int]]:
    """``(name, shape, count)`` of every weight one rank quantizes to FP8 when serving ``cfg``
    on 8 GPUs, as in an FP8 rollout engine (HF checkpoint layout, gate and up fused).

    Sharding assumption (SGLang/vLLM-style, ``--tp 8 --ep 8``):

    * attention: tensor parallel; q_proj and k/v_proj split by heads (column), o_proj by its
      input (row): ``[q/tp, H]``, ``[kv/tp, H]`` x2, ``[H, q/tp]``;
    * dense MLP (the first ``first_k_dense_replace`` layers): gate_up ``[2*I/tp, H]``, down
      ``[H, I/tp]``;
    * routed experts: expert parallel, ``E/tp`` whole experts per rank (splitting each expert
      over 8 ranks would leave GLM-4.5's 1536/8 = 192 columns, not a multiple of the 128 block);
    * the shared expert: replicated on every rank (same reason).

    Router, norms, embeddings, lm_head and the MTP layer stay BF16 and are not listed (the MTP
    layer is the draft model, quantized separately if at all).
    """
    h, i_dense, i_moe = cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size
    e_local = cfg.n_routed_experts // tp
    layers = cfg.num_hidden_layers
    shapes = [
        ("q_proj", (cfg.q_size // tp, h), layers),
        ("k_proj", (cfg.kv_size // tp, h), layers),
        ("v_proj", (cfg.kv_size // tp, h), layers),
        ("o_proj", (h, cfg.q_size // tp), layers),
        ("mlp.gate_up_proj", (2 * i_dense // tp, h), cfg.num_dense_layers),
        ("mlp.down_proj", (h, i_dense // tp), cfg.num_dense_layers),
        ("experts.gate_up_proj", (e_local, 2 * i_moe, h), cfg.num_moe_layers),
        ("experts.down_proj", (e_local, h, i_moe), cfg.num_moe_layers),
        ("shared_experts.gate_up_proj", (2 * i_moe * cfg.n_shared_experts, h), cfg.num_moe_layers),
        ("shared_experts.down_proj", (h, i_moe * cfg.n_shared_experts), cfg.num_moe_layers),
    ]
    return [s for s in shapes if s[2] > 0]


def _shard_case(cfg: ModelConfig) -> Case:
    shapes = tp8_shard_shapes(cfg)
    elems = sum(prod(s) * c for _, s, c in shapes)
    scales = sum(prod(s[:-2]) * cdiv(s[-2], GROUP) * cdiv(s[-1], GROUP) * c for _, s, c in shapes)

    def inputs(device: torch.device, gen: torch.Generator):
        # One bf16 tensor per distinct weight, reused by every layer: a real shard is
        # ~88 GB of bf16 (GLM-4.5), too much next to its 44 GB of FP8 output. Each expert
        # tensor is far larger than L2, so reuse does not flatter the timing.
        distinct = [randn(s, ACT_DTYPE, device, gen, std=0.02) for _, s, _ in shapes]
        return ([w for w, (_, _, c) in zip(distinct, shapes) for _ in range(c)],)

    def run(backend: str, device: torch.device, weights: list[torch.Tensor]):
        require(quant.per_block_quant_fp8, backend, device)
        return lambda: quant.requant_fp8_weights(weights, GROUP, EPS, backend=backend)

    return Case(
        family=FAMILY,
        name=f"requant_fp8_weights {cfg.name} TP8 shard",
        shape=f"{sum(c for *_, c in shapes)} weights, {elems / 1e6:,.1f}M params bf16",
        inputs=inputs,
        run=run,
        bytes_moved=elems * (ACT_DTYPE.itemsize + 1) + 4 * scales,
        notes="one rank of --tp 8 --ep 8; see tp8_shard_shapes",
        params={"weights": [[n, list(s), c] for n, s, c in shapes]},
    )


def cases(ctx: BenchContext) -> list[Case]:
    cfg = ctx.model
    h, i_dense, i_moe, e = cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    prefill = ctx.tokens[0]
    out = [_ptgq_case(m, h, False, False, headline=m == prefill) for m in ctx.tokens]
    out += [_ptgq_case(prefill, h, ue8m0, cm, headline=ue8m0 and cm)
            for ue8m0, cm in ((False, True), (True, False), (True, True))]
    out += [
        _pbq_case("moe gate_up", (e, 2 * i_moe, h), headline=True),
        _pbq_case("moe gate_up", (e, 2 * i_moe, h), ue8m0=True),
        _pbq_case("moe down", (e, h, i_moe)),
        _pbq_case("dense gate_up", (2 * i_dense, h)),
        _dequant_case("activations", (prefill, h), (1, GROUP)),
        _dequant_case("moe gate_up", (e, 2 * i_moe, h), (GROUP, GROUP)),
        _shard_case(cfg),
    ]
    return out
