"""Optional FlashInfer fast path for fp16/bf16/fp8 paged decode and prefill.

NOT RUN YET: written against FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper``
/ ``BatchPrefillWithPagedKVCacheWrapper`` API (0.2 and later) on a machine
without a GPU; ``tests/attention/test_flashinfer.py`` (``-m gpu``) checks it
against the reference where FlashInfer and a GPU exist.

kvmem's ``BatchLayout`` is FlashInfer's paged format already (``kv_indptr``,
``kv_indices``, ``kv_last_page_len``, NHD pages ``[page_size, heads,
head_dim]``), so nothing is copied: K and V are handed over as the pool's
strided views (fp8 codes viewed as float8). fp8 scales are folded in here
(the K scale into the softmax scale, the V scale into the output), so they
must be the same for every KV head. FlashInfer's LSE is base 2; it is
converted to the natural log. ``write_kv`` has no FlashInfer counterpart for
kvmem's formats: :mod:`kvmem.attention` writes with Triton or the reference.

Every entry point raises :class:`~kvmem.errors.InvalidArgument` saying why
when FlashInfer cannot be used (not installed, no GPU, format or dtype it
does not take); :func:`unsupported_reason` says so without raising.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kvmem.attention.reference import check_inputs
from kvmem.errors import InvalidArgument
from kvmem.formats import KVFormat
from kvmem.layout import BatchLayout
from kvmem.storage import LayerKV

try:  # the optional extra: pip install 'kvmem[flashinfer]'
    import flashinfer as _fi

    _IMPORT_ERROR: str | None = None
except Exception as e:  # ImportError, or a CUDA/JIT error raised at import
    _fi = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

#: KV formats FlashInfer reads.
FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
_LN2 = math.log(2.0)
_WORKSPACE_BYTES = 128 << 20


def available() -> bool:
    """True when the flashinfer package imported."""
    return _fi is not None


def _not_installed() -> str:
    return (
        f"flashinfer is not installed (pip install 'kvmem[flashinfer]'; "
        f"import said {_IMPORT_ERROR})"
    )


def unsupported_reason(fmt: KVFormat, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why FlashInfer cannot run attention for these inputs (None when it can)."""
    if _fi is None:
        return _not_installed()
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"FlashInfer needs a CUDA GPU; the inputs are on {device}"
    if fmt.name not in FORMATS:
        return f"FlashInfer does not read the {fmt.name} KV format (it takes {', '.join(FORMATS)})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FlashInfer takes float16 or bfloat16 queries, got {dtype}"
    if fmt.kind == "float" and fmt.storage_dtype != dtype:
        return f"FlashInfer needs the query dtype {dtype} to match the {fmt.name} KV"
    return None


_scale_cache: dict[tuple[int, int, int, int], tuple[float, float] | None] = {}


def _scalar_scales(layer: LayerKV) -> tuple[float, float] | None:
    """The layer's fp8 (k, v) scales if each is one value for every KV head, else None.

    Cached on the scale tensors' versions, so a decode step does not sync
    the device per layer to read them.
    """
    ks, vs = layer.k_scale, layer.v_scale
    assert ks is not None and vs is not None
    key = (ks.data_ptr(), ks._version, vs.data_ptr(), vs._version)
    if key not in _scale_cache:
        kl, vl = ks.reshape(-1).tolist(), vs.reshape(-1).tolist()
        same = min(kl) == max(kl) and min(vl) == max(vl)
        if len(_scale_cache) > 4096:
            _scale_cache.clear()
        _scale_cache[key] = (float(kl[0]), float(vl[0])) if same else None
    return _scale_cache[key]


def layer_reason(layer: LayerKV) -> str | None:
    """Why FlashInfer cannot read this layer's storage (None when it can)."""
    k, v = layer.k, layer.v
    if k.stride() != v.stride() or k.stride()[1:] != (k.shape[2] * k.shape[3], k.shape[3], 1):
        return (
            "FlashInfer needs K and V with equal strides and each page's "
            "[page_size, heads, head_dim] block contiguous"
        )
    if layer.spec.fmt.kind == "fp8" and _scalar_scales(layer) is None:
        return "FlashInfer takes one fp8 scale per tensor; this layer's differ per KV head"
    return None


def _kv(layer: LayerKV) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """K/V as FlashInfer takes them, and the scalar fp8 scales (1.0 for floats)."""
    why = layer_reason(layer)
    if why:
        raise InvalidArgument(why)
    fmt = layer.spec.fmt
    if fmt.kind != "fp8":
        return layer.k, layer.v, 1.0, 1.0
    assert fmt.float8_dtype is not None
    scales = _scalar_scales(layer)
    assert scales is not None
    return layer.k.view(fmt.float8_dtype), layer.v.view(fmt.float8_dtype), scales[0], scales[1]


