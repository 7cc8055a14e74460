"""``glm45-bench``: the one benchmark entry point.

    glm45-bench <family> [--preset P] [--backends torch,triton,cuda,...] [--cases SUBSTR,...]
                         [--refcheck] [--json PATH] [--csv PATH] [--plot PNG] [--iters N]
                         [--ceilings PATH]
    glm45-bench all ...              every family in glm45_ops/bench/cases/__init__.py
    glm45-bench ceilings [--json P]  measure copy bandwidth and bf16/fp8 matmul on this GPU
    glm45-bench compile-report [--json P]  AOT-compile the Triton kernels for sm_90a
    glm45-bench --info               versions, extension, GPUs

Without a GPU it still runs (torch backend, plus triton when TRITON_INTERPRET=1, on the
``small`` preset), says that the timings are CPU timings, and exits 0. The exit code is 1 only
when one of our backends errors or fails its refcheck, or a family's case module is broken.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from typing import Any

import torch

from glm45_ops.bench import report, roofline
from glm45_ops.bench.case import OUR_BACKENDS, BenchContext, Case
from glm45_ops.bench.cases import FAMILIES, load
from glm45_ops.config import PRESETS, preset

PREFILL_AND_DECODE_TOKENS = (16384, 512, 64, 1)  # a prefill chunk, then decode batch sizes
CPU_TOKENS = (256, 64, 1)
CPU_BANNER = (
    "NOTE: no CUDA GPU here. These are CPU timings (torch reference{triton}) on the 'small'\n"
    "preset: they check that the cases run, and say nothing about GPU performance."
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm45-bench", description="Benchmarks for glm45-ops kernels.")
    p.add_argument("--info", action="store_true", help="print versions, extension state and GPUs, then exit")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join([*FAMILIES, "all", "ceilings", "compile-report"]) + "}")
    bench = argparse.ArgumentParser(add_help=False)
    bench.add_argument("--preset", choices=sorted(PRESETS), help="model shapes (default glm-4.5; CPU: always small)")
    bench.add_argument("--backends", default="", help="comma list of our backends and peers (default: all that apply)")
    bench.add_argument("--cases", default="", help="comma list of substrings of case names; '=NAME' matches exactly")
    bench.add_argument("--refcheck", action="store_true", help="compare each backend's outputs with the reference")
    bench.add_argument("--json", help="write results with the environment to this JSON file")
    bench.add_argument("--csv", help="write results to this CSV file")
    bench.add_argument("--plot", help="draw a roofline chart to this PNG")
    bench.add_argument("--iters", type=int, help="timed calls per row on CPU (GPU: do_bench's 100 ms window)")
    bench.add_argument("--ceilings", help="use ceilings from `glm45-bench ceilings --json` output")
    for fam in FAMILIES:
        sub.add_parser(fam, parents=[bench], help=f"benchmark the {fam} family")
    sub.add_parser("all", parents=[bench], help="benchmark every family")
    sub.add_parser("ceilings", help="measure this GPU's copy bandwidth and matmul TFLOP/s").add_argument("--json")
    report_p = sub.add_parser("compile-report", help="AOT-compile Triton kernels for sm_90a; registers, spills")
    report_p.add_argument("--json")
    report_p.add_argument("--families", default="", help="comma list of triton_ops modules (default: all)")
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


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    from glm45_ops.bench.peers import find_peers
    from glm45_ops.bench.runner import run_case

    device = _device()
    on_gpu = device.type == "cuda"
    model = preset((args.preset or "glm-4.5") if on_gpu else "small")
    ctx = BenchContext(model, device, PREFILL_AND_DECODE_TOKENS if on_gpu and model.name != "small" else CPU_TOKENS)
    if not on_gpu:
        print(CPU_BANNER.format(triton=" and Triton in the interpreter" if _interpreting() else ""))
        if args.preset not in (None, "small"):
            print(f"(--preset {args.preset} shapes need a GPU; using 'small')")
    ceilings = roofline.load(args.ceilings) if args.ceilings else dict(roofline.H200_MEASURED)
    print(f"device: {_gpu_name()}   preset: {model.name}   tokens: {list(ctx.tokens)}")
    print("peers: " + ", ".join(f"{m} ({s})" for m, s in find_peers().items()))
    print("% roofline is of: " + "; ".join(f"{k} {c.label}" for k, c in ceilings.items()))

    wanted = [b for b in args.backends.split(",") if b]
    if not wanted and not on_gpu:
        wanted = ["torch"] + (["triton"] if _interpreting() else [])
    patterns = [p for p in args.cases.split(",") if p]

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

    families = list(FAMILIES) if args.command == "all" else [args.command]
    results, broken, offered, skip_reasons = [], False, set(), set()
    for fam in families:
        try:
            cases = [c for c in load(fam).cases(ctx) if _selected(c, patterns)]
        except Exception as e:  # a missing or broken family must not take the others down
            missing = isinstance(e, ModuleNotFoundError) and e.name == FAMILIES[fam]
            print(f"\n[{fam}] " + ("no case module yet" if missing else f"case module failed: {type(e).__name__}: {e}"))
            broken |= not missing
            continue
        rows = []
        for case in cases:
            offered.update(case.all_backends)
            for b in case.all_backends:
                if not wanted or b in wanted:
                    rows.append(run_case(case, b, device, refcheck=args.refcheck, iters=args.iters,
                                         ceilings=ceilings, repro=repro))
                    r = rows[-1]
                    brief = "skip (as above)" if r.status == "skip" and r.reason in skip_reasons else report.brief(r)
                    skip_reasons.add(r.reason)
                    print(f"  {fam} | {case.name} | {b}: {brief}", file=sys.stderr, flush=True)
            save(results + rows)
        print(f"\n[{fam}]" + (" CPU timings" if not on_gpu else ""))
        print(report.table(rows))
        print("\n".join(_case_repros(cases, rows, repro) + report.verdicts(rows)))
        results += rows
    if set(wanted) - offered:
        print(f"backends not offered by any case: {', '.join(sorted(set(wanted) - offered))}")

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
    return 1 if failed or broken else 0


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
        for kind, c in roofline.H200_MEASURED.items():
            print(f"  {kind:<13} {c.label}")
        return 0
    measured = roofline.measure(torch.device("cuda"))
    print(f"ceilings measured on {_gpu_name()}:")
    for kind, (c, how) in measured.items():
        default = roofline.H200_MEASURED[kind]
        print(f"  {kind:<13} {c.value / 1e12:8.1f} {c.unit:<8} ({how}; KNOWLEDGE.md value {default.value / 1e12:.0f})")
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

        return compile_report.main(args.json, [f for f in args.families.split(",") if f] or None)
    return _bench(args, argv)


if __name__ == "__main__":
    sys.exit(main())
