"""Rollout correction: truncated importance weights for an FP8 (or any other) rollout policy and
a BF16 trainer, with the mismatch metrics slime and verl log. Plain batched torch: no kernel, no
host sync, no data-dependent shapes (it runs inside CUDA graphs and ``torch.compile``).

Definitions, with ``r_t = exp(lr_t)`` and ``lr_t = logp_train(t) - logp_rollout(t)`` over the
valid (unmasked) tokens ``t`` of each sequence ``S``:

* **token** (slime ``--use-tis``, ``vanilla_tis_function`` in
  ``slime/backends/megatron_utils/loss.py``: ``clamp(exp(train - rollout), tis_clip_low,
  tis_clip)``, defaults ``--tis-clip 2.0 --tis-clip-low 0``; verl ``rollout_is_level="token"``):
  ``w_t = clamp(r_t, clip_low, clip_high)``.
* **sequence** (verl ``"sequence"``, ``verl/trainer/ppo/mismatch_helper.py``): every token of
  ``S`` gets ``clamp(exp(sum_{t in S} lr_t), ...)``, the product of its ratios.
* **geometric** (verl ``"geometric"``): ``clamp(exp(mean_{t in S} lr_t), ...)``, their geometric mean.

``clip_low`` is slime's ``--tis-clip-low``; verl's truncate mode clips above only (its lower
threshold belongs to its mask mode), which is ``clip_low=0``, the default.

Masked positions get weight 0 (they may hold anything, NaN included: it is never read). A valid
token's NaN log-ratio (a NaN input, or ``-inf`` on both sides) is NaN in its weight (its
sequence's at the sequence levels) and in every metric but ``clip_frac`` (which counts it as
clipped). The
metrics, fp32 0-dim tensors on the inputs' device (means over valid tokens; 0 when there are
none, the denominator clamped to 1 as slime's ``masked_mean``):

* ``kl_k1``: ``mean(logp_rollout - logp_train)``, the k1 estimator of KL(rollout || train) (verl ``mismatch_kl``);
* ``kl_k3``: ``mean(r - lr - 1)``, the non-negative k3 estimator of the same KL (verl
  ``mismatch_k3_kl``), computed as ``expm1(lr) - lr`` so that it stays accurate (and
  non-negative) for the tiny log-ratios of a close match;
* ``ppl_ratio``: the mean over sequences (with at least one valid token) of
  ``exp(mean logp_rollout - mean logp_train)``, the trainer's perplexity over the rollout's
  (verl ``mismatch_ppl_ratio``);
* ``clip_frac``: the fraction of valid tokens whose weight was clipped (``w != ratio``, slime
  ``tis_clipfrac``; at the sequence levels each token carries its sequence's ratio);
* ``max_ratio``: the largest unclipped ratio at the chosen level (verl ``rollout_is_max``, which
  bounds it at ``exp(20)``; here ``inf`` when it overflows fp32, 0 with no valid token);
* ``weight_mean``: the mean clipped weight, what the loss is scaled by on average (verl's
  ``rollout_is_mean`` averages the ratios before truncation instead).

verl clamps log-ratios to +-20 before ``exp``; here ``exp`` may overflow to ``inf`` and the clamp
to ``clip_high`` takes it back, so weights are exact and only ``max_ratio`` shows the overflow.
"""

from __future__ import annotations

import math

import torch

__all__ = ["importance_weights", "LEVELS"]

LEVELS = ("token", "sequence", "geometric")


