"""The FP8-rollout / BF16-trainer mismatch demo on the tiny preset (CPU): the next-token
log-probs both sides feed to importance_weights are those of the unfused fp32 math over each
model's final hidden states, the FP8 side really is the requantized model, and the metrics are
those of a small, nonzero drift."""

from __future__ import annotations

import copy

import pytest
import torch

from glm45_ops.model import Glm45Config, Glm45ForCausalLM
from glm45_ops.rollout import LEVELS, fp8_rollout_mismatch, importance_weights


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Glm45ForCausalLM(Glm45Config.preset("tiny"), dtype=torch.bfloat16)


def unfused_next_token_logprobs(model, ids, temperature):
    _, hidden = model(ids, return_hidden=True)
    logits = hidden[:, :-1].float() @ model.lm_head.weight.float().t()
    return (logits / temperature).log_softmax(dim=-1).gather(-1, ids[:, 1:, None])[..., 0]


@pytest.mark.parametrize("level", LEVELS)
def test_matches_unfused_scoring(tiny, level):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    weights, metrics = fp8_rollout_mismatch(tiny, ids, 0.8, level=level, clip_high=1.05)
    train = unfused_next_token_logprobs(tiny, ids, 0.8)
    rollout = unfused_next_token_logprobs(copy.deepcopy(tiny).quantize_fp8_(), ids, 0.8)
    want_w, want_m = importance_weights(train, rollout, level=level, clip_high=1.05)
    assert weights.shape == (2, 19)
    torch.testing.assert_close(weights, want_w, rtol=1e-4, atol=0)
    for k, v in want_m.items():
        torch.testing.assert_close(metrics[k], v, rtol=1e-3, atol=1e-6, msg=k)
    assert not tiny.is_fp8  # the model is untouched
    assert 0 < metrics["kl_k3"] < 0.1  # FP8 moved the log-probs, a little


def test_refuses_a_single_token(tiny):
    with pytest.raises(ValueError, match="S >= 2"):
        fp8_rollout_mismatch(tiny, torch.zeros(2, 1, dtype=torch.int64))
