"""Benchmark cases for the MoE family (``glm45_ops.moe``), at the preset's shapes.

* ``moe_route``: bf16 router logits ``[T, E]`` for every ``T`` in ``ctx.tokens``, with the fp32
  correction bias and the preset's top-k, grouping and scaling factor (GLM-4.5: E = 160, top-8,
  factor 2.5; the issue's targets are <= 3 us for T <= 64 and <= 10 us at T = 4096). Memory-bound:
  ``bytes_moved`` is the logits and the bias read once and the fp32 weights and int32 ids
  written once. Every backend must match the torch reference bit for bit. Peer: ``torch.compile``
  of the reference at the prefill T.
* ``moe_align_block_size``: the permutation of ``T x top-k`` ids at the block size the fused
  kernels use for that ``T``; bytes are the ids read and the static outputs written (SGLang's
  moe_align: 21 us at 4096 tokens x 256 experts x top-8).
* ``fused_moe``: the routed experts of one layer at TP1 (all ``E`` experts, ``I`` wide), TP8
  (``I/8``: 192 for GLM-4.5, the width vLLM's block-FP8 path refuses) and EP8 (``E/8`` local
  experts, full ``I``; the routing spreads over all ``E``, so a rank gets ``k/8`` of each token's
  slots on average), BF16 and FP8 blocks, for every ``T``. FLOPs count the pairs a rank computes
  (``6 H I`` each); ``bytes_moved`` counts the weights of the experts the case's routing hits (drawn on
  the CPU when the case is built, so the count is exact: ``experts_hit`` in its params) plus
  activations: decode is weight-bound (target >= 70% of
  HBM bandwidth), prefill FP8-compute-bound (target >= 1000 TFLOP/s and 1.3x the peer). Peer:
  ``torch._grouped_mm`` in BF16 over the same routing (sort, two grouped GEMMs, SwiGLU, weighted
  scatter), on a GPU; and ``fused_moe_grouped`` ("grouped GEMMs": the permutation, the grouped GEMM
  ops (CUTLASS on a GPU) and the combine), the candidate prefill path, which ``fused_moe`` adopts
  where this peer wins; and ``flashinfer`` (its CUTLASS fused MoE, BF16) where it imports.
* ``fused_moe +shared``: the shared expert fused as always-selected expert E (top-(k+1), weight 1)
  at TP8, against the peer "separate shared" (routed fused_moe, then the dense SwiGLU): which one
  ``MoE(fuse_shared=...)`` should default to is this case's GPU result.
* ``grouped_fp8_block_gemm`` / ``grouped_bf16_gemm``: one expert GEMM of a layer over
  expert-contiguous rows (``T x top-k`` routed rows, random routing), the gate_up GEMM
  (``N = 2 I``, ``K = H``) and the down GEMM (``N = H``, ``K = I``) at TP8 and EP8, for the
  prefill ``T`` and the largest decode ``T``. These are the building blocks of the large-``T``
  ``fused_moe`` path (permute, grouped GEMM, SwiGLU/quant, grouped GEMM, combine): ``fused_moe``
  switches its ``cuda`` path to them only once this case shows the CUTLASS kernels faster than the
  Triton ones. Peers: ``torch._grouped_mm`` in BF16 on the same groups (the FP8 case's operands
  dequantized first, so it times a BF16 GEMM of the same shape), and ``deep_gemm``'s contiguous
  grouped GEMM where it imports and N and K are multiples of 128.
"""

from __future__ import annotations

import functools

import torch

from glm45_ops import moe
from glm45_ops.bench.case import (BenchContext, Case, Skip, compile_peer, gpu_only, op_runner, peer_import, randn,
                                  smoke)
from glm45_ops.config import ModelConfig
from glm45_ops.reference import moe_routing as ref

FAMILY = "moe"
LOGITS_DTYPE = torch.bfloat16


