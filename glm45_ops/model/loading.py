"""Hugging Face checkpoints into :class:`~glm45_ops.model.Glm45ForCausalLM`, and in-place weight
updates from a trainer.

Names are transformers' ``Glm4MoeForCausalLM`` (and the released GLM-4.5 checkpoints'):
``model.embed_tokens.weight``, ``model.layers.{i}.{input_layernorm, post_attention_layernorm}.weight``,
``model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}``, ``...o_proj.weight``,
``...self_attn.{q,k}_norm.weight``, dense ``mlp.{gate,up,down}_proj.weight``, MoE ``mlp.gate.weight``,
``mlp.gate.e_score_correction_bias``, ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (or
transformers 5's stacked in-memory ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``),
``mlp.shared_experts.{gate,up,down}_proj.weight``, ``model.norm.weight``, ``lm_head.weight``; the MTP
block at ``model.layers.{num_hidden_layers}``: ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm`` and a decoder layer (its ``embed_tokens`` and ``shared_head.head`` duplicate the
main model's and are skipped). FP8 checkpoints add ``*.weight_scale_inv`` fp32 128 x 128 block
scales next to e4m3 ``*.weight``.

Every tensor is copied into a slice of an existing parameter (q/k/v rows of the fused
``qkv_proj``, gate/up rows of ``w13``, one expert of a stack), so CUDA graphs captured over the
model stay valid across :func:`load_weights`. A float tensor arriving for an FP8 parameter is
quantized (``per_block_quant_fp8``) into the slice and its scale rows: the online "BF16 training,
FP8 rollout" update.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from glm45_ops.model.config import Glm45Config
from glm45_ops.model.modeling import QUANT_BLOCK, DenseMLP, Glm45ForCausalLM, Linear
from glm45_ops.moe import MoE
from glm45_ops.quant import per_block_quant_fp8
from glm45_ops.reference.quant import FP8_DTYPE

__all__ = ["expected_names", "from_pretrained", "hf_state_dict", "load_weights", "read_checkpoint", "save_pretrained"]


@dataclass
class _Target:
    """Where one checkpoint tensor goes: ``weight`` (a view of a parameter) and, for FP8 linear
    weights, the view of the matching scale rows; ``fp8_scale`` marks a ``weight_scale_inv``."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    fp8_scale: bool = False


def _rows(t: torch.Tensor, lo: int, hi: int, block: bool = False) -> torch.Tensor:
    """Rows ``[lo, hi)`` of ``t`` (its last-but-one dim), in 128-row blocks when ``block``."""
    if block:
        lo, hi = lo // QUANT_BLOCK, -(-hi // QUANT_BLOCK)
    return t.narrow(-2, lo, hi - lo)


def _linear_target(lin: Linear, lo: int | None = None, hi: int | None = None) -> Callable[[str], _Target | None]:
    """Targets of ``{weight, bias, weight_scale_inv}`` for rows ``[lo, hi)`` of ``lin``."""
    def get(leaf: str) -> _Target | None:
        a, b = (0, lin.weight.shape[0]) if lo is None else (lo, hi)
        if leaf == "weight":
            scale = _rows(lin.weight_scale_inv, a, b, block=True) if lin.is_fp8 else None
            return _Target(_rows(lin.weight, a, b), scale)
        if leaf == "bias" and lin.bias is not None:
            return _Target(lin.bias.narrow(0, a, b - a))
        if leaf == "weight_scale_inv" and lin.is_fp8:
            return _Target(_rows(lin.weight_scale_inv, a, b, block=True), fp8_scale=True)
        return None
    return get


def _expert_target(moe: MoE, e: int, proj: str) -> Callable[[str], _Target | None]:
    """Targets of one expert's ``{gate,up,down}_proj.{weight,weight_scale_inv}``; expert ``E`` is
    the shared one (the stack's last)."""
    i = moe.intermediate_size
    w, s = (moe.w2, moe.w2_scale) if proj == "down" else (moe.w13, moe.w13_scale)
    lo, hi = {"gate": (0, i), "up": (i, 2 * i), "down": (0, moe.hidden_size)}[proj]

    def get(leaf: str) -> _Target | None:
        if leaf == "weight":
            return _Target(_rows(w[e], lo, hi), None if s is None else _rows(s[e], lo, hi, block=True))
        if leaf == "weight_scale_inv" and s is not None:
            return _Target(_rows(s[e], lo, hi, block=True), fp8_scale=True)
        return None
    return get