def _check(train_logprobs, rollout_logprobs, mask, level, clip_high, clip_low, cu_seqlens) -> None:
    for name, t in (("train_logprobs", train_logprobs), ("rollout_logprobs", rollout_logprobs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    shape = tuple(train_logprobs.shape)
    if len(shape) not in (1, 2):
        raise ValueError(f"train_logprobs must be [B, L] or packed [T], got shape {shape}")
    if tuple(rollout_logprobs.shape) != shape:
        raise ValueError(f"rollout_logprobs must have train_logprobs' shape {list(shape)}, "
                         f"got {list(rollout_logprobs.shape)}")
    device = train_logprobs.device
    for name, t in (("rollout_logprobs", rollout_logprobs), ("mask", mask), ("cu_seqlens", cu_seqlens)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but train_logprobs is on {device}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask must have train_logprobs' shape {list(shape)}, got {list(mask.shape)}")
    if cu_seqlens is not None:
        if len(shape) != 1:
            raise ValueError("cu_seqlens is for packed [T] inputs; [B, L] inputs hold one sequence per row")
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be a 1-D int32 or int64 tensor [N + 1], got {cu_seqlens.dtype} "
                             f"shape {tuple(cu_seqlens.shape)}")
        if device.type == "cpu" and not torch.compiler.is_compiling():  # values: only where no host sync
            c = cu_seqlens.tolist()
            if c[0] != 0 or c[-1] != shape[0] or any(b < a for a, b in zip(c, c[1:])):
                raise ValueError(f"cu_seqlens must start at 0, never decrease and end at T={shape[0]}, got {c}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    for name, x in (("clip_high", clip_high), ("clip_low", clip_low)):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    if not 0 <= clip_low <= clip_high or math.isnan(clip_high):
        raise ValueError(f"clip_low and clip_high must satisfy 0 <= clip_low <= clip_high, "
                         f"got clip_low={clip_low!r}, clip_high={clip_high!r}")


def _sequence_ids(shape: tuple[int, ...], cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, int]:
    """(the sequence index of each flattened position, the number of sequences N); positions
    past ``cu_seqlens[-1]`` get index N (they belong to no sequence)."""
    if len(shape) == 2:
        b, l = shape
        return torch.arange(b, device=device).repeat_interleave(l), b
    if cu_seqlens is None:
        return torch.zeros(shape[0], dtype=torch.int64, device=device), 1
    positions = torch.arange(shape[0], device=device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], positions, right=True), cu_seqlens.numel() - 1


@torch.no_grad()
def importance_weights(
    train_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    level: str = "token",
    clip_high: float = 2.0,
    clip_low: float = 0.0,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance weights ``pi_train / pi_rollout`` and mismatch metrics (module docstring).

    ``train_logprobs``, ``rollout_logprobs``: float ``[B, L]`` (one sequence per row, ``mask``
    bool ``[B, L]`` marking the valid tokens, padding False) or packed ``[T]`` (``cu_seqlens``
    int ``[N + 1]``: sequence ``n`` is ``[cu[n], cu[n+1])``; without it, one sequence; ``mask``
    optional). ``mask=None``: every position (of a sequence) is valid. ``level``: "token",
    "sequence" or "geometric". Returns ``weights`` fp32 (the inputs' shape, detached, 0 where
    masked) and ``metrics``: ``kl_k1``, ``kl_k3``, ``ppl_ratio``, ``clip_frac``, ``max_ratio``,
    ``weight_mean`` as fp32 0-dim tensors (no host sync). ``cu_seqlens`` values are checked on
    CPU only (a device-side check would sync).
    """
    _check(train_logprobs, rollout_logprobs, mask, level, clip_high, clip_low, cu_seqlens)
    shape = tuple(train_logprobs.shape)
    device = train_logprobs.device
    seq, n_seq = _sequence_ids(shape, cu_seqlens, device)
    valid = seq < n_seq
    if mask is not None:
        valid = valid & mask.reshape(-1)
    log_ratio = train_logprobs.reshape(-1).float() - rollout_logprobs.reshape(-1).float()
    lr = torch.where(valid, log_ratio, 0.0)  # masked positions may hold NaN: never read past here
    seq = seq.clamp(max=max(n_seq - 1, 0))

    def per_seq(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_seq, dtype=x.dtype, device=device).index_add_(0, seq, x)

    n_tok = per_seq(valid.float())
    sum_lr = per_seq(lr)
    if level == "token":
        log_w = lr
    elif level == "sequence":
        log_w = sum_lr[seq]
    else:
        log_w = (sum_lr / n_tok.clamp(min=1))[seq]
    ratio = log_w.exp()
    clipped = ratio.clamp(clip_low, clip_high)
    weights = torch.where(valid, clipped, 0.0)

    count = valid.sum().clamp(min=1)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x, 0.0).sum() / count

    has_tokens = n_tok > 0
    seq_ppl_ratio = torch.where(has_tokens, (-sum_lr / n_tok.clamp(min=1)).exp(), 0.0)
    metrics = {
        "kl_k1": mean(-lr),
        # expm1: r - 1 is ~lr, and r - 1 - lr ~lr^2/2 cancels in fp32 as exp(lr) - 1 (negative
        # means at |lr| ~ 1e-4); an lr of +inf (the rollout gave the token probability 0) is +inf
        "kl_k3": mean(torch.where(lr == math.inf, math.inf, torch.expm1(lr) - lr)),
        "ppl_ratio": seq_ppl_ratio.sum() / has_tokens.sum().clamp(min=1),
        "clip_frac": mean((clipped != ratio).float()),
        # padded with one -inf so that an empty input has a max (exp: 0)
        "max_ratio": torch.nn.functional.pad(torch.where(valid, log_w, float("-inf")), (0, 1),
                                             value=float("-inf")).amax().exp(),
        "weight_mean": mean(weights),
    }
    return weights.reshape(shape), metrics
