"""Benchmark cases for the RL rollout family (``glm45_ops.rollout``), at the preset's vocabulary
(GLM-4.5: V = 151552) and hidden size (H = 5120).

* ``token_logprobs``: bf16 logits ``[T, V]`` for every ``T`` in ``ctx.tokens`` (the issue's
  target: >= 85% of HBM bandwidth at T = 16384, one read of the logits); per-row temperatures
  at the prefill T. Memory-bound: ``bytes_moved`` is one read of the logits, the ids and the
  temperatures, and the two fp32 outputs.
* ``linear_logprobs`` forward (target: >= 70% of the bf16 matmul ceiling at T = 16384) and
  forward + backward (target: backward within 2.5x the forward), bf16 ``hidden [T, H]`` and LM
  head ``weight [V, H]``, at the two largest token counts. FLOPs are the model's: ``2 T V H``
  forward, ``4 T V H`` more for the two backward GEMMs; the backward's recompute of the logits
  (``2 T V H``, what keeps memory at ``O(T * chunk)``) is not counted, so fwd+bwd TFLOP/s is
  comparable with an implementation that stores the logits.

* ``fp8_rollout_mismatch``: the issue's demo as a case. A random-weight model (the ``tiny``
  preset on a CPU; on a GPU the preset's real sizes with two layers, one dense and one MoE) scores
  the same sequences as the BF16 trainer (peer "bf16 trainer") and as its FP8 requantized rollout
  copy (ours, per backend) through ``model.score`` (``linear_logprobs``); the case's report is
  ``importance_weights``' mismatch metrics between the two (k1/k3 KL, perplexity ratio, clipped
  fraction, max ratio), printed and kept in the JSON. FLOPs are the active parameters' (``2``
  per token each) plus causal attention's.

Peers (GPU only): the unfused torch math (``log_softmax`` + ``gather`` on materialised fp32
logits, ``[T, V]`` and more) and its ``torch.compile``; Liger's ``LigerFusedLinearCrossEntropyLoss``
and Apple's Cut Cross-Entropy (``reduction="none"``: per-token ``-logprob``, no entropy, no
temperature) when importable. Every backend must agree with the torch reference by the ops' own
rule; peers compute less (no entropy), so a refcheck difference there is information.
"""

from __future__ import annotations

import torch

import glm45_ops
from glm45_ops import rollout
from glm45_ops.bench.case import (BenchContext, Case, compile_peer, gpu_only, op_runner, peer_import, randn, require,
                                  smoke)
from glm45_ops.rollout.linear import compare_grads

FAMILY = "rollout"
DTYPE = torch.bfloat16
TEMPERATURE = 1.0  # the rollout temperature RL recipes (slime, verl) sample at
ENTROPY_COEF = 0.01  # fwd+bwd loss: sum(coef * logprobs) + 0.01 * sum(entropy), an entropy bonus


def _fmt(shape, dtype=DTYPE) -> str:
    return f"[{', '.join(map(str, shape))}] {str(dtype).removeprefix('torch.')}"


