"""token_logprobs against a float64 oracle (log_softmax + gather, and -sum p log p), on every CPU
backend: V in {1000, 4099, 151552}, bf16 and fp32, scalar and per-row temperatures, T = 0, a
masked (-inf) vocabulary, row-strided logits; and the temperature semantics of
``probs_from_logits`` (the distribution a rollout sampled from), greedy rows included."""

from __future__ import annotations

import math

import pytest
import torch

import glm45_ops
from conftest import cpu_backends
from glm45_ops.rollout import token_logprobs
from glm45_ops.speculative import probs_from_logits

OP = glm45_ops.registered_ops()["token_logprobs"]
EPS32 = torch.finfo(torch.float32).eps


def oracle(logits: torch.Tensor, ids: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (logprobs, entropy) of softmax(logits / t) for rows with t > 0 (the others: NaN)."""
    z = logits.double() / t.double()[:, None]
    logp = z.log_softmax(dim=-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)
    return logp.gather(1, ids.long()[:, None])[:, 0], entropy


def tolerance(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per row: a few fp32 ulps of the largest ``|x| / t`` plus ``log2 V`` (the error model of
    glm45_ops.rollout.logprobs.compare_rows, with 16 ulps here against the exact oracle)."""
    finite = torch.where(torch.isfinite(logits.float()), logits.float().abs(), 0.0)
    return 16 * EPS32 * (finite.amax(dim=-1) / t.abs() + math.log2(logits.shape[-1]) + 8)


def assert_matches_oracle(lp, ent, logits, ids, t):
    want_lp, want_ent = oracle(logits, ids, t)
    tol = tolerance(logits, t).double()
    assert lp.dtype == ent.dtype == torch.float32
    finite = torch.isfinite(want_lp)
    assert torch.equal(lp[~finite], want_lp[~finite].float()), (lp, want_lp)  # -inf targets
    assert ((lp.double() - want_lp).abs()[finite] <= tol[finite]).all(), (lp, want_lp, tol)
    assert ((ent.double() - want_ent).abs() <= tol).all(), (ent, want_ent, tol)


def logits_of(shape, dtype, gen, std=4.0):
    return (torch.randn(shape, generator=gen) * std).to(dtype)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("v", [1000, 4099])
@pytest.mark.parametrize("temp", ["one", "scalar", "per-row"])
def test_against_float64(backend, dtype, v, temp, gen):
    t_rows = 5
    logits = logits_of((t_rows, v), dtype, gen)
    ids = torch.randint(0, v, (t_rows,), generator=gen)
    if temp == "per-row":
        t = torch.rand(t_rows, generator=gen) * 1.5 + 0.2
        lp, ent = token_logprobs(logits, ids, t, backend=backend)
    else:
        value = 1.0 if temp == "one" else 0.6
        t = torch.full((t_rows,), value)
        lp, ent = token_logprobs(logits, ids, value, backend=backend)
    assert_matches_oracle(lp, ent, logits, ids, t)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_glm45_vocabulary(backend, dtype, gen):
    v = 151552
    logits = logits_of((3, v), dtype, gen, std=2.0)
    ids = torch.randint(0, v, (3,), generator=gen)
    t = torch.tensor([1.0, 0.7, 1.2])
    lp, ent = token_logprobs(logits, ids, t, backend=backend)
    assert_matches_oracle(lp, ent, logits, ids, t)


@pytest.mark.parametrize("backend", cpu_backends())
def test_masked_vocabulary_and_row_strides(backend, gen):
    """-inf logits have probability 0 and add nothing to the entropy (not NaN); a -inf target
    has logprob -inf; rows may be strided (a view into wider storage)."""
    wide = logits_of((6, 1500), torch.float32, gen)
    logits = wide[:, 200:1223]  # V = 1023, row stride 1500
    logits[:, 500:900] = float("-inf")
    logits[2, ::3] = float("-inf")
    ids = torch.randint(0, 500, (6,), generator=gen)
    ids[0] = 600  # masked target
    ids[2] = 3
    lp, ent = token_logprobs(logits, ids, 0.8, backend=backend)
    assert torch.isfinite(ent).all()
    assert lp[0] == float("-inf") and lp[2] == float("-inf")
    assert_matches_oracle(lp, ent, logits, ids, torch.full((6,), 0.8))
    kept = torch.cat([logits[:, :500], logits[:, 900:]], dim=1)  # the same rows without the mask
    _, ent_kept = token_logprobs(kept.contiguous(), torch.zeros(6, dtype=torch.int64), 0.8, backend=backend)
    torch.testing.assert_close(ent, ent_kept, rtol=0, atol=1e-5)


@pytest.mark.skipif("triton" not in cpu_backends(), reason="no Triton interpreter here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_state_across_chunks(dtype, gen):
    """The Triton kernel in 64-wide chunks (the interpreter otherwise reads a row as one chunk,
    so the online rescaling between chunks, the error-prone part, would never run here) against
    the float64 oracle: a maximum that grows in every chunk, masked leading chunks (a state that
    saw only -inf meets a finite max), the maximum alone in the partial last chunk, a maximum in
    the first chunk only; and greedy rows whose tied maxima lie in different chunks."""
    from triton_ops import rollout as tr

    v = 301  # four full chunks and a partial one
    logits = logits_of((7, v), torch.float32, gen)
    logits[0] = torch.linspace(-40.0, 40.0, v)
    logits[1, :150] = float("-inf")
    logits[2, v - 1] = 30.0
    logits[3] = torch.linspace(40.0, -40.0, v)
    logits[4, [10, 202]] = 50.0  # ties in the same lane of different chunks
    logits[5, [70, 134]] = 50.0
    logits = logits.to(dtype)
    ids = torch.randint(150, v, (7,), generator=gen)
    ids[4], ids[5] = 10, 134  # the first tied maximum (logprob 0), the second (-inf)
    t = torch.tensor([0.7, 1.0, 1.3, 0.9, 0.0, 0.0, 2.5])
    lp, ent = OP.alloc(logits, ids, 1.0, t)
    tr.token_logprobs(logits, ids, 1.0, t, lp, ent, block_v=64)
    soft = t > 0
    assert_matches_oracle(lp[soft], ent[soft], logits[soft], ids[soft], t[soft])
    assert lp[4] == 0.0 and lp[5] == float("-inf") and ent[4] == ent[5] == 0.0


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty(backend):
    for ids_dtype in (torch.int32, torch.int64):
        lp, ent = token_logprobs(torch.empty(0, 151552, dtype=torch.bfloat16), torch.empty(0, dtype=ids_dtype),
                                 backend=backend)
        assert lp.shape == ent.shape == (0,) and lp.dtype == torch.float32


@pytest.mark.parametrize("backend", cpu_backends())
def test_temperature_means_what_the_sampler_means(backend, gen):
    """exp(logprob) is probs_from_logits' probability of the token, and the entropy is that
    distribution's, for every kind of row: sampled (t > 0), greedy (t = 0 and t < 0, ties to the
    lowest id), and a tiny t whose mass sits on the tied maxima."""
    v = 300
    logits = torch.randint(-3, 4, (6, v), generator=gen).float().to(torch.bfloat16)  # many ties
    t = torch.tensor([1.0, 0.5, 0.0, -2.0, 1e-30, 2.0])
    probs = probs_from_logits(logits, t)
    ids = torch.stack([torch.randint(0, v, (), generator=gen) for _ in range(6)])
    ids[2] = int(logits[2].float().argmax())  # the greedy token: logprob 0
    ids[4] = int((logits[4] == logits[4].max()).nonzero()[-1, 0])  # a tied maximum, not the first
    lp, ent = token_logprobs(logits, ids, t, backend=backend)
    want = probs.gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(lp.exp(), want, rtol=1e-5, atol=1e-7)
    want_ent = -torch.where(probs > 0, probs * probs.log(), 0.0).sum(dim=-1)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-6)
    assert lp[2] == 0.0 and ent[2] == 0.0 and ent[3] == 0.0
    ties = int((logits[4] == logits[4].max()).sum())
    assert lp[4].item() == pytest.approx(-math.log(ties), abs=1e-6)


def test_temperature_forms():
    """The Python function takes a number, a [T] tensor or a 0-dim tensor as ``temperature``, or
    the schema's ``temperatures=`` (as the raw op, with ``temperature`` left at its default)."""
    gen = torch.Generator().manual_seed(0)
    logits = logits_of((4, 50), torch.float32, gen)
    ids = torch.randint(0, 50, (4,), generator=gen)
    want = token_logprobs(logits, ids, 0.7)
    for form in (torch.tensor(0.7), torch.full((4,), 0.7)):
        for got, w in zip(token_logprobs(logits, ids, form), want):
            assert torch.equal(got, w)
    for got, w in zip(torch.ops.glm45.token_logprobs(logits, ids, temperatures=torch.full((4,), 0.7)), want):
        assert torch.equal(got, w)
    for got, w in zip(token_logprobs(logits, ids, temperatures=torch.full((4,), 0.7)), want):
        assert torch.equal(got, w)
    with pytest.raises(ValueError, match="give per-row temperatures once"):
        token_logprobs(logits, ids, torch.ones(4), torch.ones(4))
    with pytest.raises(TypeError, match="temperature must be float, got str"):
        token_logprobs(logits, ids, "0.7")
    with pytest.raises(ValueError, match=r"temperatures must have shape \[4\]"):
        token_logprobs(logits, ids, torch.ones(3))
    with pytest.raises(ValueError, match="temperature must not be NaN"):
        token_logprobs(logits, ids, float("nan"))


def test_out_of_range_ids():
    """Refused on CPU (free to check there); the kernels give them logprob -inf (the definition
    for CUDA, where checking would cost a host sync)."""
    logits = torch.randn(3, 40)
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, V=40\); found 40 at index 1"):
        token_logprobs(logits, torch.tensor([0, 40, 2]))
    ids = torch.tensor([-1, 40, 2])
    lp, ent = glm45_ops.reference.rollout.token_logprobs_ref(logits, ids, 1.0, None)
    assert lp[0] == lp[1] == float("-inf") and torch.isfinite(lp[2]) and torch.isfinite(ent).all()
    if "triton" in cpu_backends():
        from triton_ops import rollout as tr

        got = OP.alloc(logits, ids, 1.0, None)
        tr.token_logprobs(logits, ids, 1.0, None, *got)
        assert got[0][0] == got[0][1] == float("-inf")
        torch.testing.assert_close(got[0][2], lp[2])
