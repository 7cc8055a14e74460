"""``glm45-bench tune moe``: time the fused-MoE Triton kernels' block sizes on this GPU and write
the fastest correct ones as vLLM-format tables (:mod:`triton_ops.moe_configs`).

    glm45-bench tune moe [--preset glm-4.5,glm-4.5-air] [--layouts TP1,...,EP8,TP1+shared,...]
                         [--dtypes bf16,fp8] [--batch-sizes 1,2,...] [--out DIR] [--rep-ms MS]
    glm45-bench tune moe --defaults --device-name NVIDIA_H200 [--out DIR]

One file per (preset, layout, dtype): TPn holds every expert at ``I/n`` wide, EP8 an eighth of
the experts at full ``I`` (tokens routed over all of them, as the benchmark cases do), and
TPn+shared is TPn with the shared expert fused in as ``glm45_ops.moe.MoE`` runs it by default:
``E + 1`` experts (GLM-4.5's file is ``E=161``, as SGLang names it), each token routed to top-k
of the routed ones plus the shared one (:func:`layouts`). For each batch size M every
candidate of :func:`search_space` runs ``glm45_ops.moe.fused_moe`` (Triton) under
:func:`triton_ops.moe_configs.override`, captured as a CUDA graph whose replay
``triton.testing.do_bench`` times (L2 flushed; small M would otherwise time Python dispatch, the
same for every candidate), on random inputs (:func:`problem_inputs`); the fastest whose output
passes the op's own ``compare`` against the torch reference wins. Provenance (device, date,
versions, command, the hidden size and top-k it was made for, times, speed-up over the
heuristic default) goes to the directory's ``provenance.json``, never into the table.

``--defaults`` writes :func:`triton_ops.moe_configs.default_config`'s heuristic tables instead,
with no GPU, marked "not tuned": that is how the shipped files were made. Without a GPU and
without ``--defaults`` the command exits 2 with one line. A full run (both presets, nine
layouts, two dtypes, 20 batch sizes) takes hours, as vLLM's tuner does: narrow it with the options.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import pathlib
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from glm45_ops.config import PRESETS, ModelConfig, preset
from triton_ops import moe_configs as mc

# vLLM's benchmark_moe.py batch sizes, then the prefill sizes
BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384)
TP_SIZES = (1, 2, 4, 8)
EP_SIZE = 8
DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
DEFAULT_PRESETS = ("glm-4.5", "glm-4.5-air")
WARMUP_MS = 5
SHARED = "+shared"  # layout-name suffix: the shared expert fused into the routed ones


@dataclass(frozen=True)
class Layout:
    name: str
    experts: int  # local experts: the file's E
    inter: int  # intermediate per shard: the file's N
    shared: int = 0  # of the experts, the last ones: shared experts, every token routed to them


def layouts(cfg: ModelConfig) -> list[Layout]:
    """One rank's experts at TP1/2/4/8 and EP8 (the issue's coverage), then, for a model with
    ``S`` shared experts, TP1/2/4/8 with them fused in as ``MoE(fuse_shared=True)`` runs them
    (:func:`glm45_ops.moe.layer.fuse_shared_expert`): ``E + S`` experts of ``I/n``, top ``k + S``.
    No EP layout with them: ``ep_fused_moe`` shards the routed experts only, and ``MoE`` runs
    without EP."""
    e, i, s = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.n_shared_experts
    plain = [Layout(f"TP{tp}", e, i // tp) for tp in TP_SIZES] + [Layout(f"EP{EP_SIZE}", e // EP_SIZE, i)]
    return plain + ([Layout(f"TP{tp}{SHARED}", e + s, i // tp, s) for tp in TP_SIZES] if s else [])


def top_k(model: ModelConfig, layout: Layout) -> int:
    """Experts per token in ``fused_moe``'s ids: the routed top-k, plus the fused shared experts."""
    return model.num_experts_per_tok + layout.shared


