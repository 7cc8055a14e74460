"""Muon: Newton-Schulz orthogonalisation and a drop-in ``torch.optim.Muon`` for 2-D and expert weights.

Op (schema below; definition and coefficient presets in :mod:`glm45_ops.reference.muon`):

* ``newton_schulz(G, steps=5, coefficients=None, eps=1e-7, norm_scale=None) -> X`` (the raw op
  takes ``coefficients`` flattened, ``3 * k`` floats; ``norm_scale`` None is the schedule's: 1
  there, since presets are resolved by the Python function)

Backends: ``torch`` (the reference loop), ``triton`` (symmetric kernels: only the upper-triangle
tiles of ``X X^T`` and ``b A + c A A`` are computed, then mirrored; fused epilogues; one launch
per product for a whole expert stack) and ``cuda`` (cuBLAS through torch: ``bmm`` and
``baddbmm`` with ``alpha``/``beta`` fusing the ``b A`` and ``a X`` epilogues, into preallocated
buffers). All compute in bf16 with fp32 accumulation and round each product once, so backends
differ only by accumulation order (a few bf16 ulps after five steps; tests bound it against a
float64 iteration). Which GPU backend is faster is for an H200 measurement to decide
(``glm45-bench muon``); ``auto`` picks ``cuda`` on CUDA tensors meanwhile.

:class:`Muon` is ``torch.optim.Muon``'s constructor and update rule, plus 3-D expert stacks
``[E, out, in]`` (orthogonalised per expert in one batched call, update scaled from the last two
dims) and work division over ``torch.distributed`` (see its docstring).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist

from glm45_ops._registry import ErrorInput, Op, Sample
from glm45_ops.reference.muon import PRESETS, Coefficients, newton_schulz_ref, ns_schedule, resolve_coefficients

__all__ = ["PRESETS", "Muon", "newton_schulz"]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_COEFFICIENTS = PRESETS["kellerjordan"].coefficients[0]  # torch.optim.Muon's default
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")

# Backends against the reference: all compute in bf16 with fp32 accumulation and round each
# product once; only the accumulation order differs, which flips single bf16 roundings (one ulp,
# 2^-8 relative) that the steps carry along. Entries of a near-orthogonal [m, n] matrix have an
# RMS of about 1/sqrt(n) (<= 0.16 for the sample and test shapes, n >= 40; a bf16 ulp there is
# <= 2^-10) and reach ~0.5 (ulp 2^-9): NS_ATOL = 1e-2 is 5 to 10 ulps per entry, and the
# Frobenius-relative difference must stay far below the ~1.5% that bf16 itself costs against a
# float64 iteration.
NS_ATOL = 1e-2
NS_REL = 5e-3


# ---------------------------------------------------------------------------------------------
# newton_schulz
# ---------------------------------------------------------------------------------------------

def _check_ns(G, steps, coefficients, eps, norm_scale):
    if G.is_complex():
        raise ValueError(f"G must be real: Newton-Schulz here is for real weight matrices, got {G.dtype}")
    if G.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"G must be bfloat16, float16 or float32, got {G.dtype}")
    if G.dim() < 2:
        raise ValueError(f"G must be a matrix or a batch of matrices [..., rows, cols], got shape {tuple(G.shape)}")
    ns_schedule(coefficients, steps)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0 (it floors the norm so a zero G stays finite), got {eps!r}")
    if norm_scale is not None and not (math.isfinite(norm_scale) and norm_scale > 0):
        raise ValueError(f"norm_scale must be None or finite and > 0, got {norm_scale!r}")


def _alloc_ns(G, steps, coefficients, eps, norm_scale):
    return torch.empty(G.shape, dtype=G.dtype, device=G.device)


class _NSKernels(NamedTuple):
    """One backend's three products on ``[B, ., .]`` bf16 tensors, each filling ``out``."""

    gram: Callable  # (x, out): out = x x^T
    poly: Callable  # (A, out, b, c): out = b A + c A A
    update: Callable  # (Bm, x, out, a): out = a x + Bm x


