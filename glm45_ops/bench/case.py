"""The benchmark case interface: what a family module in ``glm45_ops/bench/cases/`` provides.

A family module (``glm45_ops/bench/cases/<fam>.py``; every module there is a family) exposes

    def cases(ctx: BenchContext) -> list[Case]

and nothing else is required. ``ctx`` says which model preset, device and token counts to use
(the CLI shrinks them on a machine without a GPU). A :class:`Case` is one shape of one op:

* ``inputs(device, gen)`` draws **fresh random inputs** (never zeros: a kernel that skips work
  on zeros would look fast) with ``gen``, a generator on ``device``, and returns them as a tuple.
  Input creation happens outside the timed region.
* ``run(backend, device, *inputs)`` returns a zero-arg runner that calls the op once on one of
  our ``backends`` (``torch``, ``triton``, ``cuda``) and returns its outputs, or raises
  :class:`Skip` with the reason when that backend cannot run here (the CLI prints it and goes
  on; it never crashes on a missing backend). :func:`op_runner` does both for a ``glm45_ops`` op.
* ``peers`` maps a peer's name to its factory: other libraries' functions for the same
  computation (``torch.compile``, ``vllm``, ``sgl_kernel``, ``flashinfer``, ``deep_gemm``, ...).
  ``factory(device, gen, *inputs)`` returns a runner, or raises :class:`Skip` when the library is
  absent, needs a GPU, or rejects the call (:func:`peer_import`, :func:`gpu_only`, :func:`smoke`).
  ``gen`` is there for peers that draw random numbers of their own. Peers are reported as extra
  backends and are not held to our numerics: a refcheck mismatch is reported as "differs".
* ``bytes_moved`` (HBM bytes read + written once, the minimum any implementation must move) and
  ``flops`` give GB/s and TFLOP/s; ``roofline`` names the ceiling the result is compared with:
  ``"memory"`` (copy bandwidth), ``"compute:bf16"`` or ``"compute:fp8"`` (matmul throughput).
* ``compare(out, ref)`` checks a backend's outputs against the reference backend's outputs on the
  same inputs (drawn twice from generators seeded alike) and returns ``None`` when they agree,
  else a short reason. Left ``None``, the op's own rule applies, as in the tests
  (``glm45_ops.testing.outputs_differ``: the op's ``compare`` when the reference ran through
  :func:`op_runner`, else bit for bit with NaN matching NaN).

A minimal family module (``glm45_ops/bench/cases/quant.py`` is the full example)::

    from glm45_ops import myfam
    from glm45_ops.bench.case import BenchContext, Case, op_runner, randn

    def _case(m: int, h: int) -> Case:
        return Case(family="myfam", name=f"my_op M={m}", shape=f"[{m}, {h}] bf16",
                    inputs=lambda device, gen: (randn((m, h), torch.bfloat16, device, gen),),
                    run=lambda backend, device, x: op_runner(myfam.my_op, backend, device, x),
                    bytes_moved=2 * m * h * 2)

    def cases(ctx: BenchContext) -> list[Case]:
        return [_case(m, ctx.model.hidden_size) for m in ctx.tokens]

Keep case modules declarative: a list of cases built from the preset, the timing and the
printing belong to the CLI.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from glm45_ops import registered_ops
from glm45_ops.testing import with_mutated
from glm45_ops.bench.roofline import KINDS as ROOFLINES
from glm45_ops.config import ModelConfig

OUR_BACKENDS = ("torch", "triton", "cuda")

Runner = Callable[[], Any]
Inputs = Callable[[torch.device, torch.Generator], tuple]
OurRunner = Callable[..., Runner]  # (backend, device, *inputs) -> Runner
PeerFactory = Callable[..., Runner]  # (device, gen, *inputs) -> Runner


class Skip(Exception):
    """Raised when a backend or peer cannot run here; the message says why."""


@dataclass(frozen=True)
class BenchContext:
    """What the cases are built for: a model preset, a device, and the token counts to sweep."""

    model: ModelConfig
    device: torch.device
    tokens: tuple[int, ...]  # activation rows: prefill first, then decode sizes

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass(frozen=True)
class Case:
    """One shape of one op, runnable on our backends and its peers (see the module docstring)."""

    family: str
    name: str  # unique within the family, e.g. "per_token_group_quant_fp8 M=16384"
    shape: str  # human-readable, e.g. "[16384, 5120] bf16"
    inputs: Inputs
    run: OurRunner
    bytes_moved: int
    flops: int = 0
    roofline: str = "memory"
    backends: tuple[str, ...] = OUR_BACKENDS
    peers: Mapping[str, PeerFactory] = field(default_factory=dict)
    compare: Callable[[Any, Any], str | None] | None = None
    reference: str = "torch"  # the backend whose outputs are taken as truth
    notes: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # recorded in JSON, e.g. {"ue8m0": True}
    # Figures the case computes once, untimed (e.g. accuracy metrics): report(device, gen) -> {name:
    # number}, added to the reference backend's row params in the JSON and printed by the CLI.
    report: Callable[[torch.device, torch.Generator], dict[str, float]] | None = None

    def __post_init__(self) -> None:
        if self.roofline not in ROOFLINES:
            raise ValueError(f"roofline must be one of {ROOFLINES}, got {self.roofline!r}")
        clash = set(self.peers) & set(self.backends)
        if clash:
            raise ValueError(f"peer names {sorted(clash)} clash with our backends")

    @property
    def all_backends(self) -> tuple[str, ...]:
        return self.backends + tuple(self.peers)

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte moved (0 for pure data movement)."""
        return self.flops / self.bytes_moved if self.bytes_moved else 0.0

    def make(self, backend: str, device: torch.device, gen: torch.Generator) -> Runner:
        """Fresh inputs from ``gen``, then a runner for ``backend`` (ours or a peer), or :class:`Skip`."""
        if backend not in self.all_backends:
            raise ValueError(f"backend must be one of {self.all_backends} for {self.name!r}, got {backend!r}")
        inputs = self.inputs(device, gen)
        if backend in self.peers:
            return self.peers[backend](device, gen, *inputs)
        return self.run(backend, device, *inputs)


