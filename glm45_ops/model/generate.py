"""Generation with the reference model: plain or MTP-speculative, greedy or sampled.

Speculative decoding with GLM-4.5's single MTP layer (``speculative="mtp"``, ``S =
num_draft_tokens`` in 1..4), per round and per sequence:

1. Drafts: the MTP layer drafts ``d1`` from the last accepted position; for ``S > 1`` it runs
   again on its own output (its ``shared_head.norm``-ed hidden state stands in for the main
   model's, which does not exist yet for a draft), applying ``shared_head.norm`` and the LM head
   at **every** step: skipping the norm after the first step collapses acceptance, as vLLM
   found for GLM-5.
2. Verification: the main model runs ``[t, d1..dS]`` (``t`` the last emitted token) in one paged
   step; :func:`glm45_ops.speculative.verify_greedy` (temperature 0) or ``verify_sampling``
   (the drafts' own distributions as ``draft_probs``) accepts a prefix and emits one more token.
3. The MTP cache catches up on the verified positions, with the main model's hidden states.

Rejected drafts' K/V stay in the caches past each sequence's length, where nothing attends to
them, and are overwritten next round; sequences advance by different amounts with no host sync
inside a round (one host read per round decides whether every sequence has enough tokens).
Greedy speculative output is identical to plain greedy output: verification emits the target's
argmax at every position it checks.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from glm45_ops.speculative import probs_from_logits, verify_greedy, verify_sampling

__all__ = ["generate", "main"]


class _Graphed:
    """``fn(*inputs)`` captured once in a CUDA graph and replayed: the inputs are copied into static
    buffers, the outputs are static buffers (valid until the next call). Capturing is itself the
    check that every op ``fn`` runs is free of host syncs."""

    def __init__(self, fn, *examples: torch.Tensor):
        self.inputs = [e.clone() for e in examples]
        side = torch.cuda.Stream(examples[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles kernels, cuBLAS workspaces, outside the graph
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor):
        for buf, a in zip(self.inputs, args):
            buf.copy_(a)
        self.graph.replay()
        return self.outputs


class _Steps:
    """The decode-time model calls of one generation, plain or replayed from CUDA graphs captured
    before the prefill (their warm-up writes into the caches, which the prefill then overwrites:
    nothing reads a position before the step that writes it)."""

    def __init__(self, model, cache, b: int, s: int, graphs: bool):
        self.model = model
        self.decode = self._make(graphs, lambda ids, st: model.extend(ids, cache, st), (b, 1))
        if s:
            h = model.config.hidden_size
            self.verify = self._make(graphs, lambda ids, st: model.extend(ids, cache, st), (b, s + 1))
            self.mtp = self._make(graphs, lambda ids, hid, st: model.mtp_extend(ids, hid, cache, st), (b, s + 1), h)
            self.draft = self._make(graphs, lambda ids, hid, st: model.mtp_extend(ids, hid, cache, st), (b, 1), h)

    def _make(self, graphs: bool, fn, ids_shape, hidden: int | None = None):
        if not graphs:
            return fn
        dev = self.model.device
        examples = [torch.zeros(ids_shape, dtype=torch.long, device=dev)]
        if hidden is not None:
            examples.append(torch.zeros(*ids_shape, hidden, dtype=self.model.embed_tokens.weight.dtype, device=dev))
        examples.append(torch.zeros(ids_shape[0], dtype=torch.int32, device=dev))
        return _Graphed(fn, *examples)


def _sample(logits: torch.Tensor, temperature: float, top_k, top_p, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens ``[...]`` from logits ``[..., V]`` (argmax at temperature 0), and the distributions
    they were drawn from (None when greedy)."""
    if temperature <= 0:
        return logits.argmax(-1), None
    probs = probs_from_logits(logits, temperature, top_k or 0, 1.0 if top_p is None else top_p)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1]), probs


