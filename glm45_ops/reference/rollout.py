"""RL rollout log-probabilities and entropy: the numerical definition (and the CPU path).

For logits ``x`` ``[T, V]`` (fp32 of the input, or ``hidden @ weight^T`` accumulated in fp32 for
``linear_logprobs``), token ids ``i`` ``[T]`` and a temperature ``t`` per row (fp32: a number
rounds once to fp32; a value that rounds to 0 is 0), each row is the distribution
``glm45_ops.speculative.probs_from_logits`` samples from, so a rollout's log-probs are those of
the tokens it drew::

    t > 0 (sampling):
        m        = max_j x_j                                   (NaN if the row holds a NaN)
        d_j      = (x_j - m) / t                               (= x_j / t minus a constant)
        s        = sum_j exp(d_j)
        logprob  = d_i - log(s)                                (d_i = -inf for i outside [0, V))
        entropy  = log(s) - sum_j exp(d_j) * d_j / s           (a term with exp(d_j) == 0 is 0)
        lse      = m / t + log(s)                              (= logsumexp(x / t); linear_logprobs)
    t <= 0 (greedy): the one-hot at the argmax (the lowest id among ties, NaN the largest
        value: ``probs_from_logits``' rule), so logprob = 0 at that id and -inf elsewhere,
        entropy = 0, lse = 0 (the log of the one-hot's total mass)

**Edge values.** A ``-inf`` logit is a masked token: probability 0, no entropy contribution (not
``0 * -inf = NaN``), and logprob ``-inf`` when it is the target. An id outside ``[0, V)`` has
probability 0 too (logprob ``-inf``; such ids are refused on CPU, where checking costs no host
sync). At ``t > 0`` a NaN or ``+inf`` logit, a row of only ``-inf``, or a NaN temperature makes
all of the row's outputs NaN (``m`` is NaN, or ``x - m`` is ``inf - inf``); so does a ``-inf``
logit at ``t = +inf`` (``-inf / inf``), where finite logits give the uniform distribution. Any
positive ``t``, however small, stays finite: ``x - m <= 0``, so as ``t -> 0+`` the mass is shared
by the ids tied at the maximum. ``T = 0`` gives empty outputs.

**Gradients** (``linear_logprobs``, rows with ``t > 0``), for upstream gradients ``a``, ``b``,
``c`` of logprob, entropy and lse, with ``p_j = exp(x_j / t - lse)``::

    dL/dx_j = ( a * ([j == i] - p_j) - b * p_j * (log p_j + entropy) + c * p_j ) / t

where ``p_j * log p_j`` is 0 when ``p_j`` is 0, and ``a`` counts 0 when ``i`` is out of range (the
logprob is the constant ``-inf``). Greedy rows have zero gradient. ``dL/dhidden = dL/dx @ weight``,
``dL/dweight = dL/dx^T @ hidden``. The backward recomputes ``x`` chunk by chunk from ``hidden``
and ``weight``; it never stores ``[T, V]``.

**Chunking.** This module materialises at most ``CHUNK_ELEMS`` fp32 logits at a time (a few
temporaries of that size): ``token_logprobs_ref`` takes whole rows, ``linear_logprobs_ref`` tiles
``[CHUNK_T, CHUNK_V]`` and merges the running ``(m, s, sum e*d)`` of each row across V chunks,
equal to the formulas above in exact arithmetic (fp32 rounding differs by a few ulps); its
backward recomputes the same tiles.
"""

from __future__ import annotations

import torch

from glm45_ops.reference.speculative import _row_argmax  # probs_from_logits' greedy rule

CHUNK_ELEMS = 1 << 22  # fp32 logits held at once by the reference (16 MB per temporary)
CHUNK_T = 1024
CHUNK_V = CHUNK_ELEMS // CHUNK_T
NEG_INF = float("-inf")


def row_temperatures(n: int, temperature: float, temperatures: torch.Tensor | None, device) -> torch.Tensor:
    """fp32 ``[n, 1]``: ``temperatures`` when given, else ``temperature`` rounded once to fp32."""
    if temperatures is not None:
        return temperatures.to(device=device, dtype=torch.float32).reshape(n, 1)
    return torch.full((n, 1), temperature, dtype=torch.float32, device=device)


