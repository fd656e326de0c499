"""Quantized KV for transformers models: FP8 scales and INT4 key smoothing, and reading them back.

FP8 scales come, per layer, from the first of:

1. the checkpoint: ``k_scale`` / ``v_scale`` tensors beside each attention
   layer (the names vLLM and compressed-tensors write, e.g.
   ``model.layers.3.self_attn.k_scale``), read with :func:`load_kv_scales`
   and handed to :class:`~kvmem.integrations.hf.KVMemCache` as ``kv_scales``;
2. calibration on the first prefill that reaches the layer: per KV head
   ``amax / 448`` of the prompt's keys (values), times a headroom factor so
   that later tokens somewhat larger than the prompt's do not saturate.

A scale of 1.0 is never used silently: it saturates any key above 448.

INT4 layers of RoPE models get FireQ key smoothing
(:mod:`kvmem.attention.smoothing`), calibrated on the same first prefill.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kvmem.attention.smoothing import calibrate_key_smoothing, hadamard, key_rotation
from kvmem.errors import InvalidArgument
from kvmem.formats import dequantize_fp8, dequantize_int4, fp8_scales
from kvmem.storage import LayerKV

KVScales = Mapping[int, tuple[Any, Any]]
"""Per layer index, ``(k_scale, v_scale)``: floats or float32 tensors ``[]``/``[kv_heads]``."""

_SCALE_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\..*?([kv])_scale$")


def kv_scales_from_state_dict(state_dict: Mapping[str, Any]) -> dict[int, tuple[Any, Any]]:
    """The ``(k_scale, v_scale)`` of every layer that has both in ``state_dict`` (names as vLLM's).

    Raises InvalidArgument when a layer has one of the two but not the other.
    """
    found: dict[int, dict[str, Any]] = {}
    for name, value in state_dict.items():
        m = _SCALE_KEY.search(name)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    out: dict[int, tuple[Any, Any]] = {}
    for layer, kv in sorted(found.items()):
        if set(kv) != {"k", "v"}:
            raise InvalidArgument(f"layer {layer} has a {'/'.join(kv)}_scale but not both")
        out[layer] = (kv["k"], kv["v"])
    return out


def load_kv_scales(path: str | Path) -> dict[int, tuple[Any, Any]]:
    """FP8 KV scales from a checkpoint: a ``.safetensors`` file or a directory of them.

    Returns ``{}`` when the checkpoint carries none (then the cache calibrates).
    """
    from safetensors import safe_open

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise InvalidArgument(f"no safetensors checkpoint at {str(p)!r}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                if _SCALE_KEY.search(name):
                    tensors[name] = st.get_tensor(name)
    return kv_scales_from_state_dict(tensors)


def _as_scales(x: Any, heads: int, device: torch.device) -> torch.Tensor:
    s = torch.as_tensor(x, dtype=torch.float32).to(device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(heads)
    if s.numel() != heads:
        raise InvalidArgument(f"an fp8 scale needs 1 or {heads} entries, got {s.numel()}")
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise InvalidArgument("fp8 scales must be finite and positive")
    return s


def check_kv_scales(scales: KVScales, num_layers: int, heads: int) -> dict[int, tuple[Any, Any]]:
    """``scales`` validated (layer range, shapes, positive values), as float32 CPU tensors."""
    out: dict[int, tuple[Any, Any]] = {}
    for layer, pair in scales.items():
        if not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise InvalidArgument(f"kv_scales names layer {layer!r}; the model has {num_layers}")
        try:
            k, v = pair
        except (TypeError, ValueError):
            raise InvalidArgument(f"kv_scales[{layer}] must be a (k_scale, v_scale) pair") from None
        cpu = torch.device("cpu")
        out[layer] = (_as_scales(k, heads, cpu), _as_scales(v, heads, cpu))
    return out


def set_fp8_scales(layer: LayerKV, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """Store a layer's FP8 scales in its storage (the allocator's per-layer scale tensors)."""
    if layer.k_scale is None or layer.v_scale is None:
        raise InvalidArgument(f"format {layer.spec.kv_format} has no per-layer scales")
    layer.k_scale.copy_(k_scale.to(layer.k_scale.device))
    layer.v_scale.copy_(v_scale.to(layer.v_scale.device))


def calibrate_fp8(
    layer: LayerKV, k: torch.Tensor, v: torch.Tensor, per_head: bool, headroom: float
) -> None:
    """Set a layer's FP8 scales from sample K and V ``[tokens, kv_heads, head_dim]``."""
    fmt = layer.spec.kv_format
    set_fp8_scales(
        layer,
        fp8_scales(k, fmt, per_head=per_head) * headroom,
        fp8_scales(v, fmt, per_head=per_head) * headroom,
    )


def calibrate_smoothing(layer: LayerKV, k: torch.Tensor) -> bool:
    """Set a layer's INT4 key smoothing from sample keys; False if its storage has none."""
    if layer.k_smooth is None:
        return False
    layer.k_smooth.copy_(calibrate_key_smoothing(k, rope="half").to(layer.k_smooth.device))
    return True


def dequantize(
    layer: LayerKV, page: torch.Tensor, off: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[n, kv_heads, head_dim]`` in slots ``(page[i], off[i])``, as the model sees them.

    Unlike the kernels, which fold key smoothing and rotation into the query,
    this undoes them: the dense K returned to eager/SDPA attention is the
    model's own key.
    """
    fmt = layer.spec.fmt

    def one(which: str) -> torch.Tensor:
        codes = getattr(layer, which)[page, off]
        if fmt.kind == "float":
            return codes.to(dtype)
        scale = getattr(layer, f"{which}_scale")
        if fmt.kind == "fp8":
            return dequantize_fp8(codes, scale, fmt.name, dtype)
        z = getattr(layer, f"{which}_zero")[page, off]
        return dequantize_int4(codes, scale[page, off], z, dtype)

    k, v = one("k"), one("v")
    if fmt.kind == "int4":
        wd = torch.float64 if dtype == torch.float64 else torch.float32
        x = k.to(wd)
        if key_rotation(layer):
            x = x @ hadamard(
                x.shape[-1], wd, x.device
            )  # symmetric and orthonormal: its own inverse
        if layer.k_smooth is not None:
            x = x * layer.k_smooth.to(device=x.device, dtype=wd)
        k = x.to(dtype)
    return k, v