def _unfused(logits: torch.Tensor, ids: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch everyone writes: fp32 log_softmax over materialised logits, gather, entropy."""
    logp = (logits.float() / t).log_softmax(dim=-1)
    return logp.gather(1, ids[:, None])[:, 0], -(logp.exp() * logp).sum(dim=-1)


def _unfused_linear(hidden, weight, ids, t):
    return _unfused(hidden @ weight.t(), ids, t)


# ---------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------

def _token_peers(per_row: bool) -> dict:
    def eager(device, gen, logits, ids, t):
        gpu_only("torch (unfused)", device)  # on the CPU it times the same thing as our torch backend
        return smoke("torch.unfused", lambda: _unfused(logits, ids, t[:, None] if per_row else t))

    def compiled(device, gen, logits, ids, t):
        fn = compile_peer(_unfused, device)
        return smoke("torch.compile", lambda: fn(logits, ids, t[:, None] if per_row else t))

    return {"torch.unfused": eager, "torch.compile": compiled}


def _token_case(t_rows: int, v: int, per_row: bool = False) -> Case:
    def inputs(device: torch.device, gen: torch.Generator):
        logits = randn((t_rows, v), DTYPE, device, gen, std=2.0)
        ids = torch.randint(0, v, (t_rows,), generator=gen, device=device)
        t = torch.rand(t_rows, generator=gen, device=device) + 0.5 if per_row else TEMPERATURE
        return logits, ids, t

    return Case(
        family=FAMILY,
        name=f"token_logprobs T={t_rows}" + (" per-row temperature" if per_row else ""),
        shape=_fmt((t_rows, v)),
        inputs=inputs,
        run=lambda backend, device, logits, ids, t: op_runner(rollout.token_logprobs, backend, device, logits, ids,
                                                              **({"temperatures": t} if per_row else {"temperature": t})),
        bytes_moved=t_rows * (v * DTYPE.itemsize + 8 + 8 + (4 if per_row else 0)),
        peers=_token_peers(per_row),
        params={"T": t_rows, "V": v, "dtype": "bf16", "per_row_temperature": per_row},
    )


# ---------------------------------------------------------------------------------------------
# linear_logprobs
# ---------------------------------------------------------------------------------------------

def _linear_inputs(t_rows: int, v: int, h: int, grad: bool):
    def inputs(device: torch.device, gen: torch.Generator):
        hidden = randn((t_rows, h), DTYPE, device, gen)
        weight = randn((v, h), DTYPE, device, gen, std=h ** -0.5)  # logits of O(1), as an LM head's
        ids = torch.randint(0, v, (t_rows,), generator=gen, device=device)
        coef = torch.randn(t_rows, generator=gen, device=device)  # per-token policy-gradient weights
        if grad:
            return hidden.requires_grad_(), weight.requires_grad_(), ids, coef
        return hidden, weight, ids

    return inputs


def _liger(device, gen, hidden, weight, ids, *coef):
    gpu_only("liger_kernel", device)
    loss_cls = peer_import("liger_kernel", "liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
    loss = loss_cls(reduction="none")  # per-token cross-entropy = -logprob (no entropy, t = 1)
    if coef:
        return smoke("liger", lambda: torch.autograd.grad((coef[0] * -loss(weight, hidden, ids)).sum(), (hidden, weight)))
    return smoke("liger", lambda: loss(weight, hidden, ids))


def _cce(device, gen, hidden, weight, ids, *coef):
    gpu_only("cut_cross_entropy", device)
    fn = peer_import("cut_cross_entropy", "cut_cross_entropy", "linear_cross_entropy")
    if coef:
        return smoke("cut_cross_entropy", lambda: torch.autograd.grad(
            (coef[0] * -fn(hidden, weight, ids, reduction="none")).sum(), (hidden, weight)))
    return smoke("cut_cross_entropy", lambda: fn(hidden, weight, ids, reduction="none"))


def _loss(logprobs, entropy, coef):
    return (coef * logprobs).sum() + ENTROPY_COEF * entropy.sum()


def _linear_peers(grad: bool) -> dict:
    def eager(device, gen, hidden, weight, ids, *coef):
        gpu_only("torch (unfused)", device)
        if grad:
            return smoke("torch.unfused", lambda: torch.autograd.grad(
                _loss(*_unfused_linear(hidden, weight, ids, TEMPERATURE), coef[0]), (hidden, weight)))
        return smoke("torch.unfused", lambda: _unfused_linear(hidden, weight, ids, TEMPERATURE))

    def compiled(device, gen, hidden, weight, ids, *coef):
        if grad:
            fn = compile_peer(lambda h, w, i, c: _loss(*_unfused_linear(h, w, i, TEMPERATURE), c), device)
            return smoke("torch.compile", lambda: torch.autograd.grad(fn(hidden, weight, ids, coef[0]), (hidden, weight)))
        fn = compile_peer(lambda h, w, i: _unfused_linear(h, w, i, TEMPERATURE), device)
        return smoke("torch.compile", lambda: fn(hidden, weight, ids))

    return {"torch.unfused": eager, "torch.compile": compiled, "liger": _liger, "cut_cross_entropy": _cce}


def _fwd_bwd_run(backend: str, device: torch.device, hidden, weight, ids, coef):
    require(rollout.linear_logprobs, backend, device)

    def run():
        with glm45_ops.use_backend(backend):  # the backward op runs on the default backend
            lp, ent = rollout.linear_logprobs(hidden, weight, ids, TEMPERATURE, backend=backend)
            return torch.autograd.grad(_loss(lp, ent, coef), (hidden, weight))

    return run


def _linear_case(t_rows: int, v: int, h: int, grad: bool) -> Case:
    if grad:
        run = _fwd_bwd_run
    else:
        def run(backend, device, hidden, weight, ids):
            return op_runner(rollout.linear_logprobs, backend, device, hidden, weight, ids, TEMPERATURE)
    return Case(
        family=FAMILY,
        name=f"linear_logprobs {'fwd+bwd' if grad else 'fwd'} T={t_rows}",
        shape=f"{_fmt((t_rows, h))} x {_fmt((v, h))}",
        inputs=_linear_inputs(t_rows, v, h, grad),
        run=run,
        bytes_moved=(t_rows + v) * h * DTYPE.itemsize * (2 if grad else 1) + t_rows * (8 + 12),
        flops=(6 if grad else 2) * t_rows * v * h,
        roofline="compute:bf16",
        backends=("torch", "triton"),
        peers=_linear_peers(grad),
        compare=(lambda out, ref: compare_grads(out, ref, DTYPE)) if grad else None,
        notes="fwd+bwd FLOPs leave out the backward's recompute of the logits" if grad else "",
        params={"T": t_rows, "V": v, "H": h, "dtype": "bf16", "backward": grad},
    )


# ---------------------------------------------------------------------------------------------
# fp8_rollout_mismatch
# ---------------------------------------------------------------------------------------------

def _mismatch_case(ctx: BenchContext) -> Case:
    import copy
    import dataclasses

    from glm45_ops.model import Glm45Config, Glm45ForCausalLM
    from glm45_ops.testing import calc_diff

    if ctx.on_gpu:
        cfg = Glm45Config(**{**dataclasses.asdict(ctx.model), "num_hidden_layers": 2, "first_k_dense_replace": 1,
                             "num_nextn_predict_layers": 0})
        b, s = 4, 512
    else:
        cfg, b, s = Glm45Config.preset("tiny"), 2, 16

    def inputs(device: torch.device, gen: torch.Generator):
        torch.manual_seed(0)  # the model's weights: the same for every backend
        model = Glm45ForCausalLM(cfg, dtype=DTYPE, device=device)
        ids = torch.randint(0, cfg.vocab_size, (b, s), generator=gen, device=device)
        return model, copy.deepcopy(model).quantize_fp8_(), ids, torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)

    def run(backend, device, model, fp8, ids, labels):
        require(rollout.linear_logprobs, backend, device)  # score's op: a skip, not an error (no CUDA kernel)
        fp8.backend = backend
        fp8(ids[:, :1])  # a forced backend that cannot run the model's other ops raises here, before timing
        return lambda: fp8.score(ids, labels)

    def bf16_trainer(device, gen, model, fp8, ids, labels):
        return lambda: model.score(ids, labels)

    def report(device, gen):
        model, _, ids, _ = inputs(device, gen)
        _, metrics = rollout.fp8_rollout_mismatch(model, ids, TEMPERATURE)
        return {k: float(v) for k, v in metrics.items()}

    def compare(got, want):  # FP8 GEMM backends differ in accumulation order
        diff = calc_diff(got[:, :-1], want[:, :-1])
        return None if diff < 1e-4 else f"calc_diff {diff:.2e} >= 1e-4"

    h, i, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok + cfg.n_shared_experts
    attn = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h
    dense, moe = 3 * h * cfg.intermediate_size, 3 * h * i
    active = cfg.num_hidden_layers * attn + dense + (cfg.num_hidden_layers - 1) * k * moe + cfg.vocab_size * h
    stored = cfg.num_hidden_layers * attn + dense + (cfg.num_hidden_layers - 1) * (cfg.n_routed_experts + 1) * moe
    t = b * s
    return Case(
        family=FAMILY,
        name=f"fp8_rollout_mismatch {cfg.name} layers={cfg.num_hidden_layers}",
        shape=f"ids [{b}, {s}], H={h}, V={cfg.vocab_size}, fp8 blocks",
        inputs=inputs,
        run=run,
        bytes_moved=stored + 2 * cfg.vocab_size * h,  # e4m3 weights once, the bf16 LM head
        flops=2 * t * active + 2 * b * s * s * cfg.num_attention_heads * cfg.head_dim,
        roofline="compute:fp8" if ctx.on_gpu else "memory",
        peers={"bf16 trainer": bf16_trainer},
        compare=compare,
        report=report,
        params={"B": b, "S": s, "layers": cfg.num_hidden_layers, "temperature": TEMPERATURE},
    )


def cases(ctx: BenchContext) -> list[Case]:
    v, h = ctx.model.vocab_size, ctx.model.hidden_size
    prefill = ctx.tokens[0]
    out = [_token_case(t, v) for t in ctx.tokens]
    out.append(_token_case(prefill, v, per_row=True))
    for t in ctx.tokens[:2]:
        out += [_linear_case(t, v, h, grad=False), _linear_case(t, v, h, grad=True)]
    out.append(_mismatch_case(ctx))
    return out