def _check(model, input_ids, max_new_tokens, temperature, top_k, top_p, speculative, num_draft_tokens,
           cuda_graph) -> None:
    if cuda_graph and model.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {model.device}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature != temperature or temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be None or >= 0, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")
    if speculative not in (None, "mtp"):
        raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
    if speculative == "mtp":
        if model.mtp is None:
            raise ValueError("speculative='mtp' needs a model with an MTP layer (num_nextn_predict_layers = 1)")
        if not isinstance(num_draft_tokens, int) or not 1 <= num_draft_tokens <= 4:
            raise ValueError(f"num_draft_tokens must be an int in 1..4, got {num_draft_tokens!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [B, S] with S >= 1, got shape {tuple(input_ids.shape)}")
    longest = input_ids.shape[1] + max_new_tokens + (num_draft_tokens + 1 if speculative else 1)
    if longest > model.config.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens (+ drafts) = {longest} exceeds max_position_embeddings = "
                         f"{model.config.max_position_embeddings}")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, speculative: str | None = None,
             num_draft_tokens: int = 1, generator: torch.Generator | None = None, return_stats: bool = False,
             cuda_graph: bool = False):
    """New token ids ``[B, max_new_tokens]`` (int64) after the prompts ``input_ids`` ``[B, S]``.

    ``temperature`` 0 is greedy; otherwise tokens are sampled from ``probs_from_logits(logits,
    temperature, top_k, top_p)`` with ``generator`` (on the model's device). ``speculative="mtp"``
    drafts ``num_draft_tokens`` (1..4) tokens per round with the MTP layer (module docstring).
    Every sequence generates exactly ``max_new_tokens`` (no stopping at EOS). ``return_stats``
    also returns a dict: ``drafted`` and ``accepted`` draft counts, ``acceptance_rate``,
    ``accepted_per_position`` (``[S]``: how often draft ``i`` was accepted), ``rounds`` and
    ``tokens_per_round`` (emitted tokens per sequence per verification). ``cuda_graph`` replays
    every decode-time step (decode, verification, the MTP steps) from CUDA graphs captured once
    per call; the tokens are the same as without.
    """
    input_ids = model._ids(input_ids)
    _check(model, input_ids, max_new_tokens, temperature, top_k, top_p, speculative, num_draft_tokens, cuda_graph)
    b, p = input_ids.shape
    dev = input_ids.device
    s = num_draft_tokens if speculative else 0
    cache = model.new_cache(b, p + max_new_tokens + s + 1)
    start = torch.zeros(b, dtype=torch.int32, device=dev)
    out = torch.full((b, max_new_tokens + s + 1), -1, dtype=torch.long, device=dev)
    stats = {"drafted": 0, "accepted": 0, "rounds": 0, "accepted_per_position": torch.zeros(s, dtype=torch.long)}
    if max_new_tokens == 0:
        return (out[:, :0], stats) if return_stats else out[:, :0]

    steps = _Steps(model, cache, b, s, cuda_graph)
    logits, hidden = model.extend(input_ids, cache, start)
    tok, _ = _sample(logits[:, -1], temperature, top_k, top_p, generator)
    start += p
    out[:, 0] = tok
    if not speculative:
        for i in range(1, max_new_tokens):
            logits, _ = steps.decode(tok[:, None], start)
            start += 1
            tok, _ = _sample(logits[:, -1], temperature, top_k, top_p, generator)
            out[:, i] = tok
        return (out[:, :max_new_tokens], stats) if return_stats else out[:, :max_new_tokens]

    # The MTP layer over the prompt: position i consumes token i+1 (the last one is `tok`) and
    # hidden state i.
    mtp_logits, mtp_hidden = model.mtp_extend(torch.cat((input_ids[:, 1:], tok[:, None]), 1), hidden, cache,
                                              torch.zeros_like(start))
    last_logits, last_hidden = mtp_logits[:, -1], mtp_hidden[:, -1]
    n_out = torch.ones(b, dtype=torch.long, device=dev)
    per_position = torch.zeros(s, dtype=torch.long, device=dev)
    cols = torch.arange(s + 1, device=dev)
    while int(n_out.min()) < max_new_tokens:
        drafts, draft_probs = _draft(steps.draft, start, last_logits, last_hidden, s, temperature, top_k, top_p,
                                     generator)
        verify_in = torch.cat((tok[:, None], drafts), 1)
        logits, hidden = steps.verify(verify_in, start)
        if temperature <= 0:
            emitted, accepted = verify_greedy(drafts, logits, backend=model.backend)
        else:
            target = probs_from_logits(logits, temperature, top_k or 0, 1.0 if top_p is None else top_p)
            emitted, accepted = verify_sampling(drafts, target, draft_probs=draft_probs.to(target.dtype),
                                                generator=generator, backend=model.backend)
        emitted, accepted = emitted.long(), accepted.long()
        keep = cols[None, :] <= accepted[:, None]
        dest = torch.where(keep, n_out[:, None] + cols[None, :], out.shape[1] - 1).clamp(max=out.shape[1] - 1)
        out.scatter_(1, dest, torch.where(keep, emitted, out.gather(1, dest)))
        n_out += accepted + 1
        tok = emitted.gather(1, accepted[:, None])[:, 0]
        # The MTP layer catches up on positions start .. start + accepted with the main model's
        # hidden states (entries past `accepted` are rejected ones, overwritten later).
        mtp_logits, mtp_hidden = steps.mtp(emitted.clamp(min=0), hidden, start)
        last_logits = mtp_logits.gather(1, accepted[:, None, None].expand(-1, 1, mtp_logits.shape[-1]))[:, 0]
        last_hidden = mtp_hidden.gather(1, accepted[:, None, None].expand(-1, 1, mtp_hidden.shape[-1]))[:, 0]
        start += (accepted + 1).to(torch.int32)
        stats["rounds"] += 1
        per_position += (cols[None, :s] < accepted[:, None]).sum(0)  # on the device: no sync per round
    result = out[:, :max_new_tokens]
    if not return_stats:
        return result
    stats["drafted"] = b * s * stats["rounds"]
    stats["accepted_per_position"] = per_position.cpu()
    stats["accepted"] = int(stats["accepted_per_position"].sum())
    stats["acceptance_rate"] = stats["accepted"] / max(stats["drafted"], 1)
    stats["tokens_per_round"] = (stats["accepted"] + b * stats["rounds"]) / max(b * stats["rounds"], 1)
    return result, stats