def search_space(dtype: torch.dtype) -> list[dict[str, int]]:
    """Candidates our kernels run as given (:func:`~triton_ops.moe_configs.clamp_config` leaves
    them unchanged): FP8 tiles are fixed at 128 x 128 (scale blocks), so only M, warps and
    stages vary; BF16 also tries 32-128 wide N and 64-128 deep K tiles."""
    fp8 = mc.dtype_selector(dtype) == mc.FP8
    tiles = [(128, 128)] if fp8 else list(itertools.product((32, 64, 128), (64, 128)))
    out = []
    for bm, (bn, bk), warps, stages in itertools.product((16, 32, 64, 128), tiles, (4, 8), (2, 3, 4, 5)):
        cfg = {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 1,
               "num_warps": warps, "num_stages": stages}
        if mc.clamp_config(cfg, dtype)[0] == cfg:
            out.append(cfg)
    return out


class TuneAbort(RuntimeError):
    """A fault of the whole run (not of one candidate): stop, write nothing more."""


@dataclass(frozen=True)
class Best:
    config: dict[str, int]
    time_us: float
    default_us: float | None  # the heuristic default's time, when it was among the candidates
    rejected: int


TimeFn = Callable[[dict[str, int], int], float]
CheckFn = Callable[[dict[str, int], int], "str | None"]


def tune_table(batch_sizes: list[int], candidates: list[dict[str, int]], default: Callable[[int], dict[str, int]],
               time_fn: TimeFn, check_fn: CheckFn, log: Callable[[str], None] = print) -> dict[int, Best]:
    """For each M: time every candidate (one that raises is rejected), then check them fastest
    first; the first whose ``check_fn`` returns None wins. ``default(M)`` names the config to
    report the speed-up against. Raises TuneAbort when no candidate survives."""
    results = {}
    for m in batch_sizes:
        timed, rejected = [], []
        for cfg in candidates:
            try:
                timed.append((time_fn(cfg, m), cfg))
            except TuneAbort:
                raise
            except Exception as e:  # a config that does not compile or launch here is just not a candidate
                rejected.append(f"{_short(cfg)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        base = next((t for t, cfg in timed if cfg == default(m)), None)
        for t, cfg in sorted(timed, key=lambda pair: pair[0]):
            why = check_fn(cfg, m)
            if why is None:
                results[m] = Best(cfg, t, base, len(rejected))
                gain = f", {base / t:.2f}x the default" if base else ""
                log(f"  M={m}: {_short(cfg)} {t:.1f} us ({len(timed)} timed, {len(rejected)} rejected{gain})")
                break
            rejected.append(f"{_short(cfg)}: {why}")
        else:
            raise TuneAbort(f"M={m}: no candidate ran and matched the reference "
                            f"({len(rejected)} rejected; first: {rejected[0] if rejected else 'no candidates'})")
    return results


def _short(cfg: dict[str, int]) -> str:
    return "BM{BLOCK_SIZE_M}/BN{BLOCK_SIZE_N}/BK{BLOCK_SIZE_K} w{num_warps} s{num_stages}".format(**cfg)


def _versions() -> dict[str, str]:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def problem_provenance(command: str, model: ModelConfig, layout: Layout, dtype: str) -> dict[str, Any]:
    """What a table was made for, in every entry: the loader skips a table made for another
    ``hidden_size`` (vLLM's file names carry no K)."""
    return {"command": command, "preset": model.name, "layout": layout.name, "dtype": dtype,
            "hidden_size": model.hidden_size, "top_k": top_k(model, layout), "shared_experts": layout.shared}


def tuned_provenance(results: dict[int, Best], *, device: str, command: str, model: ModelConfig, layout: Layout,
                     dtype: str, candidates: int, method: str) -> dict[str, Any]:
    return {"tuned": True, "device": device, "date": _now(), **_versions(),
            **problem_provenance(command, model, layout, dtype), "candidates": candidates, "method": method,
            "time_us": {str(m): round(b.time_us, 2) for m, b in results.items()},
            "speedup_vs_default": {str(m): round(b.default_us / b.time_us, 3)
                                   for m, b in results.items() if b.default_us}}


def problem_inputs(model: ModelConfig, layout: Layout, m: int, fp8: bool, device: torch.device,
                   gen: torch.Generator) -> tuple:
    """``fused_moe``'s arguments for M tokens on one rank: random activations and experts (FP8:
    quantized in 128 x 128 blocks), each token routed to top-k of all the model's experts, so an
    EP rank gets the slots of its own experts and -1 for the others' (skipped), as the
    benchmark cases do; with fused shared experts, routed to them too, as ``MoE`` routes."""
    from glm45_ops import quant
    from glm45_ops.bench.case import randn
    from glm45_ops.moe.layer import append_shared_routing

    h, k = model.hidden_size, model.num_experts_per_tok
    x = randn((m, h), torch.bfloat16, device, gen, std=0.5)
    w13 = randn((layout.experts, 2 * layout.inter, h), torch.bfloat16, device, gen, std=h**-0.5)
    w2 = randn((layout.experts, h, layout.inter), torch.bfloat16, device, gen, std=layout.inter**-0.5)
    ids = torch.rand((m, model.n_routed_experts), generator=gen, device=device).topk(k, dim=1).indices.to(torch.int32)
    ids = torch.where(ids < layout.experts, ids, -1)  # EP: other ranks' slots are -1 (skipped)
    wts = torch.rand((m, k), generator=gen, device=device)
    if layout.shared:
        wts, ids = append_shared_routing(wts, ids, model.n_routed_experts, layout.shared)
    if not fp8:
        return x, w13, w2, wts, ids
    (q13, s13), (q2, s2) = quant.per_block_quant_fp8(w13), quant.per_block_quant_fp8(w2)
    return x, q13, q2, wts, ids, s13, s2


def measure_functions(model: ModelConfig, layout: Layout, dtype: str, device: torch.device,
                      timer: Callable[[Callable[[], Any]], float]) -> tuple[TimeFn, CheckFn]:
    """Time and check functions for :func:`tune_table`: ``fused_moe`` (Triton) on
    :func:`problem_inputs` under each candidate, timed by ``timer(fn) -> us``, checked by the
    op's ``compare`` against the torch backend. Inputs are made once per M."""
    from glm45_ops import moe, registered_ops

    op = registered_ops()["fused_moe"]
    made: dict[int, tuple] = {}

    def problem(m: int) -> tuple:
        if m not in made:
            made.clear()  # one M's inputs at a time: TP1 weights are GBs
            if device.type == "cuda":
                torch.cuda.empty_cache()
            args = problem_inputs(model, layout, m, dtype == "fp8", device, torch.Generator(device).manual_seed(m))
            made[m] = (args, moe.fused_moe(*args, backend="torch"))
        return made[m]

    def run(cfg: dict[str, int], m: int):
        args, _ = problem(m)
        with mc.override(cfg) as hits:
            out = moe.fused_moe(*args, backend="triton")
        if hits["calls"] == 0:
            raise TuneAbort("triton_ops.moe does not ask triton_ops.moe_configs.get_config for its block sizes, "
                            "so no candidate can reach the kernels")
        return out

    def time_fn(cfg: dict[str, int], m: int) -> float:
        run(cfg, m)  # compiles, and proves the override reaches the kernels
        args, _ = problem(m)
        with mc.override(cfg):
            return timer(lambda: moe.fused_moe(*args, backend="triton"))

    def check_fn(cfg: dict[str, int], m: int) -> str | None:
        args, want = problem(m)
        return op.compare(run(cfg, m), want, op.bind(args, {}))  # compare reads the schema's every argument

    return time_fn, check_fn


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _csv(kind: Callable[[str], Any], choices=None):
    """A comma-list argument; each item parsed by ``kind`` and, given ``choices``, one of them."""
    def parse(text: str) -> list:
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if choices is not None and t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices) if choices else 'values'}, "
                                             f"got {text!r}")
        return [kind(t) for t in items]
    return parse


