"""Benchmark cases for the MoE family (``glm45_ops.moe``), at the preset's shapes.

* ``moe_route``: bf16 router logits ``[T, E]`` for every ``T`` in ``ctx.tokens``, with the fp32
  correction bias and the preset's top-k, grouping and scaling factor (GLM-4.5: E = 160, top-8,
  factor 2.5; the issue's targets are <= 3 us for T <= 64 and <= 10 us at T = 4096). Memory-bound:
  ``bytes_moved`` is the logits and the bias read once and the fp32 weights and int32 ids
  written once. Every backend must match the torch reference bit for bit. Peer: ``torch.compile``
  of the reference at the prefill T.
"""

from __future__ import annotations

import functools

import torch

from glm45_ops import moe
from glm45_ops.bench.case import BenchContext, Case, compile_peer, op_runner, randn, smoke
from glm45_ops.config import ModelConfig
from glm45_ops.reference import moe_routing as ref

FAMILY = "moe"
LOGITS_DTYPE = torch.bfloat16


def _route_args(cfg: ModelConfig) -> tuple:
    """moe_route's arguments after the tensors, from the preset."""
    return (cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)


def _route_compiled(device, gen, logits, bias, *, cfg: ModelConfig):
    k, n_group, topk_group, renorm, factor = _route_args(cfg)
    fn = compile_peer(functools.partial(ref.moe_route_ref, top_k=k, n_group=n_group, topk_group=topk_group,
                                        renormalize=renorm, routed_scaling_factor=factor), device)
    return smoke("torch.compile", lambda: fn(logits, bias))


def _route_case(cfg: ModelConfig, t: int, headline: bool) -> Case:
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok

    def inputs(device: torch.device, gen: torch.Generator):
        return randn((t, e), LOGITS_DTYPE, device, gen, std=2.0), randn((e,), torch.float32, device, gen, std=0.1)

    return Case(
        family=FAMILY,
        name=f"moe_route T={t}",
        shape=f"[{t}, {e}] {str(LOGITS_DTYPE).removeprefix('torch.')}, top-{k}",
        inputs=inputs,
        run=lambda backend, device, logits, bias: op_runner(moe.moe_route, backend, device, logits, bias,
                                                            *_route_args(cfg)),
        bytes_moved=t * e * LOGITS_DTYPE.itemsize + 4 * e + t * k * (4 + 4),
        peers={"torch.compile": functools.partial(_route_compiled, cfg=cfg)} if headline else {},
        params={"T": t, "E": e, "top_k": k, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
                "routed_scaling_factor": cfg.routed_scaling_factor},
    )


def cases(ctx: BenchContext) -> list[Case]:
    return [_route_case(ctx.model, t, headline=i == 0) for i, t in enumerate(ctx.tokens)]
