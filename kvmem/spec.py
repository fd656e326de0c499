"""KVSpec: the shape and format of a model's KV cache, and its byte arithmetic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvmem.errors import InvalidArgument
from kvmem.formats import KVFormat, resolve_format


@dataclass(frozen=True)
class KVSpec:
    """What one token's KV looks like, for every layer of a model.

    ``kv_format`` is canonicalised on construction (``"auto"`` becomes the
    model dtype's name, ``"fp8"`` becomes ``"fp8_e4m3"``). ``group_size`` is
    the number of channels that share one int4 scale and zero (default:
    ``head_dim``); ``fp8_scale`` says whether fp8 scales are calibrated per
    tensor or per KV head (storage keeps one scale per head either way).
    ``key_rotation="hadamard"`` (int4 only, power-of-two ``head_dim``) stores
    keys rotated by a normalised Hadamard matrix after smoothing, and rotates
    queries the same way, so ``q . k`` is unchanged (see
    :mod:`kvmem.attention.smoothing`).

    Example, Llama-3-8B in fp16: 32 layers x 8 heads x 128 dims x 2 (K, V) x
    2 bytes = 131072 bytes per token.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float16
    kv_format: str = "auto"
    group_size: int | None = None
    fp8_scale: Literal["tensor", "head"] = "tensor"
    key_rotation: Literal["none", "hadamard"] = "none"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InvalidArgument(f"KVSpec.{name} must be a positive int, got {v!r}")
        fmt = resolve_format(self.kv_format, self.dtype)
        object.__setattr__(self, "kv_format", fmt.name)
        if fmt.kind == "int4":
            g = self.group_size if self.group_size is not None else self.head_dim
            if not isinstance(g, int) or g <= 0 or g % 2 or self.head_dim % g:
                raise InvalidArgument(
                    f"int4 group_size {g!r} must be an even int dividing head_dim {self.head_dim}"
                )
            object.__setattr__(self, "group_size", g)
        elif self.group_size is not None:
            raise InvalidArgument(f"group_size applies to int4 only, not {fmt.name}")
        if self.fp8_scale not in ("tensor", "head"):
            raise InvalidArgument(f"fp8_scale must be 'tensor' or 'head', got {self.fp8_scale!r}")
        if self.key_rotation not in ("none", "hadamard"):
            raise InvalidArgument(
                f"key_rotation must be 'none' or 'hadamard', got {self.key_rotation!r}"
            )
        if self.key_rotation == "hadamard":
            if fmt.kind != "int4":
                raise InvalidArgument(f"key_rotation applies to int4 only, not {fmt.name}")
            if self.head_dim & (self.head_dim - 1):
                raise InvalidArgument(
                    f"a Hadamard key rotation needs a power-of-two head_dim, got {self.head_dim}"
                )

    @property
    def fmt(self) -> KVFormat:
        """The resolved :class:`~kvmem.formats.KVFormat`."""
        return resolve_format(self.kv_format, self.dtype)

    @property
    def code_dim(self) -> int:
        """Stored elements per head vector (head_dim, or head_dim / 2 for int4)."""
        return self.fmt.code_dim(self.head_dim)

    @property
    def num_groups(self) -> int:
        """int4 scale/zero groups per head vector (0 for other formats)."""
        return self.head_dim // self.group_size if self.group_size else 0

    @property
    def head_bytes(self) -> int:
        """Bytes of one token's K (or V) for one head in one layer, metadata included."""
        return self.fmt.head_bytes(self.head_dim, self.group_size or self.head_dim)

    @property
    def bytes_per_token_layer(self) -> int:
        """Bytes of one token's K and V in one layer."""
        return 2 * self.num_kv_heads * self.head_bytes

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's K and V over all layers."""
        return self.num_layers * self.bytes_per_token_layer

    def bytes_per_page(self, page_size: int) -> int:
        """Bytes of one page of ``page_size`` tokens over all layers."""
        return page_size * self.bytes_per_token

    def tokens_in(self, num_bytes: int) -> int:
        """How many whole tokens of KV fit in ``num_bytes``."""
        return num_bytes // self.bytes_per_token
