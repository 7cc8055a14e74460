"""Benchmark cases for the Muon family (``glm45_ops.muon``), bf16, 5 KellerJordan steps.

* ``newton_schulz 8192x8192``: Flash-Muon's headline shape. Peer: ``torch.optim.Muon``'s own
  routine (``torch.optim._muon._zeropower_via_newtonschulz``, on a copy of its input: see
  :func:`_torch_ns`). Target >= 1.5x the peer.
* ``newton_schulz experts``: one MoE layer's expert stack ``[E, I, H]`` (GLM-4.5:
  ``[160, 1536, 5120]``) in one batched call. Peer: a per-expert loop of torch's routine
  (results copied into one preallocated stack, as an optimizer would consume them). Target >= 1.5x.
* ``Muon.step moe layer``: the full optimizer step (momentum, Nesterov, NS, decoupled weight
  decay, update) for every matrix of one GLM-4.5 MoE layer (:func:`moe_layer_matrices`), bf16
  parameters and gradients. Peer: ``torch.optim.Muon`` with each expert as its own 2-D
  parameter (views into the same stacks), since it rejects 3-D parameters.

FLOPs count every product in full, ``X X^T`` and ``A A`` included, although the Triton kernels
compute only their upper triangles: so TFLOP/s compares backends on the same work (and a
symmetric kernel can exceed the dense-matmul ceiling on this count). Per NS step of an ``[m, n]``
matrix (``m <= n``): ``2 m^2 n + 2 m^3 + 2 m^2 n``. Bytes are G read and X written once (the
intermediates stay on chip in no implementation, but this is the floor); the ceiling is bf16
matmul throughput.

Without a GPU the shapes shrink to what the Triton interpreter finishes in seconds, and the
whole-layer step runs on the torch backend only.
"""

from __future__ import annotations

import math

import torch

from glm45_ops import muon
from glm45_ops.bench.case import BenchContext, Case, Skip, randn, require, smoke
from glm45_ops.config import ModelConfig

FAMILY = "muon"
DTYPE = torch.bfloat16
STEPS = 5
COEFFICIENTS = muon.DEFAULT_COEFFICIENTS
EPS = 1e-7
SQUARE_GPU, SQUARE_CPU = 8192, 128
CPU_EXPERTS, CPU_SHRINK = 2, 4  # expert stack on the CPU: 2 experts, every dim / 4
LR, WEIGHT_DECAY, MOMENTUM = 0.02, 0.1, 0.95
# Two bf16 NS implementations differing only in accumulation order agree to a fraction of a
# percent (tests: < 0.5% at small sizes); bf16 itself is ~1.5% from the float64 iteration.
REL_LIMIT = 1e-2
_PEER = "torch.optim.Muon"


def close(out, ref) -> str | None:
    """Frobenius-relative difference of every output against the reference below REL_LIMIT."""
    outs = out if isinstance(out, (list, tuple)) else [out]
    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    if len(outs) != len(refs):
        return f"{len(outs)} outputs, reference has {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        if o.shape != r.shape:
            return f"output {i}: shape {list(o.shape)} vs reference {list(r.shape)}"
        x, y = o.double(), r.double()
        if not torch.isfinite(x).all():
            return f"output {i}: non-finite values"
        rel = ((x - y).norm() / y.norm().clamp(min=1e-300)).item()
        if rel > REL_LIMIT:
            return f"output {i}: Frobenius-relative difference {rel:.2e} (limit {REL_LIMIT:.0e})"
    return None


def _fmt(shape) -> str:
    return f"[{', '.join(map(str, shape))}] bf16"


def _ns_flops(shape) -> int:
    """All ``STEPS`` of every matrix in ``shape`` ``[..., r, c]``, with m = min(r, c) and
    n = max(r, c): per step X X^T 2 m^2 n, A A 2 m^3, B X 2 m^2 n."""
    m, n = sorted(shape[-2:])
    return STEPS * math.prod(shape[:-2]) * (4 * m * m * n + 2 * m**3)


def _torch_ns(g: torch.Tensor) -> torch.Tensor:
    """torch's routine on a copy: on a bf16 input it normalises that input in place (its
    ``grad.bfloat16()`` is no copy), which would change the peer's input from call to call.
    The copy costs under 2% of the routine's time at these shapes. (The routine is private to
    torch, but it is exactly what ``torch.optim.Muon`` runs.)"""
    from torch.optim._muon import _zeropower_via_newtonschulz

    return _zeropower_via_newtonschulz(g.clone(), COEFFICIENTS, STEPS, EPS)


def _ns_peer(device, gen, G):
    if G.dim() == 2:
        return smoke(_PEER, lambda: _torch_ns(G))
    out = torch.empty_like(G)

    def loop():
        for e in range(G.shape[0]):
            out[e].copy_(_torch_ns(G[e]))
        return out

    return smoke(_PEER, loop)


