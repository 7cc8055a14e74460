"""``token_logprobs``: per-token log-probabilities and entropy from ``[T, V]`` logits, one
streaming pass over the vocabulary per row (no ``[T, V]`` intermediate).

Schema ``(Tensor logits, Tensor token_ids, float temperature=1.0, Tensor? temperatures=None)
-> (Tensor, Tensor)``: a schema cannot take "a float or a tensor", so a per-row temperature is
the separate ``temperatures`` (fp32 ``[T]``, any stride), with ``temperature`` left at its
default. The Python function takes either in ``temperature``. Backends: the torch reference
(row chunks), Triton (a program per row) and CUDA (``csrc/rollout/token_logprobs.cu``: a block
per row, 16-byte loads, warp-shuffle merges of the online state). The checks and the comparison
rule here are shared with :mod:`glm45_ops.rollout.linear`.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

from glm45_ops._registry import ErrorInput, Op, Sample
from glm45_ops.reference import rollout as ref

__all__ = ["token_logprobs", "MAX_VOCAB"]

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ID_DTYPES = (torch.int32, torch.int64)
# ids and columns are int32 in the kernels, and so are the ends of their blocks (a chunk, a tile
# count) up to 16384 past V: half the int32 range keeps every one of them from wrapping
MAX_VOCAB = 2**30
# Backends agree within TOL_ULPS fp32 ulps of a row's scale (see compare_rows); greedy rows exactly.
# The kernels round d = (x - m) * fp32(1/t) (CUDA: * log2(e), then back by ln 2) two or three
# times where the reference rounds (x - m) / t once: 3 ulps of |d| <= 2 max|x| / t each way.
TOL_ULPS = 8
_EPS = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------------
# Checks shared by the family's ops (glm45_ops/rollout/linear.py; the CUDA kernel repeats them)
# ---------------------------------------------------------------------------------------------

def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")


def check_unit_last_stride(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {tuple(t.stride())}")


def check_vocab(name: str, v: int) -> None:
    if not 1 <= v <= MAX_VOCAB:
        raise ValueError(f"{name}: the vocabulary V={v} must be in [1, {MAX_VOCAB}]")


def check_rows(name: str, x: torch.Tensor, n: int, like: str, like_t: torch.Tensor) -> None:
    """``x`` is ``[T]`` with T from ``like``, on ``like``'s device."""
    if tuple(x.shape) != (n,):
        raise ValueError(f"{name} must have shape [{n}] ([T] from {like}), got {list(x.shape)}")
    if x.device != like_t.device:
        raise ValueError(f"{name} is on {x.device} but {like} is on {like_t.device}")


def check_ids_and_temperature(token_ids, temperature, temperatures, n: int, like: str, like_t) -> None:
    if token_ids.dtype not in ID_DTYPES:
        raise ValueError(f"token_ids must be int32 or int64, got {token_ids.dtype}")
    check_rows("token_ids", token_ids, n, like, like_t)
    if math.isnan(temperature):
        raise ValueError("temperature must not be NaN (a NaN entry of temperatures gives its row NaN outputs)")
    if temperatures is not None:
        if temperatures.dtype != torch.float32:
            raise ValueError(f"temperatures must be float32, got {temperatures.dtype}")
        check_rows("temperatures", temperatures, n, like, like_t)
        if temperature != 1.0:
            raise ValueError(f"temperature must be 1.0 (the default) when temperatures is given, got {temperature!r}")


def check_ids_in_vocab(token_ids: torch.Tensor, v: int) -> None:
    """Raise for ids outside [0, V) where that costs no host sync: real CPU tensors only."""
    if token_ids.device.type != "cpu" or is_fake(token_ids) or torch.compiler.is_compiling():
        return
    bad = (token_ids < 0) | (token_ids >= v)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"token_ids must lie in [0, V={v}); found {int(token_ids[i])} at index {i} "
                         "(on CUDA such ids are not checked: their logprob is -inf)")


