"""Grouped GEMMs over expert-contiguous rows (DeepGEMM's "contiguous" layout), FP8 block-scaled
and BF16.

Ops (schemas below, defaults there and nowhere else; definitions, padding rows and NaN/inf in
:mod:`glm45_ops.reference.moe_grouped`):

* ``grouped_fp8_block_gemm(a, a_scale, b, b_scale, expert_offsets, out_dtype=bfloat16) -> out``
  ``out[m] = fp8_block_gemm(a[m], a_scale[m], b[g], b_scale[g])`` for the group ``g`` holding row
  ``m`` (rows ``[offsets[g], offsets[g+1])``), zero for rows outside every group.
* ``grouped_bf16_gemm(a, b, expert_offsets) -> out``: the same with bf16 operands and output
  (fp32 accumulation), K and N multiples of 8.

``M_total`` is static (the buffer's size) and the offsets live on the device, so a MoE layer's
expert GEMMs run without a host sync and can be captured in a CUDA graph. Backends: ``torch``
(reference: a loop over the groups, reading the offsets on the host), ``triton``
(``triton_ops.moe_grouped``: tiles found from the offsets on the device) and, when
``glm45_ops._C`` is built for sm_90a, ``cuda`` (CUTLASS's PtrArray grouped GEMMs: blockwise FP8 in
``csrc/moe/grouped_gemm_sm90.cu``, BF16 in ``csrc/moe/grouped_bf16_gemm_sm90.cu``). They agree
within a tolerance per group (FP8: :func:`glm45_ops.gemm`'s rule for the dense op, applied to each
group's rows; BF16: :func:`_compare_bf16`), not bit for bit; padding rows are exactly zero
everywhere.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from glm45_ops import gemm
from glm45_ops._registry import ErrorInput, Op, Sample
from glm45_ops.reference import cdiv, moe_grouped as ref
from glm45_ops.reference.gemm import GEMM_BLOCK
from glm45_ops.reference.quant import FP8_DTYPE
from glm45_ops.testing import calc_diff

__all__ = ["grouped_bf16_gemm", "grouped_fp8_block_gemm"]

_ROW_ALIGN_BYTES = 16  # TMA: every stride of a and b but the unit one a multiple of 16 bytes



def _check_offset_values(offsets: torch.Tensor, m: int) -> None:
    """Nondecreasing within [0, M_total], where that costs no host sync: real CPU tensors only
    (on the device the kernels clamp them, so bad offsets cannot address outside the tensors)."""
    if offsets.device.type != "cpu" or is_fake(offsets) or torch.compiler.is_compiling():
        return
    prev = 0
    for i, v in enumerate(offsets.tolist()):
        if v < prev or v > m:
            raise ValueError(f"expert_offsets must be nondecreasing within [0, M_total = {m}], "
                             f"got expert_offsets[{i}] = {v}")
        prev = v


def _check(a, a_scale, b, b_scale, expert_offsets, out_dtype):
    gemm._check_fp8_matrix("a", a)
    if b.dtype != FP8_DTYPE:
        raise ValueError(f"b must be float8_e4m3fn, got {b.dtype}")
    if b.dim() != 3:
        raise ValueError(f"b must be 3-D [G, N, K], got shape {tuple(b.shape)}")
    if b.stride(2) != 1 or any(b.shape[d] > 1 and b.stride(d) % _ROW_ALIGN_BYTES for d in (0, 1)):
        raise ValueError(
            f"b must have a unit last stride and other strides that are multiples of {_ROW_ALIGN_BYTES} "
            f"(TMA), got strides {tuple(b.stride())}"
        )
    (m, k), (g, n, kb) = a.shape, b.shape
    if k != kb:
        raise ValueError(f"a [M, K] and b [G, N, K] must share K, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if k == 0 or k % gemm.K_ALIGN:
        raise ValueError(f"K (a.shape[1] = {k}) must be a positive multiple of {gemm.K_ALIGN} (TMA)")
    if g == 0:
        raise ValueError("b must have at least one group (G >= 1)")
    if n == 0:
        raise ValueError("b must have at least one row per group (N >= 1)")
    k_blocks = cdiv(k, GEMM_BLOCK)
    gemm._check_scale("a_scale", a_scale, (m, k_blocks))
    if b_scale.dtype != torch.float32:
        raise ValueError(f"b_scale must be float32, got {b_scale.dtype}")
    if tuple(b_scale.shape) != (g, cdiv(n, GEMM_BLOCK), k_blocks):
        raise ValueError(f"b_scale must have shape {(g, cdiv(n, GEMM_BLOCK), k_blocks)}, got {tuple(b_scale.shape)}")
    if expert_offsets.dtype != torch.int32:
        raise ValueError(f"expert_offsets must be int32, got {expert_offsets.dtype}")
    if tuple(expert_offsets.shape) != (g + 1,):
        raise ValueError(f"expert_offsets must have shape {(g + 1,)}, got {tuple(expert_offsets.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    devices = {t.device for t in (a, a_scale, b, b_scale, expert_offsets)}
    if len(devices) != 1:
        raise ValueError(
            f"a, a_scale, b, b_scale and expert_offsets must be on one device, got {sorted(map(str, devices))}"
        )
    _check_offset_values(expert_offsets, m)


def _alloc(a, a_scale, b, b_scale, expert_offsets, out_dtype):
    return torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)


def _launch(out, a, a_scale, b, b_scale, expert_offsets, out_dtype):
    from triton_ops import moe_grouped as tg

    tg.grouped_fp8_block_gemm(a, a_scale, b, b_scale, expert_offsets, out)


def _compare(got, want, args) -> str | None:
    """Each group's rows under :func:`glm45_ops.gemm`'s rule for its dense GEMM (the float64
    oracle's bound and calc_diff, non-finite outputs exactly where the definition puts them);
    rows outside every group exactly zero."""
    a, a_scale, b, b_scale, expert_offsets, out_dtype = args
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{got.dtype}{list(got.shape)} vs reference {want.dtype}{list(want.shape)}"
    bounds = expert_offsets.tolist()
    inside = torch.zeros(a.shape[0], dtype=torch.bool)
    for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            inside[lo:hi] = True
            why = gemm._compare(got[lo:hi], want[lo:hi], (a[lo:hi], a_scale[lo:hi], b[g], b_scale[g], out_dtype))
            if why is not None:
                return f"group {g} (rows {lo}..{hi - 1}): {why}"
    for name, t in (("output", got), ("reference", want)):
        pad = t.detach().cpu()[~inside]
        if pad.numel() and not bool((pad == 0).all()):
            return f"{name}: {int((pad != 0).sum())} values in rows outside every group are not zero"
    return None


# ---------------------------------------------------------------------------------------------
# Contract tables: samples and bad inputs
# ---------------------------------------------------------------------------------------------

def operands(sizes, n, k, gen, device, *, lead=0, tail=0, mn=False, ue8m0=False, nan_at=None):
    """Quantized random operands for groups of ``sizes`` rows (``gemm``'s operand generator:
    blocks spanning ~6 decades), ``lead`` and ``tail`` padding rows before the first group and
    after the last -> ``(a, a_scale, b, b_scale, expert_offsets)``."""
    m = lead + sum(sizes) + tail
    a, a_scale = gemm._operands(m, 1, k, gen, device, mn=mn, ue8m0=ue8m0, nan_at=nan_at)[:2]
    experts = [gemm._operands(1, n, k, gen, device, ue8m0=ue8m0)[2:] for _ in sizes]
    offsets = torch.tensor([lead + sum(sizes[:i]) for i in range(len(sizes) + 1)], dtype=torch.int32, device=device)
    return a, a_scale, torch.stack([e[0] for e in experts]), torch.stack([e[1] for e in experts]), offsets


def _samples(device, gen):
    ops = lambda *shape, **kw: operands(*shape, gen, device, **kw)  # noqa: E731
    a, a_s, b, b_s, off = ops([3, 2], 200, 176, mn=True, nan_at=(1, 5))
    b_s[1, 1, 1] = float("inf")  # group 1, columns 128..199, second K block
    a2, a2_s, b2, b2_s, off2 = ops([2, 0, 3], 130, 192, lead=1)
    b2.view(torch.uint8)[2, 7, 150] = 0x7F  # the e4m3 NaN byte, under a finite scale
    a2_s[4, 0] = -float("inf")
    # built directly: the quantizer's [0, K] output has a row stride opcheck's clone cannot copy
    empty = (torch.empty(0, 192, dtype=FP8_DTYPE, device=device), torch.empty(0, 2, device=device),
             *ops([1, 1], 40, 192)[2:4], torch.zeros(3, dtype=torch.int32, device=device))
    return [
        Sample((*ops([5, 0, 3, 1], 257, 192), torch.bfloat16),
               note="K=192 (GLM-4.5 TP8), N odd, an empty group, row-major a_scale"),
        Sample((*ops([2, 4], 130, 176, mn=True, lead=2, tail=3), torch.float32),
               note="K=176 (GLM-4.5-Air TP8), padding rows before and after, fp32 out"),
        Sample(ops([7], 129, 384, mn=True, ue8m0=True), note="one group, UE8M0 scales, 3 full K blocks"),
        Sample((*ops([1, 1, 1], 33, 16), torch.float32), note="K=16: one partial K block, one row per group"),
        Sample(ops([0, 0, 0], 24, 128, tail=4), note="every group empty: all padding"),
        Sample(empty, tag="empty", note="M_total=0, two empty groups"),
        Sample((a, a_s, b, b_s, off), tag="nonfinite", note="NaN activation group, +inf weight scale"),
        Sample((a2, a2_s, b2, b2_s, off2, torch.float32), tag="nonfinite",
               note="NaN weight byte, -inf activation scale, a padding row"),
    ]


def _errors(device):
    fp8 = lambda *shape: torch.zeros(shape, device=device).to(FP8_DTYPE)  # noqa: E731
    a, a_s = fp8(8, 256), torch.ones(8, 2, device=device)
    b, b_s = fp8(2, 130, 256), torch.ones(2, 2, 2, device=device)
    off = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    tma = r"must have a unit last stride and a row stride that is a multiple of 16 \(TMA\), got strides"
    value_errors = [
        ((a.float(), a_s, b, b_s, off), "a must be float8_e4m3fn, got torch.float32"),
        ((a.view(2, 4, 256), a_s, b, b_s, off), r"a must be 2-D, got shape \(2, 4, 256\)"),
        ((fp8(256, 8).t(), a_s, b, b_s, off), rf"a {tma} \(1, 8\)"),
        ((a, a_s, b.to(torch.float8_e5m2), b_s, off), "b must be float8_e4m3fn, got torch.float8_e5m2"),
        ((a, a_s, b[0], b_s, off), r"b must be 3-D \[G, N, K\], got shape \(130, 256\)"),
        ((a, a_s, fp8(2, 130, 264)[:, :, :256], b_s, off),
         r"b must have a unit last stride and other strides that are multiples of 16 \(TMA\), "
         r"got strides \(34320, 264, 1\)"),
        ((a, a_s, b[:, :, :128], b_s[:, :, :1], off),
         r"a \[M, K\] and b \[G, N, K\] must share K, got a \(8, 256\) and b \(2, 130, 128\)"),
        ((fp8(2, 112)[:, :100], a_s[:2, :1], fp8(1, 3, 112)[:, :, :100], b_s[:1, :1, :1], off[:2]),
         r"K \(a.shape\[1\] = 100\) must be a positive multiple of 16 \(TMA\)"),
        ((a, a_s, b[:0], b_s[:0], off[:1]), r"b must have at least one group \(G >= 1\)"),
        ((a, a_s, b[:, :0], b_s[:, :0], off), r"b must have at least one row per group \(N >= 1\)"),
        ((a, a_s.double(), b, b_s, off), "a_scale must be float32, got torch.float64"),
        ((a, a_s[:7], b, b_s, off), r"a_scale must have shape \(8, 2\), got \(7, 2\)"),
        ((a, a_s, b, b_s.half(), off), "b_scale must be float32, got torch.float16"),
        ((a, a_s, b, b_s[:, :1], off), r"b_scale must have shape \(2, 2, 2\), got \(2, 1, 2\)"),
        ((a, a_s, b, b_s, off.long()), "expert_offsets must be int32, got torch.int64"),
        ((a, a_s, b, b_s, off[:2]), r"expert_offsets must have shape \(3,\), got \(2,\)"),
        ((a, a_s, b, b_s, off, torch.float16), "out_dtype must be bfloat16 or float32, got torch.float16"),
        ((a, a_s, b, b_s, off.to("meta")),
         r"a, a_scale, b, b_scale and expert_offsets must be on one device, got \["),
    ]
    errors = [ErrorInput(args, match=match) for args, match in value_errors]
    if torch.device(device).type == "cpu":  # values: checked on real CPU tensors only (a host sync on the device)
        errors += [
            ErrorInput((a, a_s, b, b_s, torch.tensor(v, dtype=torch.int32)), match=match, fake=False)
            for v, match in (
                ([0, 5, 3], r"expert_offsets must be nondecreasing within \[0, M_total = 8\], "
                            r"got expert_offsets\[2\] = 3"),
                ([-1, 3, 8], r"got expert_offsets\[0\] = -1"),
                ([0, 3, 9], r"got expert_offsets\[2\] = 9"),
            )
        ]
    return errors + [
        ErrorInput(("a", a_s, b, b_s, off), exc=TypeError, match="a must be torch.Tensor, got str", raw=False),
        ErrorInput((a, a_s, b, b_s, off, "bf16"), exc=TypeError, match="out_dtype must be torch.dtype, got str",
                   raw=False),
    ]


_op = Op(
    "grouped_fp8_block_gemm",
    "(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor expert_offsets, "
    "ScalarType out_dtype=bfloat16) -> Tensor",
    check=_check,
    alloc=_alloc,
    torch_impl=ref.grouped_fp8_block_gemm_ref,
    triton_launch=_launch,
    compare=_compare,
    samples=_samples,
    errors=_errors,
)

grouped_fp8_block_gemm = _op.api(
    """Per-expert FP8 block GEMMs over expert-contiguous rows: ``out[m] = (a[m] * a_scale[m]) @
    (b[g] * b_scale[g])^T`` for ``offsets[g] <= m < offsets[g+1]``, zero for other rows.

    ``a`` e4m3 ``[M_total, K]`` (rows grouped by expert, e.g. permuted by
    :func:`glm45_ops.moe.moe_align_block_size`), ``a_scale`` fp32 ``[M_total, ceil(K/128)]``
    (1 x 128 blocks, any strides), ``b`` e4m3 ``[G, N, K]`` (128 x 128 blocks; unit last stride,
    other strides multiples of 16), ``b_scale`` fp32 ``[G, ceil(N/128), ceil(K/128)]``,
    ``expert_offsets`` int32 ``[G + 1]``, nondecreasing within ``[0, M_total]`` (checked on CPU
    only; read on the device, no host sync) -> ``out_dtype`` (bf16 or fp32) ``[M_total, N]``.
    K any positive multiple of 16 (partial last block: GLM-4.5's 192, Air's 176), N any.
    NaN/inf and padding rows: see :mod:`glm45_ops.reference.moe_grouped`.
    """
)

# ---------------------------------------------------------------------------------------------
# BF16
# ---------------------------------------------------------------------------------------------

_BF16_ALIGN = 8  # TMA: bf16 values per 16-byte unit (K, N and every stride but the unit one)


def _check_bf16(a, b, expert_offsets):
    if a.dtype != torch.bfloat16:
        raise ValueError(f"a must be bfloat16, got {a.dtype}")
    if a.dim() != 2:
        raise ValueError(f"a must be 2-D, got shape {tuple(a.shape)}")
    if a.stride(1) != 1 or (a.shape[0] > 1 and a.stride(0) % _BF16_ALIGN):
        raise ValueError(f"a must have a unit last stride and a row stride that is a multiple of {_BF16_ALIGN} "
                         f"(TMA), got strides {tuple(a.stride())}")
    if b.dtype != torch.bfloat16:
        raise ValueError(f"b must be bfloat16, got {b.dtype}")
    if b.dim() != 3:
        raise ValueError(f"b must be 3-D [G, N, K], got shape {tuple(b.shape)}")
    if b.stride(2) != 1 or any(b.shape[d] > 1 and b.stride(d) % _BF16_ALIGN for d in (0, 1)):
        raise ValueError(f"b must have a unit last stride and other strides that are multiples of {_BF16_ALIGN} "
                         f"(TMA), got strides {tuple(b.stride())}")
    (m, k), (g, n, kb) = a.shape, b.shape
    if k != kb:
        raise ValueError(f"a [M, K] and b [G, N, K] must share K, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if k == 0 or k % _BF16_ALIGN:
        raise ValueError(f"K (a.shape[1] = {k}) must be a positive multiple of {_BF16_ALIGN} (TMA)")
    if g == 0:
        raise ValueError("b must have at least one group (G >= 1)")
    if n == 0 or n % _BF16_ALIGN:
        raise ValueError(f"N (b.shape[1] = {n}) must be a positive multiple of {_BF16_ALIGN} (TMA)")
    if expert_offsets.dtype != torch.int32:
        raise ValueError(f"expert_offsets must be int32, got {expert_offsets.dtype}")
    if tuple(expert_offsets.shape) != (g + 1,):
        raise ValueError(f"expert_offsets must have shape {(g + 1,)}, got {tuple(expert_offsets.shape)}")
    devices = {t.device for t in (a, b, expert_offsets)}
    if len(devices) != 1:
        raise ValueError(f"a, b and expert_offsets must be on one device, got {sorted(map(str, devices))}")
    _check_offset_values(expert_offsets, m)


def _alloc_bf16(a, b, expert_offsets):
    return torch.empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16, device=a.device)


def _launch_bf16(out, a, b, expert_offsets):
    from triton_ops import moe_grouped as tg

    tg.grouped_bf16_gemm(a, b, expert_offsets, out)


# |out - y| <= 2^-8 |y| + (1 + 2^-8) gamma S per output (y, S = |a| @ |b|^T: float64 oracle), the
# dense FP8 rule's form with fp32 accumulation throughout: gamma = (K + 8) 2^-24 for a sum of K
# products in any order (CPU). On the GPU the bf16 tensor cores' fp32 accumulator is allowed
# twice that (truncation instead of rounding in the adder: an assumption, to be confirmed on an
# H200 with this very rule), and calc_diff < SIMILARITY_LIMIT over the finite outputs.
def _compare_bf16(got, want, args) -> str | None:
    """Each group within the bound above of the float64 oracle, non-finite outputs exactly where
    the reference has them, rows outside every group exactly zero."""
    a, b, expert_offsets = args
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{got.dtype}{list(got.shape)} vs reference {want.dtype}{list(want.shape)}"
    g_cpu, w_cpu = got.detach().cpu().double(), want.detach().cpu().double()
    if not torch.equal(torch.isfinite(g_cpu), torch.isfinite(w_cpu)):
        return (f"non-finite at {int((~torch.isfinite(g_cpu)).sum())} outputs, "
                f"the reference at {int((~torch.isfinite(w_cpu)).sum())}")
    gamma = (a.shape[1] + 8) * 2.0 ** (-23 if a.device.type == "cuda" else -24)
    inside = torch.zeros(a.shape[0], dtype=torch.bool)
    for g, (lo, hi) in enumerate(zip(expert_offsets.tolist()[:-1], expert_offsets.tolist()[1:])):
        if hi <= lo:
            continue
        inside[lo:hi] = True
        a64, b64 = a[lo:hi].cpu().double(), b[g].cpu().double()
        y, s = a64 @ b64.t(), a64.abs() @ b64.abs().t()
        finite = torch.isfinite(g_cpu[lo:hi]) & torch.isfinite(y) & torch.isfinite(s)
        got_f, y, bound = g_cpu[lo:hi][finite], y[finite], (2.0**-8 * y.abs() + (1 + 2.0**-8) * gamma * s)[finite]
        excess = (got_f - y).abs() - bound
        if excess.numel() and excess.max() > 0:
            i = int(excess.argmax())
            return (f"group {g}: {int((excess > 0).sum())} outputs beyond the bound, worst {got_f[i].item()!r} vs "
                    f"oracle {y[i].item()!r} (bound {bound[i].item():.3g})")
        diff = calc_diff(got_f, y)
        if diff >= gemm.SIMILARITY_LIMIT:
            return f"group {g}: calc_diff {diff:.3g} >= {gemm.SIMILARITY_LIMIT}"
    for name, t in (("output", g_cpu), ("reference", w_cpu)):
        pad = t[~inside]
        if pad.numel() and not bool((pad == 0).all()):
            return f"{name}: {int((pad != 0).sum())} values in rows outside every group are not zero"
    return None


def bf16_operands(sizes, n, k, gen, device, *, lead=0, tail=0):
    """Random bf16 ``(a, b, expert_offsets)`` for groups of ``sizes`` rows (rows and experts
    scaled over ~4 decades), ``lead`` / ``tail`` padding rows."""
    m = lead + sum(sizes) + tail
    a = torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, max(m, 1))[:m, None]
    b = torch.randn(len(sizes), n, k, generator=gen) * torch.logspace(-2, 2, n)[None, :, None]
    offsets = torch.tensor([lead + sum(sizes[:i]) for i in range(len(sizes) + 1)], dtype=torch.int32)
    return a.to(torch.bfloat16).to(device), b.to(torch.bfloat16).to(device), offsets.to(device)


def _bf16_samples(device, gen):
    ops = lambda *shape, **kw: bf16_operands(*shape, gen, device, **kw)  # noqa: E731
    a, b, off = ops([3, 2], 16, 64, tail=1)
    a[1, 5] = float("nan")
    b[1, 3, 7] = float("inf")
    return [
        Sample(ops([5, 0, 3, 1], 24, 192), note="K=192, an empty group"),
        Sample(ops([2, 4], 40, 136, lead=2, tail=3), note="K=136: a partial 64-wide K slice, padding rows"),
        Sample(ops([0, 0, 0], 8, 64, tail=4), note="every group empty: all padding"),
        Sample((torch.empty(0, 64, dtype=torch.bfloat16, device=device), *ops([1, 1], 16, 64)[1:2],
                torch.zeros(3, dtype=torch.int32, device=device)), tag="empty", note="M_total=0"),
        Sample((a, b, off), tag="nonfinite", note="NaN activation, +inf weight"),
    ]


def _bf16_errors(device):
    bf = lambda *shape: torch.zeros(shape, dtype=torch.bfloat16, device=device)  # noqa: E731
    a, b = bf(8, 64), bf(2, 16, 64)
    off = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    value_errors = [
        ((a.float(), b, off), "a must be bfloat16, got torch.float32"),
        ((a.view(2, 4, 64), b, off), r"a must be 2-D, got shape \(2, 4, 64\)"),
        ((bf(64, 8).t(), b, off),
         r"a must have a unit last stride and a row stride that is a multiple of 8 \(TMA\), got strides \(1, 8\)"),
        ((a, b.half(), off), "b must be bfloat16, got torch.float16"),
        ((a, b[0], off), r"b must be 3-D \[G, N, K\], got shape \(16, 64\)"),
        ((a, bf(2, 16, 68)[:, :, :64], off),
         r"b must have a unit last stride and other strides that are multiples of 8 \(TMA\), "
         r"got strides \(1088, 68, 1\)"),
        ((a, b[:, :, :32], off),
         r"a \[M, K\] and b \[G, N, K\] must share K, got a \(8, 64\) and b \(2, 16, 32\)"),
        ((bf(8, 16)[:, :12], bf(2, 16, 16)[:, :, :12], off),
         r"K \(a.shape\[1\] = 12\) must be a positive multiple of 8"),
        ((a, b[:0], off[:1]), r"b must have at least one group \(G >= 1\)"),
        ((a, b[:, :12], off), r"N \(b.shape\[1\] = 12\) must be a positive multiple of 8 \(TMA\)"),
        ((a, b, off.long()), "expert_offsets must be int32, got torch.int64"),
        ((a, b, off[:2]), r"expert_offsets must have shape \(3,\), got \(2,\)"),
        ((a, b, off.to("meta")), r"a, b and expert_offsets must be on one device, got \["),
    ]
    errors = [ErrorInput(args, match=match) for args, match in value_errors]
    if torch.device(device).type == "cpu":
        errors.append(ErrorInput((a, b, torch.tensor([0, 9, 8], dtype=torch.int32)), fake=False,
                                 match=r"expert_offsets must be nondecreasing within \[0, M_total = 8\], "
                                       r"got expert_offsets\[1\] = 9"))
    return errors + [ErrorInput(("a", b, off), exc=TypeError, match="a must be torch.Tensor, got str", raw=False)]


_bf16_op = Op(
    "grouped_bf16_gemm",
    "(Tensor a, Tensor b, Tensor expert_offsets) -> Tensor",
    check=_check_bf16,
    alloc=_alloc_bf16,
    torch_impl=ref.grouped_bf16_gemm_ref,
    triton_launch=_launch_bf16,
    compare=_compare_bf16,
    samples=_bf16_samples,
    errors=_bf16_errors,
)

grouped_bf16_gemm = _bf16_op.api(
    """Per-expert BF16 GEMMs over expert-contiguous rows: ``out[m] = a[m] @ b[g]^T`` for
    ``offsets[g] <= m < offsets[g+1]``, zero for other rows.

    ``a`` bf16 ``[M_total, K]``, ``b`` bf16 ``[G, N, K]`` (unit last strides, other strides
    multiples of 8), ``expert_offsets`` int32 ``[G + 1]`` as in :func:`grouped_fp8_block_gemm`
    -> bf16 ``[M_total, N]``, fp32 accumulation, one rounding. K and N multiples of 8 (16-byte
    TMA rows; GLM-4.5's 192 / 176 / 5120 / 4096 all are).
    """
)

OPS = (_op, _bf16_op)
