"""``glm45-bench compile-report``: what the GPU code costs in hardware resources, with no GPU.

* Triton: every ``COMPILE_SPECS`` entry of every ``triton_ops/<family>.py`` (format in
  ``triton_ops/__init__.py``) is compiled ahead of time for sm_90a (``triton.compile`` with
  ``GPUTarget("cuda", 90, 32)``); ``ptxas -v`` on its PTX gives registers and spill bytes,
  Triton's metadata the shared memory. ``wgmma`` in the PTX means Hopper tensor cores are used;
  ``div.full.f32`` means an approximate division, which would break the quantizers' bit-exactness
  (they must use ``div.rn.f32``).
* CUDA: when ``glm45_ops._C`` is built, ``cuobjdump --dump-resource-usage`` on it lists each
  kernel's registers, stack, shared and local (spill) memory.

Compilation runs in a child process without ``TRITON_INTERPRET`` (kernels defined under the
interpreter cannot be compiled), so the report also works from a test session.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

TARGET_ARCH = 90  # sm_90a: Triton compiles capability 90 with the "a" features (wgmma, setmaxnreg)
CHILD_TIMEOUT_S = 600
BIT_EXACT_FAMILIES = ("quant",)  # their kernels must divide with IEEE rounding
_MARK = "@@compile-report@@"  # the child's JSON follows this line (imports may print before it)


def _tool(name: str) -> str | None:
    """Path of ``ptxas`` / ``cuobjdump``: Triton's bundled copy first (known to support the PTX
    it emits), then PATH. Triton >= 3.4 has ``knobs``; ``get_ptxas(arch)`` picks Blackwell's."""
    try:
        import triton

        if name == "ptxas":
            from triton.backends.nvidia.compiler import get_ptxas

            return get_ptxas(TARGET_ARCH).path
        return getattr(triton.knobs.nvidia, name).path
    except Exception:
        return shutil.which(name)


def _ptxas_usage(ptxas: str, ptx: str) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{TARGET_ARCH}a", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_stores": int(spills.group(1)) if spills else -1,
            "spill_loads": int(spills.group(2)) if spills else -1}


def _division(ptx: str) -> str:
    if re.search(r"\bdiv\.(full|approx)\.f32", ptx):
        return "APPROX (div.full/approx.f32)"
    return "ieee (div.rn.f32)" if re.search(r"\bdiv\.rn(\.ftz)?\.f32", ptx) else "-"


def _compile_spec(family: str, spec, ptxas: str) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row: dict[str, Any] = {"family": family, "kernel": spec.kernel.__name__, "config": spec.label,
                           "num_warps": spec.options.get("num_warps", 4), "num_stages": spec.options.get("num_stages", 3)}
    names = list(spec.signature)
    if names != list(spec.kernel.arg_names):
        row["error"] = f"signature keys {names} differ from the kernel's arguments {list(spec.kernel.arg_names)}"
        return row
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in names if spec.signature[n].startswith("*") or n in spec.aligned}
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(spec.kernel, spec.signature, spec.constexprs, attrs),
                                  target=GPUTarget("cuda", TARGET_ARCH, 32), options=spec.options)
        ptx = compiled.asm["ptx"]
        row.update(_ptxas_usage(ptxas, ptx))
    except Exception as e:  # one kernel that fails to compile is a finding, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        return row
    row.update(shared_bytes=compiled.metadata.shared, wgmma="wgmma" in ptx, division=_division(ptx),
               compile_s=round(time.perf_counter() - t0, 2))
    return row


def kernel_families() -> list[str]:
    """The ``triton_ops`` modules (one per family), found without importing them (or Triton)."""
    spec = importlib.util.find_spec("triton_ops")
    return sorted(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations) if not m.name.startswith("_"))


def triton_rows(families: list[str] | None = None) -> list[dict[str, Any]]:
    """Compile every COMPILE_SPECS entry (call in a process without TRITON_INTERPRET)."""
    ptxas = _tool("ptxas")
    rows = []
    for mod in kernel_families():
        if families and mod not in families:
            continue
        try:
            specs = getattr(importlib.import_module(f"triton_ops.{mod}"), "COMPILE_SPECS", None)
        except Exception as e:
            rows.append({"family": mod, "kernel": "-", "config": "-", "error": f"import failed: {type(e).__name__}: {e}"})
            continue
        if specs is None:
            rows.append({"family": mod, "kernel": "-", "config": "-", "error": "no COMPILE_SPECS in triton_ops/" + mod + ".py"})
            continue
        rows += [_compile_spec(mod, spec, ptxas) for spec in specs]
    return rows