def _route_args(cfg: ModelConfig) -> tuple:
    """moe_route's arguments after the tensors, from the preset."""
    return (cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)


def _route_compiled(device, gen, logits, bias, *, cfg: ModelConfig):
    k, n_group, topk_group, renorm, factor = _route_args(cfg)
    fn = compile_peer(functools.partial(ref.moe_route_ref, top_k=k, n_group=n_group, topk_group=topk_group,
                                        renormalize=renorm, routed_scaling_factor=factor), device)
    return smoke("torch.compile", lambda: fn(logits, bias))


def _route_case(cfg: ModelConfig, t: int, headline: bool) -> Case:
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok

    def inputs(device: torch.device, gen: torch.Generator):
        return randn((t, e), LOGITS_DTYPE, device, gen, std=2.0), randn((e,), torch.float32, device, gen, std=0.1)

    return Case(
        family=FAMILY,
        name=f"moe_route T={t}",
        shape=f"[{t}, {e}] {str(LOGITS_DTYPE).removeprefix('torch.')}, top-{k}",
        inputs=inputs,
        run=lambda backend, device, logits, bias: op_runner(moe.moe_route, backend, device, logits, bias,
                                                            *_route_args(cfg)),
        bytes_moved=t * e * LOGITS_DTYPE.itemsize + 4 * e + t * k * (4 + 4),
        peers={"torch.compile": functools.partial(_route_compiled, cfg=cfg)} if headline else {},
        params={"T": t, "E": e, "top_k": k, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
                "routed_scaling_factor": cfg.routed_scaling_factor},
    )


