"""GPU timing: a call is timed as the replay of its CUDA graph; one that syncs the host is
found before any capture, timed eagerly and says why (the CLI reports it for our kernels)."""

from __future__ import annotations

import pytest
import torch

from glm45_ops.bench.report import eager_fallback, table
from glm45_ops.bench.runner import Result
from glm45_ops.bench.timing import EAGER, capture, time_gpu

@pytest.mark.gpu
def test_graph_replay_is_timed_and_a_host_sync_falls_back():
    x = torch.randn(4096, 4096, device="cuda")
    out = torch.empty_like(x)
    graph, why = capture(lambda: torch.mul(x, 2.0, out=out))
    assert graph is not None and why == ""
    out.zero_()
    graph.replay()  # the replay, not the eager warm-ups, writes out now
    torch.cuda.synchronize()
    torch.testing.assert_close(out, x * 2.0)
    graphed = time_gpu(lambda: torch.mul(x, 2.0, out=out), rep_ms=10, warmup_ms=2)
    assert graphed.method.startswith("CUDA graph replay"), graphed.method
    synced = time_gpu(lambda: x.sum().item(), rep_ms=10, warmup_ms=2)
    assert synced.method.startswith(EAGER) and "syncs the host" in synced.method, synced.method
    asked = time_gpu(lambda: torch.mul(x, 2.0, out=out), rep_ms=10, warmup_ms=2, cuda_graph=False)
    assert asked.method.startswith(EAGER) and "as asked" in asked.method
    # the table marks the fallback, not the eager run that was asked for
    rows = [Result("f", "c", "s", "triton", "ok", median_us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us,
                   timing=t.method) for t in (graphed, synced, asked)]
    assert [eager_fallback(r) is not None for r in rows] == [False, True, False]
    assert "* timed eagerly, triton on 1 case(s): syncs the host" in table(rows)


@pytest.mark.gpu
def test_a_sync_the_check_misses_breaks_the_capture_and_later_work_still_runs():
    """torch.cuda.synchronize() is not caught by the sync debug mode: the capture fails, the
    row is timed eagerly, and the stream current before it is current again."""
    x = torch.randn(1024, device="cuda")
    before = torch.cuda.current_stream()

    def syncs():
        y = x * 2.0
        torch.cuda.synchronize()
        return y

    graph, why = capture(syncs)
    assert graph is None and why.startswith("CUDA graph capture failed"), why
    assert torch.cuda.current_stream() == before
    torch.testing.assert_close(x * 3.0, x.cpu().cuda() * 3.0)  # the context still works
    assert time_gpu(syncs, rep_ms=5, warmup_ms=1).method.startswith(EAGER)


@pytest.mark.parametrize("timing,marked", [("CUDA graph replay, do_bench", False), (f"{EAGER}: as asked; do_bench", False),
                                           (f"{EAGER}: syncs the host (RuntimeError: x); do_bench", True),
                                           ("CPU perf_counter, 5 calls after 1 warm-up", False)])
def test_eager_fallback_marker(timing, marked):
    r = Result("f", "c", "s", "cuda", "ok", median_us=1.0, p20_us=1.0, p80_us=1.0, timing=timing)
    assert (eager_fallback(r) is not None) == marked
    assert ("*" in table([r]).splitlines()[2]) == marked
