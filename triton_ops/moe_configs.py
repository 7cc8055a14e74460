"""Block sizes for the fused-MoE Triton GEMMs (:mod:`triton_ops.moe`), one table per
``(E, N, device, dtype)`` with an entry per batch size M, in vLLM's and SGLang's file format so
either side can read the other's files.

File name (vLLM's ``get_config_file_name``; SGLang's is the same)::

    E={E},N={N},device_name={GPU name, spaces as _}[,dtype={fp8_w8a8|float32}][,block_shape=[128,128]].json

``E`` is the experts one rank holds (``w2.shape[0]``), ``N`` the intermediate size per shard
(``w2.shape[2]``: GLM-4.5 at TP8 is ``N=192``); BF16/FP16 tables have no dtype part, as in vLLM.
``glm45_ops.moe.MoE`` with its shared expert fused in runs ``E + 1`` experts (GLM-4.5: ``E=161``,
SGLang's name for the same tables), top-9 with the shared one always selected: tables of their own.
The file maps M (tokens, as a string) to one config for both GEMMs::

    {"64": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
            "num_warps": 4, "num_stages": 3}, ...}

Lookup, as vLLM does: the key nearest to M (ties to the smaller key). Directories searched in
order: ``$GLM45_MOE_CONFIG_DIR`` (drop vLLM or SGLang files there), then the files shipped in
``triton_ops/configs/moe/``; no file gives :func:`default_config`, a heuristic.

Provenance cannot live inside a file (vLLM and SGLang read every top-level key as a batch size),
so each directory has a ``provenance.json`` sidecar mapping file names to how they were made;
:attr:`ConfigTable.description` says "tuned on <device> <date>" or "defaults, not tuned".

The name has no hidden size K, though the best blocks depend on it (the issue asks for configs
per E, N, K, M, dtype): a table whose provenance records a ``hidden_size`` other than the call's
K was measured for another model and is not used (the heuristic is; the description says why).
A file without provenance (vLLM's, SGLang's) is used whatever K, as they would.

Foreign configs are clamped to what our kernels run (:func:`clamp_config`): vLLM's kernel
computes one ``[BM, BN]`` tile of ``w13``, ours the gate and the up tile together (``2 BN``
columns, twice the weight tiles in shared memory), and our FP8 path needs 128-wide N and K tiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

CONFIG_DIR = pathlib.Path(__file__).parent / "configs" / "moe"
ENV_DIR = "GLM45_MOE_CONFIG_DIR"
PROVENANCE_FILE = "provenance.json"
KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
FP8 = "fp8_w8a8"  # vLLM's dtype selector for FP8 weights and activations
FP8_BLOCK_SHAPE = (128, 128)  # the block-FP8 recipe: 128 x 128 weight blocks, 1 x 128 activation groups
MIN_BLOCK = 16  # tl.dot's smallest tile side (and wgmma's M)
MAX_BLOCK_M = 128  # two fp32 [BM, BN] accumulators: at 256 x 128 they alone fill the register file
MAX_BLOCK_NK = 128  # our BN covers 2 BN columns of w13 (gate and up), vLLM's BN=256 is our 128
SMEM_BYTES = 232448  # sm_90's 227 KiB of shared memory per block
DEFAULT_STAGES = 3  # Triton's default num_stages on CUDA: what the kernels ran with before tables
# GLM-4.5 and Air route every token to 8 experts; the heuristic needs k to count (token, slot) pairs.
GLM_TOP_K = 8
# vLLM's report of a file's Triton version; it is not a batch size, and we have no use for it.
_IGNORED_KEYS = ("triton_version",)


def dtype_selector(dtype: torch.dtype | str | None) -> str | None:
    """vLLM's ``dtype=`` part of a file name: ``fp8_w8a8`` for e4m3 weights, ``float32`` for
    fp32, none for bf16/fp16 (they share configs, as in vLLM)."""
    if dtype in (FP8, torch.float8_e4m3fn):
        return FP8
    if dtype in ("float32", torch.float32):
        return "float32"
    if dtype is None or dtype in (torch.bfloat16, torch.float16):
        return None
    raise ValueError(f"dtype must be torch.bfloat16, float16, float32, float8_e4m3fn or {FP8!r}, got {dtype!r}")


def _block_shape(dtype: str | None, block_shape) -> tuple[int, int] | None:
    shape = None if block_shape is None else tuple(int(b) for b in block_shape)
    if dtype == FP8 and shape != FP8_BLOCK_SHAPE:
        raise ValueError(f"block_shape must be {list(FP8_BLOCK_SHAPE)} with FP8 weights (our only FP8 recipe), "
                         f"got {block_shape!r}")
    if dtype != FP8 and shape is not None:
        raise ValueError(f"block_shape is only for FP8 weights, got {block_shape!r} with dtype {dtype!r}")
    return shape


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def gpu_name(device: torch.device | str | None = None) -> str | None:
    """The GPU's name as vLLM writes it in file names (``NVIDIA H200`` -> ``NVIDIA_H200``), or
    None without a CUDA device (no table applies then: the heuristic does)."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _cuda_name(torch.cuda.current_device() if device.index is None else device.index).replace(" ", "_")


