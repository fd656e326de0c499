"""Copies between a vmem slot's KV rows and a sequence's host copy.

A sequence's KV in one layer is the first ``n * token_bytes`` bytes of its
slot's row (K and V codes, and the int4 scales and zeros, side by side), so
swapping it is one contiguous copy per layer, into or out of a host tensor
``[num_layers, n * token_bytes]`` (pinned where CUDA is used)::

    layer li, slot s   [ t0 | t1 | ... | t(n-1) | (reserved, unmapped) ... ]
                         \\____ one copy_ ____/
    host[li]           [ t0 | t1 | ... | t(n-1) ]
"""

from __future__ import annotations

import torch

from kvmem.errors import OutOfHostMemory

__all__ = ["HostKV", "copy_in", "copy_out"]


class HostKV:
    """A swapped sequence's KV on the host: ``data[li]`` is layer ``li``'s first ``tokens``."""

    __slots__ = ("data", "tokens")

    def __init__(
        self, num_layers: int, tokens: int, token_bytes: int, device: torch.device
    ) -> None:
        pin = device.type == "cuda" and torch.cuda.is_available()
        where = "meta" if device.type == "meta" else "cpu"
        try:
            self.data = torch.empty(
                (num_layers, tokens * token_bytes), dtype=torch.uint8, device=where, pin_memory=pin
            )
        except RuntimeError as e:  # the host allocator refused
            raise OutOfHostMemory(f"host copy of {tokens} tokens: {e}") from e
        self.tokens = tokens

    @property
    def nbytes(self) -> int:
        """Bytes of KV held."""
        return self.data.shape[0] * self.data.shape[1]


def copy_out(rows: list[torch.Tensor], slot: int, host: HostKV) -> None:
    """Copy the slot's first ``host.tokens`` KV entries of every layer into ``host``."""
    nb = host.data.shape[1]
    if nb == 0:
        return
    blocking = host.data.device.type != "cpu" or not host.data.is_pinned()
    for li, row in enumerate(rows):
        host.data[li].copy_(row[slot, :nb], non_blocking=not blocking)


def copy_in(rows: list[torch.Tensor], slot: int, host: HostKV) -> None:
    """Copy ``host`` back into the first ``host.tokens`` KV entries of the slot, every layer."""
    nb = host.data.shape[1]
    if nb == 0:
        return
    pinned = host.data.device.type == "cpu" and host.data.is_pinned()
    for li, row in enumerate(rows):
        row[slot, :nb].copy_(host.data[li], non_blocking=pinned)
