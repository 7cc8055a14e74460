"""glm45-bench in-process on the CPU: the quant table, JSON/CSV/plot, argument checks, peers as
data, ceilings provenance, --info, compile-report."""

import ast
import csv
import json
import pathlib

import pytest
import torch

from conftest import cpu_backends
from glm45_ops.bench import cases as cases_mod
from glm45_ops.bench import cli, roofline
from glm45_ops.bench.case import BenchContext, Case, OpRun, Skip
from glm45_ops.config import preset
from glm45_ops.testing import one_thread

QUANT_KERNELS = {"_per_token_group_quant_fp8_kernel", "_per_block_quant_fp8_kernel", "_dequant_fp8_kernel"}
BENCH_DIR = pathlib.Path(cli.__file__).parent
CPU = torch.device("cpu")
SMALL = BenchContext(preset("small"), CPU, cli.CPU_TOKENS)
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")


@pytest.fixture(autouse=True)
def _one_thread():
    """The CI box is shared: torch's thread pool under contention turns microseconds into
    milliseconds per op. One thread keeps the CPU timings (and these tests) stable."""
    with one_thread():
        yield


def _quant_case_names() -> list[str]:
    return [c.name for c in cases_mod.load("quant").cases(SMALL)]


@cpu_only
def test_quant_torch_cpu_table_json_csv_plot_ceilings(tmp_path, capsys):
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    ceilings = tmp_path / "ceilings.json"
    mine = {"memory": roofline.Ceiling(1.25e12, "a test GPU, measured today", "TB/s")}
    ceilings.write_text(json.dumps({"ceilings": roofline.dump(mine)}))
    rc = cli.main(["quant", "--preset", "small", "--backends", "torch", "--refcheck", "--iters", "2",
                   "--json", str(out_json), "--csv", str(out_csv), "--plot", str(out_png),
                   "--ceilings", str(ceilings)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "CPU timings" in text
    assert "memory 1.2 TB/s (a test GPU, measured today)" in text  # --ceilings replaces the default
    names = _quant_case_names()
    for name in names:
        assert name in text
        assert f"--cases '={name}' --backends torch --refcheck" in text  # one repro per case

    record = json.loads(out_json.read_text())
    assert record["cpu_timings"] is True and record["gpu"] == "no GPU"
    assert record["command"].startswith("glm45-bench quant") and record["date"]
    assert record["env"]["torch"] == torch.__version__ and "gpus" in record["env"]
    assert record["ceilings"]["memory"]["value"] == 1.25e12
    assert record["ceilings"]["compute:fp8"] == roofline.dump(roofline.H200_DEFAULTS)["compute:fp8"]
    rows = record["results"]
    assert [r["case"] for r in rows] == names
    for r in rows:
        assert r["status"] == "ok" and r["backend"] == "torch" and r["refcheck"] == "reference"
        assert r["median_us"] > 0 and r["p20_us"] <= r["median_us"] <= r["p80_us"]
        assert r["gbps"] > 0 and r["pct_of_roofline"] is None  # no % of an H200 ceiling for CPU timings

    with open(out_csv) as f:
        assert [r["case"] for r in csv.DictReader(f)] == names
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@cpu_only
@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs a usable Triton interpreter")
def test_refcheck_triton_interpreter_and_skips(tmp_path, capsys):
    names = ["per_token_group_quant_fp8 M=64", "dequant_fp8 activations 1x128"]
    out_json = tmp_path / "r.json"
    rc = cli.main(["quant", "--backends", "torch,triton,cuda", "--cases", ",".join("=" + n for n in names),
                   "--refcheck", "--iters", "1", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0
    rows = {(r["case"], r["backend"]): r for r in json.loads(out_json.read_text())["results"]}
    assert len(rows) == 6
    for case in names:
        assert rows[(case, "triton")]["refcheck"] == "pass"  # bit-exact vs the torch reference
        assert rows[(case, "cuda")]["status"] == "skip"
    assert text.count("skipped cuda on 1 case(s): glm45::") == 2  # one line per distinct reason


def _case(run, compare=None) -> Case:
    x = torch.tensor([1.0, float("nan"), -0.0])
    return Case(family="t", name="c", shape="[3]", inputs=lambda device, gen: (x,), run=run, bytes_moved=12,
                compare=compare)


def test_refcheck_uses_the_shared_equality():
    """Without a rule of its own, --refcheck is glm45_ops.testing's: NaN matches NaN (a private
    copy comparing raw bits or values would get one of these wrong), -0.0 differs from 0.0."""
    from glm45_ops.bench.runner import _refcheck

    same = _case(lambda backend, device, x: (lambda: x.clone()))
    assert _refcheck(same, "triton", same.make("triton", CPU, torch.Generator())(), CPU) == "pass"
    zeroed = _case(lambda backend, device, x: (lambda: x.clone() if backend == "torch" else x.abs()))
    assert _refcheck(zeroed, "triton", zeroed.make("triton", CPU, torch.Generator())(), CPU).startswith(
        "FAIL: output 0: 1 of 3 elements differ")
    lenient = _case(zeroed.run, compare=lambda out, ref: None)
    assert _refcheck(lenient, "triton", lenient.make("triton", CPU, torch.Generator())(), CPU) == "pass"


def test_op_runner_binds_the_op_arguments():
    """Our backends run through op_runner, which carries the op and its bound arguments (defaults
    from the schema), so --refcheck can apply the op's own ``compare``."""
    case = next(c for c in cases_mod.load("quant").cases(SMALL) if c.name == "per_token_group_quant_fp8 M=1")
    run = case.make("torch", CPU, torch.Generator().manual_seed(0))
    assert isinstance(run, OpRun) and run.op.name == "per_token_group_quant_fp8"
    assert run.args[1:] == (128, 1e-4, False, False)


def _loaded_cases() -> list[Case]:
    out = []
    for fam in cases_mod.FAMILIES:
        try:
            out += cases_mod.load(fam).cases(SMALL)
        except ImportError:  # a family being ported may be broken for a moment; the others still count
            continue
    return out


def test_peers_are_data_and_skip_without_their_library():
    cases = _loaded_cases()
    assert any(c.peers for c in cases)
    for case in cases:
        assert all(isinstance(name, str) and callable(f) for name, f in case.peers.items()), case.name
    quant = [c for c in cases if c.family == "quant" and "vllm" in c.peers]
    assert quant
    with pytest.raises(Skip, match="vllm runs on GPU only|vllm not importable"):
        quant[0].make("vllm", CPU, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="backend must be one of"):
        quant[0].make("bogus", CPU, torch.Generator())


def test_bench_code_calls_no_private_names():
    """Cases and the CLI use the registry's and the families' public API only (``x._name`` is
    allowed on torch, whose private Muon routine is a peer; ``self`` is our own)."""
    found = []
    for path in sorted(BENCH_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("glm45_ops"):
                private = [n.name for n in node.names if n.name.startswith("_")]
                private += [p for p in node.module.split(".") if p.startswith("_")]
                found += [f"{path.name}:{node.lineno}: from {node.module} import {p}" for p in private]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if not (isinstance(root, ast.Name) and root.id in ("torch", "self")):
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


def test_offered_families_are_the_case_modules():
    # A family is a module or a package (whose __init__ gathers its submodules' cases).
    root = BENCH_DIR / "cases"
    modules = {p.stem for p in root.glob("*.py") if not p.stem.startswith("_")}
    modules |= {p.parent.name for p in root.glob("*/__init__.py") if not p.parent.name.startswith("_")}
    assert set(cases_mod.FAMILIES) == modules


def _malformed(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_ARGS = {
    "unknown backend": (["quant", "--backends", "torch,bogus"], "argument --backends: 'bogus'"),
    "pattern matching nothing": (["quant", "--cases", "per_block,zzz"], "argument --cases: 'zzz' matches no case"),
    "zero iters": (["quant", "--iters", "0"], "argument --iters: must be at least 1"),
    "zero tokens": (["quant", "--tokens", "64,0"], "argument --tokens: must be at least 1"),
    "tokens not a list": (["quant", "--tokens", ","], "argument --tokens: expected a comma list"),
    "json in a missing directory": (["quant", "--json", "{tmp}/no/r.json"], "argument --json: cannot write"),
    "csv onto a directory": (["quant", "--csv", "{tmp}"], "argument --csv: cannot write"),
    "plot in a missing directory": (["all", "--plot", "{tmp}/no/r.png"], "argument --plot: cannot write"),
    "missing ceilings": (["quant", "--ceilings", "{tmp}/none.json"], "argument --ceilings: cannot read"),
    "ceilings not JSON": (["quant", "--ceilings", "{bad_json}"], "not a ceilings file: not JSON"),
    "ceilings without values": (["quant", "--ceilings", "{bad_value}"], "value must be a positive number"),
    "unknown kernel family": (["compile-report", "--families", "quant,nosuch"], "no Triton kernel family nosuch"),
}


def _exits_2_with_one_line(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2
    assert out == ""  # checked before anything ran or printed
    lines = err.splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,message", list(BAD_ARGS.values()), ids=list(BAD_ARGS))
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    paths = {"tmp": tmp_path, "bad_json": _malformed(tmp_path, "c1.json", "{not json"),
             "bad_value": _malformed(tmp_path, "c2.json", '{"ceilings": {"memory": {"value": -1, "source": "x"}}}')}
    _exits_2_with_one_line(capsys, [a.format(**paths) for a in argv], message)
    assert not (tmp_path / "no").exists()


def test_family_without_case_module_is_not_offered(capsys):
    assert "nosuchfamily" not in cases_mod.FAMILIES
    _exits_2_with_one_line(capsys, ["nosuchfamily"], "invalid choice: 'nosuchfamily'")


def test_broken_family_does_not_break_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "brokenfam.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "needsdepfam.py").write_text("import not_an_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    families = {"quant": cases_mod.FAMILIES["quant"], "broken": "brokenfam", "needsdep": "needsdepfam"}
    monkeypatch.setattr(cases_mod, "FAMILIES", families)
    monkeypatch.setattr(cli, "FAMILIES", families)
    rc = cli.main(["all", "--backends", "torch", "--cases", "=per_token_group_quant_fp8 M=1", "--iters", "1"])
    text = capsys.readouterr().out
    assert rc == 1  # a broken case module is reported...
    assert "[broken] case module failed: RuntimeError: boom" in text
    assert "[needsdep] case module failed: ModuleNotFoundError" in text
    assert "per_token_group_quant_fp8 M=1" in text  # ...and the other families still ran


def test_verdict_compares_our_best_with_the_best_peer():
    from glm45_ops.bench.report import verdicts
    from glm45_ops.bench.runner import Result

    rows = [Result("quant", "c", "[1]", b, "ok", median_us=t) for b, t in
            (("torch", 90.0), ("triton", 20.0), ("cuda", 10.0), ("vllm", 15.0), ("torch.compile", 30.0))]
    rows.append(Result("quant", "c", "[1]", "sgl_kernel", "skip", reason="not installed"))
    assert verdicts(rows) == ["vs peers [c]: ours cuda 10.0 us, best peer vllm 15.0 us: 1.50x"]


def test_default_ceilings_say_where_they_come_from():
    """No run of this project measured the defaults: the labels must not claim it did."""
    defaults = roofline.H200_DEFAULTS
    assert set(defaults) == set(roofline.KINDS)
    for kind in ("memory", "compute:bf16"):
        assert "outside this project" in defaults[kind].source
    assert "datasheet" in defaults["compute:fp8"].source and "not measured" in defaults["compute:fp8"].source
    for c in defaults.values():
        assert "measured 20" not in c.source  # no date of a measurement we never made


def test_info(capsys):
    assert cli.main(["--info"]) == 0
    text = capsys.readouterr().out
    assert torch.__version__ in text and "per_token_group_quant_fp8" in text and "peers" in text


@cpu_only
def test_ceilings_without_gpu(capsys):
    assert cli.main(["ceilings"]) == 0
    text = capsys.readouterr().out
    assert "no CUDA GPU" in text and "outside this project" in text


def test_compile_report_quant(tmp_path, capsys):
    out = tmp_path / "cr.json"
    assert cli.main(["compile-report", "--families", "quant", "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["triton"] if r["family"] == "quant"]
    assert {r["kernel"] for r in rows} == QUANT_KERNELS
    for r in rows:
        assert "error" not in r, r
        assert r["registers"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        if r["kernel"] != "_dequant_fp8_kernel":  # the quantizers divide, and must do so exactly
            assert r["division"] == "ieee (div.rn.f32)", r
    assert "sm_90a" in capsys.readouterr().out


def test_case_report_is_printed_and_recorded(tmp_path, capsys):
    """A case's report (figures computed once, untimed) lands in the reference row's params and
    on stdout: the rollout family's FP8-vs-BF16 mismatch metrics."""
    out = tmp_path / "r.json"
    rc = cli.main(["rollout", "--backends", "torch", "--cases", "fp8_rollout_mismatch", "--iters", "1",
                   "--json", str(out)])
    assert rc == 0
    assert "report: kl_k1" in capsys.readouterr().out
    row = json.loads(out.read_text())["results"][0]
    assert {"kl_k1", "kl_k3", "ppl_ratio", "clip_frac", "max_ratio"} <= set(row["params"])
    assert 0.5 < row["params"]["ppl_ratio"] < 2


def test_tokens_choose_the_sweep(capsys):
    """--tokens replaces the preset sweep, largest first (the cases' prefill size)."""
    assert cli.main(["moe", "--cases", "moe_route", "--tokens", "3,17,3", "--backends", "torch"]) == 0
    out = capsys.readouterr().out
    assert "tokens: [17, 3]" in out and "moe_route T=17" in out and "moe_route T=3" in out and "T=64" not in out


def test_deep_gemm_layout_pads_each_group():
    """The deep_gemm peer's layout: groups of 3, 0, 130 and 1 rows at multiples of 128, padding -1."""
    from glm45_ops.bench.cases.moe import deep_gemm_layout

    offsets = torch.tensor([0, 3, 3, 133, 134], dtype=torch.int32)
    dst, m_indices = deep_gemm_layout(offsets, 134, 128)
    assert m_indices.numel() == 128 + 256 + 128
    assert dst[:3].tolist() == [0, 1, 2] and dst[3].item() == 128 and dst[132].item() == 257 and dst[133].item() == 384
    want = torch.full((512,), -1, dtype=torch.int32)
    want[:3], want[128:258], want[384] = 0, 2, 3
    assert torch.equal(m_indices, want)


def test_an_op_call_timed_eagerly_for_a_host_sync_fails_the_run(monkeypatch, capsys):
    """What a GPU run does when a call cannot be captured (simulated: the timer reports the
    fallback): our Triton kernel's row is NOT GRAPH-SAFE and the run exits 1; the torch
    reference's row is only marked."""
    from glm45_ops.bench import runner
    from glm45_ops.bench.timing import EAGER, Timing

    if "triton" not in cpu_backends():
        pytest.skip("Triton cannot run here")
    fallback = Timing(5.0, 4.0, 6.0, f"{EAGER}: syncs the host (RuntimeError: boom); do_bench")
    monkeypatch.setattr(runner, "time_fn", lambda *a, **k: fallback)
    rc = cli.main(["quant", "--backends", "torch,triton", "--cases", "=per_token_group_quant_fp8 M=64", "--iters", "1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "NOT GRAPH-SAFE: per_token_group_quant_fp8 M=64 [triton]: syncs the host (RuntimeError: boom)" in out
    assert "[torch]" not in out.split("NOT GRAPH-SAFE")[-1] and out.count("NOT GRAPH-SAFE") == 1
    assert "* timed eagerly, torch on 1 case(s)" in out and "* timed eagerly, triton on 1 case(s)" in out