def config_file_name(E: int, N: int, dtype: torch.dtype | str | None, block_shape=None,
                     device_name: str | None = None) -> str:
    """vLLM's file name for a table (``device_name`` defaults to this process's GPU)."""
    sel = dtype_selector(dtype)
    shape = _block_shape(sel, block_shape)
    name = device_name or gpu_name()
    if name is None:
        raise ValueError("device_name is required without a CUDA GPU")
    return (f"E={E},N={N},device_name={name.replace(' ', '_')}" + (f",dtype={sel}" if sel else "")
            + (f",block_shape=[{shape[0]},{shape[1]}]" if shape else "") + ".json")


def default_config(E: int, N: int, K: int, M: int, dtype: torch.dtype | str | None, block_shape=None,
                   top_k: int = GLM_TOP_K) -> dict[str, int]:
    """Heuristic defaults, not measurements: the block sizes the kernels used before tables
    existed. ``BLOCK_SIZE_M`` 16 (wgmma's smallest M) while there are at most 512 (token, slot)
    pairs, else 64; BF16 64 x 64 tiles, 4 warps; FP8 128 x 128 tiles (one tile is one scale
    block / quantization group), 8 warps (the gate-up program's two 128-wide accumulators and
    their per-slice partials spill at 4: 255 registers). ``GROUP_SIZE_M`` 1: our grids do not
    swizzle. One config serves both GEMMs, as in vLLM: the FP8 down GEMM, which ran 64-wide
    tiles at 4 warps, gets 128 at 8 (sm_90a build: 135 registers at BM 64, no spills). E, N and
    K do not move these defaults; only a measurement (``glm45-bench tune moe``) knows where
    they should."""
    sel = dtype_selector(dtype)
    _block_shape(sel, block_shape)
    fp8 = sel == FP8
    tile = FP8_BLOCK_SHAPE[0] if fp8 else 64
    return {"BLOCK_SIZE_M": 16 if M * top_k <= 512 else 64, "BLOCK_SIZE_N": tile, "BLOCK_SIZE_K": tile,
            "GROUP_SIZE_M": 1, "num_warps": 8 if fp8 else 4, "num_stages": DEFAULT_STAGES}


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def smem_per_stage(config: dict[str, int], fp8: bool) -> int:
    """Bytes one pipeline stage of the gate-up loop holds (the larger of our two GEMMs): an
    activation tile ``[BM, BK]`` and the gate and up weight tiles ``[BK, BN]``. Triton 3.8's
    sm_90a build of that kernel allocates ``num_stages`` times this at BM >= 64 and one stage
    less at BM = 16, so a config within ``num_stages * smem_per_stage <= SMEM_BYTES`` fits
    (tests/moe/test_moe_configs.py compiles the largest ones)."""
    size = 1 if fp8 else 2
    bm, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    return (bm * bk + 2 * bk * bn) * size


