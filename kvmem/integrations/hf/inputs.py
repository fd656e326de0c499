"""What transformers hands a KVMemCache, checked and read: model shapes, positions, prompts."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from kvmem.allocator import KVAllocator
from kvmem.errors import InvalidArgument

UNKNOWN_TOKEN = 2**31 - 1
"""The token id recorded for tokens whose id the cache never sees (generated ones)."""

_ids = itertools.count()


def new_id() -> Hashable:
    """A fresh allocator sequence id for one batch row."""
    return ("hf", next(_ids))


def text_config(config: Any) -> Any:
    """The decoder's config (multimodal configs nest it)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def model_shape(config: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a config (InvalidArgument unless attention-only)."""
    cfg = text_config(config)
    try:
        layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    except (AttributeError, TypeError, ValueError) as e:
        raise InvalidArgument(f"cannot read the KV shape from the model config: {e}") from None
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise InvalidArgument(f"KVMemCache supports attention layers only, got {sorted(kinds)}")
    return layers, kv_heads, head_dim


def position_ids(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The step's position ids from what models pass to ``update`` (None if they pass none)."""
    inner = kwargs.get("kwargs")
    for d in (inner, kwargs, *(a for a in args if isinstance(a, dict))):
        if isinstance(d, dict):
            for name in ("position_ids", "cache_position"):
                p = d.get(name)
                if isinstance(p, torch.Tensor):
                    return p.reshape(1, -1) if p.dim() == 1 else p
    return None


def same_rows(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None) -> list[int]:
    """Per fresh row, the first row equal to it in layer-0 K, V and positions (itself if none).

    Layer-0 keys and values depend only on each token and its position, so
    rows equal there hold the same tokens: their KV is equal at every layer.
    """
    seen: dict[bytes, int] = {}
    out = []
    kc = k.detach().cpu().contiguous().view(torch.uint8)
    vc = v.detach().cpu().contiguous().view(torch.uint8)
    for i in range(k.shape[0]):
        key = kc[i].numpy().tobytes() + vc[i].numpy().tobytes()
        if pos is not None:
            key += pos[i].contiguous().numpy().tobytes()
        out.append(seen.setdefault(key, i))
    return out


def uses_rope(config: Any) -> bool:
    """Whether the model applies rotary position embeddings to its keys."""
    cfg = text_config(config)
    return any(
        getattr(cfg, a, None) is not None for a in ("rope_parameters", "rope_theta", "rope_scaling")
    )


def check_prompt(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` on the CPU, else InvalidArgument (bad ids, or not left padding)."""
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.is_floating_point()
    ):
        raise InvalidArgument("input_ids must be an int tensor [batch, length]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InvalidArgument("input_ids must not be empty")
    ids = input_ids.detach().cpu().long()
    if bool((ids < 0).any()) or bool((ids >= UNKNOWN_TOKEN).any()):
        raise InvalidArgument(f"token ids must lie in [0, {UNKNOWN_TOKEN})")
    if attention_mask is None:
        return ids, torch.ones_like(ids)
    mask = attention_mask.detach().cpu().long()
    if mask.shape != ids.shape or bool(((mask != 0) & (mask != 1)).any()):
        raise InvalidArgument("attention_mask must be 0/1 of the shape of input_ids")
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or bool((mask[:, -1] == 0).any()):
        raise InvalidArgument("only left padding is supported (the mask must be 0...0 1...1)")
    return ids, mask


def register_prompts(
    alloc: KVAllocator, toks: list[list[int]], pads: list[int]
) -> tuple[list[Hashable], list[int], int]:
    """Add one sequence per prompt; return ``(seq_ids, cached, present)`` (all or nothing).

    ``present`` is the padded column every row can start computing from:
    the least ``pad + cached`` over rows. A row whose cached prefix reaches
    past it is registered again with fewer tokens (page-aligned hits may
    then shrink further, so this repeats until every row agrees).
    """
    seqs = [new_id() for _ in toks]
    hits = [0] * len(toks)
    try:
        for i, (sid, t) in enumerate(zip(seqs, toks, strict=True)):
            hits[i] = alloc.add(sid, t)
        while True:
            h = min(p + c for p, c in zip(pads, hits, strict=True))
            over = [i for i, (p, c) in enumerate(zip(pads, hits, strict=True)) if p + c > h and c]
            if not over:
                return seqs, hits, h
            for i in over:
                alloc.free(seqs[i])
                want = max(0, h - pads[i])
                hits[i] = alloc.add(seqs[i], toks[i][: want + 1])
                if want + 1 < len(toks[i]):
                    alloc.append(seqs[i], toks[i][want + 1 :])
    except BaseException:
        for sid in seqs:
            if sid in alloc:
                alloc.free(sid)
        raise
