"""The reference model against an independent float64 implementation written here from the
Hugging Face weight names (KNOWLEDGE.md §4 formulas), and its paged, speculative, FP8 and loading
paths against the model's own plain forward. Runs without transformers (tests/model/
test_model_hf.py compares with transformers itself when it is installed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from glm45_ops.model import Glm45Config, Glm45ForCausalLM
from glm45_ops.model import generate as gen_mod
from glm45_ops.model.loading import hf_state_dict
from glm45_ops.testing import calc_diff

TINY = Glm45Config.preset("tiny")


def _model(cfg=TINY, dtype=torch.float32, seed=0, **kw) -> Glm45ForCausalLM:
    torch.manual_seed(seed)
    m = Glm45ForCausalLM(cfg, dtype=dtype, **kw)
    with torch.no_grad():  # norms and biases away from their init values, so dropping one fails
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(std=0.5)
        for b in m.buffers():
            if b.dtype == torch.float32 and b.dim() == 1 and b.shape[0] == cfg.n_routed_experts:
                b.normal_(std=0.5)  # e_score_correction_bias: changes which experts are selected
    return m


# ---------------------------------------------------------------------------------------------
# An independent float64 GLM-4.5, from the HF state dict
# ---------------------------------------------------------------------------------------------

def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, cfg):
    r = cfg.rotary_dim
    inv = cfg.rope_theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = pos.double()[:, None, None] * inv  # [S, 1, r/2]
    x1, x2, rest = x[..., : r // 2], x[..., r // 2: r], x[..., r:]
    return torch.cat((x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin(), rest), -1)


def _layer(sd, p, x, cfg, dense: bool):
    """One decoder layer on one sequence ``x`` ``[S, H]`` (float64)."""
    s, d, hq, hk = x.shape[0], cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    g = lambda n: sd[p + n].double()  # noqa: E731
    h = _rms(x, g("input_layernorm.weight"), cfg.rms_norm_eps)
    q = (h @ g("self_attn.q_proj.weight").T + g("self_attn.q_proj.bias")).view(s, hq, d)
    k = (h @ g("self_attn.k_proj.weight").T + g("self_attn.k_proj.bias")).view(s, hk, d)
    v = (h @ g("self_attn.v_proj.weight").T + g("self_attn.v_proj.bias")).view(s, hk, d)
    if cfg.use_qk_norm:
        q, k = _rms(q, g("self_attn.q_norm.weight"), cfg.rms_norm_eps), _rms(k, g("self_attn.k_norm.weight"), cfg.rms_norm_eps)
    pos = torch.arange(s)
    q, k = _rope(q, pos, cfg), _rope(k, pos, cfg)
    k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    att = torch.einsum("qhd,khd->hqk", q, k) * d**-0.5
    att = att.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(s, hq * d) @ g("self_attn.o_proj.weight").T
    h = _rms(x, g("post_attention_layernorm.weight"), cfg.rms_norm_eps)

    def swiglu(pre, t):
        return (torch.nn.functional.silu(t @ g(pre + "gate_proj.weight").T) * (t @ g(pre + "up_proj.weight").T)) \
            @ g(pre + "down_proj.weight").T

    if dense:
        return x + swiglu("mlp.", h)
    scores = torch.sigmoid(h @ g("mlp.gate.weight").T)
    chosen = (scores + g("mlp.gate.e_score_correction_bias")).topk(cfg.num_experts_per_tok, -1).indices
    w = scores.gather(1, chosen)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
    out = swiglu("mlp.shared_experts.", h)
    for t in range(s):
        for j in range(cfg.num_experts_per_tok):
            out[t] += w[t, j] * swiglu(f"mlp.experts.{int(chosen[t, j])}.", h[t:t + 1])[0]
    return x + out


def _oracle_logits(sd, ids, cfg):
    outs = []
    for row in ids:
        x = sd["model.embed_tokens.weight"].double()[row]
        for i in range(cfg.num_hidden_layers):
            x = _layer(sd, f"model.layers.{i}.", x, cfg, dense=i < cfg.first_k_dense_replace)
        outs.append(_rms(x, sd["model.norm.weight"].double(), cfg.rms_norm_eps) @ sd["lm_head.weight"].double().T)
    return torch.stack(outs)


@pytest.mark.parametrize("variant", ["glm-4.5", "air (no qk-norm, factor 1, full rotary)"])
def test_logits_match_float64_oracle(variant):
    cfg = TINY if variant == "glm-4.5" else dataclasses.replace(
        TINY, use_qk_norm=False, routed_scaling_factor=1.0, partial_rotary_factor=1.0)
    m = _model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    want = _oracle_logits(hf_state_dict(m), ids, cfg)
    got = m(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 13, cfg.vocab_size)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 1e-5, err


def test_oracle_sees_partial_rotation_and_bias():
    """The oracle itself must be sensitive to what the test claims to check."""
    m = _model()
    ids = torch.randint(0, TINY.vocab_size, (1, 9))
    sd = hf_state_dict(m)
    base = _oracle_logits(sd, ids, TINY)
    full_rot = _oracle_logits(sd, ids, dataclasses.replace(TINY, partial_rotary_factor=1.0))
    no_bias = dict(sd, **{k: torch.zeros_like(v) for k, v in sd.items() if k.endswith("e_score_correction_bias")})
    for other in (full_rot, _oracle_logits(no_bias, ids, TINY)):
        assert ((other - base).norm() / base.norm()).item() > 1e-3


# ---------------------------------------------------------------------------------------------
# Paged incremental forward and generation
# ---------------------------------------------------------------------------------------------

def test_paged_chunks_equal_full_forward():
    m = _model()
    ids = torch.randint(0, TINY.vocab_size, (3, 11))
    full, hidden = m(ids, return_hidden=True)
    cache = m.new_cache(3, 11, page_size=4, generator=torch.Generator().manual_seed(3))
    start = torch.zeros(3, dtype=torch.int32)
    got = []
    for lo, hi in ((0, 5), (5, 8), (8, 9), (9, 11)):
        logits, _ = m.extend(ids[:, lo:hi], cache, start)
        start += hi - lo
        got.append(logits)
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-5, atol=1e-5)


def _greedy_by_full_forward(m, ids, n):
    for _ in range(n):
        ids = torch.cat((ids, m(ids)[:, -1].argmax(-1, keepdim=True)), 1)
    return ids[:, -n:]


def test_greedy_generate_equals_argmax_of_full_forwards():
    m = _model()
    ids = torch.randint(0, TINY.vocab_size, (2, 6))
    assert torch.equal(m.generate(ids, 7), _greedy_by_full_forward(m, ids, 7))


@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_mtp_speculative_greedy_equals_plain_greedy(s):
    m = _model()
    ids = torch.randint(0, TINY.vocab_size, (3, 7))
    plain = m.generate(ids, 10)
    spec, stats = m.generate(ids, 10, speculative="mtp", num_draft_tokens=s, return_stats=True)
    assert torch.equal(spec, plain)
    assert stats["drafted"] == 3 * s * stats["rounds"] and 0 <= stats["accepted"] <= stats["drafted"]


@pytest.mark.parametrize("s", [1, 3])
def test_speculative_bookkeeping_with_partly_right_drafts(monkeypatch, s):
    """A random MTP layer's drafts are almost never accepted, which would leave the acceptance
    paths (variable advance per sequence, cache catch-up, output assembly) untested: drafts here
    are the true greedy continuation, corrupted at random positions."""
    m = _model()
    ids = torch.randint(0, TINY.vocab_size, (3, 5))
    n = 14
    truth = m.generate(ids, n + 6)
    full = torch.cat((ids, truth), 1)
    rng = torch.Generator().manual_seed(5)

    def oracle_draft(step, start, logits, hidden, k, *args):
        pos = start.long()[:, None] + 1 + torch.arange(k)  # positions of the tokens being drafted
        d = full.gather(1, pos.clamp(max=full.shape[1] - 1))
        wrong = torch.rand(d.shape, generator=rng) < 0.3
        return torch.where(wrong, (d + 1) % TINY.vocab_size, d), None

    monkeypatch.setattr(gen_mod, "_draft", oracle_draft)
    spec, stats = m.generate(ids, n, speculative="mtp", num_draft_tokens=s, return_stats=True)
    assert torch.equal(spec, truth[:, :n])
    assert 0 < stats["accepted"] < stats["drafted"]
    assert stats["tokens_per_round"] > 1


def test_mtp_drafts_chain_through_shared_head_norm():
    """Draft 2 = argmax of lm_head(MTP(embed(d1), MTP output of draft 1)): the MTP output fed back
    (and the logits at every step) come after shared_head.norm."""
    m = _model()
    ids = torch.randint(0, TINY.vocab_size, (2, 6))
    cache = m.new_cache(2, 16)
    start = torch.zeros(2, dtype=torch.int32)
    logits, hidden = m.extend(ids, cache, start)
    tok = logits[:, -1].argmax(-1)
    mlog, mh = m.mtp_extend(torch.cat((ids[:, 1:], tok[:, None]), 1), hidden, cache, start)
    step = lambda ids, hid, st: m.mtp_extend(ids, hid, cache, st)  # noqa: E731
    drafts, _ = gen_mod._draft(step, start + 6, mlog[:, -1], mh[:, -1], 2, 0.0, None, None, None)
    mtp = m.mtp
    # Independent: the MTP block on the whole sequence (positions 0..6) without a cache.
    seq_tok = torch.cat((ids[:, 1:], tok[:, None], drafts[:, :1]), 1)  # token at position i+1
    h_in = torch.cat((hidden, mh[:, -1:]), 1)
    x = mtp.eh_proj(torch.cat((mtp.enorm(m.embed_tokens(seq_tok)), mtp.hnorm(h_in)), -1))
    from glm45_ops.model.modeling import _Step

    b, s = seq_tok.shape
    pos = torch.arange(s).repeat(b)
    out = mtp.shared_head_norm(mtp.layer(x.reshape(b * s, -1), pos, m.cos_sin_cache, _Step(n=s, batch=b)))
    want = m.lm_head(out).view(b, s, -1)[:, -1].argmax(-1)
    assert torch.equal(drafts[:, 0], mlog[:, -1].argmax(-1))
    assert torch.equal(drafts[:, 1], want)


def test_sampling_is_reproducible_and_in_vocab():
    m = _model()
    ids = torch.randint(0, TINY.vocab_size, (2, 5))
    for spec in (None, "mtp"):
        a = m.generate(ids, 6, temperature=0.9, top_k=20, top_p=0.9, speculative=spec, num_draft_tokens=2,
                       generator=torch.Generator().manual_seed(7))
        b = m.generate(ids, 6, temperature=0.9, top_k=20, top_p=0.9, speculative=spec, num_draft_tokens=2,
                       generator=torch.Generator().manual_seed(7))
        assert torch.equal(a, b) and a.shape == (2, 6) and int(a.min()) >= 0 and int(a.max()) < TINY.vocab_size


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"speculative": "eagle"}, "speculative"),
    ({"speculative": "mtp", "num_draft_tokens": 5}, "num_draft_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_new_tokens": 5000}, "max_position_embeddings"),
    ({"cuda_graph": True}, "cuda_graph=True needs the model on a CUDA device"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    m = _model()
    kw = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        m.generate(torch.zeros(1, 3, dtype=torch.long), kw.pop("max_new_tokens"), **kw)


def test_score_is_log_softmax_of_forward():
    m = _model()
    ids = torch.randint(0, TINY.vocab_size, (2, 9))
    labels = torch.randint(0, TINY.vocab_size, (2, 9))
    labels[0, 3] = -100
    want = torch.log_softmax(m(ids).double() / 0.7, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    want[0, 3] = 0
    torch.testing.assert_close(m.score(ids, labels, temperature=0.7).double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoints, FP8 and in-place updates
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shard", [None, 1 << 20])
def test_save_and_load_round_trip(tmp_path, shard):
    m = _model()
    m.save_pretrained(tmp_path, max_shard_bytes=shard)
    assert (tmp_path / ("model.safetensors" if shard is None else "model.safetensors.index.json")).exists()
    m2 = Glm45ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    assert m2.config == dataclasses.replace(TINY, name=m2.config.name)
    ids = torch.randint(0, TINY.vocab_size, (2, 5))
    assert torch.equal(m2(ids), m(ids))
    assert torch.equal(m2.generate(ids, 4, speculative="mtp", num_draft_tokens=2), m.generate(ids, 4))


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, intermediate_size=320)],
                         ids=["tiny", "dense width 320 (Air's 10944: not a multiple of 128)"])
def test_fp8_checkpoint_loads_as_fp8_and_stays_close_to_bf16(tmp_path, cfg):
    m = _model(cfg, dtype=torch.bfloat16)
    ids = torch.randint(0, TINY.vocab_size, (2, 9))
    bf16 = m(ids).float()
    m.quantize_fp8_()
    fp8 = m(ids).float()
    assert calc_diff(fp8, bf16) < 1e-2
    m.save_pretrained(tmp_path)
    m2 = Glm45ForCausalLM.from_pretrained(tmp_path, progress=False)
    assert m2.is_fp8
    qkv = m2.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale_inv.dtype == torch.float32
    assert m2.layers[1].mlp.w13.dtype == torch.float8_e4m3fn
    assert torch.equal(m2(ids).float(), fp8)


def test_load_weights_updates_in_place_and_requantizes():
    src = _model(dtype=torch.bfloat16, seed=1)
    dst = _model(dtype=torch.bfloat16, seed=2).quantize_fp8_()
    ptrs = {n: p.data_ptr() for n, p in dst.named_parameters()}
    ptrs.update({n: b.data_ptr() for n, b in dst.named_buffers()})
    loaded = dst.load_weights(hf_state_dict(src).items())
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in loaded
    assert all(p.data_ptr() == ptrs[n] for n, p in dst.named_parameters())
    assert all(b.data_ptr() == ptrs[n] for n, b in dst.named_buffers())
    ids = torch.randint(0, TINY.vocab_size, (2, 7))
    assert torch.equal(dst(ids), src.quantize_fp8_()(ids))


def test_load_weights_accepts_transformers5_stacked_experts():
    src, dst = _model(seed=1), _model(seed=2)
    sd = hf_state_dict(src)
    p = "model.layers.1.mlp.experts."
    e = TINY.n_routed_experts
    stacked = {k: v for k, v in sd.items() if not k.startswith(p) or "shared" in k}
    stacked[p + "gate_up_proj"] = torch.stack([torch.cat((sd[f"{p}{j}.gate_proj.weight"], sd[f"{p}{j}.up_proj.weight"]))
                                               for j in range(e)])
    stacked[p + "down_proj"] = torch.stack([sd[f"{p}{j}.down_proj.weight"] for j in range(e)])
    dst.load_weights(stacked.items())
    ids = torch.randint(0, TINY.vocab_size, (1, 5))
    assert torch.equal(dst(ids), src(ids))


def test_loading_errors_name_the_tensor(tmp_path):
    m = _model()
    sd = hf_state_dict(m)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: shape"):
        m.load_weights([("model.layers.0.self_attn.k_proj.weight", torch.zeros(3, 3))])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.zz_proj\.weight"):
        m.load_weights([("model.layers.0.self_attn.zz_proj.weight", torch.zeros(3, 3))])
    with pytest.raises(ValueError, match="quantize_fp8_"):
        m.load_weights([("model.layers.0.self_attn.o_proj.weight", sd["model.layers.0.self_attn.o_proj.weight"]
                         .to(torch.float8_e4m3fn))])
    from safetensors.torch import save_file

    m.save_pretrained(tmp_path)
    sd.pop("model.layers.1.mlp.experts.5.down_proj.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 'model\.layers\.1\.mlp\.experts\.5\.down_proj\.weight'"):
        Glm45ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, progress=False)


def test_config_from_both_hf_layouts():
    d = TINY.to_hf_dict()
    assert Glm45Config.from_hf_config(d) == dataclasses.replace(TINY, name="hf")
    v5 = {k: v for k, v in d.items() if k not in ("rope_theta", "partial_rotary_factor", "num_nextn_predict_layers")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": TINY.rope_theta, "partial_rotary_factor": 0.5}
    v5["num_mtp_layers"] = 1
    assert Glm45Config.from_hf_config(v5) == dataclasses.replace(TINY, name="hf")
    with pytest.raises(ValueError, match="'vocab_size'"):
        Glm45Config.from_hf_config({k: v for k, v in d.items() if k != "vocab_size"})
    assert Glm45Config.preset("glm-4.5").rotary_dim == 64 and Glm45Config.preset("glm-4.5-air").use_qk_norm is False
    with pytest.raises(ValueError, match="unknown preset"):
        Glm45Config.preset("glm-5")


def test_cli_runs_tiny(capsys):
    assert gen_mod.main(["--preset", "tiny", "--max-new-tokens", "4", "--speculative", "mtp",
                         "--num-draft-tokens", "2", "--batch", "2", "--prompt-len", "5"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and "tokens/s" in err and "MTP acceptance" in err


def test_triton_backend_assembles():
    """Every op of the model on the Triton backend (the interpreter on CPU): logits agree with
    the torch backend and MTP-speculative greedy decoding gives the same tokens."""
    m = _model(backend="torch")
    ids = torch.randint(0, TINY.vocab_size, (2, 5))
    want, plain = m(ids), m.generate(ids, 3)
    m.backend = "triton"
    assert calc_diff(m(ids), want) < 1e-9
    assert torch.equal(m.generate(ids, 3, speculative="mtp", num_draft_tokens=2), plain)


def test_fp8_checkpoint_never_materialises_bf16_weights(tmp_path, monkeypatch):
    """Loading an FP8 checkpoint allocates the linear and expert weights as e4m3 from the start:
    nothing is quantized on the way (GLM-4.5-Air-FP8 in BF16 would not fit an H200)."""
    from glm45_ops.model import modeling
    from glm45_ops.moe import layer

    m = _model(dtype=torch.bfloat16).quantize_fp8_()
    m.save_pretrained(tmp_path)
    ids = torch.randint(0, TINY.vocab_size, (2, 7))
    want = m(ids)

    def refuse(*args, **kwargs):
        raise AssertionError("quantized while loading an FP8 checkpoint")

    monkeypatch.setattr(modeling, "per_block_quant_fp8", refuse)
    monkeypatch.setattr(layer, "per_block_quant_fp8", refuse)
    big_bf16 = []
    real_empty = torch.empty

    def empty(*size, **kw):  # every allocation the constructors make goes through torch.empty
        t = real_empty(*size, **kw)
        if t.dtype in (torch.bfloat16, torch.float32) and t.dim() == 3:
            big_bf16.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    m2 = Glm45ForCausalLM.from_pretrained(tmp_path, progress=False)
    monkeypatch.undo()
    assert m2.is_fp8 and m2.layers[1].mlp.w13.dtype == torch.float8_e4m3fn
    # the only 3-D float allocations are the experts' scale grids
    assert all(s[1] <= 2 and s[2] <= 2 for s in big_bf16), big_bf16
    assert torch.equal(m2(ids), want)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "glm-5"], "unknown preset 'glm-5'"),
    (["--model", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--num-draft-tokens", "9", "--speculative", "mtp"], "num_draft_tokens must be an int in 1..4"),
])
def test_cli_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        gen_mod.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
