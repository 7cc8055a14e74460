"""triton_ops.moe_configs: vLLM's file names and format, nearest-M lookup, $GLM45_MOE_CONFIG_DIR
first, clamping of foreign (vLLM/SGLang) configs, provenance (and the hidden-size guard it
allows), the override hook, and the shipped tables (coverage incl. the fused shared expert,
untuned, equal to the heuristic that the kernels used before tables)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from triton_ops import moe_configs as mc

H200 = "NVIDIA_H200"
FP8 = torch.float8_e4m3fn
BLOCK = [128, 128]
# GLM-4.5 and Air at TP1/2/4/8 and EP8: (E, N), the coverage; then TP1/2/4/8 with the
# shared expert fused in (E + 1), which is how MoE runs by default
SHIPPED_SHAPES = [(160, 1536), (160, 768), (160, 384), (160, 192), (20, 1536),
                  (128, 1408), (128, 704), (128, 352), (128, 176), (16, 1408),
                  (161, 1536), (161, 768), (161, 384), (161, 192),
                  (129, 1408), (129, 704), (129, 352), (129, 176)]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")


def _cfg(bm=16, bn=64, bk=64, group=1, warps=4, stages=3):
    return {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": group,
            "num_warps": warps, "num_stages": stages}


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(mc.ENV_DIR, str(tmp_path))
    return tmp_path


def test_file_names_are_vllms():
    assert (mc.config_file_name(160, 192, FP8, BLOCK, "NVIDIA H200")
            == "E=160,N=192,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json")
    fp8_name = mc.config_file_name(160, 192, FP8, BLOCK, H200)
    assert mc.config_file_name(160, 192, "fp8_w8a8", (128, 128), H200) == fp8_name
    for dt in (torch.bfloat16, torch.float16, None):  # unquantized tables have no dtype part, as in vLLM
        assert mc.config_file_name(128, 176, dt, None, H200) == "E=128,N=176,device_name=NVIDIA_H200.json"
    fp32_name = mc.config_file_name(16, 1408, torch.float32, None, H200)
    assert fp32_name == "E=16,N=1408,device_name=NVIDIA_H200,dtype=float32.json"  # vLLM keeps fp32 apart


@pytest.mark.parametrize("dtype,block,match", [
    (FP8, None, r"block_shape must be \[128, 128\] with FP8"),
    (FP8, [64, 64], r"block_shape must be \[128, 128\] with FP8"),
    (torch.bfloat16, BLOCK, "block_shape is only for FP8"),
    (torch.int8, None, "dtype must be"),
    ("int8_w8a16", None, "dtype must be"),
])
def test_bad_dtype_or_block_shape(dtype, block, match):
    with pytest.raises(ValueError, match=match):
        mc.get_config(160, 192, 5120, 1, dtype, block, H200)


@cpu_only
def test_no_gpu_means_no_table_and_the_heuristic():
    assert mc.gpu_name() is None and mc.load_table(160, 192, FP8, BLOCK) is None
    assert mc.get_config(160, 192, 5120, 4096, FP8, BLOCK) == mc.default_config(160, 192, 5120, 4096, FP8, BLOCK)
    assert mc.describe(160, 192, FP8, BLOCK) == "no file: heuristic defaults, not tuned"
    with pytest.raises(ValueError, match="device_name is required"):
        mc.config_file_name(160, 192, FP8, BLOCK)


@pytest.mark.parametrize("m", [1, 7, 64, 65, 512, 4096, 16384])
@pytest.mark.parametrize("top_k", [8, 2])
def test_defaults_are_what_the_kernels_used_before_tables(m, top_k):
    """The heuristic is the kernels' choice before tables (BLOCK_M 16 up to 512 (token, slot) pairs,
    8 warps for FP8, 128-wide FP8 tiles, Triton's default 3 stages), and runs as it is."""
    bf16 = mc.default_config(160, 192, 5120, m, torch.bfloat16, None, top_k)
    fp8 = mc.default_config(160, 192, 5120, m, FP8, BLOCK, top_k)
    block_m = 16 if m * top_k <= 512 else 64
    assert bf16 == _cfg(bm=block_m, bn=64, bk=64, group=1, warps=4, stages=3)
    assert fp8 == _cfg(bm=block_m, bn=128, bk=128, group=1, warps=8, stages=3)
    assert mc.clamp_config(bf16, torch.bfloat16) == (bf16, []) and mc.clamp_config(fp8, FP8) == (fp8, [])


