"""GLM-4.5 assembled from ``glm45_ops`` ops: the library's end-to-end test and benchmark.

Every kernel-shaped step is one of our ops, with ``backend`` passed through: the fused q/k/v
projection (a plain matmul in BF16, :func:`glm45_ops.gemm.fp8_linear` in FP8), QK-Norm + partial
RoPE fused with the paged KV-cache write (:func:`glm45_ops.attention.qk_norm_rope_kv_write`) and
paged attention (:func:`~glm45_ops.attention.attention_paged`), or :func:`~glm45_ops.attention.qk_norm_rope`
and :func:`~glm45_ops.attention.attention_varlen` for a cache-less forward, the routed and shared
experts (:class:`glm45_ops.moe.MoE`: routing, ``fused_moe``), the dense SwiGLU's projections (the
same linear layers) and MTP verification (:mod:`glm45_ops.speculative`). What
is left in torch is elementwise: RMSNorm (HF numerics), the embedding, residual adds.

Layout of a forward: tokens are packed ``[T, ...]`` (``T = B * n`` for ``n`` new tokens per
sequence); a sequence's new tokens sit at positions ``start[b] .. start[b] + n - 1`` and attend
to the cache's ``[0, start[b] + n)``. ``start`` lives on the device, so sequences may have
different lengths (speculative decoding accepts different numbers of drafts per sequence) with
no host sync inside a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from glm45_ops import attention as attn_ops
from glm45_ops.gemm import fp8_linear
from glm45_ops.model.config import Glm45Config
from glm45_ops.moe import MoE
from glm45_ops.quant import per_block_quant_fp8
from glm45_ops.reference import cdiv
from glm45_ops.reference.quant import FP8_DTYPE

__all__ = ["Glm45ForCausalLM", "PagedKVCache"]

QUANT_BLOCK = 128


@dataclass(frozen=True)
class _Make:
    """How to allocate the weights: ``dtype`` and ``device``; ``fp8``: the linear and expert weights
    an FP8 checkpoint stores in e4m3 are allocated that way, empty, with their scale grids (so
    loading one never materialises a BF16 copy); ``init``: random weights, else ``torch.empty``."""

    dtype: torch.dtype
    device: torch.device | str | None
    fp8: bool = False
    init: bool = True


class RMSNorm(torch.nn.Module):
    """HF ``Glm4MoeRMSNorm`` numerics: normalise in fp32, cast back, then multiply by the weight."""

    def __init__(self, size: int, eps: float, mk: _Make):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=mk.dtype, device=mk.device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(torch.nn.Module):
    """``y = x @ W^T (+ b)``: ``W`` in the model's dtype, or e4m3 128 x 128 blocks with an fp32
    ``weight_scale_inv`` grid (an FP8 checkpoint's layout) after :meth:`quantize_fp8_`."""

    weight_scale_inv: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool, mk: _Make, fp8_capable: bool = True):
        super().__init__()
        self.register_buffer("weight_scale_inv", None)
        self.backend: str | None = None
        bias_dtype = torch.bfloat16 if mk.fp8 and fp8_capable else mk.dtype
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=mk.device),
                                       requires_grad=False) if bias else None
        if mk.fp8 and fp8_capable:
            self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=mk.device),
                                             requires_grad=False)
            self.weight_scale_inv = torch.empty(cdiv(out_features, QUANT_BLOCK), cdiv(in_features, QUANT_BLOCK),
                                                dtype=torch.float32, device=mk.device)
            return
        w = torch.empty(out_features, in_features, device=mk.device)
        if mk.init:
            w.normal_(std=in_features**-0.5)
        self.weight = torch.nn.Parameter(w.to(mk.dtype), requires_grad=False)

    @property
    def is_fp8(self) -> bool:
        return self.weight_scale_inv is not None

    @torch.no_grad()
    def quantize_fp8_(self) -> None:
        q, s = per_block_quant_fp8(self.weight.data.to(torch.bfloat16), QUANT_BLOCK, backend=self.backend)
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.weight_scale_inv = s
        if self.bias is not None:
            self.bias.data = self.bias.data.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_fp8:
            return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, backend=self.backend)
        return F.linear(x, self.weight, self.bias)


