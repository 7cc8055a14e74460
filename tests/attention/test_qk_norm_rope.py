"""QK-Norm + partial NeoX RoPE (``qk_norm_rope`` and the in-place ``qk_norm_rope_``): every
backend against an independent float64 formula and against HF transformers' GLM-4.5 attention
itself (skipped where transformers is absent, as in CI); partial rotation really partial (two
sabotaged rotations must fail the oracle), the pass-through dims and position 0 exact, strided
q/k views into the fused QKV buffer, the in-place variant equal to the functional one, odd T,
GLM-4.5's 12/1 and 96/8 heads, GLM-4.5-Air without norm, out-of-range positions.
opcheck, torch.compile, the bad-input tables, empty and non-finite samples and backend agreement
are the generic contract tests (tests/test_contract.py, tables in glm45_ops/attention/rope_tables.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import device_backends
from glm45_ops import attention
from glm45_ops.attention.rope import heads_differ
from glm45_ops.attention.rope_tables import norm_weight, positions, qkv_buffer
from glm45_ops.reference import attention_rope as ref
from glm45_ops.reference.attention_rope import split_qkv
from glm45_ops.testing import assert_bit_equal, poisoned_outputs

BACKENDS = device_backends()
THETA = 1e6  # GLM-4.5's
MAX_POS = 64
EPS = 1e-5


def _inputs(t, hq, hk, d, dtype, gen, norm=(True, True), device="cpu"):
    """q, k, v views of one QKV buffer, the norm weights (or None) and random positions in [1, MAX_POS)."""
    q, k, v = split_qkv(qkv_buffer(t, hq, hk, d, dtype, gen, device), hq, hk)
    qw, kw = (norm_weight(d, dtype, gen, device) if n else None for n in norm)
    pos = torch.randint(1, MAX_POS, (t,), generator=gen).to(device)
    return q, k, v, qw, kw, pos


def oracle(x, w, pos, table, eps):
    """float64 RMSNorm and NeoX rotation of ``x`` ``[T, H, D]`` given the table's cos and sin."""
    h = x.double()
    if w is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    half = table.shape[1] // 2
    c, s = table[pos.long()].double()[:, None, :half], table[pos.long()].double()[:, None, half:]
    x1, x2 = h[..., :half], h[..., half : 2 * half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, h[..., 2 * half :]), dim=-1)


def oracle_differs(got, want64, dtype) -> str | None:
    """Within 4 dtype eps of each head's max |out|: two roundings in the norm (<= half an ulp
    each), both members of a rotated pair (|c|, |s| <= 1) and the output's own rounding."""
    tol = 4 * torch.finfo(dtype).eps * want64.abs().amax(-1, keepdim=True)
    err = (got.double().cpu() - want64).abs()
    bad = err > tol
    return None if not bool(bad.any()) else f"{int(bad.sum())} elements off, worst {float((err / tol).max()):.1f} x tol"


def check(device, backend, t, hq, hk, d, r, dtype, gen, norm=(True, True)):
    q, k, _, qw, kw, pos = _inputs(t, hq, hk, d, dtype, gen, norm, device)
    table = ref.cos_sin_cache(MAX_POS, r, THETA, device)
    with poisoned_outputs():
        q_out, k_out = attention.qk_norm_rope(q, k, qw, kw, pos, table, EPS, r, backend=backend)
    for name, got, x, w in (("q", q_out, q, qw), ("k", k_out, k, kw)):
        assert got.is_contiguous() and got.shape == x.shape and got.dtype == dtype
        why = oracle_differs(got, oracle(x.cpu(), None if w is None else w.cpu(), pos.cpu(), table.cpu(), EPS), dtype)
        assert why is None, f"{name} {backend}: {why}"
    return q, k, qw, kw, pos, table, q_out, k_out


