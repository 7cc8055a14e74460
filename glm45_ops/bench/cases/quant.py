"""Benchmark cases for the FP8 quant family (``glm45_ops.quant``), at the preset's shapes.

* ``per_token_group_quant_fp8``: activations ``[M, H]`` bf16 for every ``M`` in ``ctx.tokens``;
  at the prefill ``M`` also column-major scales, UE8M0 scales, and both (DeepGEMM's layout).
* ``per_block_quant_fp8``: one MoE layer's experts ``[E, 2I, H]`` (gate_up) and ``[E, H, I]``
  (down), and the dense MLP's fused gate_up ``[2 * intermediate, H]``; UE8M0 on gate_up.
* ``dequant_fp8``: 1x128 activations and 128x128 expert weights.
* ``requant_fp8_weights``: every quantized weight of one TP8 rank (see :func:`tp8_shard_shapes`).

All are memory-bound (a few FLOPs per element): the ceiling is copy bandwidth. Every backend
must match the torch reference bit for bit.
"""

from __future__ import annotations

import functools
from math import prod
from typing import Callable

import torch

from glm45_ops import quant
from glm45_ops.bench.case import BenchContext, Case, Skip, bit_exact, compile_peer, op_runner, randn, require, smoke
from glm45_ops.config import ModelConfig
from glm45_ops.reference import quant as ref

FAMILY = "quant"
GROUP = 128
EPS = 1e-4
ACT_DTYPE = torch.bfloat16
_PEERS_PTGQ = ("torch.compile", "vllm", "sgl_kernel", "deep_gemm")
_PEERS_PBQ = ("torch.compile", "deep_gemm")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _peers(peers: tuple[str, ...], headline: bool) -> tuple[str, ...]:
    # torch.compile costs an inductor compile per case (seconds): only headline cases get it
    return peers if headline else tuple(p for p in peers if p != "torch.compile")


def _fmt(shape, dtype=ACT_DTYPE) -> str:
    return f"[{', '.join(map(str, shape))}] {str(dtype).removeprefix('torch.')}"


# ---------------------------------------------------------------------------------------------
# Peers: other libraries' implementations of the same computation, found when importable.
# Each returns a runner or raises Skip.
# ---------------------------------------------------------------------------------------------

def _ptgq_peer(peer: str, x: torch.Tensor, ue8m0: bool, column_major: bool) -> Callable:
    if x.device.type != "cuda" and peer != "torch.compile":
        raise Skip(f"{peer} runs on GPU only")
    if peer == "torch.compile":
        fn = compile_peer(functools.partial(ref.per_token_group_quant_fp8_ref, group_size=GROUP, eps=EPS,
                                         scale_ue8m0=ue8m0), x.device)
        return smoke(peer, lambda: fn(x))
    if peer == "vllm":
        try:
            from vllm.model_executor.layers.quantization.utils.fp8_utils import per_token_group_quant_fp8
        except Exception as e:
            raise Skip(f"vllm not importable ({type(e).__name__})") from None
        return smoke(peer, lambda: per_token_group_quant_fp8(
            x, GROUP, eps=EPS, column_major_scales=column_major, use_ue8m0=ue8m0))
    if peer == "sgl_kernel":
        try:
            from sgl_kernel import sgl_per_token_group_quant_fp8
        except Exception as e:
            raise Skip(f"sgl_kernel not importable ({type(e).__name__})") from None
        x_q, scale = quant._alloc_ptgq(x, GROUP, column_major)

        def run():
            sgl_per_token_group_quant_fp8(x, x_q, scale, GROUP, EPS, -quant.E4M3_MAX, quant.E4M3_MAX, ue8m0)
            return x_q, scale

        return smoke(peer, run)
    if peer == "deep_gemm":
        try:
            from deep_gemm.utils import per_token_cast_to_fp8
        except Exception as e:
            raise Skip(f"deep_gemm (source install) not importable ({type(e).__name__})") from None
        return smoke(peer, lambda: per_token_cast_to_fp8(x, use_ue8m0=ue8m0))
    raise Skip(f"unknown peer {peer!r}")