def _draft(step, start, logits, hidden, s, temperature, top_k, top_p, generator):
    """``s`` drafts ``[B, s]`` chained through the MTP layer, and their distributions ``[B, s, V]``
    (None when greedy). Draft ``j > 1`` (counting from 1) runs the MTP layer at position
    ``start + j - 2`` on draft ``j - 1`` and the previous step's output; those cache entries are
    provisional."""
    drafts, probs = [], []
    for j in range(s):
        if j:
            step_logits, step_hidden = step(drafts[-1][:, None], hidden[:, None], start + (j - 1))
            logits, hidden = step_logits[:, 0], step_hidden[:, 0]
        d, q = _sample(logits, temperature, top_k, top_p, generator)
        drafts.append(d)
        probs.append(q)
    return torch.stack(drafts, 1), None if probs[0] is None else torch.stack(probs, 1)


def main(argv: list[str] | None = None) -> int:
    """``glm45-generate``: generate with random weights (``--preset``) or a checkpoint (``--model``),
    printing the tokens, tokens/s and, with ``--speculative mtp``, the acceptance rate."""

    ap = argparse.ArgumentParser(prog="glm45-generate", description=main.__doc__)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="random weights of a preset (default tiny)")
    src.add_argument("--model", default=None, help="a Hugging Face Glm4MoeForCausalLM checkpoint directory")
    ap.add_argument("--prompt", default=None, help="comma-separated prompt token ids (default: random)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--speculative", choices=["mtp"], default=None)
    ap.add_argument("--num-draft-tokens", type=int, default=1)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--fp8", action="store_true", help="quantize the weights to FP8 blocks after loading")
    ap.add_argument("--cuda-graph", action="store_true", help="replay the decode-time steps from CUDA graphs")
    ap.add_argument("--backend", choices=["torch", "triton", "cuda"], default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:  # bad arguments or checkpoint: one line, exit 2
        ap.error(str(e).splitlines()[0])


def _run(args: argparse.Namespace) -> int:
    from glm45_ops.model import Glm45Config, Glm45ForCausalLM

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" or args.fp8 else "float32"))
    if args.model:
        model = Glm45ForCausalLM.from_pretrained(args.model, dtype=dtype, device=device, backend=args.backend)
    else:
        model = Glm45ForCausalLM(Glm45Config.preset(args.preset or "tiny"), dtype=dtype, device=device,
                                 backend=args.backend)
    if args.fp8 and not model.is_fp8:
        model.quantize_fp8_()
    if args.prompt:
        ids = torch.tensor([[int(t) for t in args.prompt.split(",")]] * args.batch, device=device)
    else:
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, speculative=args.speculative,
              num_draft_tokens=args.num_draft_tokens, generator=gen, return_stats=True, cuda_graph=args.cuda_graph)
    model.generate(ids, min(2, args.max_new_tokens), **kw)  # warm-up: compiles kernels, fills caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    new, stats = model.generate(ids, args.max_new_tokens, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    for row in new.tolist():
        print(" ".join(map(str, row)))
    n = new.numel()
    print(f"{n} tokens in {dt:.3f} s: {n / dt:.1f} tokens/s ({args.batch} sequences, device {device}, "
          f"{'fp8' if model.is_fp8 else str(dtype).removeprefix('torch.')}, backend {model.backend or 'auto'})",
          file=sys.stderr)
    if args.speculative:
        print(f"MTP acceptance: {stats['acceptance_rate']:.3f} of {stats['drafted']} drafts "
              f"({stats['tokens_per_round']:.2f} tokens per verification; per position "
              f"{stats['accepted_per_position'].tolist()} of {args.batch * stats['rounds']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
