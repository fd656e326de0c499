"""Build a :class:`LlamaModel`: random weights from a seed, or a local HF checkpoint.

Random weights use ``std = 1 / sqrt(fan_in)`` for every projection and unit
normal embeddings, so activations stay O(1) and attention is neither flat
nor one-hot: the KV cache shapes every token a random model generates,
which is what tests of KV memory need (HF's ``std = 0.02`` would leave the
attention nearly uniform and the model close to a bigram table).

Checkpoints load with no network: ``config.json`` and ``*.safetensors``
from a directory, parameters built on the meta device and assigned from the
files, so a model is held in memory once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvmem.engine.config import ModelConfig, preset
from kvmem.engine.model import LlamaModel, Rotary
from kvmem.errors import InvalidArgument


def random_model(
    config: ModelConfig | str = "tiny",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> LlamaModel:
    """A model with random weights drawn from ``seed`` (a preset name or a config)."""
    cfg = preset(config) if isinstance(config, str) else config
    if dtype is not None:
        cfg = cfg.with_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    model = LlamaModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model.to(device=device, dtype=cfg.dtype).eval()


_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> LlamaModel:
    """Load a local Llama/Mistral/Qwen2 checkpoint directory (config.json + safetensors)."""
    from safetensors.torch import load_file

    root = Path(path)
    if not root.is_dir():
        raise InvalidArgument(f"checkpoint directory {root} does not exist")
    cfg = ModelConfig.from_hf(root)
    if dtype is not None:
        cfg = cfg.with_dtype(dtype)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise InvalidArgument(f"no *.safetensors files in {root}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device=str(device)))
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    tied = cfg.tie_word_embeddings
    expected = {k for k in model.state_dict() if not (tied and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise InvalidArgument(
            f"checkpoint {root} does not match the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    state = {k: v.to(cfg.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = Rotary(cfg).to(device)
    return model.eval()


__all__ = ["load_model", "random_model"]
