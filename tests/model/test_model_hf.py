"""The reference model against Hugging Face transformers' ``Glm4MoeForCausalLM`` (skipped when
transformers is not installed, as in CI: tests/model/test_model.py holds the float64 oracle
that always runs). A tiny random transformers model is saved with ``save_pretrained`` and loaded
with ``Glm45ForCausalLM.from_pretrained``: logits in fp32 and greedy generation must match."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
Glm4MoeConfig = getattr(transformers, "Glm4MoeConfig", None)
if Glm4MoeConfig is None:
    pytest.skip("this transformers has no Glm4MoeForCausalLM", allow_module_level=True)

from glm45_ops.model import Glm45Config, Glm45ForCausalLM  # noqa: E402
from glm45_ops.model.loading import hf_state_dict  # noqa: E402

VOCAB = 300


def _hf_model(qk_norm: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = Glm4MoeConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=64, n_routed_experts=6, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, use_qk_norm=qk_norm,
        attention_bias=True, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    hf = transformers.Glm4MoeForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(std=0.3)
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(std=0.5)
    return hf


@pytest.fixture(scope="module", params=[True, False], ids=["qk-norm", "no-qk-norm"])
def pair(request, tmp_path_factory):
    hf = _hf_model(request.param)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    ours = Glm45ForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
    return hf, ours, path


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        want = hf(ids).logits
    got = ours(ids)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_greedy_generation_matches_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 9:]
    assert torch.equal(ours.generate(ids, 12), want)


@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_mtp_added_to_checkpoint_speculative_equals_plain(pair, tmp_path, s):
    """transformers drops the MTP block; add one (random, at model.layers.{L}) to its checkpoint."""
    from safetensors.torch import load_file, save_file

    hf, _, path = pair
    sd = load_file(str(path / "model.safetensors"))
    cfg = Glm45Config.from_hf_config(path)
    donor = Glm45ForCausalLM(cfg, dtype=torch.float32)  # num_nextn_predict_layers = 1 from the config
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    sd.update({k: v for k, v in hf_state_dict(donor).items() if k.startswith(mtp)})
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = Glm45ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    assert ours.mtp is not None
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=9, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 7:]
    assert torch.equal(ours.generate(ids, 9, speculative="mtp", num_draft_tokens=s), want)


def test_config_matches_transformers_config(pair):
    hf, ours, _ = pair
    c = hf.config
    assert (ours.config.hidden_size, ours.config.n_routed_experts, ours.config.rotary_dim,
            ours.config.routed_scaling_factor, ours.config.use_qk_norm) == (
        c.hidden_size, c.n_routed_experts, int(c.head_dim * c.rope_parameters["partial_rotary_factor"]),
        c.routed_scaling_factor, c.use_qk_norm)
