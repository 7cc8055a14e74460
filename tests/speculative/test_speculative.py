"""MTP speculative verification: greedy and sampling ops on every backend exactly equal to the
reference; the reference checked against naive per-row oracles; the sampler's output distribution
and acceptance rates checked statistically; probs_from_logits' definition (tiny and NaN
parameters); the C++ kernels' host checks beyond the error tables; CUDA graphs. opcheck,
torch.compile, the bad-input tables, empty and non-finite samples are the generic contract tests
(tests/test_contract.py, tables in glm45_ops/speculative.py)."""

from __future__ import annotations

import math

import pytest
import torch

import glm45_ops
from conftest import cpu_backends, device_backends
from glm45_ops import speculative as spec
from glm45_ops.reference import speculative as ref
from glm45_ops.testing import cuda_kernel_differs, outputs_differ, poisoned_outputs

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BACKENDS = device_backends()
GPU_BACKENDS = [p for p in BACKENDS if p[0] == "cuda" and p[1] != "torch"]


def assert_same(got, want, what: str = "") -> None:
    """Bit equality of (out_ids, num_accepted)."""
    why = outputs_differ(got, want)
    assert why is None, f"{what}: {why}"


def random_probs(shape, gen, scale: float = 3.0, zero_frac: float = 0.0) -> torch.Tensor:
    """Peaky random distributions (softmax of scaled normals); ``zero_frac`` of ids get mass 0."""
    logits = torch.randn(shape, generator=gen) * scale
    if zero_frac:
        logits[torch.rand(shape, generator=gen) < zero_frac] = -float("inf")
    return torch.softmax(logits, dim=-1)


def sample(probs: torch.Tensor, gen) -> torch.Tensor:
    """One id per row of ``probs`` [..., V] (int64 [...])."""
    flat = probs.reshape(-1, probs.shape[-1]).float()
    return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])


@pytest.fixture
def poisoned():
    """Outputs allocated for the kernels start as garbage (12345), so a kernel that skips the -1
    padding or a request cannot pass by luck of the allocator."""
    with poisoned_outputs():
        yield


# ---------------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------------

def greedy_oracle(draft_ids: torch.Tensor, logits: torch.Tensor):
    """Per-row loop over Python floats: the definition spelled out once more."""
    b, s = draft_ids.shape
    out = torch.full((b, s + 1), -1, dtype=torch.int32)
    acc = torch.zeros(b, dtype=torch.int32)
    for r in range(b):
        for i in range(s + 1):
            row = logits[r, i].float().tolist()
            # NaN above everything, then the value (-0.0 == 0.0 in Python), then the lowest id
            best = max(range(len(row)), key=lambda j: (math.isnan(row[j]), 0.0 if math.isnan(row[j]) else row[j], -j))
            out[r, i] = best
            if i == s or int(draft_ids[r, i]) != best:
                break
            acc[r] += 1
    return out, acc


def greedy_inputs(b: int, s: int, v: int, dtype, gen, device="cpu"):
    """Logits with planted ties, and drafts agreeing with the target argmax for a random prefix
    (none, some, all) per request."""
    logits = torch.randn(b, s + 1, v, generator=gen).to(dtype)
    # ties: the max value planted at two ids, the higher one first in the row's random order
    top = logits.float().amax(-1) + 1.0
    for r in range(0, b, 2):
        j1, j2 = sorted(torch.randperm(v, generator=gen)[:2].tolist())
        logits[r, :, j1] = top[r].to(dtype)
        logits[r, :, j2] = top[r].to(dtype)
    target = ref._row_argmax(logits)
    prefix = torch.randint(0, s + 1, (b,), generator=gen)
    draft = target[:, :s].clone()
    for r in range(b):
        if prefix[r] < s:
            draft[r, prefix[r]] = (draft[r, prefix[r]] + 1 + torch.randint(0, v - 1, (1,), generator=gen)) % v
    return draft.to(device), logits.to(device)


