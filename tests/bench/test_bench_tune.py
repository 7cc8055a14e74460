"""glm45-bench tune moe on the CPU: the search and the writing with an injected timer (the tables
round-trip through the loader in vLLM's format), the whole command with fake GPU functions,
--defaults reproducing the shipped tables, and exit 2 without a GPU."""

import json

import pytest
import torch

from glm45_ops.bench import cli, tune
from glm45_ops.config import preset
from triton_ops import moe_configs as mc

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")


def _exits_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and message in lines[0], err


def _fake_timer(m_best):
    """Fastest where BLOCK_SIZE_M is m_best(M), then fewer stages; 8 warps never compile."""
    def time_fn(cfg, m):
        if cfg["num_warps"] == 8:
            raise RuntimeError("out of resource: shared memory")
        return 10.0 + abs(cfg["BLOCK_SIZE_M"] - m_best(m)) + cfg["num_stages"] / 10 + cfg["BLOCK_SIZE_N"] / 1000
    return time_fn


def test_search_space_is_runnable_as_given_and_holds_the_defaults():
    for dtype, block in ((BF16, None), (FP8, mc.FP8_BLOCK_SHAPE)):
        space = tune.search_space(dtype)
        assert space and all(mc.clamp_config(c, dtype) == (c, []) for c in space)
        assert len({tuple(c.values()) for c in space}) == len(space)
        for m in (1, 4096):  # so the tuner can report its speed-up over the default
            assert mc.default_config(160, 192, 5120, m, dtype, block) in space
    assert {(c["BLOCK_SIZE_N"], c["BLOCK_SIZE_K"]) for c in tune.search_space(FP8)} == {(128, 128)}


def test_tune_table_keeps_the_fastest_that_passes_and_round_trips(tmp_path, monkeypatch):
    space = tune.search_space(BF16)
    m_best = {1: 16, 64: 32, 4096: 128}.get
    rejected_first = {}

    def check_fn(cfg, m):  # at M=64 the fastest is wrong: the next one must win
        if m == 64 and not rejected_first:
            rejected_first[m] = dict(cfg)
            return "calc_diff 0.5 >= 0.0001"
        return None

    def default(m):
        return mc.default_config(160, 192, 5120, m, BF16)

    logs = []
    results = tune.tune_table([1, 64, 4096], space, default, _fake_timer(m_best), check_fn, logs.append)
    assert results[1].config == {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
                                 "num_warps": 4, "num_stages": 2}
    assert results[64].config != rejected_first[64] and results[64].config["BLOCK_SIZE_M"] == 32
    assert results[64].time_us >= 10.0 + 0.2 + 0.032
    assert results[4096].config["BLOCK_SIZE_M"] == 128
    assert all(r.rejected == sum(c["num_warps"] == 8 for c in space) for r in (results[1], results[4096]))
    assert results[1].default_us == _fake_timer(m_best)(default(1), 1)  # default 4 warps: it was timed
    assert len(logs) == 3 and "x the default" in logs[0]

    model = preset("glm-4.5")
    layout = tune.layouts(model)[3]
    assert (layout.name, layout.experts, layout.inter) == ("TP8", 160, 192)
    name = mc.config_file_name(layout.experts, layout.inter, BF16, None, "NVIDIA_H200")
    prov = tune.tuned_provenance(results, device="NVIDIA H200", command="glm45-bench tune moe", model=model,
                                 layout=layout, dtype="bf16", candidates=len(space), method="fake timer")
    mc.write_table(tmp_path, name, {m: r.config for m, r in results.items()}, prov)

    raw = json.loads((tmp_path / name).read_text())  # vLLM's format: M strings -> the six keys, ints
    assert list(raw) == ["1", "64", "4096"]
    assert all(list(c) == list(mc.KEYS) and all(type(v) is int for v in c.values()) for c in raw.values())
    monkeypatch.setenv(mc.ENV_DIR, str(tmp_path))
    table = mc.load_table(160, 192, BF16, None, "NVIDIA_H200")
    assert table.path == tmp_path / name and table.tuned and not table.notes
    assert table.description.startswith("tuned on NVIDIA H200 20")
    assert table.provenance["time_us"]["64"] == round(results[64].time_us, 2)
    assert {"torch", "triton", "date", "command"} <= set(table.provenance)
    for m, r in results.items():
        assert mc.get_config(160, 192, 5120, m, BF16, None, "NVIDIA_H200") == r.config


