"""The CUDA kernels of qk_norm_rope, qk_norm_rope_, kv_cache_write and qk_norm_rope_kv_write
(csrc/attention/qk_norm_rope.cu).

Without a GPU (the extension built): the C++ checks beyond the error tables that
tests/test_extension.py runs, through ``glm45_ops.testing.cuda_kernel_differs`` (Python's
ValueError word for word, or, for arguments Python accepts, only the device error).
On a GPU, for the CUDA and Triton backends: the reference at GLM-4.5 sizes (T = 1 ... 4097, 12/1
and 96/8 heads), the 16-byte and the unaligned (kV = 1) paths, in place, NaN rotated dims for
out-of-range positions and untouched caches for out-of-range slots (no host sync refuses them
there), and the fused op captured in a CUDA graph and replayed with new positions and slots.
"""

from __future__ import annotations

import pytest
import torch

import glm45_ops
from glm45_ops import attention
from glm45_ops.attention.rope import heads_differ
from glm45_ops.attention.rope_tables import norm_weight, positions, qkv_buffer
from glm45_ops.reference import attention_rope as ref
from glm45_ops.reference.attention_rope import FP8_DTYPE, split_qkv
from glm45_ops.testing import assert_bit_equal, cuda_kernel_differs, poisoned_outputs

NAMES = ("qk_norm_rope", "qk_norm_rope_", "kv_cache_write", "qk_norm_rope_kv_write")
OPS = {n: glm45_ops.registered_ops()[n] for n in NAMES}
gpu = pytest.mark.gpu
GPU_BACKENDS = ("cuda", "triton")
bf16 = torch.bfloat16


@pytest.fixture(scope="module")
def kernels():
    missing = [n for n, op in OPS.items() if not op.has_cuda_kernel()]
    if missing:
        pytest.skip(f"glm45_ops._C has no kernel for {missing} here")


# ---------------------------------------------------------------------------------------------
# No GPU needed: the C++ checks through the CUDA key
# ---------------------------------------------------------------------------------------------

def _rope_args(**changed):
    q, k = torch.zeros(3, 2, 128, dtype=bf16), torch.zeros(3, 1, 128, dtype=bf16)
    w = torch.ones(128, dtype=bf16)
    args = dict(q=q, k=k, q_norm_weight=w, k_norm_weight=w, positions=torch.zeros(3, dtype=torch.int64),
                cos_sin_cache=torch.zeros(8, 64), eps=1e-5, rotary_dim=64)
    return {**args, **changed}


def _kv_args(cache_dtype=bf16, **changed):
    k = torch.zeros(3, 2, 64, dtype=bf16)
    cache = torch.zeros(2, 4, 2, 64, dtype=cache_dtype)
    scale = torch.ones(2) if cache_dtype == FP8_DTYPE else None
    args = dict(k=k, v=k, k_cache=cache, v_cache=cache, slot_mapping=torch.zeros(3, dtype=torch.int32),
                k_scale=scale, v_scale=scale)
    return {**args, **changed}


