"""Run cases on backends: time each, check it against the reference, and never crash.

A backend that cannot run a case here becomes a ``skip`` row with the reason; one that raises
becomes an ``error`` row; both let the run go on. Inputs come from a generator on the device
seeded with :data:`SEED`, so a backend and the reference see the same inputs.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from glm45_ops.bench import roofline
from glm45_ops.bench.case import Case, OpRun, Skip
from glm45_ops.bench.timing import time_fn
from glm45_ops.testing import outputs_differ

SEED = 0


@dataclass
class Result:
    family: str
    case: str
    shape: str
    backend: str
    status: str  # "ok" | "skip" | "error"
    reason: str = ""
    median_us: float | None = None
    p20_us: float | None = None
    p80_us: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    roofline: str = ""
    pct_of_roofline: float | None = None
    ceiling: str = ""
    refcheck: str = "not run"  # pass | FAIL: why | differs: why (peers) | reference | not run | error: why
    bytes_moved: int = 0
    flops: int = 0
    intensity: float = 0.0
    timing: str = ""
    op_call: bool = False  # the row times one call of one of our ops (which must be CUDA-graph safe)
    repro: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def asdict(self) -> dict[str, Any]:
        return asdict(self)


def _gen(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(SEED)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _agree(case: Case, out: Any, ref: Any, ref_run: Any) -> str | None:
    """The case's own rule, else the op's, as the tests apply it (:func:`outputs_differ`)."""
    if case.compare is not None:
        return case.compare(out, ref)
    if isinstance(ref_run, OpRun):
        return outputs_differ(out, ref, ref_run.op, ref_run.args)
    return outputs_differ(out, ref)


def _refcheck(case: Case, backend: str, out: Any, device: torch.device) -> str:
    if backend == case.reference:
        return "reference"
    ref_run = ref = None
    try:
        ref_run = case.make(case.reference, device, _gen(device))
        ref = ref_run()
        why = _agree(case, out, ref, ref_run)
    except Skip as e:
        return f"error: reference unavailable ({e})"
    finally:
        ref_run = ref = None
        _free(device)
    if why is None:
        return "pass"
    # peers need not follow our numerics: a difference is information, not a failure
    return f"differs: {why}" if backend in case.peers else f"FAIL: {why}"


def run_case(
    case: Case,
    backend: str,
    device: torch.device,
    *,
    refcheck: bool,
    iters: int | None,
    cuda_graph: bool = True,
    ceilings: dict[str, roofline.Ceiling],
    repro: Callable[[Case, list[str]], str],
) -> Result:
    """One (case, backend) row."""
    res = Result(case.family, case.name, case.shape, backend, "ok", roofline=case.roofline,
                 ceiling=ceilings[case.roofline].label, bytes_moved=case.bytes_moved, flops=case.flops,
                 intensity=case.intensity, repro=repro(case, [backend]), params=case.params)
    try:
        fn = case.make(backend, device, _gen(device))
        res.op_call = isinstance(fn, OpRun)
        if refcheck:
            res.refcheck = _refcheck(case, backend, fn(), device)
        t = time_fn(fn, device, iters, cuda_graph)
        if case.report is not None and backend == case.reference:
            res.params = {**case.params, **case.report(device, _gen(device))}
    except Skip as e:
        res.status, res.reason = "skip", str(e)
        return res
    except Exception as e:  # one broken backend must not stop the run
        res.status, res.reason = "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return res
    finally:
        fn = None
        _free(device)
    seconds = t.median_us * 1e-6
    res.median_us, res.p20_us, res.p80_us, res.timing = t.median_us, t.p20_us, t.p80_us, t.method
    res.gbps = case.bytes_moved / seconds / 1e9
    res.tflops = case.flops / seconds / 1e12 if case.flops else None
    if device.type == "cuda":  # a CPU timing against a GPU ceiling would be a meaningless number
        res.pct_of_roofline = roofline.percent(case.roofline, case.bytes_moved / seconds, case.flops / seconds, ceilings)
    return res