# ---------------------------------------------------------------------------------------------
# The comparison rule shared by the family's forward ops
# ---------------------------------------------------------------------------------------------

def compare_rows(got, want, t: torch.Tensor, scale: torch.Tensor, names: tuple[str, ...]) -> str | None:
    """Outputs ``[T]`` against the reference's: the same NaN and infinities, greedy rows
    (``t <= 0``) exactly, finite values within ``TOL_ULPS * eps * scale`` per row.

    Why that scale: ``d_j = (x_j - m) / t`` is rounded with relative error ~eps, so each output
    (``d_i - log s``, ``log s - sum p d``, ``m / t + log s``) may move by ~eps times the largest
    ``|x| / t`` of its row (``scale`` includes it), plus ~eps per halving of the summation tree
    (``log2 V``) and the few roundings of ``exp``, ``log`` and the online rescaling."""
    if len(got) != len(want):
        return f"{len(got)} outputs, reference has {len(want)}"
    greedy = t <= 0
    tol = TOL_ULPS * _EPS * scale
    for name, g, w in zip(names, got, want):
        g, w = g.cpu(), w.cpu()
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"{name}: {g.dtype}{list(g.shape)} vs reference {w.dtype}{list(w.shape)}"
        finite = torch.isfinite(w)
        same_nonfinite = (g.isnan() == w.isnan()) & (finite | w.isnan() | (g == w))
        if not bool(same_nonfinite.all()):
            i = int((~same_nonfinite).nonzero()[0, 0])
            return f"{name}[{i}] = {g[i].item()!r}, reference {w[i].item()!r}"
        exact = greedy & finite
        if not bool((g[exact] == w[exact]).all()):
            i = int((exact & (g != w)).nonzero()[0, 0])
            return f"{name}[{i}] (greedy row) = {g[i].item()!r}, reference {w[i].item()!r}"
        err = torch.where(finite & ~greedy, (g - w).abs() - tol, 0.0)
        if bool((err > 0).any()):
            i = int(err.argmax())
            return f"{name}[{i}] = {g[i].item()!r}, reference {w[i].item()!r} (tolerance {tol[i].item():.3g})"
    return None


def row_scale(max_abs_x: torch.Tensor, t: torch.Tensor, v: int) -> torch.Tensor:
    """``max|x| / |t| + log2(V) + 8`` per row (finite rows; ``t`` > 0 rows use it)."""
    return torch.nan_to_num(max_abs_x / t.abs(), nan=0.0, posinf=0.0) + math.log2(max(v, 2)) + 8


# ---------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------

def _check(logits, token_ids, temperature, temperatures):
    check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [T, V], got shape {tuple(logits.shape)}")
    n, v = logits.shape
    check_vocab("logits", v)
    check_unit_last_stride("logits", logits)
    check_ids_and_temperature(token_ids, temperature, temperatures, n, "logits", logits)
    check_ids_in_vocab(token_ids, v)


def _alloc(logits, token_ids, temperature, temperatures):
    n = logits.shape[0]
    return (torch.empty(n, dtype=torch.float32, device=logits.device),
            torch.empty(n, dtype=torch.float32, device=logits.device))


def _launch(outs, logits, token_ids, temperature, temperatures):
    from triton_ops import rollout as tr

    tr.token_logprobs(logits, token_ids, temperature, temperatures, *outs)


def _compare(got, want, args) -> str | None:
    logits, token_ids, temperature, temperatures = args
    x = logits.float().cpu()
    t = ref.row_temperatures(x.shape[0], temperature, temperatures, "cpu")[:, 0]
    finite_abs = torch.where(torch.isfinite(x), x.abs(), 0.0)
    scale = row_scale(finite_abs.amax(dim=-1), t, x.shape[1])
    return compare_rows(got, want, t, scale, ("logprobs", "entropy"))


