"""What the vmem allocator keeps per sequence."""

from __future__ import annotations

from kvmem.backends.vmem.hostkv import HostKV
from kvmem.swap.manager import Transfer

__all__ = ["VSeq"]


class VSeq:
    """One sequence: its tokens and counts, its slot, the page groups it holds, its swap state."""

    __slots__ = (
        "tokens", "num_computed", "reserved", "slot", "held", "held_cover",
        "swapped", "host", "transfer",
    )  # fmt: skip

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.num_computed = 0
        self.reserved = 0
        self.slot = -1
        self.held = 0  # groups its reserved tokens need
        self.held_cover = 0  # tokens those groups can hold
        self.swapped = False  # KV on the host (once ``transfer`` is done, no slot)
        self.host: HostKV | None = None  # the host copy while swapped
        self.transfer: Transfer | None = None  # a swap of this sequence in flight