def _align_case(cfg: ModelConfig, t: int, block: int) -> Case:
    from glm45_ops.reference.moe import padded_size

    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok

    def inputs(device: torch.device, gen: torch.Generator):
        return (torch.rand((t, e), generator=gen, device=device).topk(k, dim=1).indices.to(torch.int32),)

    p = padded_size(t * k, e, block)
    return Case(
        family=FAMILY,
        name=f"moe_align_block_size T={t} block={block}",
        shape=f"ids [{t}, {k}] int32, E={e}",
        inputs=inputs,
        run=lambda backend, device, ids: op_runner(moe.moe_align_block_size, backend, device, ids, e, block),
        bytes_moved=4 * (t * k + p + p // block + 1),
        params={"T": t, "E": e, "top_k": k, "block_size": block},
    )


@functools.lru_cache(maxsize=None)
def _routing(t: int, e: int, k: int) -> torch.Tensor:
    """int32 ``[t, k]`` ids of ``k`` distinct experts of ``e`` per token, drawn on the CPU from a
    seed of the shape: the case knows exactly which experts its inputs hit (the bytes it must
    move) before any device has made them."""
    gen = torch.Generator().manual_seed(t * 1009 + e * 31 + k)
    return torch.rand((t, e), generator=gen).topk(k, dim=1).indices.to(torch.int32)


def _local(ids: torch.Tensor, local_e: int) -> torch.Tensor:
    """One rank's view of global ids under expert parallelism (rank 0 holds experts
    ``[0, local_e)``): the slots of other ranks' experts become -1 (skipped)."""
    return torch.where(ids < local_e, ids, -1)


def _hit(ids: torch.Tensor) -> int:
    """Distinct experts ``ids`` route to (-1 left out)."""
    return int(ids[ids >= 0].unique().numel())


def _layouts(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """``(name, local experts, intermediate)`` of one rank: TP1, TP8 and EP8."""
    e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
    return [("TP1", e, i), ("TP8", e, i // 8), ("EP8", e // 8, i)]


def _grouped_mm_peer(device, gen, x, w13, w2, wts, ids, *scales):
    """torch._grouped_mm in BF16 over the same routing (the FP8 cases' weights dequantized)."""
    gpu_only("torch._grouped_mm", device)
    if not hasattr(torch, "_grouped_mm"):
        raise Skip("torch._grouped_mm: not in this torch")
    if scales and scales[0] is not None:
        from glm45_ops import quant

        w13 = quant.dequant_fp8(w13, scales[0], 128, 128)
        w2 = quant.dequant_fp8(w2, scales[1], 128, 128)
    e, k, inter = w13.shape[0], ids.shape[1], w13.shape[1] // 2
    w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)

    def run():
        flat = ids.flatten().long()
        local = (flat >= 0) & (flat < e)
        key = torch.where(local, flat, e)
        order = torch.argsort(key, stable=True)
        offs = torch.cumsum(torch.bincount(key, minlength=e + 1)[:e], 0).to(torch.int32)
        a = x[order // k]
        gu = torch._grouped_mm(a, w13_t, offs=offs)
        y = torch._grouped_mm(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:], w2_t, offs=offs)
        y = y.float() * (wts.flatten()[order] * local[order])[:, None]
        out = torch.zeros(flat.numel(), x.shape[1], dtype=torch.float32, device=x.device).index_copy_(0, order, y)
        return out.view(-1, k, x.shape[1]).sum(1).to(x.dtype)

    return smoke("torch._grouped_mm", run)


def _flashinfer_peer(device, gen, x, w13, w2, wts, ids, *scales, num_experts: int):
    """FlashInfer's CUTLASS fused MoE (``flashinfer.fused_moe.cutlass_fused_moe``), BF16 only:
    its FP8 block-scale path takes another weight-scale layout and is not wired here. Its fc1 is
    ``[up; gate]`` (ours ``[gate; up]``: swapped once, untimed). Expert parallelism as it does
    it: ids are global, ``ep_size = E / E_local``, and this is rank 0, so our -1 slots become an
    id on another rank, which it skips as we do."""
    gpu_only("flashinfer", device)
    if scales and scales[0] is not None:
        raise Skip("flashinfer peer: BF16 weights only (its DeepSeek FP8 block-scale path is not wired)")
    fn = peer_import("flashinfer", "flashinfer.fused_moe", "cutlass_fused_moe")
    local_e, inter = w13.shape[0], w13.shape[1] // 2
    ep_size = num_experts // local_e
    ids_fi = torch.where(ids >= 0, ids, local_e).int().contiguous()  # expert local_e: rank 1's first
    w31 = w13.view(local_e, 2, inter, -1).flip(1).reshape(w13.shape).contiguous()

    def run():
        out = fn(x, ids_fi, wts.contiguous(), w31, w2, x.dtype, quant_scales=[], ep_size=ep_size, ep_rank=0)
        return out[0] if isinstance(out, (list, tuple)) else out

    return smoke("flashinfer", run)


def _grouped_path_peer(device, gen, *args):
    """fused_moe_grouped on the auto backend (CUDA: CUTLASS grouped GEMMs)."""
    gpu_only("grouped GEMMs", device)
    return smoke("grouped GEMMs", lambda: moe.fused_moe_grouped(*args))


def _fused_case(cfg: ModelConfig, t: int, layout: str, local_e: int, inter: int, fp8: bool) -> Case:
    from glm45_ops import quant

    h, e, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok

    # routed over all E experts: an EP8 rank computes the slots of its own (k/8 per token on average)
    local_ids = _local(_routing(t, e, k), local_e)

    def inputs(device: torch.device, gen: torch.Generator):
        x = randn((t, h), torch.bfloat16, device, gen, std=0.5)
        w13 = randn((local_e, 2 * inter, h), torch.bfloat16, device, gen, std=h**-0.5)
        w2 = randn((local_e, h, inter), torch.bfloat16, device, gen, std=inter**-0.5)
        ids = local_ids.to(device)
        wts = torch.rand((t, k), generator=gen, device=device)
        if not fp8:
            return x, w13, w2, wts, ids
        (q13, s13), (q2, s2) = quant.per_block_quant_fp8(w13), quant.per_block_quant_fp8(w2)
        return x, q13, q2, wts, ids, s13, s2

    pairs = int((local_ids >= 0).sum())
    hit = _hit(local_ids)  # the weights of exactly these experts are read
    wbytes = 1 if fp8 else 2
    return Case(
        family=FAMILY,
        name=f"fused_moe {layout} {'fp8' if fp8 else 'bf16'} T={t}",
        shape=f"x [{t}, {h}], {local_e} experts [2x{inter}, {h}], top-{k} of {e}",
        inputs=inputs,
        run=lambda backend, device, *args: op_runner(moe.fused_moe, backend, device, *args),
        bytes_moved=int(hit * 3 * inter * h * wbytes + 2 * t * h * 2),
        flops=int(6 * pairs * h * inter),
        roofline="memory" if t <= 64 else ("compute:fp8" if fp8 else "compute:bf16"),
        peers={"torch._grouped_mm": _grouped_mm_peer, "grouped GEMMs": _grouped_path_peer,
               "flashinfer": functools.partial(_flashinfer_peer, num_experts=e)},
        params={"T": t, "layout": layout, "E_local": local_e, "I": inter, "fp8": fp8, "experts_hit": hit, "pairs": pairs},
    )


def _shared_case(cfg: ModelConfig, t: int, inter: int, fp8: bool) -> Case:
    """Routed + shared expert of one layer: one fused_moe over E+1 experts, top-(k+1) with the
    shared expert always selected (ours), against routed fused_moe + the dense SwiGLU
    (``shared_expert``: cuBLAS for BF16, two fp8_linear for FP8) as the "separate shared" peer."""
    from glm45_ops import quant
    from glm45_ops.moe.layer import append_shared_routing, shared_expert

    h, e, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok

    def inputs(device: torch.device, gen: torch.Generator):
        x = randn((t, h), torch.bfloat16, device, gen, std=0.5)
        w13 = randn((e + 1, 2 * inter, h), torch.bfloat16, device, gen, std=h**-0.5)  # expert e: the shared one
        w2 = randn((e + 1, h, inter), torch.bfloat16, device, gen, std=inter**-0.5)
        wts, ids = append_shared_routing(torch.rand((t, k), generator=gen, device=device), _routing(t, e, k).to(device), e)
        if not fp8:
            return x, w13, w2, wts, ids
        (q13, s13), (q2, s2) = quant.per_block_quant_fp8(w13), quant.per_block_quant_fp8(w2)
        return x, q13, q2, wts, ids, s13, s2

    def separate(device, gen, x, w13, w2, wts, ids, s13=None, s2=None):
        cut = lambda v: None if v is None else v[:e]  # noqa: E731
        return lambda: (moe.fused_moe(x, w13[:e], w2[:e], wts[:, :k], ids[:, :k], cut(s13), cut(s2))
                        + shared_expert(x, w13[e], w2[e], None if s13 is None else s13[e],
                                        None if s2 is None else s2[e]))

    hit = _hit(_routing(t, e, k)) + 1
    return Case(
        family=FAMILY,
        name=f"fused_moe +shared TP8 {'fp8' if fp8 else 'bf16'} T={t}",
        shape=f"x [{t}, {h}], {e}+1 experts [2x{inter}, {h}], top-{k}+1",
        inputs=inputs,
        run=lambda backend, device, *args: op_runner(moe.fused_moe, backend, device, *args),
        bytes_moved=int(hit * 3 * inter * h * (1 if fp8 else 2) + 2 * t * h * 2),
        flops=int(6 * t * (k + 1) * h * inter),
        roofline="memory" if t <= 64 else ("compute:fp8" if fp8 else "compute:bf16"),
        peers={"separate shared": separate},
        params={"T": t, "E": e + 1, "I": inter, "fp8": fp8, "shared": "fused", "experts_hit": hit},
    )


def _grouped_mm_gemm_peer(device, gen, a, *rest):
    """torch._grouped_mm in BF16 over the same groups (FP8 operands dequantized first)."""
    gpu_only("torch._grouped_mm", device)
    if not hasattr(torch, "_grouped_mm"):
        raise Skip("torch._grouped_mm: not in this torch")
    if len(rest) == 2:
        b, offsets = rest
    else:
        from glm45_ops import quant

        a_scale, b, b_scale, offsets = rest[:4]
        a = (a.float() * a_scale.repeat_interleave(128, dim=1)[:, :a.shape[1]]).to(torch.bfloat16)
        b = quant.dequant_fp8(b, b_scale, 128, 128)
    b_t, ends = b.transpose(1, 2), offsets[1:]
    return smoke("torch._grouped_mm", lambda: torch._grouped_mm(a, b_t, offs=ends))


def deep_gemm_layout(offsets: torch.Tensor, rows: int, align: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's contiguous layout of ``rows`` expert-contiguous rows (groups ``offsets``
    ``[E + 1]``): ``(dst, m_indices)``, where row r goes to padded row ``dst[r]``, every group
    starts at a multiple of ``align``, and ``m_indices`` holds each padded row's group (-1:
    padding; at least ``align`` rows)."""
    counts = (offsets[1:] - offsets[:-1]).long()
    padded = (counts + align - 1) // align * align
    starts = torch.cumsum(padded, 0) - padded
    r = torch.arange(rows, device=offsets.device)
    group = torch.searchsorted(offsets[1:].long(), r, right=True)
    dst = starts[group] + r - offsets[:-1].long()[group]
    m_indices = torch.full((max(int(padded.sum()), align),), -1, dtype=torch.int32, device=offsets.device)
    m_indices[dst] = group.int()
    return dst, m_indices


def _deep_gemm_peer(device, gen, a, *rest):
    """DeepGEMM's contiguous grouped GEMM (``m_grouped_fp8_gemm_nt_contiguous`` /
    ``m_grouped_bf16_gemm_nt_contiguous``; the FP8 one is ``m_grouped_gemm_fp8_fp8_bf16_nt_contiguous``
    before DeepGEMM 2). Its layout pads every expert's rows to its M alignment (128) and marks
    the padding -1 in ``m_indices``; that copy is made here, untimed, so the timed call is its
    GEMM over the padded rows. It needs N and K multiples of 128 (GLM-4.5 at TP8 is not: the
    issue's point). Its output keeps the padded rows, so the refcheck says it differs."""
    gpu_only("deep_gemm", device)
    fp8 = len(rest) == 4
    b, offsets = (rest[1], rest[3]) if fp8 else rest
    n, k = b.shape[1], b.shape[2]
    if n % 128 or k % 128:
        raise Skip(f"deep_gemm needs N and K multiples of 128, got N={n}, K={k}")
    mod = peer_import("deep_gemm", "deep_gemm")
    names = ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous") if fp8 else \
        ("m_grouped_bf16_gemm_nt_contiguous",)
    fn = next((getattr(mod, x) for x in names if hasattr(mod, x)), None)
    align_fn = next((getattr(mod, x) for x in ("get_mk_alignment_for_contiguous_layout",
                                              "get_m_alignment_for_contiguous_layout") if hasattr(mod, x)), None)
    if fn is None or align_fn is None:
        raise Skip(f"deep_gemm: none of {', '.join(names)} in this version")
    dst, m_indices = deep_gemm_layout(offsets, a.shape[0], int(align_fn()))
    m_pad = m_indices.numel()
    # through uint8: index_copy_ has no fp8 kernel
    a_pad = torch.zeros((m_pad, a.shape[1]), dtype=a.dtype, device=device)
    a_pad.view(torch.uint8).index_copy_(0, dst, a.view(torch.uint8))
    d = torch.empty((m_pad, n), dtype=torch.bfloat16, device=device)
    if not fp8:
        return smoke("deep_gemm", lambda: fn(a_pad, b, d, m_indices) or d)
    a_s = torch.zeros((m_pad, rest[0].shape[1]), dtype=torch.float32, device=device).index_copy_(0, dst, rest[0])
    # its SM90 scale layout (MN-major, TMA-aligned) made once, untimed, so its call does not convert
    to_layout = next((getattr(mod, x) for x in ("get_mn_major_tma_aligned_tensor", "get_col_major_tma_aligned_tensor")
                      if hasattr(mod, x)), None)
    if to_layout is not None:
        a_s = to_layout(a_s)
    return smoke("deep_gemm", lambda: fn((a_pad, a_s), (b, rest[2]), d, m_indices) or d)


def _grouped_case(cfg: ModelConfig, t: int, layout: str, local_e: int, inter: int, which: str, fp8: bool) -> Case:
    from glm45_ops import quant

    h, e, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    n, kk = (2 * inter, h) if which == "w13" else (h, inter)

    local_ids = _local(_routing(t, e, k), local_e)  # EP: ids past local_e belong to other ranks
    offsets_cpu = moe.expert_offsets(local_ids, local_e)
    m = int(offsets_cpu[-1])  # the rows this rank's experts get

    def inputs(device: torch.device, gen: torch.Generator):
        offsets = offsets_cpu.to(device)
        a = randn((m, kk), torch.bfloat16, device, gen, std=0.5)
        b = randn((local_e, n, kk), torch.bfloat16, device, gen, std=kk**-0.5)
        if not fp8:
            return a, b, offsets
        a_q, a_s = quant.per_token_group_quant_fp8(a, 128)
        b_q, b_s = quant.per_block_quant_fp8(b)
        return a_q, a_s, b_q, b_s, offsets

    hit = _hit(local_ids)
    wbytes = 1 if fp8 else 2
    op = moe.grouped_fp8_block_gemm if fp8 else moe.grouped_bf16_gemm
    return Case(
        family=FAMILY,
        name=f"{op.__name__} {layout} {which} T={t}",
        shape=f"a [{m}, {kk}], {local_e} experts [{n}, {kk}] {'fp8' if fp8 else 'bf16'}",
        inputs=inputs,
        run=lambda backend, device, *args: op_runner(op, backend, device, *args),
        bytes_moved=int(hit * n * kk * wbytes + m * kk * wbytes + 2 * m * n),
        flops=2 * m * n * kk,
        roofline="memory" if t <= 64 else ("compute:fp8" if fp8 else "compute:bf16"),
        peers={"torch._grouped_mm": _grouped_mm_gemm_peer, "deep_gemm": _deep_gemm_peer},
        params={"T": t, "layout": layout, "gemm": which, "E_local": local_e, "M": m, "N": n, "K": kk, "fp8": fp8,
                "experts_hit": hit},
    )


def cases(ctx: BenchContext) -> list[Case]:
    cfg = ctx.model
    route = [_route_case(cfg, t, headline=i == 0) for i, t in enumerate(ctx.tokens)]
    route += [_align_case(cfg, t, 16 if t * cfg.num_experts_per_tok <= 512 else 64) for t in ctx.tokens]
    fused = [_fused_case(cfg, t, layout, local_e, inter, fp8)
             for layout, local_e, inter in _layouts(cfg) for fp8 in (True, False) for t in ctx.tokens]
    shared = [_shared_case(cfg, t, cfg.moe_intermediate_size // 8, fp8) for fp8 in (True, False) for t in ctx.tokens]
    grouped = [_grouped_case(cfg, t, layout, local_e, inter, which, fp8)
               for layout, local_e, inter in _layouts(cfg)[1:] for which in ("w13", "w2") for fp8 in (True, False)
               for t in (ctx.tokens[0], max(ctx.tokens[1:], default=ctx.tokens[0]))]
    return route + fused + shared + grouped
