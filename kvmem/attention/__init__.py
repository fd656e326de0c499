"""Attention over kvmem's paged KV: ``write_kv``, ``decode``, ``prefill``, ``merge_states``.

Every function takes ``impl=`` to pick an implementation; today
``"reference"`` (torch, any dtype, the test oracle) is the only one and
``"auto"`` resolves to it.
"""

from __future__ import annotations

from typing import Any

import torch

from kvmem.attention import reference
from kvmem.errors import InvalidArgument
from kvmem.layout import BatchLayout
from kvmem.storage import LayerKV

IMPLS = ("auto", "reference")


def _impl(name: str) -> Any:
    if name in ("auto", "reference"):
        return reference
    raise InvalidArgument(f"unknown attention implementation {name!r}; known: {', '.join(IMPLS)}")


def write_kv(
    layer: LayerKV, layout: BatchLayout, k: torch.Tensor, v: torch.Tensor, impl: str = "auto"
) -> None:
    """Quantize and store new K/V ``[num_tokens, kv_heads, head_dim]`` at ``layout.slot_mapping``."""
    _impl(impl).write_kv(layer, layout, k, v)


def decode(
    q: torch.Tensor,
    layer: LayerKV,
    layout: BatchLayout,
    scale: float | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence over all its KV; returns ``(out, lse)``."""
    return _impl(impl).decode(q, layer, layout, scale)  # type: ignore[no-any-return]


def prefill(
    q: torch.Tensor,
    layer: LayerKV,
    layout: BatchLayout,
    scale: float | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of new tokens per sequence, causal over prefix and chunk; returns ``(out, lse)``."""
    return _impl(impl).prefill(q, layer, layout, scale)  # type: ignore[no-any-return]


def merge_states(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of two partial attention states (see :func:`reference.merge_states`)."""
    return reference.merge_states(v_a, s_a, v_b, s_b)


__all__ = ["IMPLS", "decode", "merge_states", "prefill", "write_kv"]