def add_parser(sub) -> None:
    """The ``tune`` subcommand of glm45-bench."""
    p = sub.add_parser("tune", help="time fused-MoE Triton configs on this GPU; write vLLM-format tables")
    p.add_argument("family", choices=["moe"], help="the kernels to tune")
    p.add_argument("--preset", type=_csv(str, sorted(PRESETS)), default=list(DEFAULT_PRESETS),
                   help=f"comma list of model presets (default {','.join(DEFAULT_PRESETS)})")
    names = [f"TP{tp}" for tp in TP_SIZES] + [f"EP{EP_SIZE}"] + [f"TP{tp}{SHARED}" for tp in TP_SIZES]
    p.add_argument("--layouts", type=_csv(str, names), default=None,
                   help="comma list (default: all of each preset's; +shared needs a shared expert)")
    p.add_argument("--dtypes", type=_csv(str, sorted(DTYPES)), default=list(DTYPES), help="comma list (default: all)")
    p.add_argument("--batch-sizes", type=_csv(_positive), default=list(BATCH_SIZES),
                   help="comma list of token counts M (default: vLLM's list, 8192, 16384)")
    p.add_argument("--out", type=pathlib.Path, default=mc.CONFIG_DIR,
                   help="directory for the tables and provenance.json (default: the shipped tables)")
    p.add_argument("--rep-ms", type=_positive, default=20, help="do_bench's timing window per candidate (ms)")
    p.add_argument("--defaults", action="store_true",
                   help="write the heuristic defaults (untuned, no GPU needed) instead of measuring")
    p.add_argument("--device-name", help="the file names' device (default: this GPU's name)")
    p.set_defaults(fail=p.error)


