"""``moe_align_block_size``: the device-side permutation the MoE GEMMs share (definition:
:mod:`glm45_ops.reference.moe`). Backends: torch (the reference), Triton (one program for decode
sizes; count, scan and scatter kernels over spans of pairs for prefill), CUDA
(``csrc/moe/align.cu``: one CTA for decode sizes, count + scatter over ranges for prefill), all
bit-exact and, on the GPU, free of host syncs."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from glm45_ops._registry import ErrorInput, Op, Sample
from glm45_ops.reference.moe import moe_align_block_size_ref, padded_size

MAX_EXPERTS = 1024  # the Triton kernel holds one counter per expert in registers
MAX_BLOCK_SIZE = 1024
NOT_HERE = -1  # a slot this rank does not compute (expert parallelism), as vLLM's expert_map marks it


def check_expert_ids(topk_ids: torch.Tensor, num_experts: int, what: str) -> None:
    """Every id is in ``[0, num_experts)`` or :data:`NOT_HERE`, checked where reading the values
    costs no host sync: real CPU tensors, eagerly. ``what`` names E in the message. On the GPU
    the kernels skip any other id as they skip -1 (an out-of-range id is never a weight index)."""
    if topk_ids.device.type != "cpu" or is_fake(topk_ids) or torch.compiler.is_compiling():
        return
    bad = (topk_ids < NOT_HERE) | (topk_ids >= num_experts)
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"topk_ids must be in [0, {what}) or -1 (a slot computed elsewhere: expert "
                         f"parallelism), got {int(topk_ids[tuple(where)])} at {where}")


def _check_align(topk_ids, num_experts, block_size):
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [T, k], got shape {tuple(topk_ids.shape)}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be in [1, {MAX_BLOCK_SIZE}], got {block_size}")
    if topk_ids.numel() >= 2**31 - num_experts * block_size:
        raise ValueError(f"topk_ids has too many entries for int32 positions: {topk_ids.numel()}")
    check_expert_ids(topk_ids, num_experts, f"num_experts={num_experts}")


def _alloc_align(topk_ids, num_experts, block_size):
    p = padded_size(topk_ids.numel(), num_experts, block_size)
    dev = topk_ids.device
    return (torch.empty(p, dtype=torch.int32, device=dev), torch.empty(p // block_size, dtype=torch.int32, device=dev),
            torch.empty(1, dtype=torch.int32, device=dev))


def _align_launch(outs, topk_ids, num_experts, block_size):
    from triton_ops import moe as tm

    tm.moe_align_block_size(topk_ids.contiguous(), num_experts, block_size, *outs)


def _align_samples(device, gen):
    def ids(t, k, e, not_here=0.0):
        """Ids in [0, e), a fraction ``not_here`` of them -1."""
        drawn = torch.randint(0, e, (t, k), generator=gen, dtype=torch.int32)
        return torch.where(torch.rand(t, k, generator=gen) < not_here, NOT_HERE, drawn).to(device)

    one_expert = torch.full((37, 8), 3, dtype=torch.int32, device=device)
    edges = ids(5, 8, 160, not_here=0.5)
    edges[0], edges[1] = NOT_HERE, 159  # a token computed elsewhere entirely; one all on the last expert
    return [
        Sample((ids(7, 8, 160), 160, 16)),
        Sample((ids(200, 8, 16).long(), 16, 64), note="int64 ids, many per expert"),
        Sample((one_expert, 8, 16), note="all tokens on one expert"),
        Sample((ids(9, 4, 8, not_here=0.4), 8, 4), note="-1 slots (other ranks' experts) left out"),
        Sample((ids(3, 2, 5), 5, 1)),
        Sample((torch.empty(0, 8, dtype=torch.int32, device=device), 160, 16), tag="empty"),
        Sample((edges, 160, 16), tag="nonfinite", note="the edge ids: -1 and E-1"),
        Sample((torch.full((3, 4), NOT_HERE, dtype=torch.int32, device=device), 16, 8), tag="nonfinite",
               note="every slot -1: no pair, no block"),
    ]


def _align_errors(device):
    ids = torch.zeros(4, 8, dtype=torch.int32, device=device)
    errors = [
        ErrorInput((ids.float(), 8), match="topk_ids must be int32 or int64"),
        ErrorInput((ids.view(-1), 8), match=r"topk_ids must be 2-D \[T, k\]"),
        ErrorInput((ids, 0), match=r"num_experts must be in \[1, 1024\]"),
        ErrorInput((ids, 2000), match=r"num_experts must be in \[1, 1024\]"),
        ErrorInput((ids, 8, 0), match=r"block_size must be in \[1, 1024\]"),
        ErrorInput((ids, 8.0), exc=TypeError, match="num_experts must be int", raw=False),
    ]
    if torch.device(device).type == "cpu":  # id values are checked only where that costs no host sync
        bad = ids.clone()
        bad[0, 5], bad[2, 0] = 8, -2
        errors += [
            ErrorInput((bad, 8), fake=False,
                       match=r"topk_ids must be in \[0, num_experts=8\) or -1 .*got 8 at \[0, 5\]"),
            ErrorInput((bad[1:].long(), 8), fake=False,
                       match=r"topk_ids must be in \[0, num_experts=8\) or -1 .*got -2 at \[1, 0\]"),
        ]
    return errors


_align_op = Op(
    "moe_align_block_size",
    "(Tensor topk_ids, int num_experts, int block_size=64) -> (Tensor, Tensor, Tensor)",
    check=_check_align,
    alloc=_alloc_align,
    torch_impl=moe_align_block_size_ref,
    triton_launch=_align_launch,
    samples=_align_samples,
    errors=_align_errors,
)

moe_align_block_size = _align_op.api(
    """Permute (token, slot) pairs into expert-contiguous segments padded to ``block_size``.

    ``topk_ids`` int32/int64 ``[T, k]`` -> ``sorted_ids`` int32 ``[P]`` (flat pair indices
    ``t*k + j``, ascending within each expert's segment, padding ``T*k``), ``block_expert`` int32
    ``[P / block_size]`` (each block's expert, -1 past the used ones) and ``num_padded`` int32
    ``[1]``, with ``P = T*k + E*(block_size-1)`` rounded up to ``block_size``: static shapes, no
    host sync (CUDA-graph safe). Ids are in ``[0, num_experts)`` or -1, a slot computed elsewhere
    (expert parallelism: another rank's expert), which is left out. Other ids raise ValueError
    for CPU tensors; on the GPU they are not checked (that would sync the host) and are left
    out like -1. Definition: :func:`glm45_ops.reference.moe.moe_align_block_size_ref`.
    """
)
