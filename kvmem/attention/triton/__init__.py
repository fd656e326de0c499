"""Triton attention over kvmem's paged KV: ``write_kv``, ``decode``, ``prefill``, ``merge_states``.

Same conventions as :mod:`kvmem.attention.reference` (flattened queries
``[num_tokens, q_heads, head_dim]``, GQA head ``h`` -> KV head ``h //
group``, outputs ``(out, lse)`` with ``out`` in the query dtype and ``lse``
the natural-log LSE in float32). Every kernel reads ``LayerKV`` through its
explicit strides, so block-major pools, per-layer tensors and the vmem
backend's one-page-per-sequence view all work, through the common
``BatchLayout`` page table.

Formats: fp16, bf16, fp32, fp8_e4m3, fp8_e5m2 (per-KV-head scales folded
into the softmax scale and the output), int4 (dequantized in registers,
with the layer's key smoothing fused and a Hadamard key rotation applied in
torch first). Queries and new K/V are float16, bfloat16 or float32; the
dot products run in the query dtype, or float32 when the query is float32
or differs from 16-bit KV (so float32 queries give float32 attention).

On CPU the kernels run in the Triton interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before this module is first
imported; without it, and without CUDA, every call raises
:class:`~kvmem.errors.InvalidArgument` saying so.
"""

from __future__ import annotations

import math

import torch

from kvmem.attention.reference import check_inputs
from kvmem.attention.smoothing import key_rotation, key_smoothing, transform_keys, transform_queries
from kvmem.attention.triton._common import (
    INTERPRET,
    TRITON_DTYPES,
    unusable_reason,
)
from kvmem.attention.triton.decode import choose_num_splits, launch_decode
from kvmem.attention.triton.merge import launch_merge
from kvmem.attention.triton.prefill import launch_prefill
from kvmem.attention.triton.write import launch_write
from kvmem.errors import InvalidArgument
from kvmem.formats import FP8_MAX, KVFormat
from kvmem.layout import BatchLayout
from kvmem.storage import LayerKV

_DTYPE_NAMES = ", ".join(str(d).replace("torch.", "") for d in TRITON_DTYPES)