def _ns_loop(out, G, steps, coefficients, eps, norm_scale, kernels: _NSKernels) -> torch.Tensor:
    """The reference's iteration (batched form) over preallocated, ping-ponged buffers, into
    ``out`` (``_alloc_ns``'s)."""
    triples, schedule_scale = ns_schedule(coefficients, steps)
    norm_scale = schedule_scale if norm_scale is None else norm_scale
    rows, cols = G.shape[-2:]
    transposed = rows > cols
    m, n = (cols, rows) if transposed else (rows, cols)
    nb = math.prod(G.shape[:-2])
    g3 = G.reshape(nb, rows, cols)
    x = torch.empty((nb, m, n), dtype=torch.bfloat16, device=G.device)
    x.copy_(g3.mT if transposed else g3)
    x.div_((torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) * norm_scale).clamp_(min=eps))
    x_next = torch.empty_like(x)
    a_mat = torch.empty((nb, m, m), dtype=torch.bfloat16, device=G.device)
    b_mat = torch.empty_like(a_mat)
    out3 = out.view(nb, rows, cols)
    out_view = out3.mT if transposed else out3
    for step, (a, b, c) in enumerate(triples):
        kernels.gram(x, a_mat)
        kernels.poly(a_mat, b_mat, b, c)
        # bf16 G: the last step writes the (transposed-back) output directly
        dst = out_view if step == len(triples) - 1 and G.dtype == torch.bfloat16 else x_next
        kernels.update(b_mat, x, dst, a)
        x, x_next = dst, x
    if G.dtype != torch.bfloat16:
        out_view.copy_(x)
    return out


def _triton_kernels() -> _NSKernels:
    from triton_ops import muon as tm

    return _NSKernels(
        gram=lambda x, out: tm.sym_gram(x, out),
        poly=lambda a_mat, out, b, c: tm.sym_gram(a_mat, out, alpha=c, c=a_mat, beta=b),
        update=tm.ns_update,
    )


# cuBLAS through torch: alpha/beta of baddbmm are cuBLAS's fused epilogue.
_CUBLAS_KERNELS = _NSKernels(
    gram=lambda x, out: torch.bmm(x, x.mT, out=out),
    poly=lambda a_mat, out, b, c: torch.baddbmm(a_mat, a_mat, a_mat, beta=b, alpha=c, out=out),
    update=lambda b_mat, x, out, a: torch.baddbmm(x, b_mat, x, beta=a, out=out),
)


def _ns_triton_launch(out, G, steps, coefficients, eps, norm_scale):
    _ns_loop(out, G, steps, coefficients, eps, norm_scale, _triton_kernels())


def _ns_cublas(G, steps, coefficients, eps, norm_scale):
    out = _alloc_ns(G, steps, coefficients, eps, norm_scale)
    return _ns_loop(out, G, steps, coefficients, eps, norm_scale, _CUBLAS_KERNELS)