def test_tune_table_aborts_when_nothing_survives():
    space = tune.search_space(FP8)
    with pytest.raises(tune.TuneAbort, match=r"M=1: no candidate ran and matched the reference \(\d+ rejected; "):
        tune.tune_table([1], space, lambda m: space[0], lambda c, m: 1.0, lambda c, m: "calc_diff 1 >= 0.0005")

    def unwired(cfg, m):
        raise tune.TuneAbort("triton_ops.moe does not ask")

    with pytest.raises(tune.TuneAbort, match="does not ask"):  # a fault of the run, not of one candidate
        tune.tune_table([1], space, lambda m: space[0], unwired, lambda c, m: None)


def test_tune_command_with_fake_gpu_functions(tmp_path, monkeypatch, capsys):
    """The whole command's GPU branch on the CPU: device name, file names, provenance, exit 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU 9000")
    monkeypatch.setattr(mc, "gpu_name", lambda *a: "Fake_GPU_9000")
    monkeypatch.setattr(tune, "measure_functions",
                        lambda model, layout, dtype, device, timer: (_fake_timer(lambda m: 16 if m < 100 else 64),
                                                                     lambda c, m: None))
    argv = ["tune", "moe", "--preset", "glm-4.5-air", "--layouts", "TP8,EP8,TP8+shared", "--dtypes", "fp8",
            "--batch-sizes", "1,4096", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert "3 tables (tuned)" in capsys.readouterr().out
    prov = json.loads((tmp_path / mc.PROVENANCE_FILE).read_text())
    names = {"E=128,N=176,device_name=Fake_GPU_9000,dtype=fp8_w8a8,block_shape=[128,128].json",
             "E=16,N=1408,device_name=Fake_GPU_9000,dtype=fp8_w8a8,block_shape=[128,128].json",
             "E=129,N=176,device_name=Fake_GPU_9000,dtype=fp8_w8a8,block_shape=[128,128].json"}
    assert set(prov) == names
    shared = prov["E=129,N=176,device_name=Fake_GPU_9000,dtype=fp8_w8a8,block_shape=[128,128].json"]
    what = (shared["layout"], shared["top_k"], shared["shared_experts"], shared["hidden_size"])
    assert what == ("TP8+shared", 9, 1, 4096)
    entry = prov["E=16,N=1408,device_name=Fake_GPU_9000,dtype=fp8_w8a8,block_shape=[128,128].json"]
    assert entry["tuned"] is True and entry["device"] == "Fake GPU 9000" and entry["layout"] == "EP8"
    assert entry["command"] == "glm45-bench " + " ".join(argv) and entry["top_k"] == 8
    monkeypatch.setenv(mc.ENV_DIR, str(tmp_path))
    assert mc.get_config(16, 1408, 4096, 3000, FP8, [128, 128], "Fake_GPU_9000")["BLOCK_SIZE_M"] == 64


def test_layouts_include_the_fused_shared_expert_as_moe_runs_it():
    """MoE(fuse_shared=True) runs E + 1 experts, top-k + 1: the tuner has those layouts (not at EP)
    and its inputs route every token to the shared expert with weight 1, as the layer does."""
    model = preset("glm-4.5")
    got = {lay.name: (lay.experts, lay.inter, lay.shared, tune.top_k(model, lay)) for lay in tune.layouts(model)}
    assert got == {"TP1": (160, 1536, 0, 8), "TP2": (160, 768, 0, 8), "TP4": (160, 384, 0, 8),
                   "TP8": (160, 192, 0, 8), "EP8": (20, 1536, 0, 8), "TP1+shared": (161, 1536, 1, 9),
                   "TP2+shared": (161, 768, 1, 9), "TP4+shared": (161, 384, 1, 9), "TP8+shared": (161, 192, 1, 9)}
    small = preset("small")
    lay = next(x for x in tune.layouts(small) if x.name == "TP8+shared")
    x, w13, w2, wts, ids = tune.problem_inputs(small, lay, 5, False, torch.device("cpu"), torch.Generator())
    e = small.n_routed_experts
    assert w13.shape[0] == w2.shape[0] == e + 1 and ids.shape == wts.shape == (5, 3)
    assert (ids[:, -1] == e).all() and (wts[:, -1] == 1).all()  # append_shared_routing's layout
    routed = ids[:, :-1]
    assert ((routed >= 0) & (routed < e)).all() and (routed.sort(1).values.diff(dim=1) > 0).all()


def test_a_layout_the_preset_lacks_exits_2(capsys, monkeypatch):
    import dataclasses

    no_shared = dataclasses.replace(preset("small"), n_shared_experts=0)
    monkeypatch.setattr(tune, "preset", lambda name: no_shared)
    assert [lay.name for lay in tune.layouts(no_shared)] == ["TP1", "TP2", "TP4", "TP8", "EP8"]
    _exits_2_with_one_line(capsys, ["tune", "moe", "--defaults", "--device-name", "X", "--preset", "small",
                                    "--layouts", "TP8,TP8+shared"],
                           "argument --layouts: small has no TP8+shared (no shared expert to fuse)")


def test_ep_inputs_give_other_ranks_slots_minus_one():
    """An EP8 rank's inputs: its own experts' ids, -1 for the slots of the other ranks'."""
    model = preset("small")
    lay = next(x for x in tune.layouts(model) if x.name == "EP8")
    ids = tune.problem_inputs(model, lay, 64, False, torch.device("cpu"), torch.Generator())[4]
    assert ((ids == -1) | ((ids >= 0) & (ids < lay.experts))).all()
    assert (ids == -1).any() and (ids >= 0).any()