def _pbq_peer(peer: str, w: torch.Tensor, ue8m0: bool) -> Callable:
    if peer == "torch.compile":
        fn = compile_peer(functools.partial(ref.per_block_quant_fp8_ref, block_size=GROUP, eps=EPS,
                                         scale_ue8m0=ue8m0), w.device)
        return smoke(peer, lambda: fn(w))
    if peer == "deep_gemm":
        if w.device.type != "cuda" or w.dim() != 2:
            raise Skip("deep_gemm's per_block_cast_to_fp8 takes one 2-D weight on GPU")
        try:
            from deep_gemm.utils import per_block_cast_to_fp8
        except Exception as e:
            raise Skip(f"deep_gemm (source install) not importable ({type(e).__name__})") from None
        return smoke(peer, lambda: per_block_cast_to_fp8(w, use_ue8m0=ue8m0))
    raise Skip(f"unknown peer {peer!r}")


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def _ptgq_case(m: int, k: int, ue8m0: bool, column_major: bool, headline: bool = False) -> Case:
    def make(backend: str, device: torch.device, gen: torch.Generator):
        x = randn((m, k), ACT_DTYPE, device, gen)
        if backend in _PEERS_PTGQ:
            return _ptgq_peer(backend, x, ue8m0, column_major)
        return op_runner(quant.per_token_group_quant_fp8, backend, device, x, GROUP, EPS, ue8m0, column_major)

    variant = "".join((" col-major" if column_major else "", " ue8m0" if ue8m0 else ""))
    return Case(
        family=FAMILY,
        name=f"per_token_group_quant_fp8 M={m}{variant}",
        shape=_fmt((m, k)),
        make=make,
        bytes_moved=m * k * (ACT_DTYPE.itemsize + 1) + 4 * m * (k // GROUP),
        peers=_peers(_PEERS_PTGQ, headline),
        compare=bit_exact,
        params={"M": m, "K": k, "group_size": GROUP, "scale_ue8m0": ue8m0, "column_major_scales": column_major},
    )


def _pbq_case(label: str, shape: tuple[int, ...], ue8m0: bool = False, headline: bool = False) -> Case:
    n, k = shape[-2:]
    n_scales = prod(shape[:-2]) * _cdiv(n, GROUP) * _cdiv(k, GROUP)

    def make(backend: str, device: torch.device, gen: torch.Generator):
        w = randn(shape, ACT_DTYPE, device, gen, std=0.02)
        if backend in _PEERS_PBQ:
            return _pbq_peer(backend, w, ue8m0)
        return op_runner(quant.per_block_quant_fp8, backend, device, w, GROUP, EPS, ue8m0)

    return Case(
        family=FAMILY,
        name=f"per_block_quant_fp8 {label}{' ue8m0' if ue8m0 else ''}",
        shape=_fmt(shape),
        make=make,
        bytes_moved=prod(shape) * (ACT_DTYPE.itemsize + 1) + 4 * n_scales,
        peers=_peers(_PEERS_PBQ, headline),
        compare=bit_exact,
        params={"shape": list(shape), "block_size": GROUP, "scale_ue8m0": ue8m0},
    )


def _dequant_case(label: str, shape: tuple[int, ...], block: tuple[int, int]) -> Case:
    bm, bn = block
    scale_shape = (*shape[:-2], _cdiv(shape[-2], bm), _cdiv(shape[-1], bn))

    def make(backend: str, device: torch.device, gen: torch.Generator):
        x_q = randn(shape, torch.float32, device, gen, std=64.0).clamp(-448, 448).to(quant.FP8_DTYPE)
        scale = torch.rand(scale_shape, generator=gen, device=device) * 1e-2 + 1e-4
        return op_runner(quant.dequant_fp8, backend, device, x_q, scale, bm, bn, ACT_DTYPE)

    return Case(
        family=FAMILY,
        name=f"dequant_fp8 {label} {bm}x{bn}",
        shape=_fmt(shape, quant.FP8_DTYPE),
        make=make,
        bytes_moved=prod(shape) * (1 + ACT_DTYPE.itemsize) + 4 * prod(scale_shape),
        compare=bit_exact,
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
    scales = sum(prod(s[:-2]) * _cdiv(s[-2], GROUP) * _cdiv(s[-1], GROUP) * c for _, s, c in shapes)

    def make(backend: str, device: torch.device, gen: torch.Generator):
        # One bf16 tensor per distinct weight, reused by every layer: a real shard is
        # ~88 GB of bf16 (GLM-4.5), too much next to its 44 GB of FP8 output. Each expert
        # tensor is far larger than L2, so reuse does not flatter the timing.
        require(quant.per_block_quant_fp8, backend, device)
        distinct = [randn(s, ACT_DTYPE, device, gen, std=0.02) for _, s, _ in shapes]
        weights = [w for w, (_, _, c) in zip(distinct, shapes) for _ in range(c)]
        return lambda: quant.requant_fp8_weights(weights, GROUP, EPS, backend=backend)

    return Case(
        family=FAMILY,
        name=f"requant_fp8_weights {cfg.name} TP8 shard",
        shape=f"{sum(c for *_, c in shapes)} weights, {elems / 1e6:,.1f}M params bf16",
        make=make,
        bytes_moved=elems * (ACT_DTYPE.itemsize + 1) + 4 * scales,
        compare=bit_exact,
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
