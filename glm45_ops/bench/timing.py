"""Timing: ``triton.testing.do_bench`` on the GPU, a ``perf_counter`` loop on the CPU.

Both give the median and the 20th/80th percentiles of per-call times, in microseconds. On the
GPU ``do_bench`` times with CUDA events and flushes L2 (writes a 256 MB buffer) before every
timed call, so a kernel never reads inputs left in L2 by the previous call.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    method: str  # how it was measured, recorded in the JSON


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (numpy's default rule)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_gpu(fn: Callable[[], Any], rep_ms: int = 100, warmup_ms: int = 25) -> Timing:
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(median * 1e3, p20 * 1e3, p80 * 1e3, f"triton.testing.do_bench(rep={rep_ms}ms, L2 flushed)")


def time_cpu(fn: Callable[[], Any], iters: int | None = None, budget_s: float = 0.5) -> Timing:
    """One warm-up call, then ``iters`` timed calls (default: as many as fit ``budget_s``,
    at least 3 and at most 50)."""
    fn()
    times: list[float] = []
    target = iters if iters is not None else 50
    deadline = time.perf_counter() + budget_s
    while len(times) < target:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if iters is None and len(times) >= 3 and time.perf_counter() > deadline:
            break
    times.sort()
    return Timing(statistics.median(times) * 1e6, _quantile(times, 0.2) * 1e6, _quantile(times, 0.8) * 1e6,
                  f"CPU perf_counter, {len(times)} calls after 1 warm-up")


def time_fn(fn: Callable[[], Any], device: torch.device, iters: int | None = None) -> Timing:
    """Time ``fn`` on ``device``; ``iters`` fixes the CPU call count (the GPU path is time-based)."""
    if device.type == "cuda":
        return time_gpu(fn)
    return time_cpu(fn, iters)