def _valid_ids(ids: torch.Tensor, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[R]`` in-range mask, ``[R, 1]`` int64 ids clamped into range for gathers)."""
    ids = ids.to(torch.int64)
    valid = (ids >= 0) & (ids < v)
    return valid, torch.where(valid, ids, 0)[:, None]


def _finish(m, s, w, d_i, valid, greedy, greedy_hit, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob, entropy, lse) ``[R]`` from a row's ``m``, ``s``, ``sum e*d`` (relative to ``m``)
    and the target's ``d_i``; greedy rows get the one-hot's values."""
    log_s = s.log()
    logprob = torch.where(valid, d_i, NEG_INF) - log_s
    entropy = log_s - w / s
    # s == 0 only for a row of -inf: NaN, as the full-row formula gives (m = -inf, x - m = NaN)
    lse = torch.where(s == 0, float("nan"), m / t + log_s)
    logprob = torch.where(greedy, torch.where(greedy_hit, 0.0, NEG_INF), logprob)
    zero = torch.zeros_like(entropy)
    return logprob, torch.where(greedy, zero, entropy), torch.where(greedy, zero, lse)


def token_logprobs_ref(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, temperatures: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` float ``[T, V]`` (any strides), ``token_ids`` int ``[T]`` -> (logprobs, entropy)
    fp32 ``[T]``, whole rows at a time (module docstring)."""
    n, v = logits.shape
    logprobs = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logprobs)
    t_all = row_temperatures(n, temperature, temperatures, logits.device)
    may_be_greedy = temperatures is not None or temperature <= 0  # decided without reading the device
    rows = max(1, CHUNK_ELEMS // max(v, 1))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x = logits[r0:r1].float()
        t = t_all[r0:r1]
        greedy = t <= 0  # False for NaN: a NaN temperature reaches the formulas and gives NaN
        m = x.amax(dim=-1, keepdim=True)
        d = (x - m) / torch.where(greedy, 1.0, t)
        e = d.exp()
        valid, safe = _valid_ids(token_ids[r0:r1], v)
        d_i = d.gather(1, safe)[:, 0]
        s = e.sum(dim=-1)
        w = torch.where(e == 0, 0.0, e * d).sum(dim=-1)
        hit = valid & (safe[:, 0] == _row_argmax(x)) if may_be_greedy else valid
        logprobs[r0:r1], entropy[r0:r1], _ = _finish(m[:, 0], s, w, d_i, valid, greedy[:, 0], hit, t[:, 0])
    return logprobs, entropy


def _chunk_stats(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of an fp32 chunk ``[R, C]``: (max, safe max, sum exp(d), sum exp(d) * d) with
    ``d = (x - safe max) / t`` (``c`` = the divisor ``[R, 1]``); the safe max is 0 where the max
    is ``-inf`` (a fully masked chunk contributes 0, not ``-inf - -inf``)."""
    m = x.amax(dim=-1)
    ms = torch.where(m == NEG_INF, 0.0, m)
    d = (x - ms[:, None]) / c
    e = d.exp()
    return m, ms, e.sum(dim=-1), torch.where(e == 0, 0.0, e * d).sum(dim=-1)


def _rescale(m_from, s, w, ms_to, c):
    """A state ``(s, w)`` relative to max ``m_from``, made relative to ``ms_to``: ``d`` shifts by
    ``delta = (m_from - ms_to) / t <= 0``. A vanished state (factor 0) is exactly 0, never
    ``0 * -inf``; so is one that saw nothing above ``-inf`` (whose ``delta`` may be
    ``-inf / inf = NaN`` at ``t = +inf``)."""
    delta = (m_from - ms_to) / c
    a = torch.where(m_from == NEG_INF, 0.0, delta.exp())
    return s * a, torch.where(a == 0, 0.0, a * (w + s * delta))


def linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float,
    temperatures: torch.Tensor | None,
    chunk_t: int = CHUNK_T,
    chunk_v: int = CHUNK_V,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden`` float ``[T, H]``, ``weight`` ``[V, H]``, ``token_ids`` int ``[T]`` -> (logprobs,
    entropy, lse) fp32 ``[T]`` of ``x = hidden @ weight^T`` (fp32), in ``[chunk_t, chunk_v]``
    tiles with an online merge over V (module docstring)."""
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    t_all = row_temperatures(n, temperature, temperatures, dev)[:, 0]
    greedy = t_all <= 0
    c_all = torch.where(greedy, 1.0, t_all)
    track_argmax = temperatures is not None or temperature <= 0  # decided without reading the device
    valid, safe = _valid_ids(token_ids, v)
    safe = safe[:, 0]
    h32 = hidden.float()
    m = torch.full((n,), NEG_INF, device=dev)
    s = torch.zeros(n, device=dev)
    w = torch.zeros(n, device=dev)
    x_i = torch.full((n,), NEG_INF, device=dev)
    best = torch.full((n,), NEG_INF, device=dev)  # greedy: the largest value so far (NaN largest)
    best_id = torch.zeros(n, dtype=torch.int64, device=dev)
    for v0 in range(0, v, chunk_v):
        v1 = min(v, v0 + chunk_v)
        w32 = weight[v0:v1].float()
        for r0 in range(0, n, chunk_t):
            r = slice(r0, min(n, r0 + chunk_t))
            x = h32[r] @ w32.t()
            c = c_all[r]
            cm, cms, cs, cw = _chunk_stats(x, c[:, None])
            new_m = torch.maximum(m[r], cm)  # propagates NaN
            ms = torch.where(new_m == NEG_INF, 0.0, new_m)
            s_old, w_old = _rescale(m[r], s[r], w[r], ms, c)
            s_new, w_new = _rescale(cms, cs, cw, ms, c)
            m[r], s[r], w[r] = new_m, s_old + s_new, w_old + w_new
            here = valid[r] & (safe[r] >= v0) & (safe[r] < v1)
            x_i[r] = torch.where(here, x.gather(1, (safe[r] - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], x_i[r])
            if track_argmax:
                cmax = x.amax(dim=-1)  # NaN if the chunk holds one: NaN is the largest value
                better = (cmax > best[r]) | (cmax.isnan() & ~best[r].isnan())  # strict: the earlier chunk wins ties
                best_id[r] = torch.where(better, _row_argmax(x) + v0, best_id[r])
                best[r] = torch.where(better, cmax, best[r])
    ms = torch.where(m == NEG_INF, 0.0, m)
    d_i = (x_i - ms) / c_all
    return _finish(m, s, w, d_i, valid, greedy, valid & (safe == best_id), c_all)


def linear_logprobs_backward_ref(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_lse: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    entropy: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    temperatures: torch.Tensor | None,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    chunk_t: int = CHUNK_T,
    chunk_v: int = CHUNK_V,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden in hidden's dtype ``[T, H]``, grad_weight in weight's dtype ``[V, H]``): the
    module docstring's formula, ``x`` recomputed in the forward's ``[chunk_t, chunk_v]`` fp32
    tiles; both gradients accumulate over the tiles in fp32 (grad_weight one chunk of rows at a
    time). A gradient not asked for (``need_grad_*`` False) is not computed: ``[0, H]``."""
    n, v, h = hidden.shape[0], weight.shape[0], hidden.shape[1]
    dev = hidden.device
    grad_h = torch.zeros(n if need_grad_hidden else 0, h, device=dev)
    grad_w = torch.empty(v if need_grad_weight else 0, h, dtype=weight.dtype, device=dev)
    if not (need_grad_hidden or need_grad_weight):
        return grad_h.to(hidden.dtype), grad_w
    t = row_temperatures(n, temperature, temperatures, dev)[:, 0]
    live = ~(t <= 0)  # greedy rows have no gradient (NaN temperatures propagate)
    c_all = torch.where(live, t, 1.0)[:, None]
    valid, safe = _valid_ids(token_ids, v)
    a_all = torch.where(valid & live, grad_logprobs.float(), 0.0)[:, None]
    b_all = torch.where(live, grad_entropy.float(), 0.0)[:, None]
    g_lse_all = torch.where(live, grad_lse.float(), 0.0)[:, None]
    ent_all, lse_all = entropy.float()[:, None], lse.float()[:, None]
    h32 = hidden.float()
    for v0 in range(0, v, chunk_v):
        v1 = min(v, v0 + chunk_v)
        w32 = weight[v0:v1].float()
        cols = torch.arange(v0, v1, device=dev)
        gw = torch.zeros_like(w32) if need_grad_weight else None
        for r0 in range(0, n, chunk_t):
            r = slice(r0, min(n, r0 + chunk_t))
            c, a, b = c_all[r], a_all[r], b_all[r]
            log_p = (h32[r] @ w32.t()) / c - lse_all[r]
            p = log_p.exp()
            g = (g_lse_all[r] - a) * p - b * torch.where(p == 0, 0.0, p * (log_p + ent_all[r]))
            g = torch.where(cols[None, :] == safe[r], g + a, g) / c
            g = torch.where(live[r, None], g, 0.0)
            if need_grad_hidden:
                grad_h[r] += g @ w32
            if gw is not None:
                gw += g.t() @ h32[r]
        if gw is not None:
            grad_w[v0:v1] = gw.to(weight.dtype)
    return grad_h.to(hidden.dtype), grad_w
