"""The GLM-4.5 MoE layer: router, routed experts and the shared expert, BF16 or FP8 blocks.

``out = sum_j w[t,j] * expert_{id[t,j]}(x[t]) + shared(x[t])`` (KNOWLEDGE.md §4, transformers'
``Glm4MoeMoE``), with ``(w, id) = moe_route(x @ W_r^T)`` in fp32 and every expert a SwiGLU MLP.

The shared expert runs one of two ways:

* **fused** (:func:`fuse_shared_expert` + :func:`append_shared_routing`): appended as expert E,
  always selected with weight 1, so one ``fused_moe`` launch computes routed + shared (SGLang's
  E=161 top-9, which it turns off for GLM-4.5's 160 experts; here any E works). Decode then reads
  every weight in one kernel, and the sum is rounded once instead of twice.
* **separate** (:func:`shared_expert`): a dense SwiGLU, two GEMMs. BF16 uses torch matmuls: the
  shared expert is a dense layer that every token hits, so ``fused_moe`` with E=1 would only add
  a permutation that sorts nothing and padding to its block size, while cuBLAS has kernels tuned
  for these dense shapes. FP8 uses ``fp8_linear`` (1 x 128 activation quantization +
  ``fp8_block_gemm``). It rounds ``g`` and ``u`` (GEMM outputs) and the two partial sums, so it
  sits further from ``fused_moe``'s definition than the fused path (measured on the tests'
  shapes: DeepGEMM similarity ~2e-5 against ~1e-6 for FP8).

A shared expert wider than the routed ones (``n_shared_experts = S > 1``, intermediate ``S*I``)
is S experts of width I: SwiGLU acts element-wise on the intermediate, so splitting its gate/up
rows and down columns into S slices and summing the slices' outputs is the same function.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from glm45_ops._registry import Op
from glm45_ops.gemm import fp8_linear
from glm45_ops.moe.fused import _fused_op, fused_moe
from glm45_ops.moe.routing import route
from glm45_ops.quant import per_block_quant_fp8
from glm45_ops.reference import cdiv
from glm45_ops.reference.moe import QUANT_GROUP
from glm45_ops.reference.quant import FP8_DTYPE

__all__ = ["MoE", "append_shared_routing", "backend_for", "fuse_shared_expert", "shared_expert", "split_shared_expert"]


def _check_scales(weights: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor | None]) -> bool:
    """True for FP8 (every weight e4m3 with its fp32 scale), False for BF16 (no scale given)."""
    given = [n for n, s in scales.items() if s is not None]
    fp8 = [n for n, w in weights.items() if w.dtype == FP8_DTYPE]
    if given and len(given) != len(scales) or len(fp8) != (len(weights) if given else 0):
        raise ValueError(f"FP8 weights ({', '.join(weights)} float8_e4m3fn) come with every scale "
                         f"({', '.join(scales)}), BF16 weights with none: got e4m3 {fp8 or 'none'}, "
                         f"scales given {given or 'none'}")
    for name, s in scales.items():
        if s is not None and s.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {s.dtype}")
    return bool(given)


def split_shared_expert(
    shared_w13: torch.Tensor,
    shared_w2: torch.Tensor,
    inter: int,
    shared_w13_scale: torch.Tensor | None = None,
    shared_w2_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A shared expert of intermediate ``S * inter`` as S experts of width ``inter``.

    ``shared_w13`` ``[2*S*inter, H]`` (gate rows, then up rows), ``shared_w2`` ``[H, S*inter]``
    -> ``[S, 2*inter, H]``, ``[S, H, inter]`` (and their scale grids for FP8 blocks, which must
    then not straddle slices: ``inter % 128 == 0`` when S > 1). S = 1 is a view.
    """
    if shared_w13.dim() != 2 or shared_w2.dim() != 2:
        raise ValueError(f"shared_w13 must be [2I_s, H] and shared_w2 [H, I_s], got "
                         f"{tuple(shared_w13.shape)} and {tuple(shared_w2.shape)}")
    h, wide = shared_w2.shape
    if inter <= 0 or wide % inter or tuple(shared_w13.shape) != (2 * wide, h):
        raise ValueError(f"shared_w13 [2I_s, H] and shared_w2 [H, I_s] must agree with I_s a multiple of "
                         f"the expert width {inter}, got {tuple(shared_w13.shape)} and {tuple(shared_w2.shape)}")
    s = wide // inter
    fp8 = _check_scales({"shared_w13": shared_w13, "shared_w2": shared_w2},
                        {"shared_w13_scale": shared_w13_scale, "shared_w2_scale": shared_w2_scale})
    if s == 1:
        return (shared_w13.unsqueeze(0), shared_w2.unsqueeze(0),
                None if not fp8 else shared_w13_scale.unsqueeze(0), None if not fp8 else shared_w2_scale.unsqueeze(0))
    if fp8 and inter % QUANT_GROUP:
        raise ValueError(f"an FP8 shared expert {s} experts wide splits only along whole {QUANT_GROUP}-blocks; "
                         f"the expert width {inter} is not a multiple of {QUANT_GROUP}")

    def rows(w, n):  # [2*S*n, ...] (gate slices, then up slices) -> [S, 2n, ...]
        return w.reshape(2, s, n, *w.shape[1:]).transpose(0, 1).reshape(s, 2 * n, *w.shape[1:]).contiguous()

    def cols(w, n):  # [..., S*n] -> [S, ..., n]
        return w.reshape(w.shape[0], s, n).transpose(0, 1).contiguous()

    w13, w2 = rows(shared_w13, inter), cols(shared_w2, inter)
    if not fp8:
        return w13, w2, None, None
    nb = inter // QUANT_GROUP
    return w13, w2, rows(shared_w13_scale, nb), cols(shared_w2_scale, nb)


