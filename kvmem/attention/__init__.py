"""Attention over kvmem's paged KV: ``write_kv``, ``decode``, ``prefill``, ``merge_states``.

Every function takes ``impl=`` to pick an implementation:

- ``"reference"``: torch, any float dtype including float64; the test oracle;
- ``"triton"``: the Triton kernels (:mod:`kvmem.attention.triton`); on a
  CUDA device, or on CPU in the Triton interpreter (``TRITON_INTERPRET=1``
  set before the first call);
- ``"flashinfer"``: FlashInfer's paged kernels (:mod:`kvmem.attention.flashinfer`)
  for fp16/bf16/fp8 KV on a GPU, with the extra installed; its ``write_kv``
  and ``merge_states`` are the Triton ones;
- ``"auto"`` (the default): FlashInfer when it can take these inputs (format,
  dtype, device, and the layer's storage: fp8 scales must be one per
  tensor), else Triton when it can, else the reference. On CPU, auto
  picks the (slow) Triton interpreter only while ``TRITON_INTERPRET=1`` is
  in the environment; otherwise it picks the reference.

A model running many layers over one batch uses an :class:`AttentionBackend`
instead (:func:`create_backend`, :mod:`kvmem.attention.backend`): the
implementation is chosen once, the batch planned once per step, and each
layer only writes and attends.

Asking for an implementation that cannot take the inputs raises
:class:`~kvmem.errors.InvalidArgument` saying why. The Triton kernels are
imported on first use, so ``TRITON_INTERPRET`` may be set any time before.
"""

from __future__ import annotations

from typing import Any

import torch

from kvmem.attention import reference
from kvmem.attention.backend import AttentionBackend, create_backend, stage_layout
from kvmem.attention.choice import (
    IMPLS,
    _flashinfer,
    _triton,
    resolve_impl,
    unsupported_reason,
)
from kvmem.layout import BatchLayout
from kvmem.storage import LayerKV


def _module(impl: str, layer: LayerKV, x: torch.Tensor, writes: bool = False) -> Any:
    name = resolve_impl(impl, layer.spec.fmt, x.dtype, x.device)
    if name == "reference":
        return reference
    if name == "triton" or writes:
        return _triton()
    fi = _flashinfer()
    if impl == "auto" and fi.layer_reason(layer) is not None:
        return _triton()  # e.g. fp8 scales that differ per KV head
    return fi


def write_kv(
    layer: LayerKV, layout: BatchLayout, k: torch.Tensor, v: torch.Tensor, impl: str = "auto"
) -> None:
    """Quantize and store new K/V ``[num_tokens, kv_heads, head_dim]`` at its slots."""
    _module(impl, layer, k, writes=True).write_kv(layer, layout, k, v)


def decode(
    q: torch.Tensor,
    layer: LayerKV,
    layout: BatchLayout,
    scale: float | None = None,
    impl: str = "auto",
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence over all its KV; returns ``(out, lse)``.

    ``options`` go to the implementation (Triton: ``num_splits``, ``fp8_query``).
    """
    mod = _module(impl, layer, q)
    return mod.decode(q, layer, layout, scale, **options)  # type: ignore[no-any-return]


def prefill(
    q: torch.Tensor,
    layer: LayerKV,
    layout: BatchLayout,
    scale: float | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of new tokens per sequence, causal over prefix and chunk; returns ``(out, lse)``."""
    return _module(impl, layer, q).prefill(q, layer, layout, scale)  # type: ignore[no-any-return]


def merge_states(
    v_a: torch.Tensor,
    s_a: torch.Tensor,
    v_b: torch.Tensor,
    s_b: torch.Tensor,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of two partial attention states (see :func:`reference.merge_states`)."""
    name = resolve_impl(impl, None, v_a.dtype, v_a.device)
    mod = reference if name == "reference" else _triton()
    return mod.merge_states(v_a, s_a, v_b, s_b)  # type: ignore[no-any-return]


__all__ = [
    "IMPLS",
    "AttentionBackend",
    "create_backend",
    "decode",
    "merge_states",
    "prefill",
    "resolve_impl",
    "stage_layout",
    "unsupported_reason",
    "write_kv",
]