# ---------------------------------------------------------------------------------------------
# Against the float64 formula
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("t,hq,hk,d,r,dtype,norm", [
    (7, 12, 1, 128, 64, torch.bfloat16, (True, True)),  # GLM-4.5 TP8
    (1, 12, 1, 128, 64, torch.bfloat16, (False, False)),  # GLM-4.5-Air TP8, decode
    (33, 2, 1, 64, 32, torch.float16, (True, False)),
    (5, 3, 3, 128, 128, torch.float32, (False, True)),  # full rotation
    (4, 2, 1, 64, 10, torch.bfloat16, (True, True)),  # halves of 5
])
def test_against_float64_formula(device, backend, t, hq, hk, d, r, dtype, norm, gen):
    check(device, backend, t, hq, hk, d, r, dtype, gen, norm)


def _rotate_all(x, w, pos, table, eps):
    """Sabotage 1: rotate all D dims (as if rotary_dim were ignored)."""
    full = ref.cos_sin_cache(MAX_POS, x.shape[-1], THETA)
    return oracle(x, w, pos, full, eps)


def _pair_across_head(x, w, pos, table, eps):
    """Sabotage 2: the right angles, but pair dim i with i + D/2 (the head's halves, not R's)."""
    d, half = x.shape[-1], table.shape[1] // 2
    perm = torch.cat((torch.arange(half), torch.arange(d // 2, d // 2 + half), torch.arange(half, d // 2),
                      torch.arange(d // 2 + half, d)))
    y = oracle(x[..., perm], w if w is None else w[perm], pos, table, eps)
    return y[..., perm.argsort()]


@pytest.mark.parametrize("sabotage", [_rotate_all, _pair_across_head])
def test_partial_rotation_sabotage_fails_the_oracle(sabotage, gen):
    """The oracle comparison used above catches a kernel that rotates the pass-through dims."""
    q, _, _, qw, _, pos = _inputs(5, 2, 1, 128, torch.bfloat16, gen)
    table = ref.cos_sin_cache(MAX_POS, 64, THETA)
    right = oracle(q, qw, pos, table, EPS)
    assert oracle_differs(right.to(torch.bfloat16), right, torch.bfloat16) is None
    assert oracle_differs(sabotage(q, qw, pos, table, EPS).to(torch.bfloat16), right, torch.bfloat16) is not None


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_pass_through_dims_and_position_zero_are_exact(device, backend, gen):
    """Dims [R, D) are the normed input, and position 0 (cos 1, sin 0) leaves the rotated dims
    equal to it too: bit for bit without the norm, NORM_TOL with it."""
    q, k, _, qw, _, pos = _inputs(6, 3, 2, 128, torch.bfloat16, gen, (True, False), device)
    pos[::2] = 0
    table = ref.cos_sin_cache(MAX_POS, 64, THETA, device)
    q_out, k_out = attention.qk_norm_rope(q, k, qw, None, pos, table, backend=backend)
    assert_bit_equal(k_out[..., 64:], k[..., 64:], "k pass-through")
    assert_bit_equal(k_out[::2], k[::2], "k at position 0")
    normed = ref.rms_norm_ref(q.cpu(), qw.cpu(), EPS)
    assert heads_differ(q_out[..., 64:].cpu(), normed[..., 64:], normed=True) is None
    assert heads_differ(q_out[::2].cpu(), normed[::2], normed=True) is None
    assert not torch.equal(k_out[1::2, :, :64], k[1::2, :, :64]), "positions > 0 rotate"


# ---------------------------------------------------------------------------------------------
# Against HF transformers (Glm4MoeRMSNorm, Glm4MoeRotaryEmbedding, apply_rotary_pos_emb)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers.models.glm4_moe.modeling_glm4_moe")


def hf_attention_prologue(hf, q, k, qw, kw, pos, rotary_dim):
    """HF GLM-4.5's q/k after q_norm/k_norm and apply_rotary_pos_emb, as [T, H, D]."""
    from transformers import Glm4MoeConfig

    d = q.shape[-1]
    cfg = Glm4MoeConfig(num_attention_heads=q.shape[1], num_key_value_heads=k.shape[1], head_dim=d,
                        partial_rotary_factor=rotary_dim / d, rope_theta=THETA, rms_norm_eps=EPS,
                        max_position_embeddings=MAX_POS)
    cos, sin = hf.Glm4MoeRotaryEmbedding(cfg)(q, pos[None])

    def norm(x, w):
        if w is None:
            return x
        layer = hf.Glm4MoeRMSNorm(d, eps=EPS).to(x.dtype)
        layer.weight.data.copy_(w)
        return layer(x)

    with torch.no_grad():
        hq, hk = (norm(x, w).transpose(0, 1)[None] for x, w in ((q, qw), (k, kw)))
        oq, ok = hf.apply_rotary_pos_emb(hq, hk, cos, sin)
    return oq[0].transpose(0, 1), ok[0].transpose(0, 1), cos[0], sin[0]


@pytest.mark.parametrize("norm", [(True, True), (False, False)], ids=["glm-4.5", "air"])
def test_cos_sin_cache_and_fp32_equal_hf_bit_for_bit(hf, norm, gen):
    """fp32: our table is HF's cos/sin and the whole op is HF's attention prologue, bit for bit."""
    q, k, _, qw, kw, pos = _inputs(9, 4, 2, 128, torch.float32, gen, norm)
    table = ref.cos_sin_cache(MAX_POS, 64, THETA)
    hq, hk, cos, sin = hf_attention_prologue(hf, q, k, qw, kw, pos, 64)
    assert_bit_equal(table[pos, :32], cos[:, :32], "cos")
    assert_bit_equal(table[pos, 32:], sin[:, :32], "sin")
    q_out, k_out = attention.qk_norm_rope(q, k, qw, kw, pos, table, EPS, 64, backend="torch")
    assert_bit_equal(q_out, hq, "q")
    assert_bit_equal(k_out, hk, "k")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_against_hf(hf, device, backend, dtype, gen):
    """bf16/fp16: the norm (the pass-through dims) is HF's bit for bit on the reference; the
    rotated dims differ from HF only by HF's extra roundings (cos and sin in the dtype, then
    each product and the sum): a couple of ulps of the head's largest value."""
    q, k, _, qw, kw, pos = _inputs(5, 12, 1, 128, dtype, gen)
    table = ref.cos_sin_cache(MAX_POS, 64, THETA)
    hq, hk, _, _ = hf_attention_prologue(hf, q, k, qw, kw, pos, 64)
    got = attention.qk_norm_rope(q.to(device), k.to(device), qw.to(device), kw.to(device), pos.to(device),
                                 table.to(device), EPS, 64, backend=backend)
    for g, want in zip(got, (hq, hk)):
        g = g.cpu()
        if backend == "torch":
            assert_bit_equal(g[..., 64:], want[..., 64:], "pass-through")
        else:
            assert heads_differ(g[..., 64:], want[..., 64:], normed=True) is None
        assert oracle_differs(g, want.double(), dtype) is None


# ---------------------------------------------------------------------------------------------
# Layouts: strided views, the in-place variant
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
def test_strided_views_equal_contiguous_copies(device, backend, gen):
    """q and k as views into the fused QKV buffer (and a head-strided view) give what their
    contiguous copies give, bit for bit, and leave the buffer unchanged."""
    qkv = qkv_buffer(7, 12, 1, 128, torch.bfloat16, gen, device, extra_cols=64)
    before = qkv.clone()
    q, k, _ = split_qkv(qkv, 12, 1)
    qw, kw = norm_weight(128, torch.bfloat16, gen, device), norm_weight(128, torch.bfloat16, gen, device)
    pos = positions(7, torch.int32, gen, device, MAX_POS)
    table = ref.cos_sin_cache(MAX_POS, 64, THETA, device)
    for qv, kv in ((q, k), (q[:, ::3], k)):
        got = attention.qk_norm_rope(qv, kv, qw, kw, pos, table, backend=backend)
        want = attention.qk_norm_rope(qv.contiguous(), kv.contiguous(), qw, kw, pos.long(), table, backend=backend)
        for g, w in zip(got, want):
            assert_bit_equal(g, w, f"{backend} view vs copy")
    assert_bit_equal(qkv, before, "the QKV buffer")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("hq,hk,d,r,norm", [(12, 1, 128, 64, (True, True)), (4, 2, 64, 22, (False, True))])
def test_in_place_equals_functional(device, backend, hq, hk, d, r, norm, gen):
    """``qk_norm_rope_`` writes exactly ``qk_norm_rope``'s outputs into the q and k columns of a
    row-strided QKV buffer; v and the columns past the width are untouched."""
    qkv = qkv_buffer(5, hq, hk, d, torch.bfloat16, gen, device, extra_cols=32)
    wide = qkv.as_strided((5, qkv.stride(0)), (qkv.stride(0), 1))
    before = wide.clone()
    q, k, v = split_qkv(qkv, hq, hk)
    qw, kw = (norm_weight(d, torch.bfloat16, gen, device) if n else None for n in norm)
    pos = positions(5, torch.int64, gen, device, MAX_POS)
    table = ref.cos_sin_cache(MAX_POS, r, THETA, device)
    want = attention.qk_norm_rope(q, k, qw, kw, pos, table, EPS, r, backend=backend)
    attention.qk_norm_rope_(qkv, qw, kw, pos, table, hq, hk, EPS, r, backend=backend)
    assert_bit_equal(q, want[0], "q columns")
    assert_bit_equal(k, want[1], "k columns")
    width = qkv.shape[1]
    assert_bit_equal(v, split_qkv(before[:, :width], hq, hk)[2], "v columns")
    assert_bit_equal(wide[:, width:], before[:, width:], "columns past the width")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_glm45_tp1_heads(device, backend, gen):
    """GLM-4.5 on one GPU: 96 q heads over 8 kv heads."""
    check(device, backend, 3, 96, 8, 128, 64, torch.bfloat16, gen)


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------

def test_positions_out_of_range_give_nan_rotated_dims(gen):
    """What the GPU computes (the CPU check refuses them): NaN in the rotated dims of that
    token, its pass-through dims still normed; the other tokens unaffected. The reference and the
    Triton kernel, called below the check."""
    from triton_ops import attention_rope as tr
    from triton_ops import triton_usable

    q, k, _, qw, kw, pos = _inputs(4, 2, 1, 128, torch.bfloat16, gen)
    pos[1], pos[3] = -1, MAX_POS
    table = ref.cos_sin_cache(MAX_POS, 64, THETA)
    want = ref.qk_norm_rope_ref(q, k, qw, kw, pos, table, EPS, 64)
    for out, x, w in zip(want, (q, k), (qw, kw)):
        assert out[[1, 3], :, :64].isnan().all() and not out[[0, 2]].isnan().any()
        assert_bit_equal(out[..., 64:], ref.rms_norm_ref(x, w, EPS)[..., 64:], "pass-through")
    if triton_usable(q.device):
        got = tuple(torch.empty(x.shape, dtype=x.dtype) for x in (q, k))
        tr.qk_norm_rope(q, k, qw, kw, pos, table, EPS, 64, *got)
        for g, w in zip(got, want):
            assert heads_differ(g, w, normed=True) is None


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_int32_and_int64_positions_agree(device, backend, gen):
    q, k, _, qw, kw, pos = _inputs(5, 2, 2, 64, torch.float16, gen, device=device)
    table = ref.cos_sin_cache(MAX_POS, 32, THETA, device)
    a = attention.qk_norm_rope(q, k, qw, kw, pos.int(), table, EPS, 32, backend=backend)
    b = attention.qk_norm_rope(q, k, qw, kw, pos.long(), table, EPS, 32, backend=backend)
    for x, y in zip(a, b):
        assert_bit_equal(x, y, "int32 vs int64 positions")