def unsupported_reason(fmt: KVFormat, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why these kernels cannot take ``fmt`` KV with ``dtype`` inputs on ``device`` (or None)."""
    why = unusable_reason(device)
    if why:
        return why
    if fmt.kind == "float" and fmt.storage_dtype not in TRITON_DTYPES:
        return f"the {fmt.name} KV format is for impl='reference' only"
    if dtype not in TRITON_DTYPES:
        return f"Triton kernels take {_DTYPE_NAMES} inputs, got {dtype} (use impl='reference')"
    return None


def _check(layer: LayerKV, layout: BatchLayout, x: torch.Tensor) -> None:
    why = unsupported_reason(layer.spec.fmt, x.dtype, x.device)
    if why:
        raise InvalidArgument(why)
    parts = (("K", layer.k), ("block_table", layout.block_table), ("seq_lens", layout.seq_lens))
    for name, t in parts:
        if t.device != x.device:
            raise InvalidArgument(f"{name} is on {t.device} but the input is on {x.device}")


def _sm_scale(scale: float | None, head_dim: int) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def write_kv(layer: LayerKV, layout: BatchLayout, k: torch.Tensor, v: torch.Tensor) -> None:
    """Quantize new K and V ``[num_tokens, kv_heads, head_dim]`` into their slots (-1: skipped)."""
    heads = layer.spec.num_kv_heads
    check_inputs(layer, layout, k, heads)
    check_inputs(layer, layout, v, heads)
    _check(layer, layout, k)
    _check(layer, layout, v)
    if layout.slot_mapping.device != k.device:
        raise InvalidArgument(f"slot_mapping is on {layout.slot_mapping.device}, K on {k.device}")
    smooth = key_smoothing(layer)
    if key_rotation(layer):
        k, smooth = transform_keys(layer, k), None
    launch_write(layer, layout, "k", k, smooth)
    launch_write(layer, layout, "v", v, None)


def _queries(layer: LayerKV, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The query in the stored keys' basis, and the smoothing left for the kernel to fuse."""
    if key_rotation(layer):
        return transform_queries(layer, q).to(q.dtype), None
    return q, key_smoothing(layer)


def fp8_query_reason(layer: LayerKV, q: torch.Tensor) -> str | None:
    """Why FP8 queries cannot be used here (None when they can).

    They need e4m3 KV (the dot runs on raw fp8 codes) and a GPU with FP8
    tensor cores (compute capability 8.9 or newer), or the interpreter.
    """
    if layer.spec.kv_format != "fp8_e4m3":
        return f"FP8 queries need the fp8_e4m3 KV format, not {layer.spec.kv_format}"
    if q.device.type == "cuda":
        if torch.cuda.get_device_capability(q.device) < (8, 9):
            return "FP8 queries need a GPU with compute capability 8.9 or newer"
        return None
    return None if INTERPRET else "FP8 queries need a CUDA GPU"


def quantize_queries(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(token, head) FP8 e4m3 queries: ``(float8_e4m3fn codes, float32 scales [T, H])``."""
    qf = q.float()
    amax = qf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX["fp8_e4m3"], torch.ones_like(amax))
    codes = (qf / scale[..., None]).clamp(-FP8_MAX["fp8_e4m3"], FP8_MAX["fp8_e4m3"])
    return codes.to(torch.float8_e4m3fn), scale


def decode(
    q: torch.Tensor,
    layer: LayerKV,
    layout: BatchLayout,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    fp8_query: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence over all its KV, split-KV; returns ``(out, lse)``.

    ``num_splits`` overrides :func:`choose_num_splits`. ``fp8_query=True``
    quantizes the query to FP8 e4m3 per (token, head) and runs the QK dots
    on FP8 tensor cores (FireQ); see :func:`fp8_query_reason` for where it
    can run. Not run on a GPU yet.
    """
    check_inputs(layer, layout, q, None)
    if layout.max_query_len != 1 or layout.num_tokens != layout.batch_size:
        raise InvalidArgument("decode takes exactly one new token per sequence; use prefill")
    _check(layer, layout, q)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise InvalidArgument(f"num_splits must be a positive int, got {num_splits!r}")
    qt, smooth = _queries(layer, q)
    q_scale = None
    if fp8_query:
        why = fp8_query_reason(layer, q)
        if why:
            raise InvalidArgument(why)
        qt, q_scale = quantize_queries(qt)
    sm = _sm_scale(scale, layer.spec.head_dim)
    return launch_decode(qt, layer, layout, sm, smooth, num_splits, q.dtype, q_scale)


def prefill(
    q: torch.Tensor,
    layer: LayerKV,
    layout: BatchLayout,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves."""
    check_inputs(layer, layout, q, None)
    _check(layer, layout, q)
    qt, smooth = _queries(layer, q)
    return launch_prefill(qt, layer, layout, _sm_scale(scale, layer.spec.head_dim), smooth, q.dtype)


def merge_states(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of two partial states ``v [..., head_dim]``, ``s [...]`` (lse float32)."""
    if v_a.shape != v_b.shape or s_a.shape != s_b.shape or v_a.shape[:-1] != s_a.shape:
        raise InvalidArgument(
            f"cannot merge states of shapes {tuple(v_a.shape)}/{tuple(s_a.shape)} "
            f"and {tuple(v_b.shape)}/{tuple(s_b.shape)}"
        )
    for t in (v_a, v_b):
        why = unusable_reason(t.device)
        if why:
            raise InvalidArgument(why)
        if t.dtype not in TRITON_DTYPES:
            raise InvalidArgument(f"Triton merge_states takes {_DTYPE_NAMES}, got {t.dtype}")
    if len({v_a.device, v_b.device, s_a.device, s_b.device}) != 1:
        raise InvalidArgument("merge_states inputs must be on one device")
    return launch_merge(v_a, s_a, v_b, s_b)


__all__ = [
    "INTERPRET",
    "choose_num_splits",
    "decode",
    "fp8_query_reason",
    "merge_states",
    "prefill",
    "quantize_queries",
    "unsupported_reason",
    "write_kv",
]