@pytest.mark.parametrize("e,n", SHIPPED_SHAPES)
@pytest.mark.parametrize("dtype,block", [(torch.bfloat16, None), (FP8, BLOCK)], ids=["bf16", "fp8"])
def test_shipped_tables_cover_glm45_and_air_and_say_how_they_were_made(monkeypatch, e, n, dtype, block):
    """Every shipped table is in vLLM's format and runs as written; an untuned one holds exactly
    the heuristic, a tuned one names its device and date."""
    monkeypatch.delenv(mc.ENV_DIR, raising=False)
    table = mc.load_table(e, n, dtype, block, H200)
    assert table is not None and table.path.parent == mc.CONFIG_DIR and not table.notes
    raw = json.loads(table.path.read_text())
    assert list(raw) == [str(m) for m in sorted(map(int, raw))]  # vLLM format: M keys, ascending
    for m, cfg in raw.items():
        assert list(cfg) == list(mc.KEYS) and all(type(v) is int for v in cfg.values())
    if table.tuned:
        assert table.provenance["device"].replace(" ", "_") == H200 and table.provenance["date"]
        assert mc.describe(e, n, dtype, block, H200).startswith("tuned on ")
    else:
        assert table.provenance["tuned"] is False
        assert mc.describe(e, n, dtype, block, H200).startswith("defaults, not tuned: ")
        for m, cfg in raw.items():
            assert cfg == mc.default_config(e, n, table.provenance["hidden_size"], int(m), dtype, block,
                                            table.provenance["top_k"])


@pytest.mark.parametrize("name", ["glm-4.5", "glm-4.5-air"])
@pytest.mark.parametrize("tp", [1, 8])
def test_the_layer_as_built_finds_a_shipped_table(monkeypatch, name, tp):
    """MoE (fuse_shared=True by default) runs fused_moe over E + 1 experts, top-k + 1, at the
    model's hidden size: the table it asks for exists, was made for that K and top-k, and is used."""
    from glm45_ops.config import preset
    from glm45_ops.moe import MoE

    monkeypatch.delenv(mc.ENV_DIR, raising=False)
    cfg = preset(name)
    assert MoE.__init__.__kwdefaults__["fuse_shared"] is True
    e, n, k = cfg.n_routed_experts + cfg.n_shared_experts, cfg.moe_intermediate_size // tp, cfg.hidden_size
    for dtype, block in ((torch.bfloat16, None), (FP8, BLOCK)):
        table = mc.load_table(e, n, dtype, block, H200, K=k)
        assert table is not None and not table.skipped, (e, n, dtype)
        assert table.provenance["top_k"] == cfg.num_experts_per_tok + cfg.n_shared_experts
        assert table.provenance["shared_experts"] == cfg.n_shared_experts
        assert mc.get_config(e, n, k, 64, dtype, block, H200, top_k=9) == table.lookup(64)


def test_a_table_made_for_another_hidden_size_is_not_used(user_dir):
    """vLLM's names carry no K: a table whose provenance names another hidden size falls back to
    the heuristic, and the description says why; one without provenance is used for any K."""
    name = mc.config_file_name(160, 192, FP8, BLOCK, H200)
    tuned = _cfg(bm=32, bn=128, bk=128, warps=4, stages=4)
    mc.write_table(user_dir, name, {1: tuned}, {"tuned": True, "device": "NVIDIA H200", "date": "2026-12-01",
                                                "hidden_size": 5120})
    assert mc.get_config(160, 192, 5120, 1, FP8, BLOCK, H200) == tuned
    assert mc.describe(160, 192, FP8, BLOCK, H200, K=5120).startswith("tuned on NVIDIA H200 2026-12-01")
    assert mc.get_config(160, 192, 4096, 1, FP8, BLOCK, H200) == mc.default_config(160, 192, 4096, 1, FP8, BLOCK)
    table = mc.load_table(160, 192, FP8, BLOCK, H200, K=4096)
    assert table.skipped == "made for hidden size 5120, not 4096" and table.path == user_dir / name
    assert table.description == (f"not used (made for hidden size 5120, not 4096): heuristic defaults, not tuned; "
                                 f"table: tuned on NVIDIA H200 2026-12-01: {user_dir / name}")
    assert mc.describe(160, 192, FP8, BLOCK, H200, K=4096) == table.description
    assert not mc.load_table(160, 192, FP8, BLOCK, H200).skipped  # no K given: nothing to check against

    (user_dir / mc.PROVENANCE_FILE).unlink()  # the same file as dropped in from vLLM: used for any K
    mc._find.cache_clear()
    assert mc.get_config(160, 192, 4096, 1, FP8, BLOCK, H200) == tuned
    assert mc.describe(160, 192, FP8, BLOCK, H200, K=4096).startswith("no provenance entry")