@dataclass
class PagedKVCache:
    """Paged K/V caches of every layer (the MTP layer last): ``k[l]``, ``v[l]`` ``[num_pages,
    page_size, Hk, D]``, and the ``block_table`` int32 ``[B, pages_per_seq]`` mapping each
    sequence's logical pages to physical ones (a random permutation, so a kernel that ignored the
    table would read another sequence's keys). Lengths are not stored: every step is told where
    its sequences start (see the module docstring)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_table: torch.Tensor
    page_size: int

    def slot_mapping(self, start: torch.Tensor, n: int) -> torch.Tensor:
        """int32 ``[B * n]`` cache slots of positions ``start[b] + j``, ``j < n``."""
        pos = start[:, None].long() + torch.arange(n, device=start.device)
        page = self.block_table.long().gather(1, pos // self.page_size)
        return (page * self.page_size + pos % self.page_size).flatten().to(torch.int32)


@dataclass
class _Step:
    """What attention needs for one packed forward: with ``cache`` None a cache-less causal pass
    over ``B`` sequences of ``n`` tokens (attention_varlen); otherwise the paged path."""

    n: int
    batch: int
    cache: PagedKVCache | None = None
    slots: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    _cu: torch.Tensor | None = None

    def cu_seqlens(self, device) -> torch.Tensor:
        """int32 ``[B + 1]`` query (and, cache-less, key) offsets: made once per forward, not per layer."""
        if self._cu is None:
            self._cu = torch.arange(self.batch + 1, device=device, dtype=torch.int32) * self.n
        return self._cu


class Attention(torch.nn.Module):
    def __init__(self, cfg: Glm45Config, layer_idx: int, mk: _Make):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias, mk)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, False, mk)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, mk) if cfg.use_qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, mk) if cfg.use_qk_norm else None
        self.eps, self.rotary_dim = cfg.rms_norm_eps, cfg.rotary_dim
        self.scale = cfg.head_dim**-0.5
        self.backend: str | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, step: _Step) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)
        # Strided views into the fused output: the kernels read q and k in place.
        q = qkv[:, :self.q_size].view(t, self.num_heads, d)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(t, self.num_kv_heads, d)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, d)
        qn, kn = (None, None) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
        cu = step.cu_seqlens(x.device)
        if step.cache is None:
            q, k = attn_ops.qk_norm_rope(q, k, qn, kn, positions, cos_sin, self.eps, self.rotary_dim,
                                         backend=self.backend)
            o = attn_ops.attention_varlen(q, k, v, cu, cu, step.n, step.n, self.scale, True, backend=self.backend)
        else:
            # One kernel: norm + RoPE on q and k, and the rotated k with v into the paged cache.
            kc, vc = step.cache.k[self.layer_idx], step.cache.v[self.layer_idx]
            q, _ = attn_ops.qk_norm_rope_kv_write(q, k, v, qn, kn, positions, cos_sin, kc, vc, step.slots, self.eps,
                                                  self.rotary_dim, backend=self.backend)
            o, _ = attn_ops.attention_paged(q, cu, kc, vc, step.cache.block_table, step.seq_lens, self.scale, True,
                                            max_seqlen_q=step.n, backend=self.backend)
        return self.o_proj(o.reshape(t, self.q_size))


class DenseMLP(torch.nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))``, the SwiGLU in fp32 and rounded once (as
    :func:`glm45_ops.moe.shared_expert`). Gate and up stay separate projections: GLM-4.5-Air's
    dense width 10944 is not a multiple of 128, so fused rows would share FP8 scale blocks."""

    def __init__(self, hidden: int, inter: int, mk: _Make):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, False, mk)
        self.up_proj = Linear(hidden, inter, False, mk)
        self.down_proj = Linear(inter, hidden, False, mk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj((F.silu(self.gate_proj(x).float()) * self.up_proj(x).float()).to(x.dtype))


class DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: Glm45Config, layer_idx: int, mk: _Make, fuse_shared: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, mk)
        self.self_attn = Attention(cfg, layer_idx, mk)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, mk)
        if layer_idx < cfg.first_k_dense_replace:
            self.mlp: torch.nn.Module = DenseMLP(cfg.hidden_size, cfg.intermediate_size, mk)
        else:
            if cfg.n_shared_experts > 1:
                raise ValueError(f"n_shared_experts must be 0 or 1, got {cfg.n_shared_experts}")
            self.mlp = MoE(cfg, dtype=mk.dtype, device=mk.device, fuse_shared=fuse_shared, fp8=mk.fp8, init=mk.init)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, step: _Step) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, cos_sin, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPLayer(torch.nn.Module):
    """GLM-4.5's multi-token-prediction block: ``h = eh_proj(cat(enorm(embed(next_token)),
    hnorm(hidden)))``, one MoE decoder layer, then ``shared_head.norm``; the embedding and LM head
    are the main model's."""

    def __init__(self, cfg: Glm45Config, layer_idx: int, mk: _Make, fuse_shared: bool):
        super().__init__()
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps, mk)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps, mk)
        self.eh_proj = Linear(2 * h, h, False, mk, fp8_capable=False)  # BF16 in FP8 checkpoints
        self.layer = DecoderLayer(cfg, layer_idx, mk, fuse_shared)
        self.shared_head_norm = RMSNorm(h, cfg.rms_norm_eps, mk)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                step: _Step) -> torch.Tensor:
        x = self.eh_proj(torch.cat((self.enorm(embeds), self.hnorm(hidden)), dim=-1))
        return self.shared_head_norm(self.layer(x, positions, cos_sin, step))


