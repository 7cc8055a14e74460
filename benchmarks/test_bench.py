"""The CLI's cases under pytest-benchmark, for history tracking:

    pytest benchmarks/ --benchmark-only [--benchmark-autosave]

Same case modules, presets and backends as ``glm45-bench`` (GPU: the preset ``glm-4.5`` shapes;
CPU: ``small`` on the torch backend, plus triton when TRITON_INTERPRET=1). A backend that cannot
run a case here is skipped with the CLI's reason; a broken family module is one skipped test.
"""

from __future__ import annotations

import pytest
import torch

from glm45_ops.bench import cli
from glm45_ops.bench.case import OUR_BACKENDS, BenchContext, Skip
from glm45_ops.bench.cases import FAMILIES, load
from glm45_ops.config import preset

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
CTX = BenchContext(preset("glm-4.5" if ON_GPU else "small"), DEVICE,
                   cli.PREFILL_AND_DECODE_TOKENS if ON_GPU else cli.CPU_TOKENS)


def _params():
    for fam in FAMILIES:
        try:
            cases = load(fam).cases(CTX)
        except Exception as e:  # missing or broken family: one skipped test that says so
            yield pytest.param(None, None, id=f"{fam}", marks=pytest.mark.skip(reason=f"{type(e).__name__}: {e}"))
            continue
        for case in cases:
            for backend in case.all_backends if ON_GPU else OUR_BACKENDS:
                if backend in case.all_backends:
                    yield pytest.param(case, backend, id=f"{fam}:{case.name}[{backend}]")


@pytest.mark.parametrize("case,backend", list(_params()))
def test_case(benchmark, case, backend):
    try:
        fn = case.make(backend, DEVICE, torch.Generator(device=DEVICE).manual_seed(0))
    except Skip as e:
        pytest.skip(str(e))
    benchmark.extra_info.update(shape=case.shape, bytes_moved=case.bytes_moved, flops=case.flops,
                                device=torch.cuda.get_device_name() if ON_GPU else "cpu")
    if ON_GPU:
        def run():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    else:
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