def _ns_run(backend: str, device: torch.device, G: torch.Tensor):
    # newton_schulz's Python API takes coefficient triples, its op the flattened schedule: so
    # not op_runner (which binds the op's own arguments); the case's ``close`` is the rule
    require(muon.newton_schulz, backend, device)
    return lambda: muon.newton_schulz(G, STEPS, COEFFICIENTS, EPS, backend=backend)


def _ns_case(label: str, shape: tuple[int, ...], notes: str = "") -> Case:
    return Case(
        family=FAMILY,
        name=f"newton_schulz {label}",
        shape=_fmt(shape),
        inputs=lambda device, gen: (randn(shape, DTYPE, device, gen),),
        run=_ns_run,
        bytes_moved=2 * math.prod(shape) * DTYPE.itemsize,
        flops=_ns_flops(shape),
        roofline="compute:bf16",
        peers={_PEER: _ns_peer},
        compare=close,
        notes=notes,
        params={"shape": list(shape), "steps": STEPS, "coefficients": list(COEFFICIENTS)},
    )


def moe_layer_matrices(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every matrix Muon updates in one MoE decoder layer (HF layout, gate and
    up separate: Muon orthogonalises each matrix on its own). Norm weights and q/k/v biases are
    vectors and go to AdamW, like the embeddings and the LM head."""
    h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    shared = i * cfg.n_shared_experts
    return [
        ("q_proj", (cfg.q_size, h)),
        ("k_proj", (cfg.kv_size, h)),
        ("v_proj", (cfg.kv_size, h)),
        ("o_proj", (h, cfg.q_size)),
        ("mlp.gate", (e, h)),
        ("experts.gate_proj", (e, i, h)),
        ("experts.up_proj", (e, i, h)),
        ("experts.down_proj", (e, h, i)),
        ("shared_experts.gate_proj", (shared, h)),
        ("shared_experts.up_proj", (shared, h)),
        ("shared_experts.down_proj", (h, shared)),
    ]


def _step_case(cfg: ModelConfig, on_gpu: bool) -> Case:
    shapes = [s for _, s in moe_layer_matrices(cfg)]
    elems = sum(math.prod(s) for s in shapes)
    kwargs = dict(lr=LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, adjust_lr_fn="match_rms_adamw")

    def inputs(device: torch.device, gen: torch.Generator):
        params = [randn(s, DTYPE, device, gen, std=0.02) for s in shapes]
        grads = [randn(s, DTYPE, device, gen, std=1e-3) for s in shapes]
        return params, grads

    def stepper(opt: torch.optim.Optimizer, params: list[torch.Tensor]):
        def step():
            opt.step()
            return params

        return step

    def run(backend: str, device: torch.device, params, grads):
        if backend == "triton" and not on_gpu:
            raise Skip("a whole layer takes minutes in the Triton interpreter: GPU only")
        require(muon.newton_schulz, backend, device)
        opt_params = [torch.nn.Parameter(p) for p in params]
        for param, g in zip(opt_params, grads):
            param.grad = g
        return stepper(muon.Muon(opt_params, **kwargs, backend=backend), params)

    def peer(device, gen, params, grads):  # 2-D only: every expert is its own parameter, a view into its stack
        leaves = [pair for p, g in zip(params, grads)
                  for pair in ([(p, g)] if p.dim() == 2 else zip(p.unbind(0), g.unbind(0)))]
        opt_params = [torch.nn.Parameter(p) for p, _ in leaves]
        for param, (_, g) in zip(opt_params, leaves):
            param.grad = g
        return stepper(torch.optim.Muon(opt_params, **kwargs), params)

    return Case(
        family=FAMILY,
        name=f"Muon.step {cfg.name} moe layer",
        shape=f"{len(shapes)} matrices, {elems / 1e6:,.1f}M params bf16",
        inputs=inputs,
        run=run,
        # param r+w, grad r, momentum r+w, NS input r + output w: 7 bf16 passes per element
        bytes_moved=7 * elems * DTYPE.itemsize,
        flops=sum(_ns_flops(s) for s in shapes),
        roofline="compute:bf16",
        peers={_PEER: peer},
        compare=close,
        notes="match_rms_adamw, Nesterov; peer: torch.optim.Muon with one parameter per expert",
        params={"matrices": [[n, list(s)] for n, s in moe_layer_matrices(cfg)], **kwargs},
    )


def cases(ctx: BenchContext) -> list[Case]:
    cfg = ctx.model
    e, i, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    if ctx.on_gpu:
        square, experts = SQUARE_GPU, (e, i, h)
    else:
        square, experts = SQUARE_CPU, (min(e, CPU_EXPERTS), i // CPU_SHRINK, h // CPU_SHRINK)
    return [
        _ns_case(f"{square}x{square}", (square, square), notes="Flash-Muon: 1.56x torch's NS on H800"),
        _ns_case(f"experts {cfg.name}", experts, notes="one batched call; peer: per-expert loop"),
        _step_case(cfg, ctx.on_gpu),
    ]
