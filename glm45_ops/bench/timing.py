"""Timing: ``triton.testing.do_bench`` on the GPU, a ``perf_counter`` loop on the CPU.

Both give the median and the 20th/80th percentiles of per-call times, in microseconds. On the
GPU ``do_bench`` times with CUDA events and flushes L2 (writes a 256 MB buffer) before every
timed call, so a kernel never reads inputs left in L2 by the previous call.

On the GPU a call is first captured as a CUDA graph and the graph's replay is what is timed:
that is how decode steps run in vLLM and SGLang, and it keeps the Python launch cost out of the
number. Eagerly timed, a decode-sized MoE layer (a few microseconds of kernels behind ~100 us of
dispatch, more than the L2 flush that otherwise hides it) would measure the interpreter, not the
GPU. A call that syncs the host (found first under ``torch.cuda.set_sync_debug_mode("error")``)
or fails to capture is timed eagerly, and its method says why:
for our ops that is a defect (they must stay CUDA-graph safe), for a peer a fact.
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


EAGER = "eager"  # prefix of the method of a GPU row timed without a CUDA graph


def capture(fn: Callable[[], Any]) -> tuple[Any, str]:
    """``(graph, "")``: one call of ``fn`` captured as a CUDA graph, or ``(None, why not)``.

    ``fn`` runs once eagerly with synchronizing calls made errors, so the common host syncs
    (``.item()``, ``nonzero``, a device-to-host copy) are found before any capture starts. Syncs
    that check misses (``torch.cuda.synchronize()``, a library's own ``cudaMemcpy``) break the
    capture instead: then the stream current before it is restored (``torch.cuda.graph`` leaves
    its capture stream current when ending an invalidated capture raises), so later rows run as
    before. The warm-up runs on a side stream, as PyTorch's graph docs ask.
    """
    fn()  # compiles, autotunes and allocates: one-time host work a sync check must not see
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        fn()
    except Exception as e:
        if "synchroniz" not in str(e):
            raise  # not a sync: the call itself fails, as it would eagerly
        return None, f"syncs the host ({type(e).__name__}: {_first_line(e)})"
    finally:
        torch.cuda.set_sync_debug_mode(mode)
    stream = torch.cuda.current_stream()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            fn()
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:
        torch.cuda.set_stream(stream)
        torch.cuda.synchronize()
        return None, f"CUDA graph capture failed ({type(e).__name__}: {_first_line(e)})"
    return graph, ""


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:160] if str(e) else ""


def time_gpu(fn: Callable[[], Any], rep_ms: int = 100, warmup_ms: int = 25, cuda_graph: bool = True) -> Timing:
    """``do_bench`` (L2 flushed) of a CUDA graph of ``fn`` (module docstring), or of ``fn``
    itself with ``cuda_graph`` False or when it cannot be captured."""
    import triton.testing

    graph, why = capture(fn) if cuda_graph else (None, "as asked")
    how = f"triton.testing.do_bench(rep={rep_ms}ms, L2 flushed)"
    try:
        run = graph.replay if graph is not None else fn
        median, p20, p80 = triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    finally:
        graph = None
    method = f"CUDA graph replay, {how}" if why == "" else f"{EAGER}: {why}; {how}"
    return Timing(median * 1e3, p20 * 1e3, p80 * 1e3, method)


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


def time_fn(fn: Callable[[], Any], device: torch.device, iters: int | None = None, cuda_graph: bool = True) -> Timing:
    """Time ``fn`` on ``device``; ``iters`` fixes the CPU call count (the GPU path is time-based
    and replays a CUDA graph of ``fn`` unless ``cuda_graph`` is False or it cannot be captured)."""
    if device.type == "cuda":
        return time_gpu(fn, cuda_graph=cuda_graph)
    return time_cpu(fn, iters)