def _targets(model: Glm45ForCausalLM) -> dict[str, Callable[[str], _Target | None] | torch.Tensor]:
    """HF name (without the leaf for linear weights) -> parameter view or target function."""
    cfg = model.config
    out: dict[str, Callable[[str], _Target | None] | torch.Tensor] = {
        "model.embed_tokens.weight": model.embed_tokens.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head": _linear_target(model.lm_head),
    }
    layers = [(i, layer) for i, layer in enumerate(model.layers)]
    if model.mtp is not None:
        mtp, i = model.mtp, cfg.num_hidden_layers
        layers.append((i, mtp.layer))
        out.update({f"model.layers.{i}.enorm.weight": mtp.enorm.weight,
                    f"model.layers.{i}.hnorm.weight": mtp.hnorm.weight,
                    f"model.layers.{i}.shared_head.norm.weight": mtp.shared_head_norm.weight,
                    f"model.layers.{i}.eh_proj": _linear_target(mtp.eh_proj)})
    qs, ks = cfg.q_size, cfg.kv_size
    for i, layer in layers:
        p = f"model.layers.{i}."
        att = layer.self_attn
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        out[p + "self_attn.q_proj"] = _linear_target(att.qkv_proj, 0, qs)
        out[p + "self_attn.k_proj"] = _linear_target(att.qkv_proj, qs, qs + ks)
        out[p + "self_attn.v_proj"] = _linear_target(att.qkv_proj, qs + ks, qs + 2 * ks)
        out[p + "self_attn.o_proj"] = _linear_target(att.o_proj)
        if att.q_norm is not None:
            out[p + "self_attn.q_norm.weight"] = att.q_norm.weight
            out[p + "self_attn.k_norm.weight"] = att.k_norm.weight
        mlp = layer.mlp
        if isinstance(mlp, DenseMLP):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[p + "mlp." + proj] = _linear_target(getattr(mlp, proj))
        else:
            out[p + "mlp.gate.weight"] = mlp.gate.weight
            out[p + "mlp.gate.e_score_correction_bias"] = mlp.gate.e_score_correction_bias
            for e in range(mlp.num_experts):
                for proj in ("gate", "up", "down"):
                    out[f"{p}mlp.experts.{e}.{proj}_proj"] = _expert_target(mlp, e, proj)
            if mlp.num_shared:
                for proj in ("gate", "up", "down"):
                    out[f"{p}mlp.shared_experts.{proj}_proj"] = _expert_target(mlp, mlp.num_experts, proj)
    return out


# Names a checkpoint may hold that the model does not need.
_SKIP = re.compile(r"(rotary_emb\.inv_freq$)|(^model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight$)")
_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _split_stacked(name: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers 5 holds a layer's experts stacked (``experts.gate_up_proj`` ``[E, 2I, H]``,
    ``experts.down_proj`` ``[E, H, I]``): split them into per-expert names."""
    m = _STACKED.match(name)
    if m is None:
        yield name, t
        return
    base, kind = m.groups()
    for e in range(t.shape[0]):
        if kind == "down_proj":
            yield f"{base}.{e}.down_proj.weight", t[e]
        else:
            half = t.shape[1] // 2
            yield f"{base}.{e}.gate_proj.weight", t[e, :half]
            yield f"{base}.{e}.up_proj.weight", t[e, half:]


def _resolve(targets, name: str) -> _Target | None:
    got = targets.get(name)
    if isinstance(got, torch.Tensor):
        return _Target(got)
    if got is not None:
        return None
    stem, _, leaf = name.rpartition(".")
    fn = targets.get(stem)
    return fn(leaf) if callable(fn) else None


@torch.no_grad()
def _copy(name: str, src: torch.Tensor, dst: _Target, backend) -> None:
    w = dst.weight
    if tuple(src.shape) != tuple(w.shape):
        raise ValueError(f"{name}: shape {tuple(src.shape)} does not match the model's {tuple(w.shape)}")
    if dst.fp8_scale or w.dtype != FP8_DTYPE:
        if src.dtype == FP8_DTYPE and w.dtype != FP8_DTYPE:
            raise ValueError(f"{name} is float8_e4m3fn but the model holds it in {w.dtype}: call quantize_fp8_() "
                             "before loading an FP8 checkpoint")
        w.copy_(src.to(device=w.device))
    elif src.dtype == FP8_DTYPE:
        w.copy_(src.to(device=w.device))  # its weight_scale_inv arrives under its own name
    else:  # a float tensor for an FP8 weight: quantize_fp8_ made every slice start on a block boundary
        q, s = per_block_quant_fp8(src.to(device=w.device, dtype=torch.bfloat16), QUANT_BLOCK, backend=backend)
        w.copy_(q)
        dst.scale.copy_(s)


def load_weights(model: Glm45ForCausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Copy ``(hf_name, tensor)`` pairs into ``model``'s existing parameters, in place.

    Float tensors are cast to the parameter's dtype, or quantized to e4m3 blocks when the model
    is FP8 (the trainer's BF16 weights updating an FP8 rollout model); e4m3 tensors and their
    ``weight_scale_inv`` load as they are (an FP8 checkpoint, into an FP8 model). A name the model
    does not have, or a tensor of the wrong shape, raises ValueError naming it. Returns the
    names loaded (stacked expert tensors as their per-expert names)."""
    targets = _targets(model)
    loaded: set[str] = set()
    for name, tensor in weights:
        if _SKIP.search(name):
            continue
        for n, t in _split_stacked(name, tensor):
            dst = _resolve(targets, n)
            if dst is None:
                raise ValueError(f"{n}: the model has no such weight (or it is FP8-only and the model is not FP8)")
            _copy(n, t, dst, model.backend)
            loaded.add(n)
    return loaded


