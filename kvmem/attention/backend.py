"""Attention as an object chosen once: plan a batch once per step, run it per layer.

The functions of :mod:`kvmem.attention` pick an implementation on every
call. A model that runs many layers over the same batch instead builds one
:class:`AttentionBackend` (``impl="auto"`` resolved here, once) and drives
it like this::

    attn = create_backend("auto", spec, torch.float16, device)   # once per engine
    for each step:
        attn.plan(layout)                     # once per step (FlashInfer: one plan())
        for each layer i:
            out = attn.forward(q, k, v, layers[i])   # write the new K/V, attend

``plan`` fixes the layout every layer of the step reads; it also says
whether the step is a decode (every sequence one new token) or a prefill,
which picks the kernel. Implementations: :class:`ReferenceBackend`
(torch), :class:`TritonBackend`, :class:`FlashInferBackend` (its ``plan()``
runs once per step and serves every layer; K/V are written with Triton).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import ModuleType
from typing import Any, ClassVar

import torch

from kvmem.attention.choice import resolve_impl
from kvmem.errors import InvalidArgument
from kvmem.formats import fp8_scales
from kvmem.layout import BatchLayout
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV


def stage_layout(layout: BatchLayout, device: torch.device | str) -> BatchLayout:
    """``layout`` with its tensors on ``device``, copied once (call it once per step).

    Nothing is copied when they are there already. From host memory to a
    CUDA device each tensor goes through pinned memory with a non-blocking
    copy, so the copies queue behind the step's work instead of stalling it.
    """
    device = torch.device(device)
    src = layout.slot_mapping.device
    if src == device or (device.type == src.type and device.index is None):
        return layout
    pin = device.type == "cuda" and src.type == "cpu" and torch.cuda.is_available()
    return layout.to(device, pin=pin)


class AttentionBackend(ABC):
    """One attention implementation, bound to a KV spec, query dtype and device.

    ``plan(layout)`` once per step, then ``forward`` (or ``write_kv`` and
    ``attend``) for each layer; a step is a decode when every sequence in
    the layout has exactly one new token, else a causal prefill.
    """

    name: ClassVar[str]

    def __init__(
        self, spec: KVSpec, dtype: torch.dtype, device: torch.device | str, scale: float | None
    ) -> None:
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)
        self.scale = scale
        self._layout: BatchLayout | None = None
        #: Steps planned so far.
        self.num_plans = 0
        #: FP8 KV: scale each layer's K and V from the first K/V written to it, times this
        #: headroom (None: keep the scales the storage holds). See :meth:`calibrate`.
        self.fp8_headroom: float | None = None
        self._calibrated: set[int] = set()

    @property
    def layout(self) -> BatchLayout:
        """The planned layout (InvalidArgument before the first ``plan``)."""
        if self._layout is None:
            raise InvalidArgument(f"{type(self).__name__}: plan a layout before running a layer")
        return self._layout

    @property
    def is_decode(self) -> bool:
        """Whether the planned step has one new token per sequence."""
        return self.layout.max_query_len == 1

    def plan(self, layout: BatchLayout) -> None:
        """Make ``layout`` the batch every layer of this step reads."""
        self._layout = layout
        self.num_plans += 1

    @abstractmethod
    def write_kv(self, layer: LayerKV, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize and store the step's new K/V ``[num_tokens, kv_heads, head_dim]``."""

    @abstractmethod
    def attend(self, q: torch.Tensor, layer: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``q`` over ``layer`` with the planned layout; ``(out, natural-log lse)``."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerKV
    ) -> torch.Tensor:
        """Write the new K/V of ``layer`` then attend; returns the output ``[N, q_heads, D]``."""
        if self.fp8_headroom is not None:
            self.calibrate(layer, k, v)
        self.write_kv(layer, k, v)
        return self.attend(q, layer)[0]

    def adopt_fp8_scales(
        self, layer: LayerKV, k_scale: torch.Tensor, v_scale: torch.Tensor
    ) -> bool:
        """Take another instance's FP8 scales for a layer not calibrated here yet.

        KV moving in (a migration) keeps its codes, so the layer must read them
        with the scales they were written with. False (nothing changed) when
        the layer already has scales of its own or calibration is off.
        """
        ks, vs = layer.k_scale, layer.v_scale
        if self.fp8_headroom is None or layer.spec.fmt.kind != "fp8" or ks is None or vs is None:
            return False
        if ks.data_ptr() in self._calibrated:
            return False
        ks.copy_(k_scale.to(ks.device))
        vs.copy_(v_scale.to(vs.device))
        self._calibrated.add(ks.data_ptr())
        return True

    def calibrate(self, layer: LayerKV, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Set an FP8 layer's scales from the first K/V written to it (once per scale tensor).

        ``scale = amax / fp8_max * fp8_headroom``, per KV head when the spec says
        ``fp8_scale="head"``, else per tensor: the first prefill fixes the range
        instead of a scale of 1.0 that saturates keys beyond 448. True if it set them.
        """
        ks, vs = layer.k_scale, layer.v_scale
        if layer.spec.fmt.kind != "fp8" or ks is None or vs is None or not k.numel():
            return False
        key = ks.data_ptr()
        if key in self._calibrated:
            return False
        per_head = layer.spec.fp8_scale == "head"
        headroom = self.fp8_headroom or 1.0
        ks.copy_(fp8_scales(k, layer.spec.kv_format, per_head=per_head) * headroom)
        vs.copy_(fp8_scales(v, layer.spec.kv_format, per_head=per_head) * headroom)
        self._calibrated.add(key)
        return True


class _ModuleBackend(AttentionBackend):
    """A backend whose kernels are a module's ``write_kv``/``decode``/``prefill`` functions."""

    def _module(self) -> Any:
        raise NotImplementedError

    def write_kv(self, layer: LayerKV, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new K/V at the planned layout's slots."""
        self._module().write_kv(layer, self.layout, k, v)

    def attend(self, q: torch.Tensor, layer: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode or prefill, as planned."""
        mod = self._module()
        fn = mod.decode if self.is_decode else mod.prefill
        return fn(q, layer, self.layout, self.scale)  # type: ignore[no-any-return]


class ReferenceBackend(_ModuleBackend):
    """The torch reference kernels (any dtype; the test oracle)."""

    name = "reference"

    def _module(self) -> ModuleType:
        from kvmem.attention import reference

        return reference


class TritonBackend(_ModuleBackend):
    """The Triton kernels (a CUDA device, or the interpreter on CPU)."""

    name = "triton"

    def __init__(
        self, spec: KVSpec, dtype: torch.dtype, device: torch.device | str, scale: float | None
    ) -> None:
        super().__init__(spec, dtype, device, scale)
        from kvmem.attention import triton

        self._triton = triton

    def _module(self) -> ModuleType:
        return self._triton


class FlashInferBackend(AttentionBackend):
    """FlashInfer's paged kernels: one ``plan()`` per step, run by every layer.

    The FlashInfer wrappers (one for decode, one for prefill) are built once
    and re-planned each step; the plan is made when the step's first layer
    runs (it needs the query's heads and dtype) and serves every layer
    after it. K/V are written with Triton. ``fallback`` (what ``auto``
    sets) attends layers FlashInfer cannot read, e.g. fp8 scales that differ
    per KV head; without one such a layer raises InvalidArgument.
    Not run yet on a GPU.
    """

    name = "flashinfer"

    def __init__(
        self,
        spec: KVSpec,
        dtype: torch.dtype,
        device: torch.device | str,
        scale: float | None,
        fallback: AttentionBackend | None = None,
    ) -> None:
        super().__init__(spec, dtype, device, scale)
        from kvmem.attention import flashinfer, triton

        self._fi = flashinfer
        self._writer = triton
        self.fallback = fallback
        self._wrappers: dict[str, Any] = {}
        self._planned: Any = None

    def plan(self, layout: BatchLayout) -> None:
        """Take this step's layout; FlashInfer's ``plan()`` runs at the first layer."""
        super().plan(layout)
        self._planned = None
        if self.fallback is not None:
            self.fallback.plan(layout)

    def write_kv(self, layer: LayerKV, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new K/V with the Triton writer."""
        self._writer.write_kv(layer, self.layout, k, v)

    def attend(self, q: torch.Tensor, layer: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the step's one plan over ``layer`` (planning it at the step's first layer)."""
        if self.fallback is not None and self._fi.layer_reason(layer) is not None:
            return self.fallback.attend(q, layer)
        att = self._planned
        if att is None:
            kind = "decode" if self.is_decode else "prefill"
            att = self._wrappers.get(kind)
            if att is None:
                att = self._wrappers[kind] = self._fi.PagedAttention(kind, q.device)
            att.plan(layer, self.layout, q, self.scale)
            self._planned = att
        return att.run(q, layer)  # type: ignore[no-any-return]


_BACKENDS: dict[str, type[AttentionBackend]] = {
    "reference": ReferenceBackend,
    "triton": TritonBackend,
    "flashinfer": FlashInferBackend,
}


def create_backend(
    impl: str,
    spec: KVSpec,
    dtype: torch.dtype,
    device: torch.device | str,
    scale: float | None = None,
) -> AttentionBackend:
    """The attention backend ``impl`` names for queries of ``dtype`` on ``device`` over ``spec``.

    ``"auto"`` is resolved here, once, by the rules of
    :func:`kvmem.attention.resolve_impl`; a FlashInfer backend chosen by
    ``auto`` falls back to Triton for layers it cannot read (FlashInfer
    runs only where Triton does). Raises InvalidArgument when a named
    implementation cannot take these inputs, or for an unknown name.
    """
    device = torch.device(device)
    name = resolve_impl(impl, spec.fmt, dtype, device)
    if name != "flashinfer":
        return _BACKENDS[name](spec, dtype, device, scale)
    fallback = TritonBackend(spec, dtype, device, scale) if impl == "auto" else None
    return FlashInferBackend(spec, dtype, device, scale, fallback)


__all__ = [
    "AttentionBackend",
    "FlashInferBackend",
    "ReferenceBackend",
    "TritonBackend",
    "create_backend",
    "stage_layout",
]