def _check_fp8(cfg: Glm45Config, dtype: torch.dtype) -> None:
    """FP8 weights need a bfloat16 model (FP8 GEMMs take bf16 activations), and the fused q/k/v
    rows and the experts' gate/up rows must split at 128-row block boundaries."""
    if dtype != torch.bfloat16:
        raise ValueError(f"FP8 weights need a bfloat16 model (FP8 GEMMs take bf16 activations), got {dtype}")
    for name, size in (("q width", cfg.q_size), ("kv width", cfg.kv_size),
                       ("moe_intermediate_size", cfg.moe_intermediate_size)):
        if size % QUANT_BLOCK:
            raise ValueError(f"FP8 needs {name} = {size} to be a multiple of {QUANT_BLOCK}")


class Glm45ForCausalLM(torch.nn.Module):
    """GLM-4.5 / GLM-4.5-Air (and any ``Glm4MoeForCausalLM``-shaped config) built from our ops.

    ``dtype``: bf16 (GPU) or fp32 (the CPU tests' exact comparisons with transformers); linear and
    expert weights become FP8 blocks with :meth:`quantize_fp8_`, or are allocated so (``fp8=True``,
    empty: what :meth:`from_pretrained` does for an FP8 checkpoint, so that no BF16 copy of them
    ever exists). ``init=False`` leaves the weights uninitialised (for loading). ``backend`` (None: the registry's choice per op, or ``torch``,
    ``triton``, ``cuda``) is passed to every op; set it any time with :attr:`backend`.
    ``fuse_shared``: run the shared expert inside ``fused_moe`` (see :class:`glm45_ops.moe.MoE`).

    Entry points: :meth:`forward` (logits of whole sequences), :meth:`extend` (paged incremental
    forward), :meth:`generate` (plain or MTP-speculative), :meth:`score` (per-token log-probs),
    :meth:`load_weights` (in-place update from a trainer's tensors), :meth:`from_pretrained`.
    """

    def __init__(self, config: Glm45Config, *, dtype: torch.dtype = torch.bfloat16, device=None,
                 backend: str | None = None, fuse_shared: bool = True, fp8: bool = False, init: bool = True):
        super().__init__()
        if config.num_nextn_predict_layers > 1:
            raise ValueError(f"num_nextn_predict_layers must be 0 or 1, got {config.num_nextn_predict_layers}")
        if fp8:
            _check_fp8(config, dtype)
        self.config = config
        self.dtype = dtype
        cfg, h = config, config.hidden_size
        mk = _Make(dtype, device, fp8, init)
        embed = torch.empty(cfg.vocab_size, h, dtype=dtype, device=device)
        if init:
            embed.normal_()
        self.embed_tokens = torch.nn.Embedding(cfg.vocab_size, h, _weight=embed, _freeze=True)
        self.layers = torch.nn.ModuleList(DecoderLayer(cfg, i, mk, fuse_shared) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps, mk)
        self.lm_head = Linear(h, cfg.vocab_size, False, mk, fp8_capable=False)  # BF16 in FP8 checkpoints
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = MTPLayer(cfg, cfg.num_hidden_layers, mk, fuse_shared) if cfg.num_nextn_predict_layers else None
        self.register_buffer("cos_sin_cache", attn_ops.cos_sin_cache(cfg.max_position_embeddings, cfg.rotary_dim,
                                                                    cfg.rope_theta, device), persistent=False)
        self.requires_grad_(False)
        self.backend = backend

    # -- configuration ------------------------------------------------------------------------

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self._backend = value
        for m in self.modules():
            if m is not self and hasattr(m, "backend"):
                m.backend = value

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def is_fp8(self) -> bool:
        return self.layers[0].self_attn.qkv_proj.is_fp8

    def _fp8_linears(self) -> list[Linear]:
        """Linear layers an FP8 checkpoint stores in e4m3: attention and dense MLP projections
        (the router, norms, embedding, LM head and MTP ``eh_proj`` stay BF16)."""
        layers = list(self.layers) + ([self.mtp.layer] if self.mtp is not None else [])
        out = []
        for layer in layers:
            out += [layer.self_attn.qkv_proj, layer.self_attn.o_proj]
            if isinstance(layer.mlp, DenseMLP):
                out += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        return out

    def _moes(self) -> list[MoE]:
        layers = list(self.layers) + ([self.mtp.layer] if self.mtp is not None else [])
        return [layer.mlp for layer in layers if isinstance(layer.mlp, MoE)]

    @torch.no_grad()
    def quantize_fp8_(self) -> "Glm45ForCausalLM":
        """Requantize the linear and expert weights to e4m3 128 x 128 blocks in place with
        ``per_block_quant_fp8`` (the RL "BF16 training, FP8 rollout" path); returns self. Needs a
        bf16 model; the fused q/k/v rows and the experts' gate/up rows must split at block
        boundaries (128 divides the q and kv widths and the expert intermediate size, as in GLM-4.5
        and Air; the dense MLP's width need not: Air's is 10944)."""
        if self.is_fp8:
            raise ValueError("the model is already FP8")
        _check_fp8(self.config, self.dtype)
        for lin in self._fp8_linears():
            lin.quantize_fp8_()
        for moe in self._moes():
            moe.quantize_fp8()
        return self

    # -- forward passes -----------------------------------------------------------------------

    def _hidden(self, x: torch.Tensor, positions: torch.Tensor, step: _Step) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, positions, self.cos_sin_cache, step)
        return self.norm(x)

    def _ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be an int32/int64 tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        return input_ids.to(self.device)

    def _final_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states ``[B * S, H]`` of whole sequences ``ids`` ``[B, S]`` (no cache)."""
        b, s = ids.shape
        positions = torch.arange(s, device=ids.device).repeat(b)
        return self._hidden(self.embed_tokens(ids.flatten()), positions, _Step(n=s, batch=b))

    def forward(self, input_ids: torch.Tensor, *, return_hidden: bool = False):
        """Logits ``[B, S, V]`` (the model's dtype) of whole sequences ``input_ids`` ``[B, S]``, with
        no cache (one ``attention_varlen`` per layer); ``return_hidden`` adds the final-normed
        hidden states ``[B, S, H]`` (the MTP layer's input)."""
        ids = self._ids(input_ids)
        b, s = ids.shape
        hidden = self._final_hidden(ids)
        logits = self.lm_head(hidden).view(b, s, -1)
        return (logits, hidden.view(b, s, -1)) if return_hidden else logits

    def new_cache(self, batch_size: int, max_seq_len: int, *, page_size: int = 16,
                  generator: torch.Generator | None = None) -> PagedKVCache:
        """Zeroed paged caches for ``batch_size`` sequences of up to ``max_seq_len`` tokens, every
        layer plus the MTP layer, pages assigned by a random permutation drawn from ``generator``."""
        cfg = self.config
        pages = -(-max_seq_len // page_size)
        n_layers = cfg.num_hidden_layers + (1 if self.mtp is not None else 0)
        shape = (batch_size * pages, page_size, cfg.num_key_value_heads, cfg.head_dim)
        dtype = torch.bfloat16 if self.is_fp8 else self.dtype
        perm = torch.randperm(batch_size * pages, generator=generator).to(self.device, torch.int32)
        return PagedKVCache(k=[torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)],
                            v=[torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)],
                            block_table=perm.view(batch_size, pages), page_size=page_size)

    def _paged_step(self, cache: PagedKVCache, start: torch.Tensor, b: int, n: int) -> tuple[torch.Tensor, _Step]:
        start = start.to(self.device, torch.int32)
        positions = (start[:, None] + torch.arange(n, device=self.device, dtype=torch.int32)).flatten()
        return positions, _Step(n=n, batch=b, cache=cache, slots=cache.slot_mapping(start, n),
                                seq_lens=start + n)

    def extend(self, input_ids: torch.Tensor, cache: PagedKVCache, start: torch.Tensor):
        """Paged incremental forward: ``input_ids`` ``[B, n]`` at positions ``start[b] .. start[b]+n-1``
        (``start`` int ``[B]`` on any device), their K/V written into ``cache``, attending to
        ``[0, start[b] + n)``. Returns logits ``[B, n, V]`` and final-normed hidden ``[B, n, H]``."""
        ids = self._ids(input_ids)
        b, n = ids.shape
        positions, step = self._paged_step(cache, start, b, n)
        hidden = self._hidden(self.embed_tokens(ids.flatten()), positions, step)
        return self.lm_head(hidden).view(b, n, -1), hidden.view(b, n, -1)

    def mtp_extend(self, next_ids: torch.Tensor, hidden: torch.Tensor, cache: PagedKVCache, start: torch.Tensor):
        """The MTP layer at positions ``start[b] + j``: each consumes the token at the next position
        (``next_ids`` ``[B, n]``) and the hidden state at its own (``hidden`` ``[B, n, H]``, the main
        model's final-normed one, or the MTP layer's own output when drafting further ahead).
        Returns logits ``[B, n, V]`` (through ``shared_head.norm`` and the shared LM head: at every
        draft step) and the ``shared_head.norm`` output ``[B, n, H]``."""
        if self.mtp is None:
            raise ValueError("this model has no MTP layer (num_nextn_predict_layers = 0)")
        ids = self._ids(next_ids)
        b, n = ids.shape
        positions, step = self._paged_step(cache, start, b, n)
        out = self.mtp(self.embed_tokens(ids.flatten()), hidden.reshape(b * n, -1), positions, self.cos_sin_cache, step)
        return self.lm_head(out).view(b, n, -1), out.view(b, n, -1)

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, speculative: str | None = None,
                 num_draft_tokens: int = 1, generator: torch.Generator | None = None, return_stats: bool = False,
                 cuda_graph: bool = False):
        """Autoregressive generation; see :func:`glm45_ops.model.generate.generate`."""
        from glm45_ops.model.generate import generate

        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        speculative=speculative, num_draft_tokens=num_draft_tokens, generator=generator,
                        return_stats=return_stats, cuda_graph=cuda_graph)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor = 1.0,
              *, return_entropy: bool = False):
        """Per-token log-probabilities fp32 ``[B, S]`` of ``labels`` ``[B, S]`` under the model's
        next-token distributions at ``input_ids``'s positions, ``softmax(logits / temperature)``
        (a number, or fp32 ``[B * S]`` per position; the sampler's meaning, see
        :func:`glm45_ops.rollout.token_logprobs`). The LM head runs fused with the log-softmax
        (:func:`glm45_ops.rollout.linear_logprobs`): no ``[B, S, V]`` logits are made. Labels
        ``< 0`` (ignored positions, e.g. -100) give 0. ``return_entropy`` adds the entropies."""
        from glm45_ops.rollout import linear_logprobs

        ids = self._ids(input_ids)
        labels = labels.to(ids.device)
        if tuple(labels.shape) != tuple(ids.shape):
            raise ValueError(f"labels must have input_ids' shape {tuple(ids.shape)}, got {tuple(labels.shape)}")
        weight = self.lm_head.weight
        logprobs, entropy = linear_logprobs(self._final_hidden(ids), weight, labels.clamp(min=0).flatten(), temperature,
                                            backend=self.backend)
        keep = labels >= 0
        logprobs = torch.where(keep, logprobs.view(ids.shape), torch.zeros((), device=ids.device))
        if not return_entropy:
            return logprobs
        return logprobs, torch.where(keep, entropy.view(ids.shape), torch.zeros((), device=ids.device))

    # -- weights ------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy ``(hf_name, tensor)`` pairs into the existing parameters (see
        :func:`glm45_ops.model.loading.load_weights`); returns the names loaded."""
        from glm45_ops.model.loading import load_weights

        return load_weights(self, weights)

    def save_pretrained(self, path, *, max_shard_bytes: int | None = None) -> None:
        """Write a Hugging Face checkpoint directory (see :func:`glm45_ops.model.loading.save_pretrained`)."""
        from glm45_ops.model.loading import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype = torch.bfloat16, device=None, backend: str | None = None,
                        fuse_shared: bool = True, progress: bool = True) -> "Glm45ForCausalLM":
        """Load a Hugging Face ``Glm4MoeForCausalLM`` checkpoint directory (see
        :func:`glm45_ops.model.loading.from_pretrained`)."""
        from glm45_ops.model.loading import from_pretrained

        return from_pretrained(cls, path, dtype=dtype, device=device, backend=backend, fuse_shared=fuse_shared,
                               progress=progress)
