"""``attn_implementation="kvmem"``: transformers attention that reads KV where it lies.

Registered with transformers' ``AttentionInterface`` (and, as a mask that is
never built, with ``AttentionMaskInterface``) under the name ``"kvmem"``.
With a :class:`~kvmem.integrations.hf.KVMemCache`, a layer's forward is::

    cache.update(k, v, layer)     plans the step at layer 0; returns k, v unchanged
    kvmem_attention(...)          write_kv(new k, v) into the pages, then
                                  prefill (a prompt chunk) or decode (one token per row)
                                  straight from the pages: no dense copy of the cache

Padding needs no mask: each row's KV holds its real tokens only, and the
kernels are causal over them.
"""

from __future__ import annotations

from typing import Any

import torch

from kvmem.errors import InvalidArgument

from .cache import active_cache

NAME = "kvmem"


def kvmem_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` ``[B, heads, q, D]`` over a KVMemCache's pages.

    Returns ``([B, q, heads, D], None)`` (no attention weights).

    Raises InvalidArgument without a KVMemCache (``use_cache=False``, or
    another Cache class), with dropout, or with a sliding window the
    sequences have outgrown.
    """
    cache = active_cache(key)
    layer_idx = getattr(module, "layer_idx", None)
    if cache is None or cache._step is None or not isinstance(layer_idx, int):
        raise InvalidArgument(
            'attn_implementation="kvmem" needs a KVMemCache: pass cache=KVMemCache(...) '
            "(and use_cache=True)"
        )
    if dropout:
        raise InvalidArgument('attn_implementation="kvmem" is for inference: dropout must be 0')
    return cache.attend(layer_idx, query, key, value, scaling), None


def kvmem_mask(*args: Any, **kwargs: Any) -> None:
    """The mask for ``"kvmem"``: none (sequences hold no padding; the kernels are causal)."""
    return None


def register() -> None:
    """Register ``"kvmem"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, kvmem_attention)
    AttentionMaskInterface.register(NAME, kvmem_mask)
