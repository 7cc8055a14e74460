"""Newton-Schulz orthogonalisation for Muon: the numerical definition every backend is tested against.

For ``G`` ``[..., rows, cols]`` (each trailing matrix independently), with per-step coefficients
``(a_k, b_k, c_k)``:

    X  = bf16(G)                     transposed to [cols, rows] when rows > cols (so X X^T is small)
    X  = X / max(norm_scale * ||X||_F, eps)                              (per matrix, bf16)
    for k in 1..steps:
        A = X X^T                                                        (bf16, fp32 accumulation)
        B = b_k A + c_k A A                                              (one rounding: fused addmm)
        X = a_k X + B X                                                  (one rounding: fused addmm)
    return X (transposed back), cast to G's dtype

The quintic ``p(x) = a x + b x^3 + c x^5`` is applied to the singular values of the normalised
matrix, driving them towards 1: ``X ~ U S' V^T`` with ``S'`` near the identity (KellerJordan,
https://kellerjordan.github.io/posts/muon/). This is ``torch.optim._muon._zeropower_via_newtonschulz``
step for step, batched: for a 2-D ``G`` and one triple repeated, the result is bit-identical to it.
Its normalisation clamps the norm at ``eps`` (KellerJordan's original adds ``eps``; in bf16 the two
differ only for norms below ~1e-5).

Edge cases, which every backend follows: a zero matrix gives zeros (its norm is floored at
``eps``, so ``0 / eps = 0``); a matrix holding a NaN or an infinity (in ``bf16(G)``) gives NaN
everywhere (its norm is NaN or inf, so some entry becomes NaN, and the first ``A A`` spreads it
to every entry); each matrix of a batch is on its own; empty inputs give empty outputs.

Coefficient schedules live here, in one place (:data:`PRESETS`): KellerJordan's single triple
used for every step, and Polar Express (Amsel et al., arXiv 2505.16932), five per-step triples with
the norm scaled by 1.02 so rounding cannot push a singular value past the polynomials' safe range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class NSPreset:
    """A named Newton-Schulz schedule: per-step triples (the last one repeats) and the norm scale."""

    coefficients: tuple[Triple, ...]
    norm_scale: float = 1.0


KELLER_JORDAN = NSPreset(((3.4445, -4.7750, 2.0315),))
POLAR_EXPRESS = NSPreset(
    (
        (8.15655, -22.48329, 15.87877),
        (4.04293, -2.80892, 0.50002),
        (3.89167, -2.77248, 0.50606),
        (3.28575, -2.36813, 0.46449),
        (2.34654, -1.70978, 0.42324),
    ),
    norm_scale=1.02,
)
PRESETS: dict[str, NSPreset] = {"kellerjordan": KELLER_JORDAN, "polar_express": POLAR_EXPRESS}

Coefficients = Union[None, str, Sequence[float], Sequence[Sequence[float]]]


def resolve_coefficients(coefficients: Coefficients) -> tuple[list[Triple], float]:
    """``(triples, norm_scale)`` of a ``coefficients`` argument, before any step count applies.

    ``coefficients``: None (KellerJordan), a preset name from :data:`PRESETS`, one triple
    ``(a, b, c)``, a list of triples, or the same flattened (``3 * k`` finite floats, the op
    schema's form). Only presets carry a norm scale other than 1.
    """
    if coefficients is None:
        coefficients = "kellerjordan"
    if isinstance(coefficients, str):
        if coefficients not in PRESETS:
            raise ValueError(f"coefficients: unknown preset {coefficients!r}; presets are {sorted(PRESETS)}")
        preset = PRESETS[coefficients]
        return list(preset.coefficients), preset.norm_scale
    flat = _flatten(coefficients)
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)], 1.0


def ns_schedule(coefficients: Coefficients, steps: int) -> tuple[list[Triple], float]:
    """``(per-step triples, norm_scale)`` for ``steps`` steps (``coefficients`` as in
    :func:`resolve_coefficients`). A list longer than ``steps`` is cut; a shorter one repeats its
    last triple (Polar Express's convention)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    triples, norm_scale = resolve_coefficients(coefficients)
    return triples[:steps] + [triples[-1]] * (steps - len(triples)), norm_scale


def _flatten(coefficients) -> list[float]:
    items = list(coefficients)
    if items and all(isinstance(t, (tuple, list)) for t in items):
        if any(len(t) != 3 for t in items):
            raise ValueError(f"coefficients: every per-step entry must be a triple (a, b, c), got {coefficients!r}")
        items = [v for t in items for v in t]
    if not items or len(items) % 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        raise ValueError(
            f"coefficients must be None, a preset name, a triple (a, b, c), a list of triples or 3*k floats, "
            f"got {coefficients!r}"
        )
    if not all(math.isfinite(v) for v in items):
        raise ValueError(f"coefficients must be finite, got {coefficients!r}")
    return [float(v) for v in items]


def newton_schulz_ref(
    G: torch.Tensor,
    steps: int,
    coefficients: Coefficients,
    eps: float,
    norm_scale: float | None,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The plain NS loop (formula in the module docstring) on ``G`` ``[..., rows, cols]``.

    ``coefficients`` as in :func:`resolve_coefficients`; ``norm_scale`` None takes the
    schedule's (1.02 for Polar Express, else 1). Returns a contiguous tensor of G's shape and
    dtype. ``compute_dtype=torch.float64`` runs the same iteration in (near) exact arithmetic:
    the yardstick for the bf16 kernels' error.
    """
    triples, preset_scale = ns_schedule(coefficients, steps)
    norm_scale = preset_scale if norm_scale is None else norm_scale
    rows, cols = G.shape[-2:]
    X = G.to(compute_dtype)
    if rows > cols:
        X = X.mT
    if G.dim() > 3:
        X = X.reshape(-1, *X.shape[-2:])
    if G.dim() == 2:  # 2-D: exactly torch.optim.Muon's ops (norm(), addmm)
        X = X / (X.norm() * norm_scale).clamp(min=eps)
        addmm = torch.addmm
    else:
        X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) * norm_scale).clamp(min=eps)
        addmm = torch.baddbmm
    for a, b, c in triples:
        A = X @ X.mT
        B = addmm(A, A, A, beta=b, alpha=c)
        X = addmm(X, B, X, beta=a)
    if rows > cols:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype).contiguous()