@pytest.mark.parametrize("shared", [0, 1, "ep"], ids=["routed", "shared", "EP8"])
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_measure_functions_run_the_op_under_each_candidate(dtype, shared):
    """The GPU run's time and check functions, on the CPU (Triton in the interpreter) with a
    timer that calls once: the inputs, the override and the op's compare."""
    from conftest import cpu_backends

    if "triton" not in cpu_backends() and not torch.cuda.is_available():
        pytest.skip("Triton cannot run here")
    model = preset("small")
    if shared == "ep":
        layout = next(x for x in tune.layouts(model) if x.name == "EP8")
    else:
        layout = tune.Layout("TP8", model.n_routed_experts + shared, model.moe_intermediate_size // 8, shared)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calls = []
    time_fn, check_fn = tune.measure_functions(model, layout, dtype, device, lambda fn: (calls.append(fn()), 1.5)[1])
    cfg = mc.default_config(layout.experts, layout.inter, model.hidden_size, 3, tune.DTYPES[dtype],
                            mc.FP8_BLOCK_SHAPE if dtype == "fp8" else None, tune.top_k(model, layout))
    try:
        why = check_fn(cfg, 3)
    except tune.TuneAbort as e:
        assert "does not ask triton_ops.moe_configs.get_config" in str(e)
        pytest.skip("triton_ops.moe does not call moe_configs.get_config yet: the override cannot reach the kernels")
    assert why is None
    assert time_fn(cfg, 3) == 1.5 and calls[0].shape == (3, model.hidden_size)


def test_defaults_reproduce_the_shipped_untuned_tables(tmp_path, capsys):
    """The shipped files are the command's output, byte for byte, until a GPU run tunes them."""
    assert cli.main(["tune", "moe", "--defaults", "--device-name", "NVIDIA H200", "--out", str(tmp_path)]) == 0
    # 2 presets x (TP1/2/4/8, EP8, TP1/2/4/8+shared) x 2 dtypes
    assert "36 tables (heuristic defaults, not tuned)" in capsys.readouterr().out
    written = sorted(p.name for p in tmp_path.glob("E=*.json"))
    assert written == sorted(p.name for p in mc.CONFIG_DIR.glob("E=*.json")) and len(written) == 36
    shipped = json.loads((mc.CONFIG_DIR / mc.PROVENANCE_FILE).read_text())
    assert set(shipped) == set(written)
    for name in written:
        if not shipped[name]["tuned"]:
            assert "not measured" in shipped[name]["source"]
            assert (tmp_path / name).read_text() == (mc.CONFIG_DIR / name).read_text(), name


@cpu_only
def test_tune_without_a_gpu_exits_2(capsys):
    _exits_2_with_one_line(capsys, ["tune", "moe"], "tune needs a CUDA GPU")
    _exits_2_with_one_line(capsys, ["tune", "moe", "--defaults"], "argument --device-name: required without a CUDA GPU")


@pytest.mark.parametrize("argv,message", [
    (["tune", "moe", "--batch-sizes", "1,0"], "argument --batch-sizes: expected a positive integer, got '0'"),
    (["tune", "moe", "--layouts", "TP3"], "argument --layouts: expected a comma list of TP1, TP2, TP4, TP8, EP8"),
    (["tune", "moe", "--preset", "glm-5"], "argument --preset: expected a comma list of"),
    (["tune", "moe", "--rep-ms", "0"], "argument --rep-ms: expected a positive integer"),
    (["tune", "attention"], "argument family: invalid choice: 'attention'"),
])
def test_bad_tune_arguments_exit_2(capsys, argv, message):
    _exits_2_with_one_line(capsys, argv, message)


def test_out_that_is_not_a_directory_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    _exits_2_with_one_line(capsys, ["tune", "moe", "--defaults", "--device-name", "X", "--out", str(tmp_path / "file")],
                           "argument --out: cannot write to")
