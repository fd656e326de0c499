"""KV storage: one layer's tensors (:class:`LayerKV`) and the page pool behind them.

A :class:`PagePool` holds ``num_pages`` pages of ``page_size`` token slots
for every layer, as raw byte buffers whose first dimension is the page.
Each layer's K and V codes (and, for int4, per-token scales and zeros) are
typed views into those buffers, so kernels see ordinary strided tensors.

Two layouts, chosen with ``layout=``::

    "block"  one buffer [num_pages, page_bytes]; a page row holds every layer:
             | L0.K | L0.V | L1.K | L1.V | ... |   (one copy moves a page)
    "layer"  one buffer per layer [num_pages, layer_page_bytes]:
             | L.K | L.V |                         (vLLM's per-layer tensors)

Within a layer region, each part is ``[page_size, heads, code_dim]``; int4
adds ``k_scale, k_zero, v_scale, v_zero`` parts of ``[page_size, heads,
groups]`` fp16. Parts start on 16-byte boundaries.

FP8 scales are per layer and per KV head, float32 ``[heads]``, kept in
small separate tensors (1.0 until calibrated). INT4 pools likewise keep
per-layer key smoothing scales, float32 ``[heads, head_dim]`` (1.0 until
set with :meth:`PagePool.set_key_smoothing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvmem.errors import InvalidArgument
from kvmem.spec import KVSpec

StorageLayout = Literal["block", "layer"]
_ALIGN = 16


@dataclass(frozen=True)
class LayerKV:
    """The KV storage of one layer, as kernels read it.

    ``k`` and ``v`` are ``[num_pages, page_size, num_kv_heads, code_dim]`` in
    the format's storage dtype, with whatever strides the pool gives them.
    ``k_scale``/``v_scale`` are float32 ``[heads]`` for fp8 and fp16
    ``[num_pages, page_size, heads, groups]`` for int4; ``k_zero``/``v_zero``
    are int4 only. All are None where the format has no such part.

    ``k_smooth`` (int4 only, optional) holds per-channel key smoothing scales,
    float32 ``[heads, head_dim]``: keys are stored as ``K / k_smooth`` and
    queries read them as ``Q * k_smooth``, so ``q . k`` is unchanged (see
    :mod:`kvmem.attention.smoothing`). None means no smoothing.
    """

    spec: KVSpec
    page_size: int
    index: int
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None
    k_smooth: torch.Tensor | None = None

    @property
    def num_pages(self) -> int:
        """Pages addressable through this layer's tensors."""
        return self.k.shape[0]


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _layer_parts(spec: KVSpec, page_size: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, per-page shape) of every part of one layer's page region."""
    fmt = spec.fmt
    codes = (page_size, spec.num_kv_heads, spec.code_dim)
    parts: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
        ("k", fmt.storage_dtype, codes),
        ("v", fmt.storage_dtype, codes),
    ]
    if fmt.kind == "int4":
        meta = (page_size, spec.num_kv_heads, spec.num_groups)
        parts += [(n, torch.float16, meta) for n in ("k_scale", "k_zero", "v_scale", "v_zero")]
    return parts


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def layer_page_bytes(spec: KVSpec, page_size: int) -> int:
    """Bytes one layer's region of a page takes in a pool (parts 16-byte aligned)."""
    return sum(_align(_nbytes(dt, shp)) for _, dt, shp in _layer_parts(spec, page_size))