def clamp_config(config: dict[str, Any], dtype: torch.dtype | str | None,
                 where: str = "config") -> tuple[dict[str, int], list[str]]:
    """``config`` made runnable by our kernels, and a note per change.

    Malformed values raise ValueError naming ``where`` and the key: a missing key, a non-integer,
    a size below 1, ``num_warps`` not a power of two up to 32. Sizes our kernels cannot take are
    changed: block sides to a power of two in ``[16, 128]`` (tl.arange; see MAX_BLOCK_M and
    MAX_BLOCK_NK), FP8 ``BLOCK_SIZE_N = BLOCK_SIZE_K = 128`` (one gate-up tile is one 1 x 128
    quantization group of the intermediate, one K slice one scale block), and ``num_stages``
    down until the gate-up stages fit sm_90's shared memory (vLLM's stages were sized for one
    weight tile, ours holds two). ``GROUP_SIZE_M`` is kept, for the file's round trip, though
    our grids do not read it.
    """
    fp8 = dtype_selector(dtype) == FP8
    if not isinstance(config, dict):
        raise ValueError(f"{where}: a config must be a JSON object, got {config!r}")
    out: dict[str, int] = {}
    for key in KEYS:
        value = config.get(key)
        if value is None:
            raise ValueError(f"{where}: missing {key}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
        out[key] = value
    if out["num_warps"] & (out["num_warps"] - 1) or out["num_warps"] > 32:
        raise ValueError(f"{where}: num_warps must be a power of two up to 32, got {out['num_warps']}")
    notes = [f"{where}: {key} ignored (not a config key of these kernels)" for key in config if key not in KEYS]
    limits = {"BLOCK_SIZE_M": MAX_BLOCK_M, "BLOCK_SIZE_N": MAX_BLOCK_NK, "BLOCK_SIZE_K": MAX_BLOCK_NK}
    for key, top in limits.items():
        if fp8 and key != "BLOCK_SIZE_M":
            want = FP8_BLOCK_SHAPE[0]
        else:
            want = min(max(_pow2_at_least(out[key]), MIN_BLOCK), top)
        if want != out[key]:
            notes.append(f"{where}: {key} {out[key]} -> {want}")
            out[key] = want
    fit = max(1, SMEM_BYTES // smem_per_stage(out, fp8))
    if out["num_stages"] > fit:
        notes.append(f"{where}: num_stages {out['num_stages']} -> {fit} (shared memory)")
        out["num_stages"] = fit
    return out, notes


@dataclass(frozen=True)
class ConfigTable:
    """One file's configs by M (clamped), where it was found and how it was made; ``skipped``
    says why its configs are not used for the caller's shapes (then the heuristic is)."""

    configs: dict[int, dict[str, int]]
    path: pathlib.Path | None = None
    provenance: dict[str, Any] | None = None
    notes: tuple[str, ...] = field(default=())
    skipped: str | None = None

    @property
    def tuned(self) -> bool:
        return bool(self.provenance and self.provenance.get("tuned"))

    @property
    def description(self) -> str:
        """"tuned on <device> <date>", "defaults, not tuned", or what is known of a foreign file;
        led by "not used (<why>): heuristic defaults, not tuned; " when ``skipped``."""
        if self.path is None:
            what = "no file: heuristic defaults, not tuned"
        elif self.provenance is None:
            what = f"no provenance entry (a vLLM/SGLang file?), origin unknown: {self.path}"
        elif self.tuned:
            what = f"tuned on {self.provenance.get('device', '?')} {self.provenance.get('date', '?')}: {self.path}"
        else:
            what = f"defaults, not tuned: {self.path}"
        what += f" ({len(self.notes)} clamped: {'; '.join(self.notes)})" if self.notes else ""
        return f"not used ({self.skipped}): heuristic defaults, not tuned; table: {what}" if self.skipped else what

    def for_hidden_size(self, K: int | None) -> "ConfigTable":
        """This table, marked ``skipped`` when its provenance records a ``hidden_size`` other than
        ``K`` (None: no K to check against)."""
        made = (self.provenance or {}).get("hidden_size")
        if K is None or made is None or made == K:
            return self
        return dataclasses.replace(self, skipped=f"made for hidden size {made}, not {K}")

    def lookup(self, M: int) -> dict[str, int]:
        """vLLM's rule: the entry whose M is nearest, ties to the smaller."""
        return dict(self.configs[min(self.configs, key=lambda m: (abs(m - M), m))])


def search_dirs(user_dir: str | None = None) -> list[pathlib.Path]:
    """``$GLM45_MOE_CONFIG_DIR`` (or ``user_dir``) when set, then the shipped tables."""
    user = user_dir if user_dir is not None else os.environ.get(ENV_DIR)
    return ([pathlib.Path(user)] if user else []) + [CONFIG_DIR]


def read_table(path: pathlib.Path, dtype: torch.dtype | str | None) -> ConfigTable:
    """Parse one file (vLLM/SGLang format) and its directory's provenance entry."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON config file: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object mapping batch sizes to configs")
    configs, notes = {}, []
    for key, cfg in raw.items():
        if key in _IGNORED_KEYS:
            continue
        if not key.isdigit() or int(key) < 1:
            raise ValueError(f"{path}: keys must be batch sizes (positive integers as strings), got {key!r}")
        configs[int(key)], why = clamp_config(cfg, dtype, where=f"M={key}")
        notes += why
    if not configs:
        raise ValueError(f"{path}: no batch sizes in it")
    prov_path = path.parent / PROVENANCE_FILE
    provenance = None
    if prov_path.is_file():
        try:
            provenance = json.loads(prov_path.read_text()).get(path.name)
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{prov_path}: not a provenance file: {e}") from None
    return ConfigTable(dict(sorted(configs.items())), path, provenance, tuple(notes))


@functools.lru_cache(maxsize=None)
def _find(user_dir: str, E: int, N: int, dtype: str | None, block_shape: tuple[int, int] | None,
          device_name: str) -> ConfigTable | None:
    # keyed on the shapes, not the file name: get_config runs per call, its lookups must be cheap
    name = config_file_name(E, N, dtype, block_shape, device_name)
    for d in search_dirs(user_dir):
        if (d / name).is_file():
            return read_table(d / name, dtype)
    return None


def load_table(E: int, N: int, dtype: torch.dtype | str | None, block_shape=None,
               device_name: str | None = None, K: int | None = None) -> ConfigTable | None:
    """The first table found for these shapes on ``device_name`` (default: this GPU), or None
    (no GPU, or no file); given the hidden size ``K``, marked ``skipped`` where its provenance
    says it was made for another (:meth:`ConfigTable.for_hidden_size`). Each file is read once
    per process (and value of the variable)."""
    sel = dtype_selector(dtype)
    shape = _block_shape(sel, block_shape)
    name = device_name or gpu_name()
    if name is None:
        return None
    table = _find(os.environ.get(ENV_DIR, ""), E, N, sel, shape, name)
    return None if table is None else table.for_hidden_size(K)


def describe(E: int, N: int, dtype: torch.dtype | str | None, block_shape=None, device_name: str | None = None,
             K: int | None = None) -> str:
    """Where :func:`get_config`'s answers for these shapes (and hidden size ``K``, when given)
    come from, in one line."""
    table = load_table(E, N, dtype, block_shape, device_name, K)
    return (table or ConfigTable({})).description


_OVERRIDES: list[dict[str, Any]] = []


@contextlib.contextmanager
def override(config: dict[str, Any]) -> Iterator[dict[str, int]]:
    """Make :func:`get_config` answer ``config`` (as clamped for the call's dtype) whatever the
    shapes, like vLLM's ``override_config``: the tuner times candidates through the public op.
    Yields a counter dict whose ``"calls"`` says how many times ``get_config`` answered with it,
    so the tuner can tell that the kernels really asked."""
    hits = {"calls": 0}
    _OVERRIDES.append({"config": config, "hits": hits})
    try:
        yield hits
    finally:
        _OVERRIDES.pop()


def get_config(E: int, N: int, K: int, M: int, dtype: torch.dtype | str | None, block_shape=None,
               device_name: str | None = None, top_k: int = GLM_TOP_K) -> dict[str, int]:
    """The config for M tokens through ``E`` local experts of intermediate width ``N`` (per
    shard) and hidden size ``K``: an active :func:`override`, else the nearest entry of the
    first table found (:func:`load_table`) unless its provenance names another hidden size,
    else :func:`default_config`. Keys as vLLM's (:data:`KEYS`); always within
    :func:`clamp_config`'s limits for ``dtype``."""
    sel = dtype_selector(dtype)
    _block_shape(sel, block_shape)
    if _OVERRIDES:
        active = _OVERRIDES[-1]
        active["hits"]["calls"] += 1
        return clamp_config(active["config"], sel, where="override")[0]
    table = load_table(E, N, sel, block_shape, device_name, K)
    if table is None or table.skipped:
        return default_config(E, N, K, M, sel, block_shape, top_k)
    return table.lookup(M)


def dump_table(configs: dict[int, dict[str, int]]) -> str:
    """A table as vLLM writes it: keys ascending, each config's keys in vLLM's order."""
    ordered = {str(m): {k: configs[m][k] for k in KEYS} for m in sorted(configs)}
    return json.dumps(ordered, indent=4) + "\n"


def write_table(out_dir: pathlib.Path | str, name: str, configs: dict[int, dict[str, int]],
                provenance: dict[str, Any]) -> pathlib.Path:
    """Write one table and record its provenance in the directory's sidecar (other entries kept)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(dump_table(configs))
    prov_path = out_dir / PROVENANCE_FILE
    entries = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    entries[name] = provenance
    prov_path.write_text(json.dumps(dict(sorted(entries.items())), indent=1) + "\n")
    _find.cache_clear()
    return path


# No kernels here: compile-report lists every triton_ops module, and this one has nothing to compile.
COMPILE_SPECS: list = []
