"""importance_weights: token / sequence / geometric levels against per-sequence Python loops in
float64 (slime's and verl's definitions), [B, L] with padding masks and packed [T] with
cu_seqlens agreeing, garbage (NaN) in masked positions never read, detached weights, 0-dim
metrics, torch.compile(fullgraph) (no host sync, no data-dependent shape), bad input."""

from __future__ import annotations

import math

import pytest
import torch

from glm45_ops.rollout import LEVELS, importance_weights

KEYS = ("kl_k1", "kl_k3", "ppl_ratio", "clip_frac", "max_ratio", "weight_mean")


def expected(train: list[list[float]], rollout: list[list[float]], level: str, hi: float, lo: float):
    """Per-sequence lists of valid tokens -> (per-sequence weight lists, metrics), float64 loops."""
    weights, ratios, lrs = [], [], []
    ppl = []
    for tr, ro in zip(train, rollout):
        lr = [a - b for a, b in zip(tr, ro)]
        if level == "token":
            r = [math.exp(x) for x in lr]
        elif level == "sequence":
            r = [math.exp(sum(lr))] * len(lr)
        else:
            r = [math.exp(sum(lr) / len(lr))] * len(lr) if lr else []
        ratios += r
        lrs += lr
        weights.append([min(max(x, lo), hi) for x in r])
        if lr:
            ppl.append(math.exp(-sum(lr) / len(lr)))
    flat_w = [w for ws in weights for w in ws]
    n = max(len(lrs), 1)
    metrics = {
        "kl_k1": sum(-x for x in lrs) / n,
        "kl_k3": sum(math.exp(x) - x - 1 for x in lrs) / n,
        "ppl_ratio": sum(ppl) / max(len(ppl), 1),
        "clip_frac": sum(w != r for w, r in zip(flat_w, ratios)) / n,
        "max_ratio": max(ratios, default=0.0),
        "weight_mean": sum(flat_w) / n,
    }
    return weights, metrics


def batch(gen, lengths, max_len, noise=0.3):
    """[B, L] train/rollout log-probs with right padding (NaN there), the mask, and per-sequence lists."""
    b = len(lengths)
    rollout = -torch.rand(b, max_len, generator=gen) * 3
    train = rollout + torch.randn(b, max_len, generator=gen) * noise
    mask = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]
    train[~mask] = float("nan")  # padding holds garbage: it must never be read
    rollout[~mask] = float("-inf")
    seqs = [(train[i, :n].tolist(), rollout[i, :n].tolist()) for i, n in enumerate(lengths)]
    return train, rollout, mask, seqs


def assert_metrics(metrics, want):
    assert set(metrics) == set(KEYS)
    for k in KEYS:
        m = metrics[k]
        assert m.dim() == 0 and m.dtype == torch.float32, k
        assert m.item() == pytest.approx(want[k], rel=2e-5, abs=2e-6), k


@pytest.mark.parametrize("level", LEVELS)
def test_padded_batch(level, gen):
    lengths = [5, 1, 8, 3]
    train, rollout, mask, seqs = batch(gen, lengths, 8)
    weights, metrics = importance_weights(train, rollout, mask, level, 1.5, 0.8)
    want_w, want_m = expected([s[0] for s in seqs], [s[1] for s in seqs], level, 1.5, 0.8)
    assert weights.shape == train.shape and weights.dtype == torch.float32
    assert (weights[~mask] == 0).all()
    for i, n in enumerate(lengths):
        torch.testing.assert_close(weights[i, :n].double(), torch.tensor(want_w[i], dtype=torch.float64),
                                   rtol=2e-6, atol=0)
    assert_metrics(metrics, want_m)


@pytest.mark.parametrize("level", LEVELS)
def test_packed_equals_padded(level, gen):
    lengths = [4, 7, 1, 6]
    train, rollout, mask, _ = batch(gen, lengths, 7)
    w_pad, m_pad = importance_weights(train, rollout, mask, level)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    w_packed, m_packed = importance_weights(train[mask], rollout[mask], level=level, cu_seqlens=cu)
    torch.testing.assert_close(w_packed, w_pad[mask], rtol=1e-6, atol=0)
    for k in KEYS:
        torch.testing.assert_close(m_packed[k], m_pad[k], rtol=1e-6, atol=1e-7, msg=k)
    packed_mask = torch.ones(int(cu[-1]), dtype=torch.bool)
    packed_mask[2] = False  # a mask on packed input removes that token from its sequence
    w_m, _ = importance_weights(train[mask], rollout[mask], packed_mask, level, cu_seqlens=cu)
    assert w_m[2] == 0


def test_defaults_are_slimes_tis(gen):
    """Token level, clip to [0, 2] (slime --use-tis --tis-clip 2.0 --tis-clip-low 0); no mask
    and no cu_seqlens: one sequence, every token valid."""
    train = torch.tensor([-1.0, -2.0, -0.1, -5.0])
    rollout = torch.tensor([-1.0, -3.0, -0.2, -1.0])
    weights, metrics = importance_weights(train, rollout)
    torch.testing.assert_close(weights, torch.tensor([1.0, 2.0, math.exp(0.1), math.exp(-4.0)]))
    assert metrics["clip_frac"].item() == pytest.approx(0.25)
    assert metrics["max_ratio"].item() == pytest.approx(math.e)