def _ns_compare(got, want, args) -> str | None:
    """Backends against the reference: NaN where it has NaN, every entry within NS_ATOL and the
    Frobenius-relative difference below NS_REL (the bounds are justified above)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{got.dtype}{list(got.shape)} vs reference {want.dtype}{list(want.shape)}"
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    try:
        torch.testing.assert_close(g, w, rtol=0, atol=NS_ATOL, equal_nan=True)
    except AssertionError as e:
        return str(e)
    finite = w.isfinite()
    diff, norm = (g - w)[finite].norm().item(), w[finite].norm().item()
    if diff > NS_REL * norm:
        return f"Frobenius-relative difference {diff / norm if norm else float('inf'):.2e} > {NS_REL}"
    return None


def _ns_samples(device, gen):
    def g(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen, device=gen.device).to(dtype).to(device)

    pe, pe_scale = PRESETS["polar_express"].coefficients, PRESETS["polar_express"].norm_scale
    special = g(4, 8, 40)
    special[0] = 0.0
    special[1, 2, 3] = float("nan")
    special[2, 7, 0] = float("inf")
    special[3, 0, 39] = -float("inf")
    tall_inf = g(40, 12, dtype=torch.bfloat16)
    tall_inf[5, 5] = float("inf")
    return [
        Sample((g(16, 48),)),
        Sample((g(48, 16, dtype=torch.bfloat16),), note="tall: iterated transposed"),
        Sample((g(2, 12, 40, dtype=torch.float16), 3, [3.0, -3.2, 1.2])),
        Sample((g(1, 2, 48, 12).transpose(-1, -2), 5, [v for t in pe for v in t], 1e-7, pe_scale),
               note="4-D tall view of wide data, Polar Express"),
        Sample((g(3, 16, 40, dtype=torch.bfloat16), 2, [3.4445, -4.7750, 2.0315, 3.0, -3.2, 1.2], 1e-3)),
        Sample((g(0, 8, 12),), tag="empty"),
        Sample((g(0, 5, dtype=torch.bfloat16),), tag="empty"),
        Sample((g(4, 0),), tag="empty"),
        Sample((special, 2), tag="nonfinite", note="a zero, a NaN, a +inf and a -inf matrix"),
        Sample((tall_inf,), tag="nonfinite"),
    ]


def _ns_errors(device):
    G = torch.randn(4, 6, device=device)
    return [
        ErrorInput((torch.randn(5, device=device),), match="G must be a matrix or a batch of matrices"),
        ErrorInput((G.to(torch.complex64),), match="G must be real"),
        ErrorInput((G.to(torch.int32),), match="G must be bfloat16, float16 or float32"),
        ErrorInput((G.double(),), match="G must be bfloat16, float16 or float32"),
        ErrorInput((G, 0), match="steps must be a positive int"),
        ErrorInput((G, 5, [1.0, 2.0]), match="coefficients must be None, a preset name"),
        ErrorInput((G, 5, []), match="coefficients must be None, a preset name"),
        ErrorInput((G, 5, [3.0, float("nan"), 1.0]), match="coefficients must be finite"),
        ErrorInput((G, 5, None, 0.0), match="eps must be finite and > 0"),
        ErrorInput((G, 5, None, float("nan")), match="eps must be finite and > 0"),
        ErrorInput((G, 5, None, float("inf")), match="eps must be finite and > 0"),
        ErrorInput((G, 5, None, 1e-7, -1.0), match="norm_scale must be None or finite and > 0"),
        ErrorInput((G, 5, None, 1e-7, float("inf")), match="norm_scale must be None or finite and > 0"),
        ErrorInput((G, 5, "polar_express"), exc=TypeError, match="coefficients must be a list of float or None",
                   raw=False),
        ErrorInput((G, 2.0), exc=TypeError, match="steps must be int", raw=False),
        ErrorInput((G.tolist(),), exc=TypeError, match="G must be torch.Tensor", raw=False),
    ]


_ns_op = Op(
    "newton_schulz",
    "(Tensor G, int steps=5, float[]? coefficients=None, float eps=1e-7, float? norm_scale=None) -> Tensor",
    check=_check_ns,
    alloc=_alloc_ns,
    torch_impl=newton_schulz_ref,
    triton_launch=_ns_triton_launch,
    cuda_impl=_ns_cublas,
    compare=_ns_compare,
    samples=_ns_samples,
    errors=_ns_errors,
)
_NS_DEFAULTS = {a.name: a.default for a in _ns_op.args}  # the schema's, for the wrapper's signature


def newton_schulz(
    G: torch.Tensor,
    steps: int = _NS_DEFAULTS["steps"],
    coefficients: Coefficients = _NS_DEFAULTS["coefficients"],
    eps: float = _NS_DEFAULTS["eps"],
    *,
    norm_scale: float | None = _NS_DEFAULTS["norm_scale"],
    backend: str | None = None,
) -> torch.Tensor:
    """Orthogonalise ``G`` ``[..., rows, cols]`` (bf16/fp16/fp32) by ``steps`` Newton-Schulz steps.

    ``X = bf16(G)`` (transposed when rows > cols), ``X /= max(norm_scale * ||X||_F, eps)``, then
    ``A = X X^T; B = b A + c A A; X = a X + B X`` per step, each matrix of the batch on its own
    (formula, NaN/inf/zero rules and sources: :mod:`glm45_ops.reference.muon`). ``coefficients``:
    None (KellerJordan's ``(3.4445, -4.7750, 2.0315)`` every step), a preset name
    (``"kellerjordan"``, ``"polar_express"``), one triple, or per-step triples (the last
    repeats). ``norm_scale`` None takes the preset's (1.02 for Polar Express), else 1. Returns
    G's shape and dtype, contiguous; the values are bf16's.
    """
    triples, preset_scale = resolve_coefficients(coefficients)
    flat = [v for t in triples for v in t]
    return _ns_op(G, steps, flat, eps, preset_scale if norm_scale is None else norm_scale, backend=backend)


# ---------------------------------------------------------------------------------------------
# Muon optimizer
# ---------------------------------------------------------------------------------------------

def _ns_flops(shape: Sequence[int]) -> int:
    """Per-step NS FLOPs of one [r, c] matrix (m = min, n = max), symmetric products counted in full:
    X X^T 2 m^2 n + A A 2 m^3 + B X 2 m^2 n."""
    m, n = sorted(shape[-2:])
    return 4 * m * m * n + 2 * m ** 3


def _adjust_lr(lr: float, adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """torch.optim.Muon's learning-rate scaling, from the last two dims (per expert for [E, out, in])."""
    rows, cols = shape[-2:]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(rows / cols)  # spectral_unclamped


Unit = tuple[int, int, int]  # (index into the group's params, first expert, end expert); 2-D: (i, 0, 1)


def _plan(shapes: Sequence[torch.Size], world: int) -> list[list[Unit]]:
    """Split the NS work of ``shapes`` over ``world`` ranks with balanced FLOPs.

    Every 2-D matrix and every expert of a 3-D stack is one item; the items, in parameter order,
    are cut into ``world`` contiguous runs at equal shares of the total cost (an item goes to the
    rank whose share holds its cost midpoint), so imbalance is at most one item and each rank
    gets at most one expert range per stack: one batched call per (rank, stack).
    """
    items = [(i, e, _ns_flops(s)) for i, s in enumerate(shapes) for e in range(s[0] if len(s) == 3 else 1)]
    total = sum(f for _, _, f in items) or 1
    plan: list[list[Unit]] = [[] for _ in range(world)]
    done = 0
    for i, e, f in items:
        rank = min(world - 1, (2 * done + f) * world // (2 * total))
        done += f
        units = plan[rank]
        if units and units[-1][0] == i and units[-1][2] == e:
            units[-1] = (i, units[-1][1], e + 1)
        else:
            units.append((i, e, e + 1))
    return plan


def _unit_view(t: torch.Tensor, unit: Unit) -> torch.Tensor:
    return t if t.dim() == 2 else t[unit[1]:unit[2]]


def _wide(u: torch.Tensor) -> torch.Tensor:
    """The orientation NS iterates in: a tall ``[..., rows, cols]`` update as its transposed view."""
    return u.mT if u.shape[-2] > u.shape[-1] else u


def _as_update(o: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """NS of ``_wide(like)`` back in ``like``'s shape: a tall matrix's result is a transposed view.

    That is the layout ``torch.optim.Muon``'s update has (its NS returns ``X.T``), and it matters
    for bit-identity: CPU ``bf16.add_(other, alpha)`` rounds ``alpha`` to bf16 on both paths but
    then computes ``p + alpha * other`` in fp32 with one rounding when ``other`` is contiguous,
    and rounds ``alpha * other`` to bf16 before the add when it is strided (1 ulp apart on a few
    % of the elements, each step). A contiguous result here made bf16 parameters with rows > cols
    drift from torch's by 1 ulp. On the GPU a transposed operand costs the elementwise update some
    coalescing, which is small next to NS; the last NS product, in exchange, is stored
    contiguously.
    """
    return o if o.shape == like.shape else o.mT


def _is_dtensor(t: torch.Tensor) -> bool:
    if not dist.is_available():  # torch builds without torch.distributed have no DTensor either
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _sharded_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` as ``like`` is laid out: re-sharded to its placements when ``like`` is a DTensor
    (Replicate -> Shard is a local slice, no communication)."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements)


def _check_options(group: dict) -> None:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("lr: a Tensor lr must have 1 element")
    for name in ("lr", "momentum", "weight_decay"):
        if not 0.0 <= group[name]:
            raise ValueError(f"{name} must be >= 0, got {group[name]}")
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}")
    ns_schedule(group["ns_coefficients"], group["ns_steps"])
    eps = group["eps"]
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0 (it floors the norm so a zero update stays finite), got {eps!r}")


class Muon(torch.optim.Optimizer):
    r"""Muon (momentum orthogonalised by Newton-Schulz), a drop-in for ``torch.optim.Muon``.

    Same constructor and update rule as ``torch.optim.Muon`` (torch 2.13/2.14), per parameter::

        B     <- lerp(B, g, 1 - momentum)                      (B = momentum * B + (1 - momentum) g)
        U     <- lerp(g, B, momentum) if nesterov else B
        O     <- newton_schulz(U, ns_steps, ns_coefficients, eps)
        theta <- theta * (1 - lr * weight_decay)                (decoupled weight decay)
        theta <- theta - adjust_lr(lr, rows, cols) * O

    ``adjust_lr_fn``: None / "original" ``sqrt(max(1, rows/cols))`` (KellerJordan),
    "match_rms_adamw" ``0.2 sqrt(max(rows, cols))`` (Moonlight, arXiv 2502.16982),
    "spectral_unclamped" ``sqrt(rows/cols)``. For 2-D parameters the steps are bit-identical to
    ``torch.optim.Muon``'s on the ``torch`` backend, with one exception: with bf16 parameters and
    ``nesterov=False``, torch (2.13/2.14) normalises the momentum buffer in place (its NS divides
    ``buf.bfloat16()``, which is ``buf`` itself); here the buffer is left as the formula says.
    Bit-identity includes the update's memory layout: a matrix with rows > cols is orthogonalised
    as its transpose and added as a transposed view, as torch does (CPU bf16 ``add_`` rounds
    differently for strided operands; see ``_as_update``).

    Beyond ``torch.optim.Muon``:

    * 3-D expert stacks ``[E, out, in]`` (MoE weights): each expert is orthogonalised on its own,
      the whole stack in one batched call, and ``rows, cols`` are the last two dims (torch's
      ``shape[:2]`` would be wrong there).
    * ``ns_coefficients`` also takes a preset name (``"polar_express"``) or per-step triples.
    * Distributed: with ``process_group`` (or the default group, once initialised) of more than
      one rank, each rank orthogonalises a FLOP-balanced share of the matrices (whole 2-D
      parameters and ranges of experts) and one all-gather per parameter group shares the bf16
      results, so NS work is divided instead of repeated; the result equals the single-process
      optimizer's. Every rank must hold the same gradients (after DDP's all-reduce) or the same
      shards of them: FSDP2 (``fully_shard``) DTensor parameters are gathered for NS with
      ``full_tensor()`` and the update is re-sharded to the parameter's placements.
    * ``backend`` selects the NS backend (see :func:`newton_schulz`).

    Muon is for the matrices of hidden layers; give the rest (embeddings, LM head, norms,
    biases, the router's bias) to AdamW::

        muon_params = [p for n, p in model.named_parameters() if p.ndim in (2, 3) and "embed" not in n
                       and "lm_head" not in n]
        ids = {id(p) for p in muon_params}
        other_params = [p for p in model.parameters() if id(p) not in ids]
        opt_muon = glm45_ops.muon.Muon(muon_params, lr=0.02, momentum=0.95, adjust_lr_fn="match_rms_adamw")
        opt_adamw = torch.optim.AdamW(other_params, lr=3e-4, weight_decay=0.01)
        loss.backward(); opt_muon.step(); opt_adamw.step()
        opt_muon.zero_grad(); opt_adamw.zero_grad()
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Coefficients = DEFAULT_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        process_group: "dist.ProcessGroup | None" = None,
        backend: str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)  # every group, the first ones too, goes through add_param_group
        self.process_group = process_group
        self.backend = backend

    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group``, refusing (``ValueError``) what ``step()``
        could not do: parameters that are not real matrices or expert stacks, and bad options
        (the group's own or the defaults it inherits). The group is checked before it is added,
        so nothing changes when it is refused."""
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # sets: the base class refuses them
            param_group["params"] = params = list(params)
        for p in [params] if isinstance(params, torch.Tensor) else params:
            if not isinstance(p, torch.Tensor):
                continue  # the base class refuses it by name
            if p.ndim not in (2, 3):
                raise ValueError(
                    f"Muon optimizes matrices [out, in] and expert stacks [E, out, in]; got a parameter of "
                    f"shape {tuple(p.shape)}: give it to AdamW (see the Muon docstring)"
                )
            if p.is_complex():
                raise ValueError(f"Muon does not support complex parameters, got {p.dtype}")
        _check_options({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _world(self) -> tuple["dist.ProcessGroup | None", int]:
        pg = self.process_group
        if pg is None and not (dist.is_available() and dist.is_initialized()):
            return None, 1
        return pg, dist.get_world_size(pg)

    def _ns(self, x: torch.Tensor, group: dict) -> torch.Tensor:
        """bf16 out: the values NS(x) has in x's dtype (NS starts by rounding to bf16 and its
        result is bf16's), at half the memory and traffic. ``x.to`` keeps a transposed view's
        layout, which torch.optim.Muon's routine also iterates on (``grad.bfloat16().T``)."""
        return newton_schulz(
            x.to(torch.bfloat16), group["ns_steps"], group["ns_coefficients"], group["eps"], backend=self.backend
        )

    def _distributed_ns(self, full: list[torch.Tensor], group: dict, pg, world: int) -> list[torch.Tensor]:
        """NS of every (full) update: this rank's share of the plan, then one all-gather."""
        plan = _plan([u.shape for u in full], world)
        rank = dist.get_rank(pg)
        sizes = [sum(_unit_view(full[i], (i, e0, e1)).numel() for i, e0, e1 in units) for units in plan]
        device = full[0].device
        send = torch.zeros(max(sizes), dtype=torch.bfloat16, device=device)
        offset = 0
        for unit in plan[rank]:
            o = self._ns(_unit_view(full[unit[0]], unit), group).reshape(-1)
            send[offset:offset + o.numel()] = o
            offset += o.numel()
        recv = torch.empty((world, send.numel()), dtype=torch.bfloat16, device=device)
        dist.all_gather(list(recv.unbind(0)), send, group=pg)
        out = [torch.empty(u.shape, dtype=torch.bfloat16, device=device) for u in full]
        for r, units in enumerate(plan):
            offset = 0
            for unit in units:
                dst = _unit_view(out[unit[0]], unit)
                dst.copy_(recv[r, offset:offset + dst.numel()].view(dst.shape))
                offset += dst.numel()
        return out

    def _momentum_update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Advance p's momentum buffer and return the matrix to orthogonalise."""
        if p.grad.is_sparse:
            raise RuntimeError("Muon does not support sparse gradients")
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        return p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    @staticmethod
    def _apply(p: torch.Tensor, o: torch.Tensor, group: dict) -> None:
        lr = float(group["lr"])
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(o, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step for every parameter with a gradient; returns ``closure()``'s loss if given.

        One process: parameter by parameter (one update and its NS alive at a time). Distributed:
        every update first (each rank needs all of them for its share), then the shared NS."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pg, world = self._world()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if world == 1:
                for p in params:
                    u = self._momentum_update(p, group)
                    full = u.full_tensor() if _is_dtensor(u) else u
                    o = _as_update(self._ns(_wide(full), group), full)
                    self._apply(p, _sharded_like(o, u), group)
            elif params:
                updates = [self._momentum_update(p, group) for p in params]
                full = [u.full_tensor() if _is_dtensor(u) else u for u in updates]
                outs = self._distributed_ns([_wide(f) for f in full], group, pg, world)
                for p, o, f, u in zip(params, outs, full, updates):
                    self._apply(p, _sharded_like(_as_update(o, f), u), group)
        return loss