def _logits(shape, dtype, gen, std=3.0):
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def _ids(n, v, gen, dtype=torch.int64):
    return torch.randint(0, v, (n,), generator=gen).to(dtype)


def _nonfinite(gen):
    """Masked vocabulary (-inf, a -inf target), NaN / +inf / all -inf rows, and temperatures
    (per row) of 0, NaN, +inf (uniform over finite logits, NaN with a -inf one) and a tiny
    positive value."""
    x = _logits((10, 200), torch.float32, gen)
    ids = _ids(10, 200, gen)
    x[0, 50:150] = float("-inf")  # masked vocabulary
    x[1, ::2] = float("-inf")
    ids[1] = 4  # a masked target: logprob -inf
    x[2, 7] = float("nan")
    x[3, 9] = float("inf")
    x[4] = float("-inf")
    x[5, 3] = float("-inf")  # with t = +inf: NaN
    x[6, :100] = float("-inf")  # with t = 0: greedy over the unmasked half
    x[7, 10:12] = x[7].max() + 1.0  # a tie at the max with a tiny temperature: shared mass
    ids[7] = 11
    t = torch.tensor([1.0, 0.5, 1.0, 1.0, 1.0, float("inf"), 0.0, 1e-30, float("nan"), float("inf")])
    return x, ids, t


def _samples(device, gen):
    d = lambda *ts: tuple(t.to(device) for t in ts)  # noqa: E731
    strided = _logits((6, 400), torch.bfloat16, gen)[:, 37:337]
    ties = torch.randint(0, 3, (5, 64), generator=gen).float().to(torch.bfloat16)  # many tied maxima
    temps = torch.tensor([0.7, 1.0, 0.0, 1.3, -1.0])
    x_nf, ids_nf, t_nf = _nonfinite(gen)
    return [
        Sample(d(_logits((5, 300), torch.bfloat16, gen), _ids(5, 300, gen))),
        Sample((*d(_logits((3, 1000), torch.float32, gen), _ids(3, 1000, gen, torch.int32)), 0.7), note="int32 ids"),
        Sample((*d(_logits((5, 257), torch.float16, gen), _ids(5, 257, gen)), 1.0, temps.to(device)),
               note="per-row temperatures with greedy rows"),
        Sample(d(strided, _ids(6, 300, gen)), note="row-strided logits"),
        Sample((*d(ties, _ids(5, 64, gen)), 0.0), note="greedy with ties"),
        Sample(d(_logits((2, 1), torch.float32, gen), torch.zeros(2, dtype=torch.int64)), note="V=1"),
        Sample(d(torch.empty(0, 300, dtype=torch.bfloat16), torch.empty(0, dtype=torch.int64)), tag="empty"),
        Sample((*d(torch.empty(0, 10), torch.empty(0, dtype=torch.int32)), 1.0, torch.empty(0, device=device)),
               tag="empty"),
        Sample((*d(x_nf, ids_nf), 1.0, t_nf.to(device)), tag="nonfinite"),
        Sample(d(x_nf[:4].to(torch.bfloat16), ids_nf[:4]), tag="nonfinite"),
    ]