CASES = [
    ("qk_norm_rope", _rope_args(eps=0.0)),
    ("qk_norm_rope", _rope_args(eps=float("nan"))),
    ("qk_norm_rope", _rope_args(q_norm_weight=None, k_norm_weight=None)),
    ("qk_norm_rope", _rope_args(rotary_dim=-2)),
    ("qk_norm_rope", _rope_args(rotary_dim=128, cos_sin_cache=torch.zeros(8, 128))),
    ("qk_norm_rope", _rope_args(rotary_dim=2, cos_sin_cache=torch.zeros(8, 2))),
    ("qk_norm_rope", _rope_args(q=torch.zeros(3, 2, 32, dtype=bf16), k=torch.zeros(3, 1, 32, dtype=bf16))),
    ("qk_norm_rope", _rope_args(k=torch.zeros(3, 0, 128, dtype=bf16))),
    ("qk_norm_rope", _rope_args(positions=torch.zeros(3, dtype=torch.int16))),
    ("qk_norm_rope", _rope_args(q_norm_weight=torch.ones(128, dtype=torch.float16))),
    ("qk_norm_rope", _rope_args(cos_sin_cache=torch.zeros(8, 128)[:, :64])),
    ("qk_norm_rope_", dict(qkv=torch.zeros(3, 6 * 64, dtype=torch.float16), q_norm_weight=None, k_norm_weight=None,
                           positions=torch.zeros(3, dtype=torch.int32), cos_sin_cache=torch.zeros(8, 64),
                           num_q_heads=4, num_kv_heads=1)),
    ("qk_norm_rope_", dict(qkv=torch.zeros(3, 6 * 96), q_norm_weight=None, k_norm_weight=None,
                           positions=torch.zeros(3, dtype=torch.int32), cos_sin_cache=torch.zeros(8, 64),
                           num_q_heads=4, num_kv_heads=1)),
    ("qk_norm_rope_", dict(qkv=torch.zeros(3, 6 * 64), q_norm_weight=None, k_norm_weight=None,
                           positions=torch.zeros(3, dtype=torch.int32), cos_sin_cache=torch.zeros(8, 64),
                           num_q_heads=-4, num_kv_heads=5)),
    ("kv_cache_write", _kv_args(FP8_DTYPE, k_scale=torch.ones(1).expand(2))),
    ("kv_cache_write", _kv_args(FP8_DTYPE, k=torch.zeros(3, 2, 64, dtype=torch.float16),
                                v=torch.zeros(3, 2, 64, dtype=torch.float16))),
    ("kv_cache_write", _kv_args(torch.float32)),
    ("kv_cache_write", _kv_args(FP8_DTYPE, v_scale=torch.ones(2, 1))),
    ("kv_cache_write", _kv_args(v_cache=torch.zeros(2, 4, 2, 64, dtype=FP8_DTYPE))),
    ("kv_cache_write", _kv_args(slot_mapping=torch.zeros(3, 1, dtype=torch.int32))),
    ("qk_norm_rope_kv_write", dict(**{k: v for k, v in _rope_args().items() if k not in ("eps", "rotary_dim")},
                                   v=torch.zeros(3, 1, 128, dtype=bf16),
                                   k_cache=torch.zeros(2, 4, 1, 128, dtype=FP8_DTYPE),
                                   v_cache=torch.zeros(2, 4, 1, 128, dtype=FP8_DTYPE),
                                   slot_mapping=torch.zeros(3, dtype=torch.int32), k_scale=torch.ones(1))),
    ("qk_norm_rope_kv_write", dict(**{k: v for k, v in _rope_args().items() if k not in ("eps", "rotary_dim")},
                                   v=torch.zeros(3, 1, 128, dtype=bf16),
                                   k_cache=torch.zeros(2, 4, 1, 128, dtype=bf16),
                                   v_cache=torch.zeros(2, 4, 1, 128, dtype=bf16),
                                   slot_mapping=torch.zeros(3, dtype=torch.int32), rotary_dim=7)),
]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_cpp_checks_beyond_the_error_tables(kernels, name, kwargs):
    why = cuda_kernel_differs(OPS[name], (), kwargs)
    assert why is None, why


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

def _rope_inputs(t, hq, hk, d, r, dtype, gen, norm=True, lead=0):
    """q, k, v views into a QKV buffer on the GPU whose rows start ``lead`` elements in (1: not
    16-byte aligned, the kV = 1 path), norm weights, positions, table."""
    buf = qkv_buffer(t, hq, hk, d, dtype, gen, "cuda", extra_cols=lead)
    qkv = buf.as_strided((t, (hq + 2 * hk) * d), buf.stride(), buf.storage_offset() + lead) if lead else buf
    q, k, v = split_qkv(qkv, hq, hk)
    qw, kw = (norm_weight(d, dtype, gen, "cuda") if norm else None for _ in "qk")
    return qkv, q, k, v, qw, kw, positions(t, torch.int64, gen, "cuda", 4096), ref.cos_sin_cache(4096, r, 1e6, "cuda")


def _check_outputs(got, q, k, qw, kw, pos, table, r):
    want = ref.qk_norm_rope_ref(*(x.cpu() if x is not None else None for x in (q, k, qw, kw, pos, table)), 1e-5, r)
    for name, g, w, wt in zip(("q_out", "k_out"), got, want, (qw, kw)):
        why = heads_differ(g.cpu(), w, wt is not None)
        assert why is None, f"{name}: {why}"


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("t", [1, 7, 127, 129, 4097])
@pytest.mark.parametrize("dtype", [bf16, torch.float16, torch.float32])
@pytest.mark.parametrize("norm", [True, False], ids=["glm-4.5", "air"])
def test_reference_at_glm45_tp8_sizes(backend, t, dtype, norm, gen):
    _, q, k, _, qw, kw, pos, table = _rope_inputs(t, 12, 1, 128, 64, dtype, gen, norm)
    with poisoned_outputs():
        got = attention.qk_norm_rope(q, k, qw, kw, pos, table, backend=backend)
    _check_outputs(got, q, k, qw, kw, pos, table, 64)


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("d,r,lead", [(128, 64, 0), (128, 64, 1), (64, 32, 1), (64, 22, 0), (128, 128, 3)])
def test_tp1_heads_aligned_and_unaligned(backend, d, r, lead, gen):
    qkv, q, k, v, qw, kw, pos, table = _rope_inputs(129, 96, 8, d, r, bf16, gen, lead=lead)
    got = attention.qk_norm_rope(q, k, qw, kw, pos, table, 1e-5, r, backend=backend)
    _check_outputs(got, q, k, qw, kw, pos, table, r)
    v_before = v.clone()
    attention.qk_norm_rope_(qkv, qw, kw, pos, table, 96, 8, 1e-5, r, backend=backend)
    assert_bit_equal(q, got[0], "in place: q")
    assert_bit_equal(k, got[1], "in place: k")
    assert_bit_equal(v, v_before, "in place: v")