def test_nearest_m_lookup_ties_to_the_smaller(user_dir):
    table = {m: _cfg(bm=16, stages=i + 2) for i, m in enumerate((1, 16, 64, 256))}
    mc.write_table(user_dir, mc.config_file_name(160, 192, torch.bfloat16, None, H200), table, {"tuned": False})
    stages = {m: mc.get_config(160, 192, 5120, m, torch.bfloat16, None, H200)["num_stages"]
              for m in (1, 8, 9, 40, 41, 200, 10**6)}
    # 8 is 7 from 1 and 8 from 16; 40 is 24 from both 16 and 64 (vLLM: first in file order)
    assert stages == {1: 2, 8: 2, 9: 3, 40: 3, 41: 4, 200: 5, 10**6: 5}


def test_user_dir_comes_first(user_dir, monkeypatch):
    name = mc.config_file_name(160, 192, FP8, BLOCK, H200)
    vllm_file = {"1": _cfg(bm=32, bn=128, bk=128, group=16, warps=4, stages=4)}
    (user_dir / name).write_text(json.dumps(vllm_file))  # a dropped-in vLLM file: no provenance
    assert mc.get_config(160, 192, 5120, 3, FP8, BLOCK, H200) == vllm_file["1"]
    table = mc.load_table(160, 192, FP8, BLOCK, H200)
    assert table.path == user_dir / name and table.provenance is None and not table.tuned
    assert table.description.startswith("no provenance entry (a vLLM/SGLang file?), origin unknown")
    monkeypatch.delenv(mc.ENV_DIR)
    assert mc.load_table(160, 192, FP8, BLOCK, H200).path.parent == mc.CONFIG_DIR
    monkeypatch.setenv(mc.ENV_DIR, str(user_dir / "empty"))  # nothing there: the shipped table
    assert mc.load_table(160, 192, FP8, BLOCK, H200).path.parent == mc.CONFIG_DIR


def test_foreign_configs_are_clamped_to_our_kernels(user_dir):
    fp8_name = mc.config_file_name(20, 1536, FP8, BLOCK, H200)
    (user_dir / fp8_name).write_text(json.dumps({
        "triton_version": "3.4.0",  # vLLM's newer files carry it; not a batch size
        "1": _cfg(bm=16, bn=64, bk=128, group=1, warps=4, stages=4),
        "4096": _cfg(bm=256, bn=128, bk=256, group=32, warps=8, stages=5),
    }))
    table = mc.load_table(20, 1536, FP8, BLOCK, H200)
    assert table.configs[1] == _cfg(bm=16, bn=128, bk=128, group=1, warps=4, stages=4)
    # BM 256 -> 128; 128 x 128 fp8: (128*128 + 2*128*128) bytes a stage, 4 fit in 227 KiB
    assert table.configs[4096] == _cfg(bm=128, bn=128, bk=128, group=32, warps=8, stages=4)
    assert "M=1: BLOCK_SIZE_N 64 -> 128" in table.notes and "M=4096: BLOCK_SIZE_M 256 -> 128" in table.notes
    assert "M=4096: num_stages 5 -> 4 (shared memory)" in table.notes
    assert "clamped" in table.description

    cfg, notes = mc.clamp_config(_cfg(bm=64, bn=256, bk=128, stages=3, warps=4) | {"USE_TMA": False}, torch.bfloat16)
    # bf16 64 x 128 x 128: (64*128 + 2*128*128) * 2 = 80 KiB a stage: 2 fit, not vLLM's 3
    assert cfg == _cfg(bm=64, bn=128, bk=128, stages=2, warps=4)
    assert notes == ["config: USE_TMA ignored (not a config key of these kernels)", "config: BLOCK_SIZE_N 256 -> 128",
                     "config: num_stages 3 -> 2 (shared memory)"]
    assert mc.clamp_config(_cfg(bm=8, bn=48, bk=16), torch.float16)[0] == _cfg(bm=16, bn=64, bk=16)
    assert mc.smem_per_stage(cfg, fp8=False) * cfg["num_stages"] <= mc.SMEM_BYTES


@pytest.mark.parametrize("bad,match", [
    ({"BLOCK_SIZE_M": 16}, "M=1: missing BLOCK_SIZE_N"),
    (_cfg(warps=6), "M=1: num_warps must be a power of two up to 32, got 6"),
    (_cfg(stages=0), "M=1: num_stages must be a positive integer, got 0"),
    (_cfg(bn=64.0), "M=1: BLOCK_SIZE_N must be a positive integer, got 64.0"),
    (_cfg(group=True), "M=1: GROUP_SIZE_M must be a positive integer, got True"),
    ([16, 64], "M=1: a config must be a JSON object"),
])
def test_malformed_configs_raise_naming_the_key(user_dir, bad, match):
    (user_dir / mc.config_file_name(16, 1408, torch.bfloat16, None, H200)).write_text(json.dumps({"1": bad}))
    with pytest.raises(ValueError, match=match):
        mc.load_table(16, 1408, torch.bfloat16, None, H200)


