"""glm45-bench in-process on the CPU: the quant table, JSON/CSV/plot, --info, compile-report."""

import csv
import json

import pytest
import torch

from conftest import cpu_backends
from glm45_ops.bench import cases as cases_mod
from glm45_ops.bench import cli
from glm45_ops.bench.case import BenchContext
from glm45_ops.config import preset

QUANT_KERNELS = {"_per_token_group_quant_fp8_kernel", "_per_block_quant_fp8_kernel", "_dequant_fp8_kernel"}


@pytest.fixture
def one_thread():
    """The CI box is shared: torch's thread pool under contention turns microseconds into
    milliseconds per op. One thread keeps the CPU timings (and this test) stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _quant_case_names() -> list[str]:
    ctx = BenchContext(preset("small"), torch.device("cpu"), cli.CPU_TOKENS)
    return [c.name for c in cases_mod.load("quant").cases(ctx)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_quant_torch_cpu_table_json_csv_plot(tmp_path, capsys, one_thread):
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    rc = cli.main(["quant", "--preset", "small", "--backends", "torch", "--refcheck", "--iters", "2",
                   "--json", str(out_json), "--csv", str(out_csv), "--plot", str(out_png)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "CPU timings" in text
    names = _quant_case_names()
    for name in names:
        assert name in text
        assert f"--cases '={name}' --backends torch --refcheck" in text  # one repro per case

    record = json.loads(out_json.read_text())
    assert record["cpu_timings"] is True and record["gpu"] == "no GPU"
    assert record["command"].startswith("glm45-bench quant") and record["date"]
    assert record["env"]["torch"] == torch.__version__ and "gpus" in record["env"]
    rows = record["results"]
    assert [r["case"] for r in rows] == names
    for r in rows:
        assert r["status"] == "ok" and r["backend"] == "torch" and r["refcheck"] == "reference"
        assert r["median_us"] > 0 and r["p20_us"] <= r["median_us"] <= r["p80_us"]
        assert r["gbps"] > 0 and r["pct_of_roofline"] is None  # no % of an H200 ceiling for CPU timings

    with open(out_csv) as f:
        assert [r["case"] for r in csv.DictReader(f)] == names
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs a usable Triton interpreter")
def test_refcheck_triton_interpreter_and_skips(tmp_path, capsys, one_thread):
    names = ["per_token_group_quant_fp8 M=64", "dequant_fp8 activations 1x128"]
    out_json = tmp_path / "r.json"
    rc = cli.main(["quant", "--backends", "torch,triton,cuda", "--cases", ",".join("=" + n for n in names),
                   "--refcheck", "--iters", "1",
                   "--json", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0
    rows = {(r["case"], r["backend"]): r for r in json.loads(out_json.read_text())["results"]}
    assert len(rows) == 6
    for case in names:
        assert rows[(case, "triton")]["refcheck"] == "pass"  # bit-exact vs the torch reference
        assert rows[(case, "cuda")]["status"] == "skip"
    assert text.count("skipped cuda on 1 case(s): glm45::") == 2  # one line per distinct reason


def test_broken_family_does_not_break_the_cli(tmp_path, monkeypatch, capsys, one_thread):
    (tmp_path / "brokenfam.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "needsdepfam.py").write_text("import not_an_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    families = {"quant": cases_mod.FAMILIES["quant"], "broken": "brokenfam", "needsdep": "needsdepfam",
                "absent": "glm45_ops.bench.cases._absent"}
    monkeypatch.setattr(cases_mod, "FAMILIES", families)
    monkeypatch.setattr(cli, "FAMILIES", families)
    rc = cli.main(["all", "--backends", "torch", "--cases", "=per_token_group_quant_fp8 M=1", "--iters", "1"])
    text = capsys.readouterr().out
    assert rc == 1  # a broken case module is reported...
    assert "[broken] case module failed: RuntimeError: boom" in text
    assert "[needsdep] case module failed: ModuleNotFoundError" in text  # a missing dependency is not "no module"
    assert "[absent] no case module yet" in text
    assert "per_token_group_quant_fp8 M=1" in text  # ...and the other families still ran


def test_verdict_compares_our_best_with_the_best_peer():
    from glm45_ops.bench.report import verdicts
    from glm45_ops.bench.runner import Result

    rows = [Result("quant", "c", "[1]", b, "ok", median_us=t) for b, t in
            (("torch", 90.0), ("triton", 20.0), ("cuda", 10.0), ("vllm", 15.0), ("torch.compile", 30.0))]
    rows.append(Result("quant", "c", "[1]", "sgl_kernel", "skip", reason="not installed"))
    assert verdicts(rows) == ["vs peers [c]: ours cuda 10.0 us, best peer vllm 15.0 us: 1.50x"]


def test_info(capsys):
    assert cli.main(["--info"]) == 0
    text = capsys.readouterr().out
    assert torch.__version__ in text and "per_token_group_quant_fp8" in text and "peers" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_ceilings_without_gpu(capsys):
    assert cli.main(["ceilings"]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


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
