"""Expert parallelism: ``fused_moe`` with the experts sharded over a ``torch.distributed`` group.

Rank ``r`` of ``W`` holds experts ``[r*E/W, (r+1)*E/W)`` (``local_experts``) and its own tokens.
``ep_fused_moe`` computes, for every token ``t`` of every rank::

    partial_d[t] = fused_moe(x[t], experts of rank d, ids shifted into rank d's range)   (x's dtype)
    out[t]       = round_x(sum_{d = 0..W-1 ascending, d hit by t} partial_d[t])          (fp32 sum)

i.e. each rank's experts run once per token that routes to them, whatever the token's number of
slots there, and the partials are summed in rank order: deterministic, independent of timing and
of the other ranks' tokens. Against single-process ``fused_moe`` on all experts this regroups the
fp32 sum over the k slots by rank and, in bf16/fp16 (and the bf16 output of FP8 weights), rounds
each rank's partial once more: within ``fused_moe``'s own tolerance table
(``glm45_ops.moe.fused.SIMILARITY_LIMIT``). A token all of whose slots live on one rank gets
exactly that rank's ``fused_moe`` result. Ids are global, in ``[0, E)`` or -1 (a slot computed
nowhere, as in ``fused_moe``).

Protocol (three collectives, one host sync), per rank:

1. ``hit[t, d]``: token ``t`` has a slot on rank ``d``. One send row per ``(d, t)`` hit, sorted by
   ``d`` then ``t`` (a token goes to a rank once, not once per slot: GLM-4.5's top-8 of 160
   experts over 8 ranks, routed uniformly, sends ~5.3 rows per token instead of 8).
2. ``all_to_all_single`` of the per-rank row counts (int64 ``[W]``, on x's device).
3. The split sizes of ``all_to_all_single`` are Python lists, so the counts are read on the host
   here (the one sync: it stops CUDA-graph capture of the MoE layer).
4. ``all_to_all_single`` of the rows, each packed as bytes: ``x[t]``, then the k ids shifted into
   ``d``'s local range (-1 for slots on other ranks, so ``fused_moe`` skips them) as int32, then
   the k fp32 routing weights, padded to 16 bytes (the rows stay 16-byte aligned for the GEMMs).
   One message instead of three; bytes also carry dtypes gloo lacks.
5. ``fused_moe`` on the received rows with the local experts: one partial row per received row.
6. ``all_to_all_single`` of the partials back (splits swapped), arriving in the order sent.
7. ``index_add_`` of each rank's partials into an fp32 ``[T, H]`` in ascending rank order: a
   token occurs at most once per rank, so no two adds of one call meet (deterministic on GPU).

Where DeepEP slots in: its normal (high-throughput) kernels replace steps 1-4 and 6-7 one for one
(``get_dispatch_layout`` is step 1, ``dispatch`` steps 2-4 over NVLink/RDMA with the same host
read of the counts, ``combine`` steps 6-7), and can send x as FP8 with its 1 x 128 scales.
Its low-latency kernels remove step 3 altogether: every rank receives into fixed-size per-expert
buffers ``[E/W, W * max_tokens_per_rank, H]`` with the counts written on the device, so decode
runs without a host sync and can be captured in a CUDA graph; the expert GEMMs then run on that
masked per-expert layout instead of ``moe_align_block_size``'s permutation, and the combine
kernel sums the weighted outputs back per token. Neither is needed for gloo on CPU, which this
module also serves.

Collectives need every rank: a bad input raises ``ValueError`` on the rank that has it before any
communication, and the other ranks then wait in their collective until the group's timeout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from glm45_ops.moe.fused import _fused_op, check_fused_args, fused_moe
from glm45_ops.moe.permute import NOT_HERE, check_expert_ids
from glm45_ops.reference import cdiv

_ROW_ALIGN = 16  # bytes: x's part of a row is whole 16-byte chunks (H % 16 == 0), the metadata is padded to them


def local_experts(num_experts: int, group: dist.ProcessGroup | None = None) -> range:
    """The global ids of the experts this rank of ``group`` holds: ``[r*E/W, (r+1)*E/W)``.
    ``ValueError`` unless the group's size divides ``num_experts`` and this process is in it."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be int, got {type(num_experts).__name__}")
    if num_experts <= 0:
        raise ValueError(f"num_experts must be positive, got {num_experts}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("group must contain this process")
    if num_experts % world:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the group size ({world})")
    per_rank = num_experts // world
    return range(rank * per_rank, (rank + 1) * per_rank)


def ep_fused_moe(
    x: torch.Tensor,
    w13_local: torch.Tensor,
    w2_local: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    group: dist.ProcessGroup | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``fused_moe`` over the experts of every rank of ``group`` (NCCL on GPU, gloo on CPU),
    for this rank's tokens; a collective: every rank of the group calls it.

    ``x`` ``[T, H]`` (T may differ per rank, 0 included); ``w13_local`` ``[E/W, 2I, H]``,
    ``w2_local`` ``[E/W, H, I]`` (and FP8 scales) are this rank's experts ``local_experts(E,
    group)``; ``topk_weights`` fp32 and ``topk_ids`` ``[T, k]`` route to global expert ids in
    ``[0, num_experts)`` or -1 (skipped; other ids raise for CPU tensors and are skipped on the
    GPU, as in ``fused_moe``) -> ``[T, H]`` in x's dtype. Everything else
    (dtypes, H and I multiples of 16, FP8 blocks) is ``fused_moe``'s contract; ``backend`` is passed to it. The module
    docstring defines the result and the exchange (three ``all_to_all_single`` calls and one host
    read of the row counts, which this API's list-valued split sizes make unavoidable: DeepEP's
    low-latency kernels are what removes it).
    """
    experts = local_experts(num_experts, group)
    args = _fused_op.bind((x, w13_local, w2_local, topk_weights, topk_ids, w13_scale, w2_scale), {})
    check_fused_args(*args)
    check_expert_ids(topk_ids, num_experts, f"num_experts={num_experts}")
    world = dist.get_world_size(group)
    if w13_local.shape[0] != len(experts):
        raise ValueError(f"w13_local must hold this rank's {len(experts)} experts (num_experts {num_experts} over "
                         f"{world} ranks), got {w13_local.shape[0]}")
    per_rank = len(experts)
    t, h = x.shape
    k = topk_ids.shape[1]
    dev = x.device

    # 1. which ranks each token visits; world = "none" (-1, and on the GPU any id outside [0, E))
    ids = topk_ids.long()
    dest = torch.where((ids >= 0) & (ids < num_experts), ids // per_rank, world)
    hit = torch.zeros((t, world + 1), dtype=torch.bool, device=dev).scatter_(1, dest, True)[:, :world]
    send_counts = hit.sum(0)

    # 2-3. row counts, then the one host read
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = torch.stack([send_counts, recv_counts]).tolist()
    sent, received = sum(send_splits), sum(recv_splits)

    # 4. dispatch: rows sorted by destination, then token (nonzero's row-major order)
    d_idx, t_idx = torch.nonzero_static(hit.t(), size=sent).unbind(1)
    local_ids = torch.where(dest[t_idx] == d_idx[:, None], ids[t_idx] - d_idx[:, None] * per_rank, NOT_HERE)
    x_bytes = h * x.element_size()
    meta_bytes = cdiv(8 * k, _ROW_ALIGN) * _ROW_ALIGN
    send = torch.empty((sent, x_bytes + meta_bytes), dtype=torch.uint8, device=dev)
    send[:, :x_bytes] = x[t_idx].view(torch.uint8)
    send[:, x_bytes:x_bytes + 4 * k] = local_ids.to(torch.int32).view(torch.uint8)
    send[:, x_bytes + 4 * k:x_bytes + 8 * k] = topk_weights[t_idx].view(torch.uint8)
    send[:, x_bytes + 8 * k:] = 0  # no uninitialised memory on the wire
    recv = torch.empty((received, send.shape[1]), dtype=torch.uint8, device=dev)
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)

    # 5. the local experts on every received row (views into the packed rows: no copies)
    partial = fused_moe(recv[:, :x_bytes].view(x.dtype), w13_local, w2_local,
                        recv[:, x_bytes + 4 * k:x_bytes + 8 * k].view(torch.float32),
                        recv[:, x_bytes:x_bytes + 4 * k].view(torch.int32), w13_scale, w2_scale, backend=backend)

    # 6. partials back to their tokens' ranks
    back = torch.empty((sent, h), dtype=x.dtype, device=dev)
    dist.all_to_all_single(back, partial, send_splits, recv_splits, group=group)

    # 7. combine in ascending rank order
    out = torch.zeros((t, h), dtype=torch.float32, device=dev)
    start = 0
    for n in send_splits:
        out.index_add_(0, t_idx[start:start + n], back[start:start + n].float())
        start += n
    return out.to(x.dtype)