def fuse_shared_expert(
    w13: torch.Tensor,
    w2: torch.Tensor,
    shared_w13: torch.Tensor,
    shared_w2: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    shared_w13_scale: torch.Tensor | None = None,
    shared_w2_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The routed experts with the shared expert appended: ``fused_moe``'s weights for E + S experts.

    ``w13`` ``[E, 2I, H]``, ``w2`` ``[E, H, I]`` (and ``[E, ...]`` scale grids for FP8 blocks),
    ``shared_w13`` ``[2*S*I, H]``, ``shared_w2`` ``[H, S*I]`` (its scales ``[ceil(2SI/128),
    ceil(H/128)]``, ``[ceil(H/128), ceil(SI/128)]``) -> ``(w13, w2, w13_scale, w2_scale)`` with
    experts ``[E, E+S)`` the shared one (:func:`split_shared_expert`). Pair with
    :func:`append_shared_routing`. A copy: do it once at load time, not per step.
    """
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 must be [E, 2I, H] and w2 [E, H, I], got {tuple(w13.shape)} and {tuple(w2.shape)}")
    fp8 = _check_scales({"w13": w13, "w2": w2}, {"w13_scale": w13_scale, "w2_scale": w2_scale})
    parts = split_shared_expert(shared_w13, shared_w2, w2.shape[2], shared_w13_scale, shared_w2_scale)
    if fp8 != (parts[2] is not None):
        raise ValueError(f"the routed experts are {'FP8' if fp8 else 'BF16'} but the shared expert is "
                         f"{'FP8' if parts[2] is not None else 'BF16'}")
    routed = (w13, w2, w13_scale, w2_scale)
    for name, r, p in zip(("w13", "w2", "w13_scale", "w2_scale"), routed, parts):
        if r is not None and (r.shape[1:] != p.shape[1:] or r.dtype != p.dtype or r.device != p.device):
            raise ValueError(f"{name} {tuple(r.shape)} {r.dtype} on {r.device} and the shared expert's "
                             f"{tuple(p.shape[1:])} {p.dtype} on {p.device} do not stack")
    return tuple(None if r is None else torch.cat((r, p)) for r, p in zip(routed, parts))


def append_shared_routing(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, num_shared: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_weights`` ``[T, k]``, ``topk_ids`` ``[T, k]`` -> ``[T, k + S]`` with ids
    ``E .. E+S-1`` and weight 1.0 appended to every token: the shared expert, always selected,
    in :func:`fuse_shared_expert`'s layout. Device-side only (no host sync, CUDA-graph safe)."""
    if topk_weights.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights and topk_ids must be [T, k] of one shape, got "
                         f"{tuple(topk_weights.shape)} and {tuple(topk_ids.shape)}")
    if num_experts < 0 or num_shared < 1:
        raise ValueError(f"num_experts must be >= 0 and num_shared >= 1, got {num_experts} and {num_shared}")
    t = topk_ids.shape[0]
    ids = torch.arange(num_experts, num_experts + num_shared, dtype=topk_ids.dtype, device=topk_ids.device)
    ones = torch.ones((t, num_shared), dtype=topk_weights.dtype, device=topk_weights.device)
    return torch.cat((topk_weights, ones), 1), torch.cat((topk_ids, ids.expand(t, num_shared)), 1)


