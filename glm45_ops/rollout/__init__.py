"""RL rollout kernels: per-token log-probabilities and entropy over a 151k vocabulary, the LM head
fused with them (forward and backward), and FP8-rollout / BF16-training mismatch correction.

* :mod:`glm45_ops.rollout.logprobs`: ``token_logprobs(logits, token_ids, temperature)`` ->
  (logprobs, entropy) fp32 ``[T]``, one streaming pass over V per row (torch, Triton, CUDA).
* :mod:`glm45_ops.rollout.linear`: ``linear_logprobs(hidden, weight, token_ids, temperature)``,
  the same from ``hidden @ weight^T`` without materialising ``[T, V]``, differentiable w.r.t.
  ``hidden`` and ``weight`` (its derivative is the op ``linear_logprobs_backward``).
* :mod:`glm45_ops.rollout.importance`: ``importance_weights``, truncated importance sampling
  weights at token / sequence / geometric level and the mismatch metrics (slime ``--use-tis``,
  verl rollout correction), in plain torch.
* :mod:`glm45_ops.rollout.mismatch`: ``fp8_rollout_mismatch(model, input_ids)``, those metrics
  for a checkpoint scored in BF16 and as its FP8 requantized rollout copy.

Temperatures mean what :func:`glm45_ops.speculative.probs_from_logits` means (``t <= 0`` is
greedy), so a rollout's log-probs are those of the distribution it sampled from. Definition,
edge values and gradients: :mod:`glm45_ops.reference.rollout`.
"""

from __future__ import annotations

from glm45_ops.rollout.importance import LEVELS, importance_weights
from glm45_ops.rollout.linear import linear_logprobs, linear_logprobs_backward
from glm45_ops.rollout.logprobs import MAX_VOCAB, token_logprobs
from glm45_ops.rollout.mismatch import fp8_rollout_mismatch

__all__ = ["LEVELS", "MAX_VOCAB", "fp8_rollout_mismatch", "importance_weights", "linear_logprobs",
           "linear_logprobs_backward", "token_logprobs"]