def _out_dir(args: argparse.Namespace) -> None:
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".glm45-tune-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        args.fail(f"argument --out: cannot write to {args.out}: {e.strerror or e}")


def _jobs(args: argparse.Namespace) -> list[tuple[ModelConfig, Layout, str]]:
    """(model, layout, dtype) for each table to write; exits 2 naming a layout a preset lacks."""
    jobs = []
    for name in dict.fromkeys(args.preset):
        model = preset(name)
        have = {lay.name: lay for lay in layouts(model)}
        wanted = list(have) if args.layouts is None else list(dict.fromkeys(args.layouts))
        missing = [lay for lay in wanted if lay not in have]
        if missing:
            args.fail(f"argument --layouts: {name} has no {', '.join(missing)} (no shared expert to fuse)")
        jobs += [(model, have[lay], dt) for lay in wanted for dt in dict.fromkeys(args.dtypes)]
    return jobs


def main(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``glm45-bench tune`` (arguments parsed by glm45-bench's parser)."""
    if not args.defaults and not torch.cuda.is_available():
        args.fail("tune needs a CUDA GPU to time candidate configs (none here); "
                  "--defaults writes the untuned heuristic tables without one")
    device = args.device_name or mc.gpu_name()
    if device is None:
        args.fail("argument --device-name: required without a CUDA GPU")
    device = device.replace(" ", "_")
    jobs = _jobs(args)
    _out_dir(args)
    command = shlex.join(["glm45-bench", *argv])
    written = 0

    def gpu_timer(fn: Callable[[], Any]) -> float:
        from glm45_ops.bench.timing import EAGER, time_gpu

        t = time_gpu(fn, args.rep_ms, WARMUP_MS)
        if t.method.startswith(EAGER):  # the kernels are graph-safe: candidates must be timed alike
            raise TuneAbort(f"fused_moe could not be timed as a CUDA graph ({t.method})")
        return t.median_us

    try:
        for model, lay, dt in jobs:
            dtype = DTYPES[dt]
            block = mc.FP8_BLOCK_SHAPE if dt == "fp8" else None
            fname = mc.config_file_name(lay.experts, lay.inter, dtype, block, device)
            k, slots = model.hidden_size, top_k(model, lay)

            def default(m: int) -> dict[str, int]:
                return mc.default_config(lay.experts, lay.inter, k, m, dtype, block, slots)

            if args.defaults:
                table = {m: default(m) for m in args.batch_sizes}
                prov = {"tuned": False, "source": "triton_ops.moe_configs.default_config: heuristic, not measured",
                        **problem_provenance(command, model, lay, dt)}
            else:
                print(f"{model.name} {lay.name} {dt}: E={lay.experts} N={lay.inter} K={k} -> {fname}", flush=True)
                candidates = search_space(dtype)
                time_fn, check_fn = measure_functions(model, lay, dt, torch.device("cuda"), gpu_timer)
                results = tune_table(args.batch_sizes, candidates, default, time_fn, check_fn)
                table = {m: b.config for m, b in results.items()}
                prov = tuned_provenance(results, device=torch.cuda.get_device_name(), command=command, model=model,
                                        layout=lay, dtype=dt, candidates=len(candidates),
                                        method=f"CUDA graph replay, triton.testing.do_bench(rep={args.rep_ms}ms, "
                                               "L2 flushed), median")
            mc.write_table(args.out, fname, table, prov)
            written += 1
    except TuneAbort as e:
        print(f"glm45-bench tune: {e} ({written} tables written)", file=sys.stderr)
        return 1
    print(f"{written} tables ({'heuristic defaults, not tuned' if args.defaults else 'tuned'}) in {args.out}")
    return 0
