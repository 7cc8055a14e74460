"""The benchmark case interface: what a family module in ``glm45_ops/bench/cases/`` provides.

A family module (``glm45_ops/bench/cases/<fam>.py``, registered in ``cases/__init__.py``) exposes

    def cases(ctx: BenchContext) -> list[Case]

and nothing else is required. ``ctx`` says which model preset, device and token counts to use
(the CLI shrinks them on a machine without a GPU). A :class:`Case` is one shape of one op:

* ``make(backend, device, gen)`` draws **fresh random inputs** (never zeros: a kernel that skips
  work on zeros would look fast) with ``gen``, a generator on ``device``, and returns a zero-arg
  callable that runs the op once on ``backend`` and returns its outputs. Input creation happens
  in ``make``, outside the timed region. When a backend cannot run here, ``make`` raises
  :class:`Skip` with the reason (the CLI prints it and goes on; it never crashes on a missing
  backend). :func:`op_runner` does this for ``glm45_ops`` ops.
* ``backends`` are our own (``torch``, ``triton``, ``cuda``); ``peers`` are other libraries'
  functions for the same computation (``torch.compile``, ``vllm``, ``sgl_kernel``,
  ``flashinfer``, ``deep_gemm``), run through the same ``make`` (called with the peer's name as
  ``backend``; it raises :class:`Skip` when the library is absent) and reported as extra
  backends. Peers are not held to our numerics: a refcheck mismatch is reported as "differs".
* ``bytes_moved`` (HBM bytes read + written once, the minimum any implementation must move) and
  ``flops`` give GB/s and TFLOP/s; ``roofline`` names the ceiling the result is compared with:
  ``"memory"`` (copy bandwidth), ``"compute:bf16"`` or ``"compute:fp8"`` (matmul throughput).
* ``compare(out, ref)`` checks a backend's outputs against the reference backend's outputs on
  the same inputs (``make`` is called twice with generators seeded alike) and returns ``None``
  when they agree, else a short reason. :func:`bit_exact` is the rule for the quantizers;
  families with rounding differences write a tolerance-based one.

Helpers: :func:`op_runner` / :func:`require` (our backends, with the registry's reason when one
is unavailable), :func:`smoke` and :func:`compile_peer` (peers), :func:`randn`, :func:`bit_exact`.
A minimal family module (``glm45_ops/bench/cases/quant.py`` is the full example)::

    from glm45_ops import myfam
    from glm45_ops.bench.case import BenchContext, Case, bit_exact, op_runner, randn

    def _case(m: int, h: int) -> Case:
        def make(backend, device, gen):
            x = randn((m, h), torch.bfloat16, device, gen)
            return op_runner(myfam.my_op, backend, device, x)

        return Case(family="myfam", name=f"my_op M={m}", shape=f"[{m}, {h}] bf16", make=make,
                    bytes_moved=2 * m * h * 2, compare=bit_exact)

    def cases(ctx: BenchContext) -> list[Case]:
        return [_case(m, ctx.model.hidden_size) for m in ctx.tokens]

Keep case modules declarative: a list of cases built from the preset, the timing and the
printing belong to the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from glm45_ops.config import ModelConfig

OUR_BACKENDS = ("torch", "triton", "cuda")
ROOFLINES = ("memory", "compute:bf16", "compute:fp8")

Runner = Callable[[], Any]
Factory = Callable[[str, torch.device, torch.Generator], Runner]


class Skip(Exception):
    """Raised by ``Case.make`` when a backend cannot run here; the message says why."""


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
    """One shape of one op, runnable on several backends (see the module docstring)."""

    family: str
    name: str  # unique within the family, e.g. "per_token_group_quant_fp8 M=16384"
    shape: str  # human-readable, e.g. "[16384, 5120] bf16"
    make: Factory
    bytes_moved: int
    flops: int = 0
    roofline: str = "memory"
    backends: tuple[str, ...] = OUR_BACKENDS
    peers: tuple[str, ...] = ()
    compare: Callable[[Any, Any], str | None] | None = None
    reference: str = "torch"  # the backend whose outputs ``compare`` takes as truth
    notes: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # recorded in JSON, e.g. {"ue8m0": True}

    def __post_init__(self) -> None:
        if self.roofline not in ROOFLINES:
            raise ValueError(f"roofline must be one of {ROOFLINES}, got {self.roofline!r}")

    @property
    def all_backends(self) -> tuple[str, ...]:
        return self.backends + self.peers

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte moved (0 for pure data movement)."""
        return self.flops / self.bytes_moved if self.bytes_moved else 0.0


def require(fn: Callable, backend: str, device: torch.device) -> None:
    """Raise :class:`Skip` unless the public ``glm45_ops`` function ``fn`` (named like its op)
    can run on ``backend`` with tensors on ``device`` in this process."""
    from glm45_ops._registry import registered_ops

    op = registered_ops()[fn.__name__]
    if backend not in op.backends(device):
        raise Skip(op._unavailable(backend, device))


def op_runner(fn: Callable, backend: str, device: torch.device, *args, **kwargs) -> Runner:
    """A zero-arg callable running ``fn(*args, backend=backend, **kwargs)``, after :func:`require`."""
    require(fn, backend, device)
    return lambda: fn(*args, backend=backend, **kwargs)


def smoke(peer: str, run: Runner) -> Runner:
    """Call a peer's runner once (compiles, autotunes, and turns an API mismatch between peer
    versions into a :class:`Skip` instead of an error in the timed loop)."""
    try:
        run()
    except Exception as e:
        raise Skip(f"{peer} call failed: {type(e).__name__}: {e}") from None
    return run


def compile_peer(fn: Callable, device: torch.device) -> Callable:
    """``torch.compile(fn)`` as the "torch.compile" peer (GPU only: on the CPU its compile
    outlasts the benchmark). Dynamo's caches are reset first: many shapes of one reference
    would otherwise hit the recompile limit and silently run eagerly."""
    if device.type != "cuda":
        raise Skip("torch.compile peer runs on GPU only (on CPU its compile outlasts the benchmark)")
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def randn(shape: Iterable[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator, std: float = 1.0) -> torch.Tensor:
    """Normal random tensor drawn on ``device`` (fast for GB-sized inputs), never all zeros."""
    return (torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32) * std).to(dtype)


def _leaves(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _leaves(item)]
    raise TypeError(f"outputs must be tensors or (nested) lists/tuples of them, got {type(x).__name__}")


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_exact(out: Any, ref: Any) -> str | None:
    """``None`` if every output tensor equals the reference's bit for bit (same shapes and
    dtypes; strides may differ), else which one differs and how many of its elements."""
    outs, refs = _leaves(out), _leaves(ref)
    if len(outs) != len(refs):
        return f"{len(outs)} outputs, reference has {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        if o.shape != r.shape or o.dtype != r.dtype:
            return f"output {i}: {o.dtype}{list(o.shape)} vs reference {r.dtype}{list(r.shape)}"
        as_int = _SAME_WIDTH_INT[o.element_size()]
        diff = o.contiguous().view(as_int) != r.to(o.device).contiguous().view(as_int)
        n = int(diff.sum())
        if n:
            return f"output {i}: {n} of {o.numel()} elements differ"
    return None
