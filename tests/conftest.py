"""Test set-up: CPU runs Triton kernels in the interpreter; `gpu` tests need CUDA."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton_ops defines its kernels (triton reads it at decoration time).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import glm45_ops  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        # Tests parametrized onto the GPU (device_backends' ("cuda", backend) pairs) are GPU tests
        # too: `-m gpu` selects them with the explicitly marked ones (benchmarks/gpu_check.sh).
        for item in items:
            callspec = getattr(item, "callspec", None)
            if callspec is not None and str(callspec.params.get("device", "")).startswith("cuda"):
                item.add_marker(pytest.mark.gpu)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A seeded generator: fresh random inputs per test, reproducible per run."""
    return torch.Generator().manual_seed(1234)


def cpu_backends() -> list[str]:
    """Backends testable on this machine with CPU tensors."""
    from triton_ops import triton_usable

    return ["torch"] + (["triton"] if triton_usable(torch.device("cpu")) else [])


def device_backends() -> list[tuple[str, str]]:
    """(device, backend) pairs to test: CPU backends, plus CUDA ones on a GPU machine."""
    pairs = [("cpu", b) for b in cpu_backends()]
    if torch.cuda.is_available():
        pairs += [("cuda", "torch"), ("cuda", "triton"), ("cuda", "cuda")]
    return pairs


def run_processes(worker, world: int, args: tuple, timeout_s: float, what: str) -> None:
    """Spawn ``world`` processes running ``worker(rank, *args)`` and wait for all of them; kill
    them and fail (instead of hanging the suite) when they outlast ``timeout_s``."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} with {world} processes did not finish in {timeout_s} s")
