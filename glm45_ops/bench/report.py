"""Print, save and plot benchmark results (the table, JSON, CSV, the roofline chart)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from typing import Any, Iterable

from glm45_ops.bench.roofline import Ceiling
from glm45_ops.bench.runner import Result

_HEAD = ("case", "shape", "backend", "median us (p20/p80)", "GB/s", "TFLOP/s", "% roofline", "refcheck")


def _rate(v: float | None) -> str:
    """Throughputs with three significant digits below 100 (CPU runs give tiny numbers)."""
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def eager_fallback(r: Result) -> str | None:
    """Why a GPU row was timed eagerly although CUDA graphs were asked for (None: it was not)."""
    from glm45_ops.bench.timing import EAGER

    if r.status != "ok" or not r.timing.startswith(EAGER) or "as asked" in r.timing:
        return None
    return r.timing.removeprefix(EAGER + ": ").split(";")[0]


def _cells(r: Result) -> tuple[str, ...]:
    if r.status != "ok":
        return (r.case, r.shape, r.backend, f"{r.status}: {r.reason}", "", "", "", "")
    timing = f"{r.median_us:,.1f} ({r.p20_us:,.1f}/{r.p80_us:,.1f})" + (" *" if eager_fallback(r) else "")
    pct = "n/a (CPU)" if r.pct_of_roofline is None else f"{r.pct_of_roofline:.1f}% {r.roofline.split(':')[0]}"
    return (r.case, r.shape, r.backend, timing, _rate(r.gbps), _rate(r.tflops), pct, r.refcheck)


def brief(r: Result) -> str:
    """One result in a few words (the CLI's progress lines)."""
    if r.status != "ok":
        return f"{r.status}: {r.reason}"
    return f"{r.median_us:,.1f} us, {_rate(r.gbps)} GB/s, refcheck {r.refcheck}"


def table(results: Iterable[Result]) -> str:
    """The results as an aligned text table; skips are summarised below it, one line per reason."""
    results = list(results)
    shown = [r for r in results if r.status != "skip"]
    rows = [_HEAD] + [_cells(r) for r in shown]
    widths = [max(len(row[i]) for row in rows if row[i] or i < 3) for i in range(len(_HEAD))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    skips: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in results:
        if r.status == "skip":
            skips[(r.backend, r.reason)].append(r.case)
    for (backend, reason), cases in skips.items():
        lines.append(f"skipped {backend} on {len(cases)} case(s): {reason}")
    eager: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in shown:
        why = eager_fallback(r)
        if why:
            eager[(r.backend, why)].append(r.case)
    for (backend, why), cases in eager.items():
        lines.append(f"* timed eagerly, {backend} on {len(cases)} case(s): {why}")
    return "\n".join(lines)


def verdicts(results: Iterable[Result]) -> list[str]:
    """Per case with a timed peer: our fastest backend against the fastest peer (the targets
    say "faster than the best peer available in the same run")."""
    from glm45_ops.bench.case import OUR_BACKENDS

    by_case: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        if r.status == "ok":
            by_case[r.case].append(r)
    lines = []
    for case, rows in by_case.items():
        ours = [r for r in rows if r.backend in OUR_BACKENDS]
        peers = [r for r in rows if r.backend not in OUR_BACKENDS]
        if ours and peers:
            a = min(ours, key=lambda r: r.median_us)
            b = min(peers, key=lambda r: r.median_us)
            lines.append(f"vs peers [{case}]: ours {a.backend} {a.median_us:,.1f} us, best peer {b.backend} "
                         f"{b.median_us:,.1f} us: {b.median_us / a.median_us:.2f}x")
    return lines


def write_json(path: str, record: dict[str, Any], results: Iterable[Result]) -> None:
    with open(path, "w") as f:
        json.dump({**record, "results": [r.asdict() for r in results]}, f, indent=1, default=str)


def write_csv(path: str, record: dict[str, Any], results: Iterable[Result]) -> None:
    rows = [{"date": record["date"], "gpu": record["gpu"], **r.asdict()} for r in results]
    for row in rows:
        row["params"] = json.dumps(row["params"])
    with open(path, "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def plot(path: str, results: Iterable[Result], ceilings: dict[str, Ceiling], title: str) -> None:
    """Roofline chart. Left: arithmetic intensity vs achieved TFLOP/s with the bf16/fp8 compute
    roofs and the bandwidth slope, for cases that do arithmetic. Right: achieved GB/s against the
    copy ceiling for pure data movement (intensity ~0 has no place on a log-log roofline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    compute = [r for r in ok if r.flops]
    memory = [r for r in ok if not r.flops]
    fig, (ax_roof, ax_bw) = plt.subplots(1, 2, figsize=(15, max(5, 0.25 * len(memory) + 2)))
    bw = ceilings["memory"].value
    xs = [0.1 * 1.3**i for i in range(45)]  # 0.1 .. ~1e4 FLOP/byte
    for kind, style in (("compute:bf16", "-"), ("compute:fp8", "--")):
        peak = ceilings[kind].value
        ax_roof.plot(xs, [min(peak, bw * x) / 1e12 for x in xs], style, label=f"{kind}: {ceilings[kind].label}")
    for r in compute:
        ax_roof.scatter(r.intensity, r.tflops, s=18)
        ax_roof.annotate(f"{r.case} [{r.backend}]", (r.intensity, r.tflops), fontsize=6)
    ax_roof.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte)", ylabel="TFLOP/s",
                title="compute cases" if compute else "compute cases (none in this run)")
    ax_roof.legend(fontsize=7)
    labels = [f"{r.case} [{r.backend}]" for r in memory]
    ax_bw.barh(range(len(memory)), [r.gbps for r in memory])
    for i, r in enumerate(memory):
        ax_bw.annotate(f" {r.gbps:,.3g}", (r.gbps, i), va="center", fontsize=6)
    ax_bw.axvline(bw / 1e9, color="k", linestyle="--", label=f"copy ceiling: {ceilings['memory'].label}")
    ax_bw.set_yticks(range(len(memory)), labels, fontsize=6)
    ax_bw.invert_yaxis()
    ax_bw.set(xlabel="GB/s", title="memory-bound cases")
    ax_bw.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