@gpu
@pytest.mark.parametrize("backend", ["torch", *GPU_BACKENDS])
def test_out_of_range_positions_and_slots_on_the_gpu(backend, gen):
    _, q, k, v, qw, kw, pos, table = _rope_inputs(6, 12, 1, 128, 64, bf16, gen)
    pos[1], pos[4] = -3, 4096
    kc = torch.full((2, 16, 1, 128), 7.0, dtype=bf16, device="cuda")
    vc = kc.clone()
    slots = torch.tensor([0, 1, 32, -1, 2**40, 5], device="cuda")
    q_out, k_out = attention.qk_norm_rope_kv_write(q, k, v, qw, kw, pos, table, kc, vc, slots, backend=backend)
    for out in (q_out, k_out):
        assert out[[1, 4], :, :64].isnan().all() and not out[[0, 2, 3, 5]].isnan().any()
        assert not out[..., 64:].isnan().any()
    written = torch.zeros(32, dtype=torch.bool)
    written[[0, 1, 5]] = True
    for cache in (kc, vc):
        assert (cache.flatten(0, 1)[~written.cuda()] == 7.0).all()
    assert_bit_equal(vc[0, 5], v[5], "v at slot 5")
    assert_bit_equal(kc[0, 1], k_out[1], "k_out at slot 1 (NaN rotated dims)")


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cache_dtype,lead", [(bf16, 0), (FP8_DTYPE, 0), (bf16, 1), (FP8_DTYPE, 3)])
def test_kv_cache_write_paths(backend, cache_dtype, lead, gen):
    """Both kernel paths (a cache view 1 or 3 elements off 16 bytes takes kV = 1), bit for bit."""
    t, hk, d = 257, 8, 128
    _, k, v = split_qkv(qkv_buffer(t, 8, hk, d, bf16, gen, "cuda"), 8, hk)
    pages = 20
    buf = torch.full((2, pages * 16 * hk * d + lead), 3.0, device="cuda").to(cache_dtype)
    kc, vc = (b[lead:].view(pages, 16, hk, d) for b in buf)
    slots = torch.randperm(pages * 16, device="cuda")[:t]
    slots[::5] = -1
    fp8 = cache_dtype == FP8_DTYPE
    ks, vs = (torch.rand(hk, device="cuda") * 0.02 + 0.01 for _ in "kv") if fp8 else (None, None)
    want = [c.cpu() for c in (kc, vc)]
    ref.kv_cache_write_ref(k.cpu(), v.cpu(), *want, slots.cpu(), *(None if s is None else s.cpu() for s in (ks, vs)))
    attention.kv_cache_write(k, v, kc, vc, slots, ks, vs, backend=backend)
    assert_bit_equal(kc.cpu(), want[0], "k_cache")
    assert_bit_equal(vc.cpu(), want[1], "v_cache")


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fused_op_in_a_cuda_graph(backend, gen):
    """Captured once, replayed with new positions, slots and activations written into the static
    inputs: the same outputs and caches as eager calls (no host sync, no allocation that
    depends on values)."""
    t, hq, hk, d = 64, 12, 1, 128
    qkv, q, k, v, qw, kw, pos, table = _rope_inputs(t, hq, hk, d, 64, bf16, gen)
    kc, vc = (torch.zeros(8, 16, hk, d, dtype=FP8_DTYPE, device="cuda") for _ in "kv")
    ks, vs = (torch.rand(hk, device="cuda") * 0.02 + 0.01 for _ in "kv")
    slots = torch.randperm(128, device="cuda")[:t].int()

    def step():
        return attention.qk_norm_rope_kv_write(q, k, v, qw, kw, pos, table, kc, vc, slots, 1e-5, 64, ks, vs,
                                               backend=backend)

    step()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for _ in range(2):
        qkv.copy_(qkv_buffer(t, hq, hk, d, bf16, gen, "cuda"))
        pos.copy_(positions(t, torch.int64, gen, "cuda", 4096))
        slots.copy_(torch.randperm(128, device="cuda")[:t].int())
        kc.zero_(), vc.zero_()
        graph.replay()
        replayed = [x.clone() for x in (*static_out, kc, vc)]
        kc.zero_(), vc.zero_()
        eager = [*step(), kc, vc]
        for g, w, name in zip(replayed, eager, ("q_out", "k_out", "k_cache", "v_cache")):
            assert_bit_equal(g, w, f"graph replay vs eager: {name}")