def _errors(device):
    x = torch.randn(4, 64, device=device)
    ids = torch.zeros(4, dtype=torch.int64, device=device)
    t = torch.ones(4, device=device)
    return [
        ErrorInput((x.double(), ids), match="logits must be bfloat16, float16 or float32, got torch.float64"),
        ErrorInput((x[0], ids), match=r"logits must be 2-D \[T, V\], got shape \(64,\)"),
        ErrorInput((x[:, :0], ids), match=rf"logits: the vocabulary V=0 must be in \[1, {MAX_VOCAB}\]"),
        ErrorInput((torch.randn(64, 4, device=device).t(), ids), match="logits must be contiguous in its last dim"),
        ErrorInput((x, ids.float()), match="token_ids must be int32 or int64, got torch.float32"),
        ErrorInput((x, ids[:3]), match=r"token_ids must have shape \[4\] \(\[T\] from logits\), got \[3\]"),
        ErrorInput((x, ids.to("meta")), match=f"token_ids is on meta but logits is on {device}"),
        ErrorInput((x, ids, float("nan")), match="temperature must not be NaN"),
        ErrorInput((x, ids, 1.0, t.double()), match="temperatures must be float32, got torch.float64"),
        ErrorInput((x, ids, 1.0, t[:2]), match=r"temperatures must have shape \[4\] \(\[T\] from logits\)"),
        ErrorInput((x, ids, 0.5, t), match=r"temperature must be 1.0 \(the default\) when temperatures is given, got 0.5"),
        ErrorInput((x, ids + 64), match=r"token_ids must lie in \[0, V=64\); found 64 at index 0", fake=False),
        ErrorInput((x, ids - 1), match=r"token_ids must lie in \[0, V=64\); found -1", fake=False),
        ErrorInput((x, ids, "hot"), exc=TypeError, match="temperature must be float, got str", raw=False),
        ErrorInput(("x", ids), exc=TypeError, match="logits must be torch.Tensor", raw=False),
    ]


_op = Op(
    "token_logprobs",
    "(Tensor logits, Tensor token_ids, float temperature=1.0, Tensor? temperatures=None) -> (Tensor, Tensor)",
    check=_check,
    alloc=_alloc,
    torch_impl=ref.token_logprobs_ref,
    triton_launch=_launch,
    compare=_compare,
    samples=_samples,
    errors=_errors,
)

_DEFAULTS = {a.name: a.default for a in _op.args}  # the schema's, for the wrapper's signature


def temperature_args(temperature, temperatures, n_rows: int | None) -> dict:
    """The public ``temperature`` (a number, or a tensor of ``[T]`` or 0-dim) and ``temperatures``
    as the schema's arguments; a 0-dim tensor is broadcast to ``[T]`` (a view)."""
    if not isinstance(temperature, torch.Tensor):
        return {"temperature": temperature, "temperatures": temperatures}
    if temperatures is not None:
        raise ValueError("give per-row temperatures once: as temperature or as temperatures, not both")
    if temperature.dim() == 0 and n_rows is not None:
        temperature = temperature.expand(n_rows)
    return {"temperatures": temperature}


def token_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float | torch.Tensor = _DEFAULTS["temperature"],
    temperatures: torch.Tensor | None = _DEFAULTS["temperatures"],
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each row's token, and each row's entropy, under ``softmax(logits / t)``.

    ``logits`` bf16/fp16/fp32 ``[T, V]`` (rows may be strided; unit last stride), ``token_ids``
    int32/int64 ``[T]`` -> (``logprobs``, ``entropy``), fp32 ``[T]``::

        logprob[r] = z[r, id_r] - logsumexp(z[r]),   entropy[r] = logsumexp(z[r]) - sum softmax(z[r]) * z[r]
        z = logits / t

    ``temperature``: a number, or an fp32 tensor ``[T]`` (one per row) or 0-dim; it means what
    :func:`glm45_ops.speculative.probs_from_logits` means by it, so a rollout's log-probs are
    those of the distribution it sampled from: ``t <= 0`` is greedy (logprob 0 at the argmax,
    ``-inf`` elsewhere, entropy 0); a NaN number is refused, a NaN entry gives its row NaN.
    ``-inf`` logits are a masked vocabulary (probability 0, no entropy contribution). Ids outside
    ``[0, V)`` are refused on CPU and give ``-inf`` elsewhere (checking would cost a host sync).
    Full definition, NaN/inf included: :mod:`glm45_ops.reference.rollout`. ``temperatures`` is
    the schema's form of a per-row temperature (``temperature`` then stays 1.0), accepted here too.
    """
    n = logits.shape[0] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None
    return _op(logits, token_ids, **temperature_args(temperature, temperatures, n), backend=backend)


OPS = (_op,)
