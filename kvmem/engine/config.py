"""ModelConfig: the shape of a Llama-architecture model, from a preset or a HF config.json;
EngineConfig: everything else an engine is built from.

The presets build random-weight models small enough to run on two CPU
cores; ``from_hf`` reads the ``config.json`` of a local Llama, Mistral or
Qwen2 checkpoint (the fields those three share, plus Qwen2's q/k/v biases).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kvmem.errors import InvalidArgument

#: Byte-level vocabulary: 256 byte tokens, then BOS, EOS and PAD.
BYTE_VOCAB_SIZE = 259


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-architecture decoder (HF names in comments)."""

    vocab_size: int = BYTE_VOCAB_SIZE
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2  # num_hidden_layers
    num_heads: int = 4  # num_attention_heads
    num_kv_heads: int = 2  # num_key_value_heads
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    #: HF ``rope_scaling`` (``rope_type`` "default", "linear" or "llama3"), or None.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    bos_token_id: int | None = 256
    eos_token_ids: tuple[int, ...] = (257,)
    dtype: torch.dtype = torch.float32
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidArgument(f"ModelConfig.{name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise InvalidArgument(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise InvalidArgument(f"head_dim must be even for rotary, got {self.head_dim}")

    def with_dtype(self, dtype: torch.dtype) -> ModelConfig:
        """The same config computing in ``dtype``."""
        return replace(self, dtype=dtype)

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """Read a HF ``config.json`` (a path to it, its directory, or the parsed dict)."""
        if isinstance(source, dict):
            cfg = source
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise InvalidArgument(f"no config.json at {path}")
            cfg = json.loads(path.read_text())
        arch = " ".join(cfg.get("architectures") or [cfg.get("model_type", "")])
        known = ("Llama", "Mistral", "Qwen2", "llama", "mistral", "qwen2")
        if not any(k in arch for k in known):
            raise InvalidArgument(f"unsupported architecture {arch!r}; Llama-style models only")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        dtype = getattr(torch, str(dtype_name).replace("torch.", ""), torch.float32)
        model_type = str(cfg.get("model_type", ""))
        bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
        rope = dict(cfg.get("rope_parameters") or {})  # transformers >= 5 keeps theta here
        theta = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        scaling = cfg.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bias,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=dtype,
            extra={"model_type": model_type},
        )


#: Random-weight model sizes. ``tiny`` runs a step in milliseconds on two CPU cores.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "small": ModelConfig(
        hidden_size=128, intermediate_size=344, num_layers=4, num_heads=8, num_kv_heads=2
    ),
    "base": ModelConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
    ),
}


def preset(name: str) -> ModelConfig:
    """The config of a named size preset (``tiny``, ``small``, ``base``)."""
    if name not in PRESETS:
        raise InvalidArgument(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is built from, besides the model.

    ``backend`` and ``backend_options`` go to :func:`kvmem.create_allocator`
    (with ``num_tokens=num_kv_tokens`` and ``device``, by default the
    model's); ``policy`` and
    ``policy_options`` to :func:`~kvmem.engine.policies.make_policy`.
    ``max_model_len`` defaults to the model's context. ``attention_impl``
    (see :mod:`kvmem.attention`) is resolved once, when the engine is built. ``detokenize=False``
    skips text (and stop strings) for replay benchmarks. FP8 KV scales are calibrated from
    the first K/V each layer writes, times ``fp8_headroom`` (None: keep the spec's scales).
    ``role``: ``colocated`` (prefill and decode here), ``prefill`` (requests routed to a decode
    instance leave after their first token) or ``decode`` (takes requests in from prefill
    instances); see :mod:`kvmem.engine.roles`.
    """

    backend: str = "paged"
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    kv_format: str = "auto"
    num_kv_tokens: int = 16384
    device: str | None = None
    policy: str = "fcfs"
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 256
    chunked_prefill: bool = True
    preemption: str = "recompute"
    watermark: float = 0.01
    max_model_len: int | None = None
    attention_impl: str = "auto"
    fp8_headroom: float | None = 2.0
    seed: int = 0
    detokenize: bool = True
    finished_history: int = 100_000
    role: str = "colocated"

    def __post_init__(self) -> None:
        if self.role not in ("colocated", "prefill", "decode"):
            raise InvalidArgument(
                f"unknown engine role {self.role!r}; known: colocated, prefill, decode"
            )
