"""H200 ceilings and the ``% of roofline`` every benchmark row reports.

A case's ``roofline`` kind picks its ceiling: ``memory`` (bytes moved per second against a
device-to-device copy), ``compute:bf16`` or ``compute:fp8`` (FLOP/s against a large matmul).

No run of this project has measured the defaults below (:data:`H200_DEFAULTS`): the copy and
bf16 numbers were measured on an H200 outside this project, and FP8 is NVIDIA's datasheet peak.
Each label says which. ``glm45-bench ceilings --json FILE`` measures all three on the GPU at hand
(same method: a plain ``copy_``, 8192^3 matmuls on random data), and ``--ceilings FILE`` makes a
benchmark run use those numbers instead of the defaults.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

import torch

KINDS = ("memory", "compute:bf16", "compute:fp8")

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


_NOT_OURS = "measured on an H200 outside this project"
H200_DEFAULTS = {
    "memory": Ceiling(4.3e12, f"torch device copy_, read + write counted, {_NOT_OURS}", "TB/s"),
    "compute:bf16": Ceiling(788e12, f"bf16 8192^3 torch.matmul on random data, 769-798 over runs, {_NOT_OURS}"),
    "compute:fp8": Ceiling(H200_DATASHEET["compute:fp8"], "H200 FP8 dense datasheet peak, not measured"),
}


def percent(kind: str, bytes_per_s: float, flops_per_s: float, ceilings: dict[str, Ceiling]) -> float:
    """Achieved throughput as a percentage of the ceiling for ``kind``."""
    achieved = bytes_per_s if kind == "memory" else flops_per_s
    return 100.0 * achieved / ceilings[kind].value


def load(path: str) -> dict[str, Ceiling]:
    """Ceilings written by ``glm45-bench ceilings --json PATH`` (kinds it lacks keep the defaults).

    ``OSError`` when the file cannot be read, ``ValueError`` saying what is wrong when it is not
    such a file."""
    with open(path) as f:
        try:
            data = json.load(f)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise ValueError(f"not JSON: {e}") from None
    ceilings = data.get("ceilings") if isinstance(data, dict) else None
    if not isinstance(ceilings, dict) or not ceilings:
        raise ValueError('no "ceilings" object in it (`glm45-bench ceilings --json PATH` writes one)')
    names = {f.name for f in fields(Ceiling)}
    out = dict(H200_DEFAULTS)
    for kind, c in ceilings.items():
        if kind not in KINDS:
            raise ValueError(f"unknown ceiling kind {kind!r} (expected {', '.join(KINDS)})")
        if not isinstance(c, dict) or not {"value", "source"} <= set(c) <= names:
            raise ValueError(f"ceiling {kind!r} must be an object with value, source and optionally unit")
        value = c["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"ceiling {kind!r}: value must be a positive number, got {value!r}")
        out[kind] = Ceiling(float(value), str(c["source"]), str(c.get("unit", Ceiling.unit)))
    return out


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
    ``{kind: (ceiling, how long one call took)}``; each source names the GPU and the date."""
    import datetime

    name = torch.cuda.get_device_name(device)
    day = datetime.date.today().isoformat()
    bw, bw_us = _copy(device)
    bf16, bf16_us = _matmul(device, fp8=False)
    fp8, fp8_us = _matmul(device, fp8=True)
    return {
        "memory": (Ceiling(bw, f"{name} 4 GiB copy_, read + write counted, measured {day}", "TB/s"), f"{bw_us:.0f} us"),
        "compute:bf16": (Ceiling(bf16, f"{name} bf16 8192^3 matmul, measured {day}"), f"{bf16_us:.0f} us"),
        "compute:fp8": (Ceiling(fp8, f"{name} fp8 8192^3 _scaled_mm fast-accum, measured {day}"), f"{fp8_us:.0f} us"),
    }
