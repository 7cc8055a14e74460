"""``glm45_ops.info()``: what this process runs on (also ``glm45-bench --info``)."""

from __future__ import annotations

import platform
from typing import Any

import torch


def gpu_info() -> list[dict[str, Any]] | str:
    """Per-GPU facts from NVML (name, memory, clocks, power limit), or why there are none."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return "no NVIDIA GPU"
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            entry: dict[str, Any] = {
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_total_gib": round(mem.total / 2**30, 1),
                "driver": _str(pynvml.nvmlSystemGetDriverVersion()),
            }
            for key, fn in (
                ("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
                ("sm_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)),
                ("mem_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)),
                ("power_limit_w", lambda: pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000),
                ("power_draw_w", lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1000),
                ("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
            ):
                try:
                    entry[key] = fn()
                except pynvml.NVMLError:
                    entry[key] = None
            gpus.append(entry)
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def info() -> dict[str, Any]:
    """Versions, the extension's state, the registered ops and the GPUs of this process."""
    from glm45_ops import __version__
    from glm45_ops._extension import extension_error
    from glm45_ops._registry import default_backend, registered_ops
    from triton_ops import HAVE_TRITON, interpreting

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # pragma: no cover
        triton_version = f"unavailable ({e})"
    ops = registered_ops()
    return {
        "glm45_ops": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version if HAVE_TRITON else "not installed",
        "triton_interpret": interpreting(),
        "cuda_available": torch.cuda.is_available(),
        "extension": "loaded" if extension_error() is None else extension_error(),
        "cuda_kernels": sorted(n for n, op in ops.items() if op.has_cuda_kernel()),
        "ops": sorted(ops),
        "default_backend": default_backend(),
        "gpus": gpu_info(),
    }
