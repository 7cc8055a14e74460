"""H200 ceilings and the ``% of roofline`` every benchmark row reports.

A case's ``roofline`` kind picks its ceiling: ``memory`` (bytes moved per second against a
device-to-device copy), ``compute:bf16`` or ``compute:fp8`` (FLOP/s against a large matmul).
Percentages are of a *measured* ceiling where one exists (what a kernel can actually reach),
else of the datasheet peak; the label says which. ``glm45-bench ceilings`` re-measures them on
the GPU at hand and ``--ceilings PATH`` makes a benchmark run use those numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

# Datasheet peaks (NVIDIA H200 SXM; dense, i.e. without 2:4 sparsity).
H200_DATASHEET = {"memory": 4.8e12, "compute:bf16": 989e12, "compute:fp8": 1979e12}


@dataclass(frozen=True)
class Ceiling:
    value: float  # bytes/s for "memory", FLOP/s for "compute:*"
    source: str
    unit: str = "TFLOP/s"  # how value / 1e12 reads

    @property
    def label(self) -> str:
        return f"{self.value / 1e12:.1f} {self.unit} ({self.source})"


H200_MEASURED = {
    "memory": Ceiling(4.3e12, "H200 device copy, measured 2026-11-29", "TB/s"),
    "compute:bf16": Ceiling(788e12, "H200 bf16 8192^3 torch.matmul, measured 2026-11-29"),
    # no FP8 matmul was measured yet: the datasheet peak stands in until `ceilings` runs
    "compute:fp8": Ceiling(H200_DATASHEET["compute:fp8"], "H200 FP8 datasheet peak, not measured"),
}


def percent(kind: str, bytes_per_s: float, flops_per_s: float, ceilings: dict[str, Ceiling]) -> float:
    """Achieved throughput as a percentage of the ceiling for ``kind``."""
    achieved = bytes_per_s if kind == "memory" else flops_per_s
    return 100.0 * achieved / ceilings[kind].value


def load(path: str) -> dict[str, Ceiling]:
    """Ceilings written by ``glm45-bench ceilings --json PATH`` (kinds it lacks keep the defaults)."""
    with open(path) as f:
        data = json.load(f)["ceilings"]
    return {**H200_MEASURED, **{k: Ceiling(**v) for k, v in data.items()}}


def dump(ceilings: dict[str, Ceiling]) -> dict[str, dict]:
    return {k: asdict(v) for k, v in ceilings.items()}


def _copy(device: torch.device) -> tuple[float, float]:
    """(bytes/s, us) of a 4 GiB device-to-device copy (read + write counted)."""
    from glm45_ops.bench.timing import time_gpu

    src = torch.empty(2**31, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    t = time_gpu(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (t.median_us * 1e-6), t.median_us


def _matmul(device: torch.device, fp8: bool, n: int = 8192) -> tuple[float, float]:
    """(FLOP/s, us) of an n^3 bf16 ``torch.matmul``, or e4m3 ``torch._scaled_mm`` with
    per-tensor scales and fast accumulation (the best case FP8 GEMMs are held to)."""
    from glm45_ops.bench.timing import time_gpu

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    if fp8:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # B column-major for cuBLASLt
        one = torch.ones((), device=device)
        t = time_gpu(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16, use_fast_accum=True))
    else:
        t = time_gpu(lambda: a @ b)
    return 2 * n**3 / (t.median_us * 1e-6), t.median_us


def measure(device: torch.device) -> dict[str, tuple[Ceiling, str]]:
    """Measure copy bandwidth and bf16/fp8 matmul throughput on ``device`` (a GPU):
    ``{kind: (ceiling, how long one call took)}``."""
    name = torch.cuda.get_device_name(device)
    bw, bw_us = _copy(device)
    bf16, bf16_us = _matmul(device, fp8=False)
    fp8, fp8_us = _matmul(device, fp8=True)
    return {
        "memory": (Ceiling(bw, f"{name} 4 GiB copy_, measured", "TB/s"), f"{bw_us:.0f} us"),
        "compute:bf16": (Ceiling(bf16, f"{name} bf16 8192^3 matmul, measured"), f"{bf16_us:.0f} us"),
        "compute:fp8": (Ceiling(fp8, f"{name} fp8 8192^3 _scaled_mm fast-accum, measured"), f"{fp8_us:.0f} us"),
    }