@pytest.mark.parametrize("s", [1, 3, 5])
def test_greedy_reference_vs_oracle(gen, s):
    draft, logits = greedy_inputs(9, s, 37, torch.float32, gen)
    logits[1, 0, 5] = float("nan")  # NaN counts as the largest value (torch.argmax's rule)
    logits[3, 0, :] = -float("inf")  # all equal: id 0
    assert_same(ref.verify_greedy_ref(draft, logits), greedy_oracle(draft, logits))
    # the tie rule is torch.argmax's (documented: the first maximal index)
    torch.testing.assert_close(ref._row_argmax(logits), logits.argmax(-1))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("s", [1, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_verify_greedy(gen, poisoned, device, backend, s, dtype):
    draft, logits = greedy_inputs(7, s, 1001, dtype, gen, device)
    want = ref.verify_greedy_ref(draft.cpu(), logits.cpu())
    assert want[1].unique().numel() > 1, "inputs should exercise several accept counts"
    assert_same(spec.verify_greedy(draft, logits, backend=backend), want, f"{backend} {dtype}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_verify_greedy_special_values_and_layouts(gen, poisoned, device, backend):
    """NaN, all -inf rows, -0 == +0 ties, int32 ids, strided (non-contiguous) logits."""
    b, s, v = 6, 3, 999
    big = torch.randn(b, s + 2, v + 8, generator=gen)
    logits = big[:, 1:, 3 : 3 + v]  # strides (.., .., 1) with a row pitch of v + 8
    logits[0, 0, 17] = float("nan")
    logits[0, 0, 900] = float("nan")
    logits[1, :, :] = -float("inf")
    logits[2, 0, :] = -1.0
    logits[2, 0, 40] = -0.0
    logits[2, 0, 30] = 0.0  # the max 0 appears as +0 at 30 and -0 at 40: id 30
    logits[3, 1, :] = float("inf")
    draft = ref._row_argmax(logits)[:, :s].to(torch.int32)
    draft[4, 1] += 1
    draft[0, 0] = 900  # the second NaN is not the first: rejected
    want = greedy_oracle(draft, logits)
    assert_same(ref.verify_greedy_ref(draft, logits), want, "reference")
    got = spec.verify_greedy(draft.to(device), logits.to(device), backend=backend)
    assert_same(got, want, backend)
    if device == "cpu" and "triton" in cpu_backends():
        got = spec.verify_greedy(draft, logits.contiguous(), backend="triton")
        assert_same(got, want, "triton contiguous")


# ---------------------------------------------------------------------------------------------
# Sampling: exact agreement for given uniforms
# ---------------------------------------------------------------------------------------------

def sampling_inputs(b: int, s: int, v: int, gen, with_draft: bool, dtype=torch.float32):
    """Draft and target distributions, drafts sampled from the draft, and uniforms including the
    extremes 0 and the largest fp32 below 1. In about half the requests the target puts half its
    mass on the drafted tokens, so accept counts spread over 0..S."""
    q = random_probs((b, s + 1, v), gen, zero_frac=0.3)
    p = random_probs((b, s, v), gen, zero_frac=0.3)
    draft = sample(p, gen)
    agree = (torch.rand(b, generator=gen) < 0.5)[:, None, None]
    planted = torch.zeros(b, s, v).scatter(-1, draft[..., None], 1.0)
    q[:, :s] = torch.where(agree, 0.5 * q[:, :s] + 0.5 * planted, q[:, :s])
    u = torch.rand(b, s + 1, generator=gen)
    u[0, s] = 0.0
    u[1, s] = 1.0 - 2.0**-24
    return draft, q.to(dtype), u, (p.to(dtype) if with_draft else None)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("with_draft", [True, False])
@pytest.mark.parametrize("s,v,dtype", [(1, 1031, torch.float32), (3, 3001, torch.float32), (3, 999, torch.bfloat16)])
def test_verify_sampling_exact(gen, poisoned, device, backend, with_draft, s, v, dtype):
    draft, q, u, p = sampling_inputs(16, s, v, gen, with_draft, dtype)
    want = ref.verify_sampling_ref(draft, q, u, p)
    assert want[1].unique().numel() > 1, "inputs should exercise several accept counts"
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = spec.verify_sampling(to(draft), to(q), to(u), to(p), backend=backend)
    assert_same(got, want, f"{backend} draft={with_draft}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_verify_sampling_degenerate_rows(gen, poisoned, device, backend):
    """The residual has no mass (draft token of probability 0 under both models, or p == q),
    an all-zero target row, a one-hot target, S = 0, strided rows, int32 ids."""
    b, s, v = 6, 2, 515
    q = random_probs((b, s + 1, v), gen)
    p = q[:, :s].clone()  # p == q: the residual is all zero wherever a rejection happens
    draft = sample(p, gen)
    q[0, 0, 7] = p[0, 0, 7] = 0.0
    draft[0, 0] = 7  # probability 0 under both: rejected, the residual is 0 -> draw from q
    q[1, 0] = 0.0
    p[1, 0] = 0.0
    draft[1, 0] = 3  # rejected, the target row has no mass at all -> V - 1
    q[2, :, :] = 0.0
    q[2, :, 11] = 1.0
    draft[2] = 11  # one-hot target: always accepted, bonus 11
    u = torch.rand(b, s + 1, generator=gen)
    pad = torch.zeros(b, s, v + 4)
    pad[..., 2 : 2 + v] = p
    p_strided = pad[..., 2 : 2 + v]
    want = ref.verify_sampling_ref(draft, q, u, p)
    assert want[0][0, 0] != 7 and want[0][1, 0] == v - 1 and want[0][2].tolist() == [11, 11, 11]
    ids32 = draft.to(torch.int32)
    got = spec.verify_sampling(ids32.to(device), q.to(device), u.to(device), p_strided.to(device), backend=backend)
    assert_same(got, want, backend)
    # S = 0: only the bonus draw
    got0 = spec.verify_sampling(draft[:, :0].to(device), q[:, :1].to(device), u[:, :1].to(device), backend=backend)
    assert_same(got0, ref.verify_sampling_ref(draft[:, :0], q[:, :1], u[:, :1], None), backend + " S=0")


def test_inverse_cdf_draw_ends():
    """u = 0 draws the first id with mass, u -> 1 the last one; never a zero-probability id."""
    w = ref.to_fixed_point(torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 3))
    u = torch.tensor([0.0, 0.25, 1.0 - 2.0**-24])
    assert ref.inverse_cdf_draw(w, u).tolist() == [1, 3, 3]
    # fixed point: exact multiples of 2**-40, values below 2**-40 vanish, > 1 saturates, NaN is 0
    d = torch.tensor([1.0, 0.5, 2.0**-41, 3.0, float("nan"), -0.5])
    assert ref.to_fixed_point(d).tolist() == [2**40, 2**39, 0, 2**40, 0, 0]


def unchecked(op, backend: str):
    """``op``'s implementation on ``backend`` without its check (which refuses out-of-vocabulary
    ids on CPU tensors): the registry's launcher for Python backends, the C++ kernel for cuda."""
    return op.overload if backend == "cuda" else op.impls[backend]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_out_of_range_ids_are_rejected(gen, poisoned, device, backend):
    """The kernels define an id outside [0, V) as a token of probability 0: rejected, never read."""
    b, s, v = 4, 3, 300
    for with_draft in (True, False):
        draft, q, u, p = sampling_inputs(b, s, v, gen, with_draft)
        q[:, :s] = q[:, :s] + 1.0  # would accept anything that is read
        draft[0, 0], draft[1, 1], draft[2, 2], draft[3, 0] = -1, v, 2**40, -(2**40)
        want = ref.verify_sampling_ref(draft, q, u, p)
        assert want[1].tolist() == [0, 1, 2, 0]
        args = [None if t is None else t.to(device) for t in (draft, q, u, p)]
        assert_same(unchecked(spec._sampling_op, backend)(*args), want, f"{backend} draft={with_draft}")
    draft, logits = greedy_inputs(b, s, v, torch.float32, gen)
    draft[0, 0], draft[1, 1] = -5, v + 5
    want = ref.verify_greedy_ref(draft, logits)
    assert want[1][0] == 0 and want[1][1] <= 1
    assert_same(unchecked(spec._greedy_op, backend)(draft.to(device), logits.to(device)), want, f"{backend} greedy")


def test_out_of_range_ids_are_refused_on_cpu(gen):
    """Where the range check costs no host sync (real CPU tensors), it raises, naming the id.
    (Not in the op's error table: fake tensors, like CUDA ones, skip it by definition.)"""
    ids, q, u, p = sampling_inputs(3, 2, 50, gen, True)
    logits = torch.randn(3, 3, 50, generator=gen)
    bad = ids.clone()
    bad[1, 1] = 50
    for backend in cpu_backends():
        with pytest.raises(ValueError, match=r"draft_ids must lie in \[0, V=50\); found 50 at flat index 3"):
            spec.verify_sampling(bad, q, u, p, backend=backend)
        bad[1, 1] = -1
        with pytest.raises(ValueError, match="found -1"):
            spec.verify_greedy(bad, logits, backend=backend)
        bad[1, 1] = 50
    with pytest.raises(ValueError, match="found 50"):
        torch.ops.glm45.verify_sampling.default(bad, q, u)


def test_generator_draws_the_uniforms(gen):
    draft, q, _, p = sampling_inputs(8, 3, 200, gen, True)
    got = spec.verify_sampling(draft, q, draft_probs=p, generator=torch.Generator().manual_seed(7))
    u = torch.rand(8, 4, generator=torch.Generator().manual_seed(7))
    assert_same(got, ref.verify_sampling_ref(draft, q, u, p))


def cpp_check_cases() -> list[tuple]:
    """(op, args) beyond the error tables and samples: inputs Python accepts (V = MAX_VOCAB, a
    one-id vocabulary of any stride) and refuses (V = MAX_VOCAB + 1, each argument's other
    dtypes and dims, strided draft rows, draft and target dtypes that differ)."""
    greedy, sampling = spec._greedy_op, spec._sampling_op
    ids, u = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4)
    logits, q, p = torch.zeros(2, 4, 10), torch.zeros(2, 4, 10), torch.zeros(2, 3, 10)
    cases = []
    for v in (ref.MAX_VOCAB, ref.MAX_VOCAB + 1):  # 16 MiB of bf16, never written
        row = torch.empty(1, 1, v, dtype=torch.bfloat16)
        cases += [(greedy, (ids[:1, :0], row)), (sampling, (ids[:1, :0], row, u[:1, :1]))]
    for dt in (torch.float64, torch.int32, torch.bool, torch.float8_e4m3fn, torch.complex64):
        cases += [(greedy, (ids, logits.to(dt))), (sampling, (ids, q.to(dt), u)),
                  (sampling, (ids, q, u.to(dt), p)), (sampling, (ids, q, u, p.to(dt)))]
    for dt in (torch.int32, torch.float32, torch.int16, torch.uint8):
        cases += [(greedy, (ids.to(dt), logits)), (sampling, (ids.to(dt), q, u, p))]
    one_id = torch.zeros(2, 4, 3)[..., 1:2]  # V = 1 with last stride 3: no stride to check
    cases += [
        (greedy, (ids[None], logits)), (greedy, (ids, logits[:, :, ::2])), (greedy, (ids, one_id)),
        (sampling, (ids[0], q, u)), (sampling, (ids, q[0], u, p)), (sampling, (ids, q, u[None], p)),
        (sampling, (ids, q, u, p[0])), (sampling, (ids, q, u, p.half())), (sampling, (ids, q, u, p[:, :, ::2])),
        (sampling, (ids, q, u, p.transpose(0, 2).contiguous().transpose(0, 2))),
        (sampling, (ids, one_id, u, torch.zeros(2, 3, 5)[..., :1])), (sampling, (ids, q, u, torch.zeros(2, 3, 11))),
    ]
    return cases


def test_cpp_checks_match_python():
    """The C++ kernels' host checks (through the CUDA key, no GPU) beyond the error tables and
    samples, which tests/test_extension.py runs: Python's ValueError word for word, or the device
    error where Python accepts."""
    if not glm45_ops.extension_loaded():
        pytest.skip(f"extension not built: {glm45_ops.extension_error()}")
    wrong = []
    for i, (op, args) in enumerate(cpp_check_cases()):
        why = cuda_kernel_differs(op, args)
        if why is not None:
            wrong.append(f"case {i} ({op.name}): {why}")
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------------------------
# Sampling: the emitted tokens follow the target (torch backend: many rows)
# ---------------------------------------------------------------------------------------------

# A correct sampler exceeds these thresholds with probability ~1e-7 per test (z = 5.2 for the
# binomial acceptance tests; the same tail for chi-square with 10 degrees of freedom, V = 12 ids
# of which one has probability 0: scipy.stats.chi2.isf(scipy.stats.norm.sf(5.2), 10) = 52.32).
# The seed is fixed, so the outcome is deterministic anyway. The distributions below are far
# enough apart that the usual bugs (residual not renormalised, the acceptance uniform reused for
# the draw, the bonus drawn from row k) push the statistics orders of magnitude past them.
Z = 5.2
CHI2_DF10 = 52.32
N_ROWS = 200_000


@pytest.mark.parametrize("with_draft", [True, False])
def test_emitted_tokens_follow_target(with_draft):
    g = torch.Generator().manual_seed(2024)
    s, v = 3, 12
    q = random_probs((s + 1, v), g, scale=1.0)
    q[:, 5] = 0.0  # an id the target never emits
    q = q / q.sum(-1, keepdim=True)
    p = random_probs((s, v), g, scale=1.5)
    draft = sample(p.expand(N_ROWS, s, v), g)
    qb = q.expand(N_ROWS, s + 1, v)
    pb = p.expand(N_ROWS, s, v) if with_draft else None
    out, acc = spec.verify_sampling(draft, qb, draft_probs=pb, generator=g, backend="torch")

    for i in range(s + 1):
        reached = acc >= i  # position i is emitted by these requests
        tokens = out[reached, i].long()
        assert (tokens >= 0).all()
        counts = torch.bincount(tokens, minlength=v).double()
        assert counts[5] == 0, "a zero-probability id was emitted"
        n = counts.sum()
        support = q[i] > 0
        expected = n * q[i].double()
        chi2 = (((counts - expected) ** 2)[support] / expected[support]).sum().item()
        assert int(support.sum()) - 1 == 10
        assert chi2 < CHI2_DF10, f"position {i}: chi2 {chi2:.1f} over {n:.0f} rows"

        if i < s:  # acceptance at i, among requests that reach it
            if with_draft:
                rate = torch.minimum(p[i], q[i]).sum().item()  # sum_x min(p, q)
            else:
                rate = (p[i] * q[i]).sum().item()  # one-hot draft x ~ p: E[q(x)]
            hits = (acc[reached] > i).double()
            sd = math.sqrt(rate * (1 - rate) / hits.numel())
            assert abs(hits.mean().item() - rate) < Z * sd, f"position {i}: acceptance {hits.mean():.4f} vs {rate:.4f}"


# ---------------------------------------------------------------------------------------------
# probs_from_logits
# ---------------------------------------------------------------------------------------------

def test_probs_from_logits(gen):
    x = torch.randn(4, 3, 50, generator=gen)
    x[..., 7] = x[..., 9] = x.amax(-1) + 1  # a tie at the top: ids 7 and 9
    torch.testing.assert_close(spec.probs_from_logits(x, 0.7), torch.softmax(x / 0.7, -1))
    greedy = spec.probs_from_logits(x, 0.0)
    assert torch.equal(greedy.argmax(-1), torch.full((4, 3), 7)) and torch.equal(greedy.sum(-1), torch.ones(4, 3))

    # top-k = 1 keeps the lower id of the tie; top-k = 5 keeps the 5 largest; renormalised
    top1 = spec.probs_from_logits(x, 1.0, top_k=1)
    assert torch.equal(top1, greedy)
    p5 = spec.probs_from_logits(x, 1.0, top_k=5)
    full = torch.softmax(x, -1)
    keep = full >= full.topk(5, -1).values[..., -1:]
    torch.testing.assert_close(p5, full * keep / (full * keep).sum(-1, keepdim=True))

    # top-p: the smallest prefix (by probability) whose mass before the last kept id is < top_p
    pp = spec.probs_from_logits(x, 1.0, top_p=0.6)
    for row_full, row in zip(full.reshape(-1, 50), pp.reshape(-1, 50)):
        order = row_full.argsort(descending=True, stable=True)
        before = row_full[order].cumsum(0) - row_full[order]
        kept = order[before < 0.6]
        assert set(row.nonzero().flatten().tolist()) == set(kept.tolist())

    # per-request tensors [B, 1] broadcast over positions; each row matches its scalar call
    t = torch.tensor([[0.5], [1.0], [0.0], [2.0]])
    k = torch.tensor([[0], [3], [10], [50]])
    tp = torch.tensor([[0.9], [1.0], [0.5], [0.3]])
    batched = spec.probs_from_logits(x, t, k, tp)
    for r in range(4):
        one = spec.probs_from_logits(x[r], t[r, 0].item(), int(k[r, 0]), tp[r, 0].item())
        torch.testing.assert_close(batched[r], one)


def test_probs_from_logits_is_sync_free():
    """Meta tensors have no data: any .item(), data-dependent shape or host read would raise."""
    x = torch.empty(4, 3, 151552, device="meta", dtype=torch.bfloat16)
    t = torch.empty(4, 1, device="meta")
    k = torch.empty(4, 1, device="meta", dtype=torch.int64)
    out = spec.probs_from_logits(x, t, k, torch.empty(4, 1, device="meta"))
    assert out.shape == x.shape and out.dtype == torch.float32


def test_bad_probs_from_logits_params():
    x = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match=r"top_k of shape \[2\] must broadcast"):
        spec.probs_from_logits(x, 1.0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"temperature of shape \[2, 3, 1\] must broadcast to .* \[2, 3\]"):
        spec.probs_from_logits(x, torch.ones(2, 3, 1))  # broadcasts with [2, 3], not to it
    with pytest.raises(TypeError, match="temperature must be a number or a tensor"):
        spec.probs_from_logits(x, "hot")
    with pytest.raises(ValueError, match="logits must be bfloat16"):
        spec.probs_from_logits(x.long())
    # top_k counts ids: a fraction has no meaning (3.7 used to be truncated to 3)
    with pytest.raises(TypeError, match="top_k must be an int or an integer tensor, got float"):
        spec.probs_from_logits(x, 1.0, 3.7)
    with pytest.raises(TypeError, match="top_k must be an int or an integer tensor, got float"):
        spec.probs_from_logits(x, 1.0, 3.0)
    with pytest.raises(ValueError, match="top_k must be an int or an integer tensor, got a torch.float32 tensor"):
        spec.probs_from_logits(x, 1.0, torch.full((2, 3), 3.7))
    # a NaN number is refused at once (it used to be greedy: NaN > 0 is False)
    with pytest.raises(ValueError, match="temperature must not be NaN"):
        spec.probs_from_logits(x, float("nan"))
    with pytest.raises(ValueError, match="top_p must not be NaN"):
        spec.probs_from_logits(x, 1.0, 0, float("nan"))


def test_probs_from_logits_tiny_temperatures(gen):
    """Any positive temperature is a finite softmax (1e-45 and a tensor 1e-40 used to give NaN:
    x / t overflowed to inf - inf). Tiny ones reach the t -> 0+ limit exactly: all the mass on
    the maximum, shared equally by ids tied there; t <= 0 (or a t that is 0 in fp32) is greedy,
    all the mass on the lowest of them."""
    x = torch.randn(4, 3, 50, generator=gen) * 10
    x[0, :, 7] = x[0, :, 9] = x[0].amax(-1) + 1  # a tie at the top of request 0
    tied = torch.zeros(50)
    tied[[7, 9]] = 0.5
    greedy = spec.probs_from_logits(x, 0.0)
    for t in (1e-45, 2**-149, 1e-30, torch.full((4, 1), 1e-40), torch.tensor([[1e-45], [1e-40], [1e-38], [2**-149]])):
        got = spec.probs_from_logits(x, t)
        assert torch.isfinite(got).all(), t
        assert torch.equal(got[1:], greedy[1:]), t
        assert torch.equal(got[0], tied.expand(3, 50)), t
        assert torch.equal(spec.probs_from_logits(x, t, top_k=1), greedy), t  # top-k's tie rule: lowest id
    # the temperature is taken in fp32: 1e-46 is 0 there (greedy), 1e-45 is its smallest subnormal
    assert torch.equal(spec.probs_from_logits(x, 1e-46), greedy)
    assert torch.equal(spec.probs_from_logits(x, torch.full((4, 1), 1e-50, dtype=torch.float64)), greedy)
    # the shifted form is torch.softmax itself at t = 1, and the scalar and tensor paths agree
    assert torch.equal(spec.probs_from_logits(x, 1.0), torch.softmax(x, -1))
    for t in (0.3, 1e-3, 7.0):
        assert torch.equal(spec.probs_from_logits(x, torch.full((4, 1), t)), spec.probs_from_logits(x, t))


def test_probs_from_logits_nonfinite(gen):
    """NaN entries of tensor parameters give their row NaN probabilities (checking them would be
    a host sync), the other rows are untouched; NaN/inf logits follow the reference docstring."""
    x = torch.randn(3, 20, generator=gen)
    t = torch.tensor([0.7, float("nan"), 0.0])
    got = spec.probs_from_logits(x, t)
    assert got[1].isnan().all()
    assert torch.equal(got[0], spec.probs_from_logits(x[0], 0.7))
    assert torch.equal(got[2], spec.probs_from_logits(x[2], 0.0))
    got = spec.probs_from_logits(x, 1.0, 5, torch.tensor([0.5, float("nan"), 1.0]))
    assert got[1].isnan().all() and not got[[0, 2]].isnan().any()
    assert torch.equal(got[0], spec.probs_from_logits(x[0], 1.0, 5, 0.5))

    y = torch.randn(4, 6, generator=gen)
    y[0, 2] = float("nan")
    y[1, 3] = float("inf")
    y[2] = -float("inf")
    y[3, [0, 4]] = -float("inf")
    p = spec.probs_from_logits(y, 0.5)
    assert p[:3].isnan().all()  # a NaN or +inf logit, or only -inf: NaN
    assert torch.equal(p[3, [0, 4]], torch.zeros(2)) and torch.isclose(p[3].sum(), torch.tensor(1.0))
    g = spec.probs_from_logits(y, 0.0)  # greedy: NaN is the largest value, then +inf; all -inf: id 0
    assert g.argmax(-1).tolist()[:3] == [2, 3, 0] and torch.equal(g.sum(-1), torch.ones(4))


# ---------------------------------------------------------------------------------------------
# GPU only: full-size rows, the scalar (unaligned) paths, CUDA graphs
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("device,backend", GPU_BACKENDS)
@pytest.mark.parametrize("v", [151552, 151551, 40000])  # 151551: unaligned rows -> scalar loads
def test_gpu_full_vocab(device, backend, v):
    gen = torch.Generator().manual_seed(v)
    for dtype in DTYPES:
        draft, logits = greedy_inputs(64, 3, v, dtype, gen)
        assert_same(spec.verify_greedy(draft.cuda(), logits.cuda(), backend=backend),
                    ref.verify_greedy_ref(draft, logits), f"greedy {dtype} V={v}")
    for with_draft in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            draft, q, u, p = sampling_inputs(64, 3, v, gen, with_draft, dtype)
            to = lambda t: None if t is None else t.cuda()  # noqa: E731
            assert_same(spec.verify_sampling(to(draft), to(q), to(u), to(p), backend=backend),
                        ref.verify_sampling_ref(draft, q, u, p), f"sampling {dtype} draft={with_draft} V={v}")


@pytest.mark.gpu
@pytest.mark.parametrize("device,backend", GPU_BACKENDS)
def test_gpu_cuda_graph(device, backend):
    """Both ops capture into a CUDA graph (no host sync, no allocation that changes per call) and
    replays recompute from the captured inputs' new contents."""
    gen = torch.Generator().manual_seed(3)
    draft, q, u, p = (t.cuda() for t in sampling_inputs(8, 3, 4096, gen, True))
    gd, gl = (t.cuda() for t in greedy_inputs(8, 3, 4096, torch.bfloat16, gen))
    spec.verify_sampling(draft, q, u, p, backend=backend)  # warm up (Triton compiles)
    spec.verify_greedy(gd, gl, backend=backend)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_out = spec.verify_sampling(draft, q, u, p, backend=backend)
        g_out = spec.verify_greedy(gd, gl, backend=backend)
    u.copy_(torch.rand(u.shape, generator=gen).cuda())
    gl.copy_(torch.randn(gl.shape, generator=gen).to(gl.dtype).cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert_same(s_out, ref.verify_sampling_ref(draft.cpu(), q.cpu(), u.cpu(), p.cpu()), "graph sampling")
    assert_same(g_out, ref.verify_greedy_ref(gd.cpu(), gl.cpu()), "graph greedy")


def test_bench_cases_refcheck():
    """The benchmark cases build on the CPU ('small' preset) and every CPU backend matches the
    torch reference on them, as ``glm45-bench speculative --refcheck`` checks (one run each)."""
    from glm45_ops.bench import cases as cases_mod
    from glm45_ops.bench.case import BenchContext
    from glm45_ops.config import preset

    cpu = torch.device("cpu")
    for case in cases_mod.load("speculative").cases(BenchContext(preset("small"), cpu, (1,))):
        inputs = case.inputs(cpu, torch.Generator().manual_seed(0))
        want = case.run("torch", cpu, *inputs)()
        for backend in cpu_backends()[1:]:
            assert_same(case.run(backend, cpu, *inputs)(), want, f"{case.name} {backend}")
