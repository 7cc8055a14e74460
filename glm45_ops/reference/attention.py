"""GQA attention over packed (varlen) and paged KV, and the merge of partial attention states:
the numerical definitions (SDPA's math, per sequence, in fp32; the CPU path and the test oracle).

For sequence ``b`` with ``Tq_b`` queries and ``Tk_b`` keys, query head ``h`` reads KV head
``h // G`` (``G = Hq / Hk``), and query ``i`` (0-based within the sequence) sees key ``j`` when::

    causal:      j <= i + Tk_b - Tq_b        (bottom-right aligned: the queries are the last
                                               Tq_b positions of the sequence)
    not causal:  every j < Tk_b

    s_ij = sm_scale * (q_i . k_j)                          for the keys i sees
    m_i  = max_j s_ij,   p_ij = exp(s_ij - m_i),   l_i = sum_j p_ij
    out_i = (sum_j p_ij v_j) / l_i,                        lse_i = m_i + log(l_i)  (natural log)

computed in fp32 (``compute_dtype``; float64 for the tests' oracle) and rounded once into q's
dtype; ``lse`` is fp32 ``[Hq, Tq]`` (FlashAttention's and vLLM's ``softmax_lse`` layout).

**Rows that see no key** (``Tk_b = 0``, or causal rows with ``i + Tk_b - Tq_b < 0``), and rows
whose seen scores are all ``-inf``: ``out = 0``, ``lse = -inf`` (an empty state: merging it
changes nothing). Empty tensors give empty outputs.

**NaN/inf.** Scores follow IEEE arithmetic: a NaN in ``q_i`` or in a seen ``k_j``, or a seen score
of ``+inf`` (``exp(inf - inf)``), makes row ``i`` NaN (out and lse); a seen score of ``-inf`` is a
key of weight 0. A NaN/inf in a seen ``v_j`` makes ``out_i`` non-finite (NaN or inf: not part of
the contract). Unseen keys' ``q . k`` never matter. A non-finite ``v_j`` at a key row ``i`` does
*not* see is outside the contract: the reference, like SDPA's math, multiplies the whole
sequence's ``v`` by weights that are 0 there (NaN), and the kernels do so within a key tile
(NaN or not, depending on the tiling).

Paged KV (:func:`attention_paged_ref`): key ``j`` of sequence ``b`` is slot ``j % page_size`` of
page ``block_table[b, j // page_size]``; ``seq_lens[b]`` counts the new keys too. Slots and
pages past ``seq_lens[b]`` are never read (garbage there changes nothing). FP8 (e4m3) caches are
dequantized per KV head: ``k = stored * k_scale[h]`` (``kv_cache_write``'s
``stored = e4m3(clamp(x / scale))``), in fp32.

:func:`merge_attn_states_ref` combines two states over disjoint key sets (cascade / chunked
prefill / split-KV), exactly as if their keys had been attended together::

    m = max(lse_a, lse_b);  w_x = exp(lse_x - m)
    out = (w_a out_a + w_b out_b) / (w_a + w_b),   lse = m + log(w_a + w_b)

A state with ``lse = -inf`` is empty and its ``out`` is ignored (it may hold anything); both
empty gives ``out = 0``, ``lse = -inf``. A NaN or ``+inf`` lse makes the row NaN.
"""

from __future__ import annotations

import torch

LSE_DTYPE = torch.float32
SCORE_BUDGET = 1 << 28  # score elements per step (1 GiB in fp32): a GLM-4.5 8k prefill fits a GPU


