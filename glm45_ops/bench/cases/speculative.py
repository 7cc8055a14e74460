"""Benchmark cases for MTP speculative verification (``glm45_ops.speculative``), at decode batch
B = 64 with S = 3 drafted tokens per request and the preset's vocabulary (GLM-4.5: 151552).

* ``verify_sampling``: fp32 draft and target probabilities (the issue's target: >= 80% of HBM
  bandwidth and faster than FlashInfer's ``chain_speculative_sampling``, the peer when
  importable); and the one-hot ("target only") variant without draft probabilities.
* ``verify_greedy``: bf16 target logits with the argmax fused. The drafts equal the target's
  argmax, so every request accepts all S drafts: the worst case for an implementation that stops
  at the first mismatch (ours reads every row regardless).

``bytes_moved`` is, as the issue defines it, one read of every probability (or logit) tensor.
The sampling kernels read less: only the draft and target rows at each request's first rejection
(plus one 8192-id tile again), so their GB/s is an *effective* rate that can exceed the HBM
ceiling; the greedy kernels read every row, so theirs is real. Uniforms are passed in, so every
backend is deterministic and must match the torch reference by the op's own rule (bit for bit);
FlashInfer draws its own random numbers, so a difference from it is information, not a failure.
"""

from __future__ import annotations

import torch

from glm45_ops import speculative
from glm45_ops.bench.case import BenchContext, Case, compile_peer, gpu_only, op_runner, peer_import, smoke
from glm45_ops.reference import speculative as ref

FAMILY = "speculative"
S = 3
BATCH_GPU, BATCH_CPU = 64, 8


def _distributions(b: int, v: int, with_draft: bool):
    """Inputs of verify_sampling in its order: drafts sampled from the draft, target
    [B, S+1, V] fp32 probabilities, the uniforms, and draft [B, S, V] fp32 probabilities that
    overlap the target as a decent draft model's do (shared logits plus noise), or None for the
    one-hot variant."""
    def inputs(device: torch.device, gen: torch.Generator):
        shared = torch.randn((b, S + 1, v), generator=gen, device=device) * 2.0
        target = torch.softmax(shared, dim=-1)
        noise = torch.randn((b, S, v), generator=gen, device=device) * 0.5
        draft = torch.softmax(shared[:, :S] + noise, dim=-1)
        ids = torch.multinomial(draft.reshape(-1, v), 1, generator=gen).reshape(b, S)
        uniform = torch.rand((b, S + 1), generator=gen, device=device)
        return ids, target, uniform, (draft if with_draft else None)

    return inputs


def _flashinfer(device, gen, ids, target, uniform, draft):
    """FlashInfer draws its own uniforms: its tokens differ from ours, by design."""
    gpu_only("flashinfer", device)
    fn = peer_import("flashinfer", "flashinfer.sampling", "chain_speculative_sampling")
    ids32 = ids.to(torch.int32)
    return smoke("flashinfer", lambda: fn(draft, ids32, target))


def _compiled(reference):
    def factory(device, gen, *inputs):
        fn = compile_peer(reference, device)
        return smoke("torch.compile", lambda: fn(*inputs))

    return factory


def _sampling_case(b: int, v: int, with_draft: bool) -> Case:
    peers = {"torch.compile": _compiled(ref.verify_sampling_ref)}
    if with_draft:  # chain_speculative_sampling takes draft probabilities
        peers["flashinfer"] = _flashinfer
    prob_tensors = (S + 1) + (S if with_draft else 0)
    return Case(
        family=FAMILY,
        name=f"verify_sampling B={b} S={S}" + ("" if with_draft else " one-hot draft"),
        shape=f"[{b}, {S + 1}, {v}] fp32" + (f" + [{b}, {S}, {v}] fp32" if with_draft else ""),
        inputs=_distributions(b, v, with_draft),
        run=lambda backend, device, *inputs: op_runner(speculative.verify_sampling, backend, device, *inputs),
        bytes_moved=b * v * 4 * prob_tensors + b * (S * 8 + (S + 1) * 4 + (S + 1) * 4 + 4),
        peers=peers,
        notes="bytes: one read of the probability tensors; the kernels read only the rows they draw from",
        params={"B": b, "S": S, "V": v, "draft_probs": with_draft},
    )


def _greedy_case(b: int, v: int) -> Case:
    dtype = torch.bfloat16

    def inputs(device: torch.device, gen: torch.Generator):
        logits = torch.randn((b, S + 1, v), generator=gen, device=device).to(dtype)
        ids = logits[:, :S].argmax(dim=-1)  # every draft accepted: all S+1 rows matter
        return ids, logits

    return Case(
        family=FAMILY,
        name=f"verify_greedy B={b} S={S}",
        shape=f"[{b}, {S + 1}, {v}] bf16",
        inputs=inputs,
        run=lambda backend, device, ids, logits: op_runner(speculative.verify_greedy, backend, device, ids, logits),
        bytes_moved=b * (S + 1) * v * dtype.itemsize + b * (S * 8 + (S + 1) * 4 + 4),
        peers={"torch.compile": _compiled(ref.verify_greedy_ref)},
        params={"B": b, "S": S, "V": v, "dtype": "bf16"},
    )


def cases(ctx: BenchContext) -> list[Case]:
    b = BATCH_GPU if ctx.on_gpu else BATCH_CPU
    v = ctx.model.vocab_size
    return [_sampling_case(b, v, True), _sampling_case(b, v, False), _greedy_case(b, v)]
