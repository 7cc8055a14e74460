"""How far an FP8 rollout drifts from the BF16 trainer, for one checkpoint (issue 12's demo).

slime trains GLM-4.5 in BF16 and rolls out with FP8 weights requantized every step. Scoring the
same sequences both ways, through ``model.score`` (``linear_logprobs``), and comparing with ``importance_weights``
gives the mismatch metrics TIS is meant to absorb (``kl_k1``, ``kl_k3``, ``ppl_ratio``,
``clip_frac``, ``max_ratio``, ``weight_mean``). On a CPU it runs with the ``tiny`` preset; on an
H200 with a real layer stack.
"""

from __future__ import annotations

import copy

import torch

from glm45_ops.rollout.importance import importance_weights


def _next_token_logprobs(model, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 ``[B, S-1]``: log-prob of ``input_ids[:, i+1]`` given the prefix up to ``i``
    (``model.score``: the LM head fused with the log-softmax)."""
    labels = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)
    return model.score(input_ids, labels, temperature)[:, :-1]


@torch.no_grad()
def fp8_rollout_mismatch(
    model, input_ids: torch.Tensor, temperature: float = 1.0, **importance
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``importance_weights(train, rollout, **importance)`` for the next tokens of ``input_ids``.

    ``model``: a BF16 :class:`glm45_ops.model.Glm45ForCausalLM` (the trainer's weights);
    ``input_ids`` int ``[B, S]``, S >= 2. ``train`` are its log-probs of ``input_ids[:, 1:]``
    (``[B, S-1]``, at ``temperature``); ``rollout`` the same from ``copy.deepcopy(model)
    .quantize_fp8_()``, as an FP8 rollout engine serves it (linear and expert weights in e4m3
    128 x 128 blocks; embedding, router, norms and LM head BF16). The model is left untouched;
    the copy costs its weights once more; both score on ``model.backend``. ``importance`` goes to
    :func:`importance_weights` (``level``, ``clip_high``, ``clip_low``). Returns its
    ``(weights [B, S-1], metrics)``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be an int tensor [B, S] with S >= 2, got {getattr(input_ids, 'shape', input_ids)}")
    train = _next_token_logprobs(model, input_ids, temperature)
    rollout = _next_token_logprobs(copy.deepcopy(model).quantize_fp8_(), input_ids, temperature)
    return importance_weights(train, rollout, **importance)