def expected_names(model: Glm45ForCausalLM) -> set[str]:
    """Every name a complete checkpoint for ``model`` must hold (``weight_scale_inv`` included
    when the model is FP8; the LM head not when the embeddings are tied)."""
    names = set()
    for key, target in _targets(model).items():
        if isinstance(target, torch.Tensor):
            names.add(key)
            continue
        for leaf in ("weight", "bias", "weight_scale_inv"):
            if target(leaf) is not None:  # weight_scale_inv only exists for FP8 weights
                names.add(f"{key}.{leaf}")
    if model.config.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


def hf_state_dict(model: Glm45ForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under their Hugging Face names (the inverse of :func:`load_weights`):
    per-expert and separate q/k/v, gate/up tensors, ``weight_scale_inv`` for FP8 weights, the MTP
    block at ``model.layers.{num_hidden_layers}`` (copies, contiguous)."""
    targets = _targets(model)
    return {n: _resolve(targets, n).weight.contiguous().clone() for n in sorted(expected_names(model))}


def save_pretrained(model: Glm45ForCausalLM, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> None:
    """Write ``config.json`` and the weights as safetensors under ``path``: one
    ``model.safetensors``, or shards of at most ``max_shard_bytes`` with a
    ``model.safetensors.index.json`` (as transformers lays out large checkpoints)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_hf_dict(), f, indent=2)
    sd = {k: v.cpu() for k, v in hf_state_dict(model).items()}
    if max_shard_bytes is None:
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def read_checkpoint(path: str | os.PathLike) -> tuple[list[str], Callable[[], Iterator[tuple[str, torch.Tensor]]]]:
    """The tensor names of a safetensors checkpoint directory (``model.safetensors``, or shards
    listed by ``model.safetensors.index.json``) and a generator over ``(name, tensor)``, one
    shard open at a time."""
    from safetensors import safe_open

    path = os.fspath(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        single = os.path.join(path, "model.safetensors")
        if not os.path.exists(single):
            raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
        files, weight_map = ["model.safetensors"], {}
    if not weight_map:
        with safe_open(os.path.join(path, files[0]), framework="pt") as f:
            weight_map = {k: files[0] for k in f.keys()}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            with safe_open(os.path.join(path, file), framework="pt") as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)
    return list(weight_map), tensors


def _progress(items: Iterable, total: int, enabled: bool, desc: str):
    """tqdm when installed, else a counter on stderr every 5%."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        step = max(total // 20, 1)
        for i, x in enumerate(items, 1):
            if i % step == 0 or i == total:
                print(f"\r{desc}: {i}/{total} tensors", end="\n" if i == total else "", file=sys.stderr, flush=True)
            yield x
        return
    yield from tqdm(items, total=total, desc=desc, unit="tensor")


def from_pretrained(cls, path, *, dtype: torch.dtype = torch.bfloat16, device=None, backend: str | None = None,
                    fuse_shared: bool = True, progress: bool = True) -> Glm45ForCausalLM:
    """Build ``cls`` from ``path/config.json`` and load its safetensors (single file or sharded).
    A checkpoint with ``*.weight_scale_inv`` tensors loads as FP8 (e4m3 weights as stored, never
    dequantized, into weights allocated as e4m3: no BF16 copy of them exists at any point, so
    GLM-4.5-Air-FP8 fits one H200; ``dtype`` must then be bfloat16). A checkpoint with no tensor under
    ``model.layers.{num_hidden_layers}`` (transformers' ``save_pretrained`` drops the MTP block)
    gives a model without the MTP layer. Any other missing tensor raises ValueError naming it; so
    does a misshapen or unknown one."""
    cfg = Glm45Config.from_hf_config(path)
    names, tensors = read_checkpoint(path)
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    if cfg.num_nextn_predict_layers and not any(n.startswith(mtp_prefix) for n in names):
        # transformers' save_pretrained drops the MTP block: a model without it, rather than an error.
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    fp8 = any(n.endswith(".weight_scale_inv") for n in names)
    # Weights allocated as they will be loaded (e4m3 blocks for an FP8 checkpoint), uninitialised.
    model = cls(cfg, dtype=dtype, device=device, backend=backend, fuse_shared=fuse_shared, fp8=fp8, init=False)
    want = expected_names(model)
    have = {n for name in names if not _SKIP.search(name)
            for n in ([name] if not _STACKED.match(name) else _stacked_names(name, model))}
    missing = sorted(want - have)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint {os.fspath(path)} lacks {missing[0]!r}{more}")
    model.load_weights(_progress(tensors(), len(names), progress, "loading"))
    return model


def _stacked_names(name: str, model: Glm45ForCausalLM) -> list[str]:
    base, kind = _STACKED.match(name).groups()
    e = model.config.n_routed_experts
    projs = ("down",) if kind == "down_proj" else ("gate", "up")
    return [f"{base}.{j}.{p}_proj.weight" for j in range(e) for p in projs]