class PagePool:
    """``num_pages`` pages of KV for every layer of ``spec``, in one of two layouts.

    ``device="meta"`` builds the same views with no memory behind them, for
    bookkeeping-only use (benchmarks of very large pools).
    """

    def __init__(
        self,
        spec: KVSpec,
        num_pages: int,
        page_size: int,
        device: torch.device | str = "cpu",
        layout: StorageLayout = "block",
    ) -> None:
        if layout not in ("block", "layer"):
            raise InvalidArgument(f"storage layout must be 'block' or 'layer', got {layout!r}")
        if num_pages <= 0 or page_size <= 0:
            raise InvalidArgument("a page pool needs num_pages > 0 and page_size > 0")
        self.spec = spec
        self.num_pages = num_pages
        self.page_size = page_size
        self.device = torch.device(device)
        self.layout: StorageLayout = layout
        self.layer_bytes = layer_page_bytes(spec, page_size)
        per_buffer = spec.num_layers if layout == "block" else 1
        self.buffers: list[torch.Tensor] = [
            torch.zeros(
                num_pages, per_buffer * self.layer_bytes, dtype=torch.uint8, device=self.device
            )
            for _ in range(spec.num_layers // per_buffer)
        ]
        heads = spec.num_kv_heads
        self.fp8_scales = (
            torch.ones(spec.num_layers, 2, heads, dtype=torch.float32, device=self.device)
            if spec.fmt.kind == "fp8"
            else None
        )
        self.key_smoothing = (
            torch.ones(spec.num_layers, heads, spec.head_dim, device=self.device)
            if spec.fmt.kind == "int4"
            else None
        )
        self._layers = [self._make_layer(i, per_buffer) for i in range(spec.num_layers)]

    def _make_layer(self, i: int, per_buffer: int) -> LayerKV:
        buf = self.buffers[i // per_buffer]
        off = (i % per_buffer) * self.layer_bytes
        views: dict[str, torch.Tensor] = {}
        for name, dtype, shape in _layer_parts(self.spec, self.page_size):
            n = _nbytes(dtype, shape)
            views[name] = buf[:, off : off + n].view(dtype).unflatten(1, shape)
            off += _align(n)
        if self.fp8_scales is not None:
            views["k_scale"] = self.fp8_scales[i, 0]
            views["v_scale"] = self.fp8_scales[i, 1]
        if self.key_smoothing is not None:
            views["k_smooth"] = self.key_smoothing[i]
        return LayerKV(self.spec, self.page_size, i, **views)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over all layers, as stored."""
        return self.layer_bytes * self.spec.num_layers

    @property
    def nbytes(self) -> int:
        """Bytes of every page of the pool."""
        return self.page_bytes * self.num_pages

    def layer(self, i: int) -> LayerKV:
        """The :class:`LayerKV` of layer ``i``."""
        if not 0 <= i < self.spec.num_layers:
            raise InvalidArgument(f"layer {i} out of range 0..{self.spec.num_layers - 1}")
        return self._layers[i]

    def set_fp8_scales(self, layer: int, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        """Set layer ``layer``'s fp8 scales (float32 [heads] or scalars)."""
        if self.fp8_scales is None:
            raise InvalidArgument(f"format {self.spec.kv_format} has no per-layer scales")
        self.layer(layer)
        self.fp8_scales[layer, 0] = k_scale
        self.fp8_scales[layer, 1] = v_scale

    def set_key_smoothing(self, layer: int, scales: torch.Tensor) -> None:
        """Set layer ``layer``'s int4 key smoothing scales, float32 [heads, head_dim] or [head_dim].

        Set them before any KV of the layer is written: keys already stored
        were divided by the old scales and would be read with the new ones.
        """
        if self.key_smoothing is None:
            raise InvalidArgument(f"format {self.spec.kv_format} has no key smoothing (int4 only)")
        self.layer(layer)
        s = torch.as_tensor(scales, dtype=torch.float32, device=self.device)
        want = (self.spec.num_kv_heads, self.spec.head_dim)
        if s.shape not in (want, want[1:]):
            raise InvalidArgument(
                f"key smoothing scales must have shape {list(want)} or [{want[1]}], "
                f"got {list(s.shape)}"
            )
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise InvalidArgument("key smoothing scales must be finite and positive")
        self.key_smoothing[layer] = s

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy pages ``src[i]`` onto ``dst[i]`` for every layer (copy-on-write)."""
        if not src:
            return
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for buf in self.buffers:
            buf[d] = buf[s]