def _states(s: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``s`` ``[H, Tq, Tk]`` (unseen ones get weight 0) and ``v`` ``[Tk, H, D]`` ->
    ``(out [Tq, H, D], lse [H, Tq])`` in ``s``'s dtype, with the empty-row rule."""
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    if s.shape[-1]:
        m = s.amax(-1, keepdim=True)
    else:
        m = torch.full((*s.shape[:-1], 1), float("-inf"), dtype=s.dtype, device=s.device)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # an all -inf row: weights 0, not NaN
    p = torch.exp(s - m)
    l = p.sum(-1)
    out = torch.einsum("hqk,khd->qhd", p, v) / l.t()[..., None]
    out = torch.where((l == 0).t()[..., None], torch.zeros_like(out), out)
    lse = torch.where(l == 0, torch.full_like(l, float("-inf")), m[..., 0] + torch.log(l))
    return out, lse


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    sm_scale: float,
    causal: bool,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[Tq, Hq, D]``, ``k``/``v`` ``[Tk, Hk, D]`` (any strides), ``cu_seqlens_q``/``_k``
    int32 ``[B + 1]`` -> ``out`` ``[Tq, Hq, D]`` in q's dtype and ``lse`` fp32 ``[Hq, Tq]`` (module
    docstring). ``max_seqlen_*`` are the kernels' grid bounds; the reference reads the lengths
    on the host. fp8 ``k``/``v`` are taken as already-dequantized values (``k_scale`` handled by
    :func:`attention_paged_ref`)."""
    hq, hk = q.shape[1], k.shape[1]
    g = hq // hk
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=compute_dtype, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0:
            continue
        visible = None
        if causal:
            i = torch.arange(q1 - q0, device=q.device)[:, None]
            j = torch.arange(k1 - k0, device=q.device)[None, :]
            visible = j <= i + (k1 - k0) - (q1 - q0)
        step = max(1, SCORE_BUDGET // max(1, g * (q1 - q0) * (k1 - k0)))  # KV heads per step
        for h0 in range(0, hk, step):
            h1 = min(hk, h0 + step)
            qb = q[q0:q1, h0 * g:h1 * g].to(compute_dtype)
            kb = k[k0:k1, h0:h1].to(compute_dtype).repeat_interleave(g, dim=1)
            vb = v[k0:k1, h0:h1].to(compute_dtype).repeat_interleave(g, dim=1)
            s = torch.einsum("qhd,khd->hqk", qb, kb) * sm_scale
            out[q0:q1, h0 * g:h1 * g], lse[h0 * g:h1 * g, q0:q1] = _states(s, vb, visible)
    return out.to(q.dtype), lse.to(LSE_DTYPE)


def gather_paged_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paged caches ``[num_pages, page_size, Hk, D]`` as packed ``k``, ``v`` ``[sum seq_lens,
    Hk, D]`` (dequantized into ``compute_dtype`` for e4m3 caches, the cache dtype otherwise) and
    their ``cu_seqlens_k`` int32 ``[B + 1]``: only the slots below ``seq_lens`` are read."""
    page = k_cache.shape[1]
    lens = seq_lens.tolist()
    slots = [block_table[b, j // page].long() * page + j % page
             for b, j in enumerate(torch.arange(n, device=k_cache.device) for n in lens)]
    flat = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long, device=k_cache.device)
    k = k_cache.flatten(0, 1)[flat]
    v = v_cache.flatten(0, 1)[flat]
    if k_scale is not None:
        k = k.to(compute_dtype) * k_scale.to(LSE_DTYPE).to(compute_dtype)[:, None]
        v = v.to(compute_dtype) * v_scale.to(LSE_DTYPE).to(compute_dtype)[:, None]
    cu = torch.tensor([0, *torch.tensor(lens, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)
    return k, v, cu.to(k_cache.device)


def attention_paged_ref(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    causal: bool,
    max_seqlen_q: int,
    num_splits: int,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[Tq, Hq, D]`` packed by ``cu_seqlens_q`` int32 ``[B + 1]`` against the paged caches
    (module docstring) -> ``out`` ``[Tq, Hq, D]`` in q's dtype, ``lse`` fp32 ``[Hq, Tq]``: the
    varlen definition on the gathered keys. ``max_seqlen_q`` and ``num_splits`` only shape the
    kernels' grids; the result does not depend on them beyond rounding."""
    k, v, cu_k = gather_paged_kv(k_cache, v_cache, block_table, seq_lens, k_scale, v_scale,
                                 compute_dtype=compute_dtype)
    return attention_varlen_ref(q, k, v, cu_seqlens_q, cu_k, max_seqlen_q, k.shape[0], sm_scale, causal,
                                compute_dtype=compute_dtype)


def merge_attn_states_ref(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out_a``/``out_b`` ``[T, H, D]`` and fp32 ``lse_a``/``lse_b`` ``[H, T]`` -> the merged
    ``out`` (out_a's dtype) and fp32 ``lse`` (module docstring)."""
    la, lb = lse_a.to(compute_dtype).t()[..., None], lse_b.to(compute_dtype).t()[..., None]
    m = torch.maximum(la, lb)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    zero = torch.zeros((), dtype=compute_dtype, device=out_a.device)
    acc = (torch.where(la == float("-inf"), zero, wa * out_a.to(compute_dtype))
           + torch.where(lb == float("-inf"), zero, wb * out_b.to(compute_dtype)))
    l = wa + wb
    out = torch.where(l == 0, zero, acc / l)
    lse = torch.where(l == 0, torch.full_like(l, float("-inf")), m + torch.log(l))
    return out.to(out_a.dtype), lse[..., 0].t().to(LSE_DTYPE)