def extension_rows() -> tuple[list[dict[str, Any]], str]:
    """Per-kernel resource usage of the built ``glm45_ops._C`` (and a note), via cuobjdump."""
    spec = importlib.util.find_spec("glm45_ops._C")
    if spec is None or not spec.origin:
        return [], "glm45_ops._C is not built: no CUDA kernel resource usage"
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        return [], "cuobjdump not found (Triton ships one; so does the CUDA toolkit)"
    out = subprocess.run([cuobjdump, "--dump-resource-usage", spec.origin], capture_output=True, text=True)
    rows, arch = [], ""
    for line in out.stdout.splitlines():
        if m := re.match(r"\s*arch = (\S+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            rows.append({"kernel": m.group(1), "arch": arch})
        elif rows and "REG:" in line:
            rows[-1].update({k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)})
    demangle = shutil.which("c++filt")
    if demangle and rows:
        names = subprocess.run([demangle], input="\n".join(r["kernel"] for r in rows), capture_output=True, text=True)
        for r, name in zip(rows, names.stdout.splitlines()):
            r["kernel"] = name
    note = f"{spec.origin}: {len(rows)} kernel(s)" + ("" if out.returncode == 0 else f"; cuobjdump: {out.stderr.strip()}")
    return rows, note


def _display_name(kernel: str) -> str:
    """A readable table name; the JSON keeps the full one. CUTLASS kernels are named by their
    MMA atom and output type (their full names run to thousands of characters)."""
    if "cutlass" in kernel:
        mma = re.search(r"MMA_(\d+x\d+x\d+)_F32(E4M3|E5M2|BF16|F16)\w*?_(SS|RS)", kernel)
        out = "bf16" if "bfloat16_t" in kernel else "fp32"
        sched = "stream-K" if "StreamK" in kernel else "persistent" if "Persistent" in kernel else ""
        return " ".join(x for x in ("cutlass gemm", mma.group(1) if mma else "", mma.group(2) if mma else "",
                                    f"-> {out}", sched) if x)
    name = kernel.removeprefix("void ")
    if name.endswith(")"):  # drop the parameter list: the "(" matching the last ")"
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name.replace("glm45::(anonymous namespace)::", "").replace("glm45::", "")


def collect(families: list[str] | None = None) -> dict[str, Any]:
    """Run the Triton part in a child process without TRITON_INTERPRET, the CUDA part here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "glm45_ops.bench.compile_report", "--child", ",".join(families or [])]
    child = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_S)
    if child.returncode != 0:
        raise RuntimeError(f"compile child failed ({child.returncode}): {child.stderr.strip()[-2000:]}")
    cuda_rows, cuda_note = extension_rows()
    triton = json.loads(child.stdout.rsplit(_MARK, 1)[1])
    return {"target": f"sm_{TARGET_ARCH}a", "ptxas": _tool("ptxas"), "triton": triton,
            "cuda": cuda_rows, "cuda_note": cuda_note}


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    cells = [cols] + [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def main(json_path: str | None = None, families: list[str] | None = None) -> int:
    """Print the report (and write it as JSON); 1 if a kernel failed to compile or spilled, or a
    bit-exact family's kernel divides approximately."""
    import datetime

    report = collect(families)
    report["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    ok = [r for r in report["triton"] if "error" not in r]
    print(f"Triton kernels compiled for {report['target']} (no GPU needed; ptxas: {report['ptxas']})")
    print(_table(ok, ["family", "kernel", "config", "num_warps", "num_stages", "registers", "spill_stores",
                      "spill_loads", "shared_bytes", "wgmma", "division", "compile_s"]))
    for r in report["triton"]:
        if "error" in r:
            print(f"  {r['family']}: {r['kernel']} {r['config']}: {r['error']}")
    print(f"\nCUDA extension: {report['cuda_note']}")
    if report["cuda"]:
        shown = [{**r, "kernel": _display_name(r["kernel"])} for r in report["cuda"]]
        print(_table(shown, ["kernel", "arch", "reg", "stack", "shared", "local"]))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    bad = [r for r in report["triton"] if r.get("spill_stores", 0) > 0 or ("error" in r and r["kernel"] != "-")
           or (r["family"] in BIT_EXACT_FAMILIES and str(r.get("division", "")).startswith("APPROX"))]
    for r in bad:
        why = r.get("error") or ("spills" if r.get("spill_stores", 0) > 0 else r.get("division"))
        print(f"PROBLEM: {r['family']} {r['kernel']} [{r['config']}]: {why}")
    return 1 if bad else 0


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    fams = [f for f in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if f]
    print(_MARK + json.dumps(triton_rows(fams or None)))