def test_k3_of_a_close_match(gen):
    """k3 = r - 1 - log r is about lr^2 / 2: at the log-ratio spread of a close match (1e-4, BF16
    against FP32) ``exp(lr) - 1`` cancels in fp32 and the mean came out negative; it must stay
    the float64 value of the same fp32 log-ratios. A valid token the rollout gave probability 0
    (lr = +inf) makes it +inf, not inf - inf."""
    rollout = -torch.rand(4096, generator=gen) * 5
    train = rollout + torch.randn(4096, generator=gen) * 1e-4
    _, metrics = importance_weights(train, rollout)
    lr = (train - rollout).double()  # the fp32 log-ratios the function sees, exactly
    assert metrics["kl_k3"].item() == pytest.approx((torch.expm1(lr) - lr).mean().item(), rel=1e-4)
    rollout[7] = float("-inf")
    _, metrics = importance_weights(train, rollout)
    assert metrics["kl_k3"] == float("inf")


def test_overflow_and_empty():
    """A sequence ratio beyond fp32 clips to clip_high (max_ratio says inf); no valid token gives
    zero weights and zero metrics, not NaN."""
    train = torch.full((1, 10), 0.0)
    rollout = torch.full((1, 10), -20.0)
    weights, metrics = importance_weights(train, rollout, level="sequence")
    assert (weights == 2.0).all() and metrics["max_ratio"] == float("inf")
    assert metrics["clip_frac"] == 1.0
    for shape in ((0,), (3, 0)):
        w, m = importance_weights(torch.empty(shape), torch.empty(shape), level="geometric")
        assert w.shape == shape and all(m[k] == 0 for k in KEYS)
    w, m = importance_weights(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert (w == 0).all() and all(m[k] == 0 for k in KEYS)


def test_weights_are_detached(gen):
    train = torch.randn(3, 4, generator=gen).requires_grad_()
    weights, metrics = importance_weights(train, torch.randn(3, 4, generator=gen))
    assert not weights.requires_grad and not any(m.requires_grad for m in metrics.values())


def test_compiles_fullgraph(gen):
    """One graph: no host sync and no data-dependent shape (packed, every level)."""
    train, rollout = torch.randn(12, generator=gen), torch.randn(12, generator=gen)
    cu = torch.tensor([0, 5, 5, 12])
    for level in LEVELS:
        torch._dynamo.reset()
        fn = torch.compile(lambda a, b, c: importance_weights(a, b, level=level, cu_seqlens=c), fullgraph=True,
                           backend="aot_eager")
        got, want = fn(train, rollout, cu), importance_weights(train, rollout, level=level, cu_seqlens=cu)
        torch.testing.assert_close(got[0], want[0])
        for k in KEYS:
            torch.testing.assert_close(got[1][k], want[1][k])


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((torch.zeros(2, 3), torch.zeros(2, 4)), {}, ValueError, r"rollout_logprobs must have train_logprobs' shape \[2, 3\]"),
    ((torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), {}, ValueError, r"must be \[B, L\] or packed \[T\]"),
    ((torch.zeros(3, dtype=torch.int64), torch.zeros(3)), {}, ValueError, "train_logprobs must be a floating-point"),
    (([0.0], torch.zeros(1)), {}, TypeError, "train_logprobs must be a torch.Tensor, got list"),
    ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)), {}, ValueError, "mask must be a bool tensor"),
    ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool)), {}, ValueError,
     r"mask must have train_logprobs' shape \[2, 3\]"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"cu_seqlens": torch.tensor([0, 3])}, ValueError,
     r"cu_seqlens is for packed \[T\] inputs"),
    ((torch.zeros(5), torch.zeros(5)), {"cu_seqlens": torch.tensor([0, 2, 4])}, ValueError,
     r"cu_seqlens must start at 0, never decrease and end at T=5, got \[0, 2, 4\]"),
    ((torch.zeros(5), torch.zeros(5)), {"cu_seqlens": torch.tensor([0, 3, 2, 5])}, ValueError, "never decrease"),
    ((torch.zeros(5), torch.zeros(5)), {"cu_seqlens": torch.tensor([0.0, 5.0])}, ValueError,
     "cu_seqlens must be a 1-D int32 or int64 tensor"),
    ((torch.zeros(5), torch.zeros(5)), {"level": "seq"}, ValueError, r"level must be one of \('token', 'sequence', 'geometric'\), got 'seq'"),
    ((torch.zeros(5), torch.zeros(5)), {"clip_low": 3.0}, ValueError, r"0 <= clip_low <= clip_high, got clip_low=3.0, clip_high=2.0"),
    ((torch.zeros(5), torch.zeros(5)), {"clip_low": -1.0}, ValueError, "0 <= clip_low"),
    ((torch.zeros(5), torch.zeros(5)), {"clip_high": float("nan")}, ValueError, "0 <= clip_low"),
    ((torch.zeros(5), torch.zeros(5)), {"clip_high": "2"}, TypeError, "clip_high must be a number, got str"),
    ((torch.zeros(5), torch.zeros(5, device="meta")), {}, ValueError, "rollout_logprobs is on meta but train_logprobs is on cpu"),
])
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        importance_weights(*args, **kwargs)
