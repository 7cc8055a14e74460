"""MTP speculative verification: the numerical definition every backend matches exactly.

Shapes: ``B`` requests, ``S`` draft tokens each, vocabulary ``V``. Outputs are ``out_ids`` int32
``[B, S+1]`` (the accepted drafts, then the one token the target model emits, then ``-1``
padding) and ``num_accepted`` int32 ``[B]``.

**Greedy** (``verify_greedy_ref``)::

    t_i = argmax_j target_logits[b, i, j]      i = 0..S  (ties -> lowest j; NaN is the largest value)
    k   = number of leading i < S with draft_ids[b, i] == t_i
    out = [t_0 .. t_{k-1} (== the drafts), t_k, -1, ...],  num_accepted = k

``torch.argmax`` documents the same rule (first maximal index, NaN counts as maximal); we spell
it out as ``min{j : x_j == max(x)}`` so the definition does not rest on a backend's reduction.

**Sampling** (``verify_sampling_ref``; the chain rule of Leviathan et al. 2023 / Chen et al.
2023 with FlashInfer's ``chain_speculative_sampling`` acceptance test), with ``p`` the draft
probabilities (a one-hot at the draft token when ``draft_probs`` is None) and ``q`` the target's::

    accept x_i  iff  u_i * p_i(x_i) < q_i(x_i)              (fp32 product, i.e. prob. min(1, q/p))
    k = first rejected i, or S when all are accepted
    dist = relu(q_k - p_k)  if k < S and draft_probs given
         = q_k with x_k's entry zeroed   if k < S and draft_probs is None ("target only")
         = q_S                           if k == S (the bonus token)
    emitted token = inverse-CDF draw from dist with u_S: the smallest j with C_j > u_S * C_{V-1}

so the emitted tokens are distributed exactly as the target model's (the probability of
emitting y at position k is q_k(y)). An id outside ``[0, V)`` is a token both models give
probability 0: it is always rejected and never read.

**The draw, defined so every backend agrees bit for bit.** A float prefix sum over 151,552
entries depends on the summation order, which differs between a sequential loop, a Triton
``tl.cumsum`` and a CUDA warp-shuffle scan; so the CDF is taken over *fixed-point* weights, where
addition is exact and associative and every order gives the same integers::

    w_j = trunc(min(dist_j, 1) * 2**40)  as int64   (dist_j fp32; 0 when dist_j <= 0 or NaN)
    C_j = w_0 + ... + w_j                           (exact: V * 2**40 < 2**63 for V <= 2**23)
    T   = C_{V-1};  if T == 0: redo with dist = q_k (the residual has no mass: only possible when
                    the draft token had zero probability under both models, or through rounding)
    thr = trunc(float64(u_S) * float64(T))          (one IEEE float64 product, then floor)
    j   = #{j : C_j <= thr}, clamped to V - 1       (= the smallest j with C_j > thr)

``dist_j * 2**40`` is exact in fp32 and the truncation is the same everywhere, so the kernels
compute these very integers. The fixed-point grid moves each probability by less than 2**-40,
a total variation below ``V * 2**-40`` (1.4e-7 at V = 151552), far under the 2**-24 granularity
of an fp32 uniform. ``thr < T`` for any ``u_S < 1`` (the float64 product errs by at most
``T * 2**-53``), so the chosen id always has ``w_j > 0``: the draw never falls off the end and
never returns a zero-probability id; the clamp to ``V - 1`` only names the result of an all-zero
(degenerate) target row.
"""

from __future__ import annotations

import math

import torch

FIXED_POINT_BITS = 40  # probabilities become int64 multiples of 2**-40 for the exact CDF
MAX_VOCAB = 1 << 23  # V * 2**40 must stay below 2**63


def _row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[..., V]`` float -> int64 ``[...]``: lowest index of the maximum, NaN maximal."""
    x = x.float()
    m = x.amax(dim=-1, keepdim=True)  # propagates NaN
    is_max = (x == m) | (x.isnan() & m.isnan())
    ids = torch.arange(x.shape[-1], device=x.device)
    return torch.where(is_max, ids, x.shape[-1]).amin(dim=-1)


def _leading_true(mask: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` bool -> int64 ``[B]``: how many leading entries are True."""
    return mask.to(torch.int64).cumprod(dim=-1).sum(dim=-1)


