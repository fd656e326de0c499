"""KV formats: names, storage dtypes and the reference (torch) quantizers.

Format names follow vLLM's ``kv_cache_dtype``, plus ``int4`` and ``fp64``
(the latter for float64 oracle tests):

=========  ===============  =================================================
name       stored as        meaning
=========  ===============  =================================================
fp16       float16          plain copy
bf16       bfloat16         plain copy
fp32       float32          plain copy
fp64       float64          plain copy (tests)
fp8_e4m3   uint8 (float8)   ``code = sat(x / scale)``, RNE; range +-448
fp8_e5m2   uint8 (float8)   same, range +-57344
int4       uint8, 2/byte    ``x = (code - zero) * scale``, codes 0..15, one
                            fp16 scale and zero per (token, head, group)
=========  ===============  =================================================

FP8 scales are per layer, per tensor or per KV head; they are float32 and
live beside the codes (see :mod:`kvmem.storage`). INT4 packs element ``2i``
into bits 0-3 and ``2i+1`` into bits 4-7 of byte ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvmem.errors import InvalidArgument

FormatKind = Literal["float", "fp8", "int4"]

#: Largest finite magnitude of each FP8 format.
FP8_MAX: dict[str, float] = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}

#: INT4 keeps ``|zero| <= INT4_MAX_ZERO`` so that rounding zero to fp16 moves
#: it by at most 1/4 of a code; see :func:`quantize_int4`.
INT4_MAX_ZERO = 512.0

_FP16_MIN_NORMAL = 2.0**-14
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class KVFormat:
    """A KV storage format: how one element is stored and what it costs."""

    name: str
    kind: FormatKind
    storage_dtype: torch.dtype
    bits: int
    #: The float8 dtype that fp8 codes are viewed as (None for other kinds).
    float8_dtype: torch.dtype | None = None

    @property
    def is_quantized(self) -> bool:
        """True for fp8 and int4, whose codes need scales to be read."""
        return self.kind != "float"

    def code_dim(self, head_dim: int) -> int:
        """Elements of ``storage_dtype`` that hold one head's vector."""
        return head_dim // 2 if self.kind == "int4" else head_dim

    def head_bytes(self, head_dim: int, group_size: int) -> int:
        """Bytes of one token's K (or V) for one KV head, metadata included."""
        if self.kind == "int4":
            return head_dim // 2 + 4 * (head_dim // group_size)  # fp16 scale + zero
        return head_dim * self.bits // 8


_FLOATS: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}
_ALIASES = {
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32",
    "float": "fp32",
    "float64": "fp64",
    "fp8": "fp8_e4m3",
    "fp8_e4m3fn": "fp8_e4m3",
}
FORMAT_NAMES: tuple[str, ...] = ("auto", *_FLOATS, "fp8_e4m3", "fp8_e5m2", "int4")


def dtype_name(dtype: torch.dtype) -> str:
    """The format name of a floating dtype (``torch.float16`` -> ``"fp16"``)."""
    for name, dt in _FLOATS.items():
        if dt == dtype:
            return name
    raise InvalidArgument(f"model dtype {dtype} is not one of {list(_FLOATS.values())}")


