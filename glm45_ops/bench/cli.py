"""``glm45-bench``: the one benchmark entry point.

    glm45-bench <family> [--preset P] [--backends torch,triton,cuda,PEER,...] [--cases SUBSTR,...]
                         [--refcheck] [--json PATH] [--csv PATH] [--plot PNG] [--iters N]
                         [--ceilings FILE] [--tokens T,...] [--eager]
    glm45-bench all ...              every family (a module in glm45_ops/bench/cases/)
    glm45-bench ceilings [--json P]  measure copy bandwidth and bf16/fp8 matmul on this GPU
    glm45-bench compile-report [--json P] [--families F,...]  AOT-compile Triton kernels for sm_90a
    glm45-bench tune moe [--preset P,...] [--out DIR] ...  fused-MoE configs on this GPU (bench/tune.py)
    glm45-bench --info               versions, extension, GPUs

Without a GPU it still runs (torch backend, plus triton when TRITON_INTERPRET=1, on the
``small`` preset), says that the timings are CPU timings, and exits 0. Arguments are checked
before anything runs: a backend that is neither ours nor a peer of the chosen families, a
``--cases`` pattern that matches no case, ``--iters`` or a ``--tokens`` count below 1, an output path that cannot be
written, an unreadable or malformed ``--ceilings`` file or an unknown ``--families`` name exits
2 with one line on stderr, as argparse does. The exit code is 1 when one of our backends errors
or fails its refcheck, or a family's case module is broken.

On a GPU each row times the replay of a CUDA graph of the call (``bench/timing.py``: kernels,
not Python dispatch), unless ``--eager``; a call that syncs the host or cannot be captured is
timed eagerly, marked ``*`` in the table with the reason below it, and a call of one of our ops
on its Triton or CUDA kernel so marked is reported (``NOT GRAPH-SAFE``): our ops must stay
CUDA-graph safe.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from typing import Any

import torch

from glm45_ops.bench import report, roofline, tune
from glm45_ops.bench.case import OUR_BACKENDS, BenchContext, Case
from glm45_ops.bench.cases import FAMILIES, load
from glm45_ops.config import PRESETS, preset

PREFILL_AND_DECODE_TOKENS = (16384, 512, 64, 1)  # a prefill chunk, then decode batch sizes
CPU_TOKENS = (256, 64, 1)
CPU_BANNER = (
    "NOTE: no CUDA GPU here. These are CPU timings (torch reference{triton}) on the 'small'\n"
    "preset: they check that the cases run, and say nothing about GPU performance."
)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr, exit status 2: ``prog: error: message``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _token_counts(text: str) -> tuple[int, ...]:
    """``--tokens 16384,4096,1``: distinct positive counts, largest first (cases take the first
    as the prefill size)."""
    counts = [_positive_int(t) for t in text.split(",") if t.strip()]
    if not counts:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return tuple(sorted(set(counts), reverse=True))


def _output_path(path: str) -> str:
    """A path we can write results to, checked before anything runs (a long run must not fail
    at its end for want of a directory). Opening is the only check that holds for every user
    and file system (``os.access`` says yes to root); a file made by the check is removed."""
    existed = os.path.lexists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {path}: {e.strerror or e}") from None
    if not existed:
        os.remove(path)
    return path


def _ceilings_file(path: str) -> dict[str, roofline.Ceiling]:
    try:
        return roofline.load(path)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{path} is not a ceilings file: {e}") from None


def _kernel_families(text: str) -> list[str]:
    from glm45_ops.bench.compile_report import kernel_families

    names = [f for f in text.split(",") if f]
    known = kernel_families()
    unknown = [f for f in names if f not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"no Triton kernel family {', '.join(unknown)} (choose from {', '.join(known)})")
    return names


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="glm45-bench", description="Benchmarks for glm45-ops kernels.")
    p.add_argument("--info", action="store_true", help="print versions, extension state and GPUs, then exit")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join([*FAMILIES, "all", "ceilings", "compile-report", "tune"]) + "}")
    bench = argparse.ArgumentParser(add_help=False)
    bench.add_argument("--preset", choices=sorted(PRESETS), help="model shapes (default glm-4.5; CPU: always small)")
    bench.add_argument("--backends", default="", help="comma list of our backends and peers (default: all that apply)")
    bench.add_argument("--cases", default="", help="comma list of substrings of case names; '=NAME' matches exactly")
    bench.add_argument("--refcheck", action="store_true", help="compare each backend's outputs with the reference")
    bench.add_argument("--json", type=_output_path, help="write results with the environment to this JSON file")
    bench.add_argument("--csv", type=_output_path, help="write results to this CSV file")
    bench.add_argument("--plot", type=_output_path, help="draw a roofline chart to this PNG")
    bench.add_argument("--iters", type=_positive_int, help="timed calls per row on CPU (GPU: do_bench's 100 ms window)")
    bench.add_argument("--tokens", type=_token_counts, metavar="T,T,...",
                       help=f"token counts to sweep (GPU default {','.join(map(str, PREFILL_AND_DECODE_TOKENS))}; "
                            f"CPU default {','.join(map(str, CPU_TOKENS))})")
    bench.add_argument("--eager", action="store_true",
                       help="GPU: time the calls themselves, not a CUDA graph's replay of them (includes Python launch cost)")
    bench.add_argument("--ceilings", type=_ceilings_file, metavar="FILE",
                       help="ceilings measured by `glm45-bench ceilings --json FILE` (default: the H200 "
                            "numbers in roofline.py, not measured by this project)")
    for fam in [*FAMILIES, "all"]:
        sp = sub.add_parser(fam, parents=[bench], help="benchmark every family" if fam == "all" else f"benchmark the {fam} family")
        sp.set_defaults(fail=sp.error)
    sub.add_parser("ceilings", help="measure this GPU's copy bandwidth and matmul TFLOP/s").add_argument(
        "--json", type=_output_path)
    report_p = sub.add_parser("compile-report", help="AOT-compile Triton kernels for sm_90a; registers, spills")
    report_p.add_argument("--json", type=_output_path)
    report_p.add_argument("--families", type=_kernel_families, default=[],
                          help="comma list of triton_ops modules (default: all)")
    tune.add_parser(sub)
    return p


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _interpreting() -> bool:
    from triton_ops import interpreting

    return interpreting()


def _selected(case: Case, patterns: list[str]) -> bool:
    if not patterns:
        return True
    return any(case.name == p[1:] if p.startswith("=") else p in case.name for p in patterns)


def _gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def _record(argv: list[str], ctx: BenchContext, ceilings: dict) -> dict[str, Any]:
    from glm45_ops import info
    from glm45_ops.bench.peers import find_peers

    return {
        "tool": "glm45-bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["glm45-bench", *argv]),
        "gpu": _gpu_name(),
        "cpu_timings": not ctx.on_gpu,
        "preset": ctx.model.name,
        "tokens": list(ctx.tokens),
        "env": info(),
        "peers": find_peers(),
        "ceilings": roofline.dump(ceilings),
    }


def _case_repros(cases: list[Case], rows: list, repro) -> list[str]:
    """One repro command per case, naming the backends that ran (not the skipped ones)."""
    ran = {c.name: [r.backend for r in rows if r.case == c.name and r.status != "skip"] for c in cases}
    return [f"repro [{c.name}]: {repro(c, ran[c.name])}" for c in cases if ran[c.name]]


def _load_cases(args: argparse.Namespace, ctx: BenchContext) -> tuple[dict[str, list[Case]], dict[str, str]]:
    """Each chosen family's cases, and why each family that failed to load failed. Then
    ``--cases`` and ``--backends`` are checked against them: every pattern must match a case and
    every name must be ours or a peer of one (argparse-style error, exit 2, before anything runs)."""
    families = list(FAMILIES) if args.command == "all" else [args.command]
    loaded, broken = {}, {}
    for fam in families:
        try:
            loaded[fam] = load(fam).cases(ctx)
        except Exception as e:  # a broken family must not take the others down
            broken[fam] = f"{type(e).__name__}: {e}"
    note = f" ({', '.join(broken)}: case module failed to load)" if broken else ""
    every = [c for cases in loaded.values() for c in cases]
    for p in _patterns(args):
        if loaded and not any(_selected(c, [p]) for c in every):
            args.fail(f"argument --cases: {p!r} matches no case of {', '.join(loaded)}{note}")
    offered = list(OUR_BACKENDS) + sorted({p for c in every for p in c.peers})
    unknown = [b for b in _wanted(args) if b not in offered]
    if loaded and unknown:
        args.fail(f"argument --backends: {', '.join(map(repr, unknown))} is neither one of our backends nor a peer "
                  f"of {', '.join(loaded)} (choose from {', '.join(offered)}){note}")
    return ({fam: [c for c in cases if _selected(c, _patterns(args))] for fam, cases in loaded.items()}, broken)


def _patterns(args: argparse.Namespace) -> list[str]:
    return [p for p in args.cases.split(",") if p]


def _wanted(args: argparse.Namespace) -> list[str]:
    return [b for b in args.backends.split(",") if b]


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    from glm45_ops.bench.peers import find_peers
    from glm45_ops.bench.runner import run_case

    device = _device()
    on_gpu = device.type == "cuda"
    model = preset((args.preset or "glm-4.5") if on_gpu else "small")
    tokens = args.tokens or (PREFILL_AND_DECODE_TOKENS if on_gpu and model.name != "small" else CPU_TOKENS)
    ctx = BenchContext(model, device, tokens)
    chosen, broken = _load_cases(args, ctx)
    if not on_gpu:
        print(CPU_BANNER.format(triton=" and Triton in the interpreter" if _interpreting() else ""))
        if args.preset not in (None, "small"):
            print(f"(--preset {args.preset} shapes need a GPU; using 'small')")
    ceilings = args.ceilings or dict(roofline.H200_DEFAULTS)
    print(f"device: {_gpu_name()}   preset: {model.name}   tokens: {list(ctx.tokens)}")
    print("peers: " + ", ".join(f"{m} ({s})" for m, s in find_peers().items()))
    print("% roofline is of: " + "; ".join(f"{k} {c.label}" for k, c in ceilings.items()))
    if not args.ceilings and on_gpu:
        print("(default ceilings: `glm45-bench ceilings --json FILE`, then `--ceilings FILE`, uses this GPU's own)")

    wanted = _wanted(args)
    if not wanted and not on_gpu:
        wanted = ["torch"] + (["triton"] if _interpreting() else [])

    def repro(case: Case, backends: list[str]) -> str:
        env = "TRITON_INTERPRET=1 " if "triton" in backends and _interpreting() else ""
        cmd = ["glm45-bench", case.family, "--preset", model.name, "--cases", "=" + case.name,
               "--backends", ",".join(backends)] + (["--refcheck"] if args.refcheck else [])
        return env + shlex.join(cmd)

    record = _record(argv, ctx, ceilings)

    def save(rows: list) -> None:  # after every case too, so a run cut short by a timeout keeps its rows
        if args.json:
            report.write_json(args.json, record, rows)
        if args.csv:
            report.write_csv(args.csv, record, rows)

    results, offered, skip_reasons = [], set(), set()
    for fam in [f for f in FAMILIES if f in chosen or f in broken]:
        if fam in broken:
            print(f"\n[{fam}] case module failed: {broken[fam]}")
            continue
        rows = []
        for case in chosen[fam]:
            offered.update(case.all_backends)
            for b in case.all_backends:
                if not wanted or b in wanted:
                    rows.append(run_case(case, b, device, refcheck=args.refcheck, iters=args.iters, cuda_graph=not args.eager,
                                         ceilings=ceilings, repro=repro))
                    r = rows[-1]
                    brief = "skip (as above)" if r.status == "skip" and r.reason in skip_reasons else report.brief(r)
                    skip_reasons.add(r.reason)
                    print(f"  {fam} | {case.name} | {b}: {brief}", file=sys.stderr, flush=True)
                    if case.report is not None and r.params is not case.params:
                        figures = ", ".join(f"{k} {r.params[k]:.4g}" for k in r.params if k not in case.params)
                        print(f"  {fam} | {case.name} | report: {figures}", flush=True)
            save(results + rows)
        print(f"\n[{fam}]" + (" CPU timings" if not on_gpu else ""))
        print(report.table(rows))
        print("\n".join(_case_repros(chosen[fam], rows, repro) + report.verdicts(rows)))
        results += rows
    if set(wanted) - offered:
        print(f"backends not offered by the selected cases: {', '.join(sorted(set(wanted) - offered))}")

    save(results)
    if args.plot:
        title = f"glm45-bench {' '.join(argv)} on {record['gpu']}" + (" (CPU timings)" if not on_gpu else "")
        try:
            report.plot(args.plot, results, ceilings, title)
        except ImportError as e:  # matplotlib is a dev extra; the results are already written
            print(f"--plot skipped: {e}")
    failed = [r for r in results if r.backend in OUR_BACKENDS
              and (r.status == "error" or r.refcheck.startswith(("FAIL", "error")))]
    for r in failed:
        print(f"FAILED: {r.case} [{r.backend}]: {r.reason or r.refcheck}")
    # a call of one of our ops on its Triton or CUDA kernel must not sync (the torch backend is
    # the definition and may; a case that runs a whole model is not one op call)
    unsafe = [r for r in results if r.op_call and r.backend in ("triton", "cuda") and report.eager_fallback(r)]
    for r in unsafe:
        print(f"NOT GRAPH-SAFE: {r.case} [{r.backend}]: {report.eager_fallback(r)}")
    return 1 if failed or unsafe or broken else 0


def _print_info() -> int:
    from glm45_ops import info
    from glm45_ops.bench.peers import find_peers

    data = {**info(), "peers": find_peers()}
    width = max(map(len, data))
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{key:<{width}}  {len(value)}")
            for item in value:
                print(" " * (width + 2) + ", ".join(f"{k}={v}" for k, v in item.items()))
        elif isinstance(value, dict):
            print(f"{key:<{width}}  " + ", ".join(f"{k}: {v}" for k, v in value.items()))
        elif isinstance(value, list):
            print(f"{key:<{width}}  {', '.join(map(str, value)) or '-'}")
        else:
            print(f"{key:<{width}}  {value}")
    return 0


def _ceilings(args: argparse.Namespace, argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure. Benchmarks use these ceilings by default:")
        for kind, c in roofline.H200_DEFAULTS.items():
            print(f"  {kind:<13} {c.label}")
        return 0
    measured = roofline.measure(torch.device("cuda"))
    print(f"ceilings measured on {_gpu_name()}:")
    for kind, (c, how) in measured.items():
        default = roofline.H200_DEFAULTS[kind]
        print(f"  {kind:<13} {c.value / 1e12:8.1f} {c.unit:<8} ({how}; default {default.value / 1e12:.0f})")
    if args.json:
        from glm45_ops import info

        record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": shlex.join(["glm45-bench", *argv]), "env": info(),
                  "ceilings": roofline.dump({k: c for k, (c, _) in measured.items()})}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=str)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.info:
        return _print_info()
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "ceilings":
        return _ceilings(args, argv)
    if args.command == "compile-report":
        from glm45_ops.bench import compile_report

        return compile_report.main(args.json, args.families or None)
    if args.command == "tune":
        return tune.main(args, argv)
    return _bench(args, argv)


if __name__ == "__main__":
    sys.exit(main())