def _pad_after(tokens: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep ``tokens[b, :k+1]``, write -1 after: int32 ``[B, S+1]``."""
    pos = torch.arange(tokens.shape[-1], device=tokens.device)
    return torch.where(pos <= k[:, None], tokens, -1).to(torch.int32)


def verify_greedy_ref(draft_ids: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``draft_ids`` int ``[B, S]``, ``target_logits`` float ``[B, S+1, V]`` ->
    (``out_ids`` int32 ``[B, S+1]``, ``num_accepted`` int32 ``[B]``); see the module docstring."""
    s = draft_ids.shape[1]
    target = _row_argmax(target_logits)  # [B, S+1]
    k = _leading_true(draft_ids.to(torch.int64) == target[:, :s])
    return _pad_after(target, k), k.to(torch.int32)


def to_fixed_point(dist: torch.Tensor) -> torch.Tensor:
    """fp32 probabilities -> int64 multiples of 2**-40: ``trunc(min(d, 1) * 2**40)``, 0 where ``d <= 0`` or NaN."""
    d = dist.float()
    d = torch.where(d > 0, d.clamp(max=1.0), 0.0)
    return (d * float(1 << FIXED_POINT_BITS)).to(torch.int64)  # exact: a power-of-two scale


def inverse_cdf_draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """int64 weights ``[B, V]`` (non-negative), fp32 ``u`` ``[B]`` in [0, 1) -> int64 ids ``[B]``:
    the smallest j with ``cumsum(w)[j] > trunc(float64(u) * float64(sum(w)))``, clamped to V - 1."""
    cdf = weights.cumsum(dim=-1)
    thr = (u.double() * cdf[:, -1].double()).to(torch.int64)
    return (cdf <= thr[:, None]).sum(dim=-1).clamp(max=weights.shape[-1] - 1)


def verify_sampling_ref(
    draft_ids: torch.Tensor,
    target_probs: torch.Tensor,
    uniform: torch.Tensor,
    draft_probs: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``draft_ids`` int ``[B, S]``, ``target_probs`` float ``[B, S+1, V]``, ``uniform`` fp32
    ``[B, S+1]`` in [0, 1), ``draft_probs`` float ``[B, S, V]`` or None (one-hot draft) ->
    (``out_ids`` int32 ``[B, S+1]``, ``num_accepted`` int32 ``[B]``); see the module docstring."""
    b, s = draft_ids.shape
    v = target_probs.shape[-1]
    rows = torch.arange(b, device=target_probs.device)
    ids = draft_ids.to(torch.int64)
    valid = (ids >= 0) & (ids < v)
    safe = torch.where(valid, ids, 0)
    u = uniform.float()

    # 1. the acceptance chain (fp32: u * p < q)
    q_x = target_probs[:, :s].gather(-1, safe[..., None])[..., 0].float()
    p_x = draft_probs.gather(-1, safe[..., None])[..., 0].float() if draft_probs is not None else torch.ones_like(q_x)
    k = _leading_true(valid & (u[:, :s] * p_x < q_x))  # [B]

    # 2. the distribution to draw from at position k
    q_k = target_probs[rows, k].float()  # [B, V]
    rejected = k < s
    k_draft = k.clamp(max=max(s - 1, 0))
    if s == 0:
        resid = q_k
    elif draft_probs is not None:
        p_k = torch.where(rejected[:, None], draft_probs[rows, k_draft].float(), 0.0)
        resid = q_k - p_k
    else:
        x_k = torch.where(rejected & valid[rows, k_draft], ids[rows, k_draft], -1)
        resid = torch.where(torch.arange(v, device=q_k.device) == x_k[:, None], 0.0, q_k)
    w = to_fixed_point(resid)
    w = torch.where(w.sum(dim=-1, keepdim=True) > 0, w, to_fixed_point(q_k))

    # 3. the inverse-CDF draw with the last uniform
    token = inverse_cdf_draw(w, u[:, s])
    drafts = torch.cat([ids, ids.new_zeros(b, 1)], dim=1)
    out = torch.where(torch.arange(s + 1, device=k.device) == k[:, None], token[:, None], drafts)
    return _pad_after(out, k), k.to(torch.int32)


def probs_from_logits_ref(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """``logits`` float ``[..., V]`` -> fp32 probabilities ``[..., V]`` (tempered, top-k, top-p).

    ``temperature`` (float), ``top_k`` (int), ``top_p`` (float): numbers or tensors broadcastable
    to ``logits.shape[:-1]``; ``t`` is ``temperature`` in fp32 (a value that rounds to 0 there is 0)::

        x = fp32(logits),  m = max(x)             (per row; NaN if the row holds a NaN)
        p = softmax((x - m) / t)                  (t > 0)
          = one-hot at the argmax                 (t <= 0; ties -> lowest id, NaN the largest value)
        top-k: keep the k most probable ids (stable order: ties -> lowest id); k <= 0 or k >= V keeps all
        top-p: on the top-k-renormalised p, keep an id when the mass strictly before it in that order
               is < top_p (so the most probable id always stays); top_p >= 1 keeps all
        result = p * keep / sum(p * keep)

    ``softmax((x - m) / t)`` is ``softmax(x / t)`` in exact arithmetic, but stays finite for any
    positive ``t``: ``x - m <= 0``, so a tiny ``t`` (1e-45, a subnormal) sends every id below
    the maximum to ``exp(-inf) = 0`` and the maximum to ``exp(0) = 1``, where ``x / t`` would
    overflow to ``inf - inf = NaN``. As ``t -> 0+`` this is the exact limit: the mass is shared
    equally by the ids tied at the maximum (``t <= 0`` gives all of it to the lowest of them).
    At ``t = 1`` it is ``torch.softmax(x)`` bit for bit (which subtracts the same maximum).

    Non-finite values: a NaN ``t`` or ``top_p`` gives its row NaN probabilities (the public
    wrapper refuses NaN numbers; a tensor entry is not checked, which would cost a host sync).
    At ``t > 0`` a NaN or ``+inf`` logit, or a row of only ``-inf``, makes the row NaN (``m`` is
    NaN, or ``x - m`` is ``inf - inf``), and other ``-inf`` logits get 0 (at finite ``t``; at
    ``t = +inf`` they are ``-inf / inf = NaN``, and a row of finite logits is uniform).

    The order top-k then top-p is SGLang's and vLLM's. No host sync and no data-dependent shapes;
    the sort is skipped when top_k and top_p are numbers that disable both filters.
    """
    x = logits.float()
    v = x.shape[-1]

    def per_row(a, dtype):  # tensors broadcast to [..., 1]; numbers stay numbers (no host-to-device copy)
        return a.to(device=x.device, dtype=dtype).expand(x.shape[:-1])[..., None] if isinstance(a, torch.Tensor) else a

    t = per_row(temperature, torch.float32)
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, dtype=torch.float32).item()  # a CPU scalar op: rounds as a tensor would
    rank = torch.arange(v, device=x.device)
    shifted = x - x.amax(dim=-1, keepdim=True)
    if isinstance(t, torch.Tensor):
        greedy = t <= 0  # False for NaN: a NaN temperature reaches the softmax and gives NaN
        probs = torch.softmax(shifted / torch.where(greedy, 1.0, t), dim=-1)
        probs = torch.where(greedy, (rank == _row_argmax(x)[..., None]).float(), probs)
    elif t <= 0:
        probs = (rank == _row_argmax(x)[..., None]).float()
    else:
        probs = torch.softmax(shifted / t, dim=-1)
    if not isinstance(top_k, torch.Tensor) and not isinstance(top_p, torch.Tensor) and top_k <= 0 and top_p >= 1:
        return probs

    kk = per_row(top_k, torch.int64)
    pp = per_row(top_p, torch.float32)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    keep_k = (rank < kk) | (kk <= 0)
    p_k = sorted_p * keep_k
    p_k = p_k / p_k.sum(dim=-1, keepdim=True)
    before = p_k.cumsum(dim=-1) - p_k
    keep = keep_k & ((before < pp) | (pp >= 1) | (rank == 0))
    mask = torch.zeros_like(keep).scatter(-1, order, keep)
    out = probs * mask
    if isinstance(pp, torch.Tensor):
        out = torch.where(pp.isnan(), float("nan"), out)
    elif math.isnan(pp):
        out = torch.full_like(out, float("nan"))
    return out / out.sum(dim=-1, keepdim=True)