def shared_expert(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The shared expert as a dense SwiGLU: ``w2 @ (silu(g) * u)`` with ``[g; u] = w13 @ x``.

    ``x`` ``[..., H]``, ``w13`` ``[2I, H]``, ``w2`` ``[H, I]`` in x's dtype (torch matmuls), or
    e4m3 128 x 128 blocks with fp32 ``w13_scale`` ``[ceil(2I/128), ceil(H/128)]`` and
    ``w2_scale`` ``[ceil(H/128), ceil(I/128)]`` (x bf16; ``fp8_linear`` twice, ``backend`` picks
    its ops' backend) -> ``[..., H]`` in x's dtype. As in ``fused_moe``, SwiGLU is computed in
    fp32 and the intermediate rounded once into x's dtype; here ``g`` and ``u`` are also rounded
    (the GEMM's output dtype), one more rounding than the fused kernel.
    """
    if w13.dim() != 2 or w2.dim() != 2 or w13.shape[0] != 2 * w2.shape[1] or w13.shape[1] != w2.shape[0]:
        raise ValueError(f"w13 must be [2I, H] and w2 [H, I], got {tuple(w13.shape)} and {tuple(w2.shape)}")
    if x.shape[-1] != w13.shape[1]:
        raise ValueError(f"x [..., H={x.shape[-1]}] and w13 [2I, H={w13.shape[1]}] must share H")
    fp8 = _check_scales({"w13": w13, "w2": w2}, {"w13_scale": w13_scale, "w2_scale": w2_scale})
    if fp8:
        gu = fp8_linear(x, w13, w13_scale, backend=backend)
    else:
        if w13.dtype != x.dtype or w2.dtype != x.dtype:
            raise ValueError(f"w13 and w2 must have x's dtype {x.dtype} (or be float8_e4m3fn), "
                             f"got {w13.dtype} and {w2.dtype}")
        gu = F.linear(x, w13)
    g, u = gu.float().chunk(2, dim=-1)
    h = (F.silu(g) * u).to(x.dtype)
    return fp8_linear(h, w2, w2_scale, backend=backend) if fp8 else F.linear(h, w2)


def backend_for(op: Op, backend: str | None) -> str | None:
    """What a module asked for ``backend`` passes to ``op``: ``"cuda"`` becomes ``"auto"`` (the
    registry's choice: Triton on a GPU) for an op with no CUDA implementation at all, neither a
    C++ kernel nor a Python one (``fused_moe``); anything else is passed unchanged, so an op that
    has a C++ kernel still raises when the extension is missing rather than silently running
    another backend."""
    if backend == "cuda" and not op.has_cuda_kernel() and "cuda" not in op.impls:
        return "auto"
    return backend


class Router(torch.nn.Module):
    """GLM-4.5's router, named as transformers' ``Glm4MoeTopkRouter``: fp32 ``weight`` ``[E, H]``
    and the fp32 ``e_score_correction_bias`` ``[E]`` buffer (used for selection only)."""

    def __init__(self, num_experts: int, hidden_size: int, device: torch.device | str | None = None,
                 init: bool = True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32, device=device))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        if init:
            torch.nn.init.normal_(self.weight, std=hidden_size**-0.5)


class MoE(torch.nn.Module):
    """One GLM-4.5 MoE layer: ``forward(x [..., H]) -> [..., H]`` in x's dtype.

    ``config``: anything with ``hidden_size``, ``moe_intermediate_size`` (I), ``n_routed_experts``
    (E), ``num_experts_per_tok``, ``n_group``, ``topk_group``, ``norm_topk_prob``,
    ``routed_scaling_factor`` and ``n_shared_experts`` (S): a :mod:`glm45_ops.config` preset or
    transformers' ``Glm4MoeConfig``.

    Parameters: ``gate.weight`` fp32 ``[E, H]`` and buffer ``gate.e_score_correction_bias`` fp32
    ``[E]``; ``w13`` ``[E+S, 2I, H]`` and ``w2`` ``[E+S, H, I]`` in ``dtype``: the routed experts,
    then the shared expert (:func:`fuse_shared_expert`'s layout, stored once so both ways of
    running it read the same weights with no copy). :meth:`quantize_fp8` turns them into e4m3
    128 x 128 blocks with fp32 ``w13_scale`` / ``w2_scale`` buffers (``None`` for BF16).
    ``fuse_shared`` picks the fused (one ``fused_moe`` over E+S experts) or the separate shared
    expert; ``backend`` is passed to every op (None: the registry's choice), except that
    ``"cuda"`` gives ``fused_moe``, which has no CUDA kernel, ``"auto"`` (Triton on a GPU) while
    routing, quantization and the FP8 shared expert's GEMMs run their CUDA kernels
    (:func:`backend_for`). Weights are
    initialised at random (``load_hf_state_dict`` loads a checkpoint's); ``fp8=True`` allocates
    them as empty e4m3 blocks with their scale grids (to be loaded into, with no BF16 copy), and
    ``init=False`` leaves every weight uninitialised (``torch.empty``). Move it with
    ``.to(device)`` only: a dtype cast would also convert the fp32 router and the e4m3 weights.
    """

    w13_scale: torch.Tensor | None
    w2_scale: torch.Tensor | None

    def __init__(
        self,
        config: Any,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        fuse_shared: bool = True,
        backend: str | None = None,
        fp8: bool = False,
        init: bool = True,
    ):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.moe_intermediate_size
        self.num_experts = config.n_routed_experts
        self.num_shared = config.n_shared_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = float(config.routed_scaling_factor)
        self.fuse_shared = fuse_shared
        self.backend = backend
        h, i, n = self.hidden_size, self.intermediate_size, self.num_experts + self.num_shared
        self.gate = Router(self.num_experts, h, device, init=init)
        self.register_buffer("w13_scale", None)
        self.register_buffer("w2_scale", None)
        if fp8:  # allocated as e4m3 blocks to be loaded into: no BF16 copy of the experts ever exists
            g = QUANT_GROUP
            self.w13 = torch.nn.Parameter(torch.empty(n, 2 * i, h, dtype=FP8_DTYPE, device=device), requires_grad=False)
            self.w2 = torch.nn.Parameter(torch.empty(n, h, i, dtype=FP8_DTYPE, device=device), requires_grad=False)
            self.w13_scale = torch.empty(n, cdiv(2 * i, g), cdiv(h, g), dtype=torch.float32, device=device)
            self.w2_scale = torch.empty(n, cdiv(h, g), cdiv(i, g), dtype=torch.float32, device=device)
            return
        w13, w2 = torch.empty(n, 2 * i, h, device=device), torch.empty(n, h, i, device=device)
        if init:
            w13.uniform_(-(h**-0.5), h**-0.5)
            w2.uniform_(-(i**-0.5), i**-0.5)
        self.w13 = torch.nn.Parameter(w13.to(dtype))
        self.w2 = torch.nn.Parameter(w2.to(dtype))

    @property
    def is_fp8(self) -> bool:
        return self.w13_scale is not None

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, shared={self.num_shared}, top_k={self.top_k}, "
                f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"weights={'fp8 blocks' if self.is_fp8 else self.w13.dtype}, fuse_shared={self.fuse_shared}")

    @torch.no_grad()
    def quantize_fp8(self, eps: float = 1e-4) -> "MoE":
        """Quantize the expert weights to e4m3 in 128 x 128 blocks, per expert (the router stays
        fp32, as in FP8 checkpoints). In place; returns self."""
        if self.is_fp8:
            raise ValueError("the expert weights are already FP8")
        (q13, s13), (q2, s2) = (per_block_quant_fp8(w.data, QUANT_GROUP, eps, backend=self.backend)
                                for w in (self.w13, self.w2))
        self.w13 = torch.nn.Parameter(q13, requires_grad=False)
        self.w2 = torch.nn.Parameter(q2, requires_grad=False)
        self.w13_scale, self.w2_scale = s13, s2
        return self

    def forward(self, x: torch.Tensor, *, fuse_shared: bool | None = None) -> torch.Tensor:
        """``x`` ``[..., H]`` (x's dtype must be the weights', bf16 for FP8 weights) -> ``[..., H]``.
        ``fuse_shared`` overrides the module's choice for this call."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [..., H={self.hidden_size}], got shape {tuple(x.shape)}")
        fuse = self.fuse_shared if fuse_shared is None else fuse_shared
        x2 = x.reshape(-1, self.hidden_size)
        e, s = self.num_experts, self.num_shared
        weights, ids = route(x2, self.gate.weight, self.gate.e_score_correction_bias, self.top_k, self.n_group,
                             self.topk_group, self.norm_topk_prob, self.routed_scaling_factor, backend=self.backend)
        w13, w2, s13, s2 = self.w13, self.w2, self.w13_scale, self.w2_scale
        experts = backend_for(_fused_op, self.backend)
        if s and fuse:
            weights, ids = append_shared_routing(weights, ids, e, s)
            return fused_moe(x2, w13, w2, weights, ids, s13, s2, backend=experts).view(x.shape)
        routed = lambda t: None if t is None else t[:e]  # noqa: E731
        out = fused_moe(x2, routed(w13), routed(w2), weights, ids, routed(s13), routed(s2), backend=experts)
        for j in range(e, e + s):
            out = out + shared_expert(x2, w13[j], w2[j], None if s13 is None else s13[j],
                                      None if s2 is None else s2[j], backend=self.backend)
        return out.view(x.shape)

    @torch.no_grad()
    def load_hf_state_dict(self, sd: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """Load one layer's ``mlp`` weights from a transformers / GLM-4.5 checkpoint.

        Names under ``prefix`` (e.g. ``model.layers.3.mlp.``): ``gate.weight``,
        ``gate.e_score_correction_bias``, ``shared_experts.{gate,up,down}_proj.weight``, and the
        routed experts either per expert as checkpoint files store them
        (``experts.{e}.{gate,up,down}_proj.weight``, stacked here gate rows first, then up) or
        stacked as transformers >= 5 holds them in memory (``experts.gate_up_proj`` ``[E, 2I, H]``,
        ``experts.down_proj`` ``[E, H, I]``). An FP8 checkpoint (e4m3 ``*.weight`` with fp32
        ``*.weight_scale_inv``) loads into an FP8 module; its gate and up scale grids stack only
        when ``128 | I`` (the unsharded checkpoint). BF16/FP32 weights load into a BF16 module
        (cast to its dtype) or an FP8 one (quantized here). Missing or misshapen tensors raise
        ValueError naming them.
        """
        p = prefix if not prefix or prefix.endswith(".") else prefix + "."
        e, s, i, h = self.num_experts, self.num_shared, self.intermediate_size, self.hidden_size

        def get(name: str) -> torch.Tensor:
            if p + name not in sd:
                raise ValueError(f"sd lacks {p + name!r}")
            return sd[p + name]

        def scale(name: str) -> torch.Tensor | None:
            return sd.get(p + name + "_scale_inv")

        def gate_up(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
            """``name`` is a format string for ``{gate,up}_proj.weight``: gate rows, then up."""
            g, u = name.format("gate"), name.format("up")
            return torch.cat((get(g), get(u))), self._stack_scales(scale(g), scale(u))

        if p + "experts.gate_up_proj" in sd:
            w13, w2 = get("experts.gate_up_proj"), get("experts.down_proj")
            s13, s2 = scale("experts.gate_up_proj"), scale("experts.down_proj")
        else:
            routed = [gate_up(f"experts.{j}.{{}}_proj.weight") for j in range(e)]
            down = [f"experts.{j}.down_proj.weight" for j in range(e)]
            w13, w2 = torch.stack([w for w, _ in routed]), torch.stack([get(n) for n in down])
            s13 = None if routed[0][1] is None else torch.stack([sc for _, sc in routed])
            s2 = None if scale(down[0]) is None else torch.stack([scale(n) for n in down])
        if s:
            sh13, sh13_scale = gate_up("shared_experts.{}_proj.weight")
            down = "shared_experts.down_proj.weight"
            w13, w2, s13, s2 = fuse_shared_expert(w13, w2, sh13, get(down), s13, s2, sh13_scale, scale(down))
        for name, w, want in (("w13", w13, (e + s, 2 * i, h)), ("w2", w2, (e + s, h, i))):
            if tuple(w.shape) != want:
                raise ValueError(f"the checkpoint's experts stack to {name} {tuple(w.shape)}, the module needs {want}")
        if s13 is not None and not self.is_fp8:
            raise ValueError("sd holds FP8 expert weights but the module is BF16: call quantize_fp8() first")
        if s13 is None and self.is_fp8:
            (w13, s13), (w2, s2) = (per_block_quant_fp8(w.float(), QUANT_GROUP, backend=self.backend)
                                    for w in (w13, w2))
        dev = self.w13.device
        self.w13.data = w13.to(device=dev, dtype=self.w13.dtype)
        self.w2.data = w2.to(device=dev, dtype=self.w2.dtype)
        if self.is_fp8:
            self.w13_scale, self.w2_scale = s13.to(dev), s2.to(dev)
        self.gate.weight.copy_(get("gate.weight"))
        self.gate.e_score_correction_bias.copy_(get("gate.e_score_correction_bias"))

    def _stack_scales(self, gate: torch.Tensor | None, up: torch.Tensor | None) -> torch.Tensor | None:
        """Scale grids of separately quantized gate and up projections, as one ``[2I, H]`` weight's
        (None for BF16 weights)."""
        if (gate is None) != (up is None):
            raise ValueError("gate_proj and up_proj must both have a weight_scale_inv, or neither")
        if gate is None:
            return None
        if self.intermediate_size % QUANT_GROUP:
            raise ValueError(f"FP8 gate_proj and up_proj scale grids stack only when {QUANT_GROUP} divides I="
                             f"{self.intermediate_size} (their blocks would share rows otherwise): load the "
                             "unsharded checkpoint, or BF16 weights and quantize")
        return torch.cat((gate, up))