@pytest.mark.parametrize("text,match", [
    ("{not json", "not a readable JSON config file"),
    ('{"M1": {}}', "keys must be batch sizes"),
    ('{"0": {}}', "keys must be batch sizes"),
    ("{}", "no batch sizes in it"),
    ("[1, 2]", "expected an object mapping batch sizes to configs"),
])
def test_malformed_files_raise(user_dir, text, match):
    (user_dir / mc.config_file_name(16, 1408, torch.bfloat16, None, H200)).write_text(text)
    with pytest.raises(ValueError, match=match):
        mc.get_config(16, 1408, 4096, 1, torch.bfloat16, None, H200)


def test_tuned_provenance_is_reported(user_dir):
    name = mc.config_file_name(128, 176, FP8, BLOCK, H200)
    mc.write_table(user_dir, name, {1: _cfg(bm=16, bn=128, bk=128, warps=8)},
                   {"tuned": True, "device": "NVIDIA H200", "date": "2026-11-30T20:00:00+00:00"})
    mc.write_table(user_dir, "other.json", {1: _cfg()}, {"tuned": False})  # the sidecar keeps both entries
    table = mc.load_table(128, 176, FP8, BLOCK, H200)
    assert table.tuned and table.description == f"tuned on NVIDIA H200 2026-11-30T20:00:00+00:00: {user_dir / name}"
    assert set(json.loads((user_dir / mc.PROVENANCE_FILE).read_text())) == {name, "other.json"}


def test_override_wins_and_counts_its_calls():
    cfg = _cfg(bm=32, bn=64, bk=64, warps=8, stages=2)
    with mc.override(cfg) as hits:
        assert mc.get_config(160, 192, 5120, 1, torch.bfloat16, None, H200) == cfg
        with mc.override(_cfg(bm=64, bn=32, bk=32)) as inner:
            # clamped for the call's dtype: FP8 tiles are 128 x 128 whatever the override says
            assert mc.get_config(160, 192, 5120, 1, FP8, BLOCK, H200) == _cfg(bm=64, bn=128, bk=128)
        assert mc.get_config(160, 192, 5120, 1, torch.bfloat16, None, H200) == cfg
    assert hits["calls"] == 2 and inner["calls"] == 1
    assert mc.get_config(160, 192, 5120, 1, torch.bfloat16, None, H200) == mc.default_config(160, 192, 5120, 1, None)


SMEM_PROBE = textwrap.dedent("""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton_ops import moe as tm
    shared = []
    for fp8, cfg in json.loads(sys.argv[1]):
        spec = tm._gate_up_spec(fp8, cfg["BLOCK_SIZE_M"])
        names = list(spec.signature)
        attrs = {(names.index(n),): [["tt.divisibility", 16]]
                 for n in names if spec.signature[n].startswith("*") or n in spec.aligned}
        constexprs = dict(spec.constexprs, BLOCK_M=cfg["BLOCK_SIZE_M"], BLOCK_N=cfg["BLOCK_SIZE_N"],
                          BLOCK_K=cfg["BLOCK_SIZE_K"])
        k = triton.compile(ASTSource(spec.kernel, spec.signature, constexprs, attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        shared.append(k.metadata.shared)
    print(json.dumps(shared))
""")


def test_largest_admitted_configs_fit_sm90_shared_memory():
    """The clamp's stage budget, checked against Triton's own sm_90a build of the gate-up kernel
    (no GPU needed; in a child process, as kernels defined under the interpreter do not
    compile): the most stages the clamp admits fit, and at BM >= 64 one more does not."""
    probes = []
    for dtype, bm in ((torch.bfloat16, 128), (torch.bfloat16, 16), (FP8, 64)):
        cfg, _ = mc.clamp_config(_cfg(bm=bm, bn=128, bk=128, warps=8, stages=16), dtype)
        probes += [(dtype == FP8, cfg), (dtype == FP8, cfg | {"num_stages": cfg["num_stages"] + 1})]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SMEM_PROBE, json.dumps(probes)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    shared = json.loads(out.stdout.splitlines()[-1])
    for (fp8, cfg), admitted, one_more in zip(probes[::2], shared[::2], shared[1::2]):
        assert admitted <= mc.SMEM_BYTES, (fp8, cfg, admitted)
        if cfg["BLOCK_SIZE_M"] >= 64:
            assert one_more > mc.SMEM_BYTES, (fp8, cfg, one_more)
