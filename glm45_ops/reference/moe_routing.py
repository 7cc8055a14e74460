"""MoE routing (``moe_route``): the numerical definition every backend matches bit for bit.

GLM-4.5 / DeepSeek-V3 routing (KNOWLEDGE.md §4; HF ``Glm4MoeTopkRouter``), for ``T`` tokens and
``E`` experts, all in fp32 except the sigmoid (see below)::

    s[t, e] = fp32(sigmoid(float64(logits[t, e])))            unbiased scores, in [0, 1] (see "The sigmoid")
    b[t, e] = s[t, e] + bias[e]                                biased scores (fp32 add; bias 0 if None)
    groups (n_group > 1): E / n_group consecutive experts per group;
        score(g) = b1 + b2                                     the group's two highest b (fp32 add)
        keep the topk_group highest-scoring groups; the other groups' experts are never chosen
    ids     = the top_k highest b among kept experts, in descending order of b
    w_j     = s[t, ids_j]                                      unbiased scores at the chosen ids
    renormalize: sum = (((w_0 + w_1) + w_2) + ... + w_{k-1})  fp32, left to right in output order
                 w_j = w_j / (sum + fp32(1e-20))               IEEE fp32 division
    weights = w_j * fp32(routed_scaling_factor)

**Order and ties.** Scores are ranked by value with ``-0 == +0``; equal scores go to the lower
expert id (the lower group index for group scores). ``ids`` is int32 ``[T, top_k]`` in that
order: column 0 is the best expert. Each "highest" is a strict total order on (value, id), so
the result does not depend on a sort's stability or a reduction tree.

**NaN.** A NaN score (NaN logit, NaN bias, or ``inf - inf``) ranks *below every other value*,
``-inf`` included; among NaNs the lower id (group) wins. So a token with NaN logits still gets
``top_k`` distinct ids (the non-NaN experts first), and its weights are NaN where its unbiased
score is NaN (with ``renormalize``, the NaN sum makes the whole row NaN). A group whose two best
scores include a NaN (or sum to ``inf - inf``) has a NaN score and ranks last. ``+-inf`` logits
give scores 1 and 0; an infinite bias ranks its expert first (``+inf``) or last among non-NaN
(``-inf``), and the weights stay the unbiased scores. A kernel computes exactly this by ranking
an int32 key of each value (NaN mapped below the key of ``-inf``; see :func:`order_key`).

**The sigmoid.** ``exp`` is not correctly rounded anywhere, and fp32 ``exp`` differs by an ulp
between libm, numpy, CUDA and Triton, which would flip ties and weights. So ``s`` is computed in
float64 and rounded once to fp32; every backend's float64 ``exp`` is within an ulp or two of
exact, so they agree unless the exact sigmoid lies within ~2^-52 (relative) of an fp32 rounding
boundary. Near 0 that happens by construction: ``sigmoid(x) = 0.5 + x/4 - x^3/48 + ...`` and
``0.5 + x/4`` is often an exact fp32 midpoint for a short-mantissa ``x`` (bf16 ``9.89e-6``), with
the deciding ``x^3/48`` below float64's resolution. There the definition is the linear term::

    s = fp32(0.5 + 0.25 * float64(x))                 if |x| < 2^-12   (exact float64 ops: no libm)
    s = fp32(1 / (1 + exp(-float64(x))))              otherwise

(the dropped ``x^3/48 < 2^-41`` is below 2^-17 of an fp32 ulp). Elsewhere no such structure
exists: tests/moe/test_moe_routing.py checks every bf16 and fp16 value against Python's libm,
and a random sample costs an fp32 tie with probability ~2^-27 per value.

Empty input (``T = 0``) gives empty outputs.
"""

from __future__ import annotations

import torch

MAX_EXPERTS = 512
MAX_TOP_K = 16
RENORM_EPS = 1e-20  # added to the sum before dividing (HF Glm4Moe: denominator + 1e-20)
NAN_KEY = -(2**31) + 1  # below every non-NaN key (-inf's is -2139095041); -2**31 marks "excluded"
EXCLUDED_KEY = -(2**31)
SIGMOID_LINEAR_BELOW = 2.0**-12  # |x| below this: s = 0.5 + x/4 (see "The sigmoid")


def sigmoid_scores(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` float ``[..., E]`` -> fp32 sigmoid, computed in float64 and rounded (module docstring)."""
    x = logits.double()
    return torch.where(x.abs() < SIGMOID_LINEAR_BELOW, 0.5 + 0.25 * x, 1.0 / (1.0 + torch.exp(-x))).float()


def order_key(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> int64 holding an int32 whose signed order is x's: ``-0 == +0``, NaN lowest (NAN_KEY)."""
    bits = x.float().view(torch.int32).to(torch.int64)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = torch.where(x == 0, 0, key)
    return torch.where(x.isnan(), NAN_KEY, key)


def _ranked(key: torch.Tensor) -> torch.Tensor:
    """int keys ``[..., N]`` (N <= 1024) -> int64 composite keys, distinct per row: higher key
    first, then lower index first. Sorting these needs no tie rule from the sort."""
    idx = torch.arange(key.shape[-1], device=key.device)
    return key * 1024 + (1023 - idx)


def moe_route_ref(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_logits`` float ``[T, E]``, ``correction_bias`` fp32 ``[E]`` or None ->
    (``topk_weights`` fp32 ``[T, top_k]``, ``topk_ids`` int32 ``[T, top_k]``); see the module docstring."""
    t, e = router_logits.shape
    dev = router_logits.device
    s = sigmoid_scores(router_logits)
    b = s if correction_bias is None else s + correction_bias.float()
    key = order_key(b)
    if n_group > 1:
        gsize = e // n_group
        # the two highest b of each group, by the same total order
        gkey = _ranked(key).view(t, n_group, gsize).topk(2, dim=-1).indices  # [T, G, 2] positions in group
        top2 = b.view(t, n_group, gsize).gather(-1, gkey)
        gscore = top2[..., 0] + top2[..., 1]
        kept = _ranked(order_key(gscore)).topk(topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros(t, n_group, dtype=torch.bool, device=dev).scatter(-1, kept, True)
        key = torch.where(keep.repeat_interleave(gsize, dim=-1), key, EXCLUDED_KEY)
    ids = _ranked(key).topk(top_k, dim=-1).indices  # distinct composite keys: descending, ids break ties
    w = s.gather(-1, ids)
    if renormalize:
        total = w[:, 0]
        for j in range(1, top_k):  # left to right: every backend adds in this order
            total = total + w[:, j]
        w = w / (total + torch.tensor(RENORM_EPS, dtype=torch.float32))[:, None]
    w = w * torch.tensor(routed_scaling_factor, dtype=torch.float32)
    return w, ids.to(torch.int32)
