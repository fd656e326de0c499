"""A Llama-architecture decoder whose attention keeps its KV in a kvmem allocator.

The module tree and parameter names are Hugging Face's (``model.layers.0.
self_attn.q_proj.weight``, ...), so a Llama, Mistral or Qwen2 safetensors
checkpoint loads with ``load_state_dict`` (see :mod:`kvmem.engine.weights`).

One forward runs a flattened batch of new tokens from many sequences: rows
of prefill chunks and rows of decodes side by side, as a
:class:`~kvmem.layout.BatchLayout` describes them::

    input_ids  [ a0 a1 a2 a3 | b7 | c12 ]     positions [ 0 1 2 3 | 7 | 12 ]
    layout.query_start_loc = [0, 4, 5, 6]      (a: prefill chunk, b, c: decodes)

The forward pass plans the batch once on an
:class:`~kvmem.attention.AttentionBackend` (chosen once, by the engine or
from ``attention_impl``); each layer then writes its new K/V at
``layout.slot_mapping`` and attends (a decode kernel when every row is a
decode, else a causal prefill). The model is handed the layers' KV; it
never touches KV memory any other way.

Mistral's sliding window is not applied (attention is full); it only
matters beyond the window (4096 tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kvmem.attention import AttentionBackend, create_backend
from kvmem.engine.config import ModelConfig
from kvmem.errors import InvalidArgument
from kvmem.layout import BatchLayout
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV


class KVLayers(Protocol):
    """Anything that hands out per-layer KV storage (a :class:`~kvmem.allocator.KVAllocator`)."""

    def layer(self, i: int) -> LayerKV:
        """The KV storage of layer ``i``."""
        ...


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32 as HF does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies [head_dim / 2] and the cos/sin scale, per ``rope_scaling``."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(rs["factor"]), 1.0
    if kind == "llama3":
        factor = float(rs["factor"])
        lo, hi = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    raise InvalidArgument(f"unsupported rope_scaling type {kind!r} (default, linear, llama3)")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (HF's rotary convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Cos/sin tables for every position up to ``max_position_embeddings``."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv, scale = rope_inv_freq(cfg)
        pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` [N, Hq, D] and ``k`` [N, Hkv, D] by their positions [N]."""
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Attention(nn.Module):
    """Grouped-query attention over paged KV."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=b)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=b)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=b)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary,
        layer: LayerKV,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        """Write this step's K/V to ``layer``, attend over all of each sequence's KV."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        q, k = rotary(q, k, positions)
        out = attn.forward(q, k, v, layer)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention block then pre-norm MLP block, both residual."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, index)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary,
        layer: LayerKV,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        """One transformer block."""
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, layer, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = Rotary(cfg)


class LlamaModel(nn.Module):
    """A causal LM: ``model`` (the backbone) and ``lm_head``, with HF parameter names."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.attention_impl = "auto"
        self._attn: AttentionBackend | None = None
        self._attn_key: tuple[object, ...] = ()

    def kv_spec(self, kv_format: str = "auto", **options: object) -> KVSpec:
        """The KV cache this model needs, in ``kv_format``."""
        c = self.config
        return KVSpec(c.num_layers, c.num_kv_heads, c.head_dim, c.dtype, kv_format, **options)  # type: ignore[arg-type]

    def attention_backend(self, spec: KVSpec, impl: str | None = None) -> AttentionBackend:
        """An attention backend for this model over ``spec`` KV (``impl``: ``attention_impl``).

        Chosen once here (``auto`` resolved for the model's dtype and
        device); raises InvalidArgument when ``impl`` cannot take them.
        """
        w = self.lm_head.weight
        return create_backend(impl or self.attention_impl, spec, w.dtype, w.device)

    def _default_backend(self, spec: KVSpec) -> AttentionBackend:
        a, w = self._attn, self.lm_head.weight
        key = (self.attention_impl, spec, w.dtype, w.device)
        if a is None or self._attn_key != key:
            a = self._attn = self.attention_backend(spec)
            self._attn_key = key
        return a

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return self.lm_head.weight.device

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        layout: BatchLayout,
        kv: KVLayers | Sequence[LayerKV],
        logit_rows: torch.Tensor | None = None,
        attn: AttentionBackend | None = None,
    ) -> torch.Tensor:
        """Run the flattened batch; return float32 logits of ``logit_rows`` (default: every row).

        ``input_ids`` and ``positions`` are int64 [N], N = ``layout.num_tokens``.
        ``kv`` is the layers' KV storage (a list, one per layer) or anything
        with ``layer(i)``. The K/V of every row is written there at
        ``layout.slot_mapping``. ``attn`` is planned with ``layout`` once,
        then runs every layer; without it, a backend for ``attention_impl``
        is chosen on the first call and kept.
        """
        if input_ids.shape != positions.shape or input_ids.shape[0] != layout.num_tokens:
            raise InvalidArgument(
                f"{input_ids.shape[0]} tokens and {positions.shape[0]} positions "
                f"for a layout of {layout.num_tokens}"
            )
        if positions.numel() and int(positions.max()) >= self.config.max_position_embeddings:
            raise InvalidArgument(
                f"position {int(positions.max())} beyond the model's context "
                f"of {self.config.max_position_embeddings}"
            )
        m = self.model
        layers = (
            list(kv) if isinstance(kv, Sequence) else [kv.layer(i) for i in range(len(m.layers))]
        )
        if len(layers) != len(m.layers):
            raise InvalidArgument(f"{len(layers)} KV layers for a model of {len(m.layers)}")
        if attn is None:
            attn = self._default_backend(layers[0].spec)
        attn.plan(layout)
        x = m.embed_tokens(input_ids)
        for block, layer in zip(m.layers, layers, strict=True):
            x = block(x, positions, m.rotary_emb, layer, attn)
        if logit_rows is not None:
            x = x[logit_rows]
        return self.lm_head(m.norm(x)).float()


__all__ = ["KVLayers", "LlamaModel", "RMSNorm", "Rotary", "rope_inv_freq", "rotate_half"]