def _check(layer: LayerKV, layout: BatchLayout, q: torch.Tensor) -> None:
    check_inputs(layer, layout, q, None)
    why = unsupported_reason(layer.spec.fmt, q.dtype, q.device)
    if why:
        raise InvalidArgument(why)


_workspaces: dict[torch.device, torch.Tensor] = {}


def _workspace(device: torch.device) -> torch.Tensor:
    ws = _workspaces.get(device)
    if ws is None:
        ws = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        _workspaces[device] = ws
    return ws


class PagedAttention:
    """A FlashInfer decode or prefill wrapper, planned for one batch layout, run once per layer.

    ``plan`` does FlashInfer's host-side scheduling for a layout (once per
    step; the wrapper itself is built at the first plan and reused); ``run``
    then attends any layer of the same spec. Not run yet on a GPU.
    """

    def __init__(self, kind: str, device: torch.device | str) -> None:
        if kind not in ("decode", "prefill"):
            raise InvalidArgument(f"kind must be 'decode' or 'prefill', got {kind!r}")
        if _fi is None:
            raise InvalidArgument(_not_installed())
        self.kind = kind
        self.device = torch.device(device)
        self._wrapper: Any = None
        self._planned = False
        self._sm_scale = 1.0
        self._k_scale = 1.0

    def _get_wrapper(self, group: int) -> Any:
        assert _fi is not None
        if self._wrapper is None:
            ws = _workspace(self.device)
            if self.kind == "decode":
                self._wrapper = _fi.BatchDecodeWithPagedKVCacheWrapper(
                    ws, "NHD", use_tensor_cores=group >= 4
                )
            else:
                self._wrapper = _fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        return self._wrapper

    def plan(
        self, layer: LayerKV, layout: BatchLayout, q: torch.Tensor, scale: float | None = None
    ) -> None:
        """Schedule attention of queries shaped and typed like ``q`` over ``layout``.

        ``layer``'s fp8 K scale is folded into the softmax scale; a layer
        run later with another K scale has its query rescaled instead.
        """
        check_inputs(layer, layout, q, None)
        spec = layer.spec
        _, _, k_scale, _ = _kv(layer)
        hq, hkv, d = q.shape[1], spec.num_kv_heads, spec.head_dim
        sm = float(scale) if scale is not None else 1.0 / math.sqrt(d)
        kv_dtype = spec.fmt.float8_dtype or spec.fmt.storage_dtype
        wrapper = self._get_wrapper(hq // hkv)
        if self.kind == "decode":
            if layout.max_query_len != 1 or layout.num_tokens != layout.batch_size:
                raise InvalidArgument("decode takes one new token per sequence; use prefill")
            wrapper.plan(
                layout.kv_indptr,
                layout.kv_indices,
                layout.kv_last_page_len,
                hq,
                hkv,
                d,
                layout.page_size,
                pos_encoding_mode="NONE",
                q_data_type=q.dtype,
                kv_data_type=kv_dtype,
                sm_scale=sm * k_scale,
            )
        else:
            wrapper.plan(
                layout.query_start_loc,
                layout.kv_indptr,
                layout.kv_indices,
                layout.kv_last_page_len,
                hq,
                hkv,
                d,
                layout.page_size,
                causal=True,
                pos_encoding_mode="NONE",
                q_data_type=q.dtype,
                kv_data_type=kv_dtype,
                sm_scale=sm * k_scale,
            )
        self._planned = True
        self._sm_scale = sm
        self._k_scale = k_scale

    def run(self, q: torch.Tensor, layer: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``q`` over ``layer`` with the planned layout; ``(out, natural-log lse)``."""
        if not self._planned:
            raise InvalidArgument("PagedAttention.run before plan")
        k, v, k_scale, v_scale = _kv(layer)
        if k_scale != self._k_scale:  # the plan folded the planning layer's K scale in
            q = (q.float() * (k_scale / self._k_scale)).to(q.dtype)
        out, lse2 = self._wrapper.run(q, (k, v), return_lse=True)
        if v_scale != 1.0:
            out = (out.float() * v_scale).to(q.dtype)
        return out, lse2.float() * _LN2


def decode(
    q: torch.Tensor, layer: LayerKV, layout: BatchLayout, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer paged decode (plans, then runs); ``(out, ln lse)``. Not run yet."""
    _check(layer, layout, q)
    att = PagedAttention("decode", q.device)
    att.plan(layer, layout, q, scale)
    return att.run(q, layer)


def prefill(
    q: torch.Tensor, layer: LayerKV, layout: BatchLayout, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer paged causal prefill (plans, then runs); ``(out, ln lse)``. Not run yet."""
    _check(layer, layout, q)
    att = PagedAttention("prefill", q.device)
    att.plan(layer, layout, q, scale)
    return att.run(q, layer)
