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

import functools
import os
import sys
from types import ModuleType
from typing import Any

import torch

from kvmem.attention import reference
from kvmem.attention.backend import AttentionBackend, create_backend, stage_layout
from kvmem.errors import InvalidArgument
from kvmem.formats import KVFormat
from kvmem.layout import BatchLayout
from kvmem.storage import LayerKV

IMPLS = ("auto", "triton", "reference", "flashinfer")


def _triton() -> ModuleType:
    from kvmem.attention import triton as tk

    return tk


def _flashinfer() -> ModuleType:
    from kvmem.attention import flashinfer as fi

    return fi


def _triton_reason(fmt: KVFormat | None, dtype: torch.dtype, device: torch.device) -> str | None:
    cpu_off = device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"
    # decide without importing the kernels, which would fix the interpreter mode
    if cpu_off and "kvmem.attention.triton" not in sys.modules:
        return (
            f"Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before "
            f"kvmem.attention.triton is first imported to run on {device.type}"
        )
    try:
        tk = _triton()
    except ImportError as e:  # pragma: no cover - triton is a hard dependency
        return f"triton cannot be imported: {e}"
    if fmt is None:
        why: str | None = tk.unusable_reason(device)
        if why is None and dtype not in tk.TRITON_DTYPES:
            why = f"Triton kernels take float16, bfloat16 or float32, got {dtype}"
        return why
    return tk.unsupported_reason(fmt, dtype, device)  # type: ignore[no-any-return]


def unsupported_reason(
    impl: str, fmt: KVFormat | None, dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why ``impl`` cannot take inputs of ``dtype`` on ``device`` over ``fmt`` KV (None if it can).

    ``fmt=None`` asks about ``merge_states``, which reads no KV.
    """
    if impl == "reference":
        return None
    if impl == "triton":
        return _triton_reason(fmt, dtype, device)
    if impl == "flashinfer":
        if fmt is None:
            return _triton_reason(None, dtype, device)
        return _flashinfer().unsupported_reason(fmt, dtype, device)  # type: ignore[no-any-return]
    raise InvalidArgument(f"unknown attention implementation {impl!r}; known: {', '.join(IMPLS)}")


def resolve_impl(impl: str, fmt: KVFormat | None, dtype: torch.dtype, device: torch.device) -> str:
    """The implementation ``impl`` names for these inputs (``"auto"`` resolved).

    Raises InvalidArgument when a named implementation cannot take them.
    Answers are cached per argument tuple and ``TRITON_INTERPRET`` value:
    kernels call this for every layer of every step.
    """
    return _resolve(impl, fmt, dtype, device, os.environ.get("TRITON_INTERPRET", "0") == "1")


@functools.lru_cache(maxsize=256)
def _resolve(
    impl: str, fmt: KVFormat | None, dtype: torch.dtype, device: torch.device, interpret: bool
) -> str:
    if impl == "auto":
        if fmt is not None and unsupported_reason("flashinfer", fmt, dtype, device) is None:
            return "flashinfer"
        if device.type != "cuda" and not interpret:
            return "reference"
        if unsupported_reason("triton", fmt, dtype, device) is None:
            return "triton"
        return "reference"
    why = unsupported_reason(impl, fmt, dtype, device)
    if why:
        raise InvalidArgument(f"impl={impl!r} cannot be used: {why}")
    return impl


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