@dataclass(frozen=True)
class OpRun:
    """The runner :func:`op_runner` returns: ``fn(*args, backend=backend)``, where ``args`` are
    the op's arguments bound in schema order, so ``--refcheck`` can apply the op's ``compare``
    (to the outputs and, for an op that writes its arguments, those arguments after them)."""

    fn: Callable
    op: Any  # the registry's Op
    args: tuple
    backend: str

    def __call__(self) -> Any:
        return with_mutated(self.op, self.fn(*self.args, backend=self.backend), self.args)


def require(fn: Callable, backend: str, device: torch.device) -> None:
    """Raise :class:`Skip` unless the public ``glm45_ops`` function ``fn`` (named like its op)
    can run on ``backend`` with tensors on ``device`` in this process."""
    op = registered_ops()[fn.__name__]
    if backend not in op.backends(device):
        raise Skip(op.why_unavailable(backend, device))


def op_runner(fn: Callable, backend: str, device: torch.device, *args, **kwargs) -> OpRun:
    """A runner of ``fn(*args, backend=backend, **kwargs)`` after :func:`require`. ``fn`` is an
    op's public function taking the op's own arguments (a ``TypeError`` here says otherwise)."""
    require(fn, backend, device)
    op = registered_ops()[fn.__name__]
    return OpRun(fn, op, op.bind(args, kwargs), backend)


def op_outputs(fn: Callable, *args, **kwargs) -> Any:
    """The outputs ``fn(*args, **kwargs)`` would return, allocated empty by its op (``op.alloc``):
    buffers in our layout, for peers that write into outputs they are given."""
    op = registered_ops()[fn.__name__]
    return op.alloc(*op.bind(args, kwargs))


def gpu_only(peer: str, device: torch.device) -> None:
    """Raise :class:`Skip` unless ``device`` is a GPU (most peers ship CUDA kernels only)."""
    if device.type != "cuda":
        raise Skip(f"{peer} runs on GPU only")


def peer_import(peer: str, module: str, name: str | None = None) -> Any:
    """``module``, or its attribute ``name``; :class:`Skip` when the peer library is absent,
    fails to import here, or lacks ``name`` (another version's API)."""
    try:
        mod = importlib.import_module(module)
        return mod if name is None else getattr(mod, name)
    except Exception as e:
        raise Skip(f"{peer} not importable ({type(e).__name__}: {_first_line(e)})") from None


def smoke(peer: str, run: Runner) -> Runner:
    """Call a peer's runner once (compiles, autotunes, and turns an API mismatch between peer
    versions into a :class:`Skip` instead of an error in the timed loop)."""
    try:
        run()
    except Exception as e:
        raise Skip(f"{peer} call failed: {type(e).__name__}: {_first_line(e)}") from None
    return run


def compile_peer(fn: Callable, device: torch.device) -> Callable:
    """``torch.compile(fn)`` as the "torch.compile" peer (GPU only: on the CPU its compile
    outlasts the benchmark). Compiler caches are reset first: many shapes of one reference
    would otherwise hit the recompile limit and silently run eagerly."""
    if device.type != "cuda":
        raise Skip("torch.compile peer runs on GPU only (on CPU its compile outlasts the benchmark)")
    torch.compiler.reset()
    return torch.compile(fn, dynamic=False)


def randn(shape: Iterable[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator, std: float = 1.0) -> torch.Tensor:
    """Normal random tensor drawn on ``device`` (fast for GB-sized inputs), never all zeros."""
    return (torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32) * std).to(dtype)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else ""