def resolve_format(name: str, model_dtype: torch.dtype = torch.float16) -> KVFormat:
    """Look up a format by name; ``"auto"`` means the model dtype."""
    if not isinstance(name, str):
        raise InvalidArgument(f"kv format must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key == "auto":
        key = dtype_name(model_dtype)
    if key in _FLOATS:
        dt = _FLOATS[key]
        return KVFormat(key, "float", dt, torch.finfo(dt).bits)
    if key == "fp8_e4m3":
        return KVFormat(key, "fp8", torch.uint8, 8, torch.float8_e4m3fn)
    if key == "fp8_e5m2":
        return KVFormat(key, "fp8", torch.uint8, 8, torch.float8_e5m2)
    if key == "int4":
        return KVFormat(key, "int4", torch.uint8, 4)
    raise InvalidArgument(f"unknown kv format {name!r}; known: {', '.join(FORMAT_NAMES)}")


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _head_broadcast(scale: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Shape a per-tensor ([] or [1]) or per-head ([H]) scale to broadcast over [..., H, D]."""
    s = torch.as_tensor(scale, device=x.device)
    if s.dim() == 0 or s.numel() == 1:
        return s.reshape(()).to(_work_dtype(x))
    if s.dim() != 1 or x.dim() < 2 or s.shape[0] != x.shape[-2]:
        raise InvalidArgument(
            f"fp8 scale of shape {tuple(s.shape)} fits neither per tensor nor per head "
            f"of x with shape {tuple(x.shape)} ([..., heads, head_dim])"
        )
    return s.to(_work_dtype(x))[:, None]


def _fp8(fmt: str) -> KVFormat:
    f = resolve_format(fmt)
    if f.kind != "fp8":
        raise InvalidArgument(f"{fmt!r} is not an fp8 format")
    return f


def quantize_fp8(
    x: torch.Tensor, scale: torch.Tensor | float, fmt: str = "fp8_e4m3"
) -> torch.Tensor:
    """FP8 codes (uint8) of ``x`` [..., H, D]: ``sat(x / scale)`` rounded to nearest even."""
    f = _fp8(fmt)
    assert f.float8_dtype is not None
    y = x.to(_work_dtype(x)) / _head_broadcast(scale, x)
    m = FP8_MAX[f.name]
    return y.clamp(-m, m).to(f.float8_dtype).view(torch.uint8)


def dequantize_fp8(
    codes: torch.Tensor,
    scale: torch.Tensor | float,
    fmt: str = "fp8_e4m3",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Values of FP8 codes [..., H, D]: ``code * scale`` in ``dtype``."""
    f = _fp8(fmt)
    assert f.float8_dtype is not None
    x = codes.view(f.float8_dtype).to(dtype)
    return x * _head_broadcast(scale, x).to(dtype)


def fp8_scales(x: torch.Tensor, fmt: str = "fp8_e4m3", per_head: bool = False) -> torch.Tensor:
    """Calibrate FP8 scales from sample values ``x`` [..., H, D]: ``amax / fp8_max``.

    Returns float32 [H]; with ``per_head=False`` every entry is the tensor-wide
    scale. A head whose samples are all zero gets scale 1.
    """
    f = _fp8(fmt)
    if x.dim() < 2:
        raise InvalidArgument("calibration samples must have shape [..., heads, head_dim]")
    a = x.detach().abs().float().transpose(-2, 0).reshape(x.shape[-2], -1).amax(dim=1)
    if not per_head:
        a = a.amax().expand(x.shape[-2]).clone()
    s = a / FP8_MAX[f.name]
    return torch.where(s > 0, s, torch.ones_like(s))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes 0..15 [..., D] into [..., D/2]: element 2i low nibble, 2i+1 high."""
    if codes.shape[-1] % 2:
        raise InvalidArgument("int4 packing needs an even last dimension")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 codes 0..15 [..., 2 * D/2]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def _check_group(d: int, group_size: int) -> int:
    if group_size <= 0 or d % group_size or group_size % 2:
        raise InvalidArgument(f"int4 group_size {group_size} must be even and divide head_dim {d}")
    return d // group_size


def quantize_int4(
    x: torch.Tensor, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric INT4 of ``x`` [..., D] per group of ``group_size`` channels.

    Returns ``(packed, scale, zero)``: uint8 [..., D/2], fp16 [..., D/g] and
    fp16 [..., D/g], with ``x ~= (code - zero) * scale``. The scale is rounded
    *up* to fp16 and kept at least ``|min| / 512`` so that the fp16 zero is
    off by at most 1/4 code: every element then reconstructs within
    ``scale / 2`` (plus float32 rounding), for any finite input whose range
    fits fp16.
    """
    d = x.shape[-1]
    g = group_size or d
    ng = _check_group(d, g)
    xg = x.to(_work_dtype(x)).unflatten(-1, (ng, g))
    lo = xg.amin(dim=-1)
    hi = xg.amax(dim=-1)
    scale = torch.maximum((hi - lo) / 15.0, lo.abs() / INT4_MAX_ZERO)
    scale = scale.clamp(_FP16_MIN_NORMAL, _FP16_MAX)
    scale16 = scale.to(torch.float16)
    up = scale16.to(scale.dtype) < scale
    scale16 = torch.where(
        up, torch.nextafter(scale16, torch.full_like(scale16, torch.inf)), scale16
    )
    s = scale16.to(xg.dtype)
    zero16 = (-lo / s).to(torch.float16)
    codes = torch.round(xg / s[..., None] + zero16.to(xg.dtype)[..., None]).clamp(0, 15)
    return pack_int4(codes.to(torch.uint8).flatten(-2)), scale16, zero16


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Values of INT4 codes: ``(code - zero) * scale`` in ``dtype``, shape [..., D]."""
    codes = unpack_int4(packed).to(dtype)
    ng = scale.shape[-1]
    cg = codes.unflatten(-1, (ng, codes.shape[-1] // ng))
    return ((cg - zero.to(dtype)[..., None]) * scale.to(dtype)[..., None]).flatten(-2)
