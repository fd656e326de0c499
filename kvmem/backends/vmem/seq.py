"""What the vmem allocator keeps per sequence, beyond the base class's counts."""

from __future__ import annotations

from kvmem.backends.base import SeqState
from kvmem.backends.vmem.hostkv import HostKV
from kvmem.swap.manager import Transfer
from kvmem.tiers import LoadHandle

__all__ = ["VSeq"]


class VSeq(SeqState):
    """One sequence: the base counts, plus its slot, the page groups it holds, its host copy.

    ``swapped`` (from the base) means its KV is on the host; once the
    swap-out copy (``transfer``) is done it holds no slot.
    """

    __slots__ = ("slot", "held", "held_cover", "host", "root", "hashes")

    transfer: Transfer | LoadHandle | None  # a swap or tier load of this sequence in flight

    def __init__(self, tokens: list[int]) -> None:
        super().__init__(tokens)
        self.slot = -1
        self.held = 0  # groups its reserved tokens need
        self.held_cover = 0  # tokens those groups can hold
        self.host: HostKV | None = None  # the host copy while swapped
        self.root = 0  # prefix-key chain seed: hash of the cache salt
        self.hashes: list[int] = []  # hash of the key of each full, computed page
