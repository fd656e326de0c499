"""What the vmem allocator's helper modules (checks, prefix hooks, tiers) read of it.

A :class:`typing.Protocol`, so :mod:`.checks` and :mod:`.prefixing` are
typed against the allocator's state without importing the allocator (which
imports them).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Protocol

from kvmem.backends.vmem.driver import VMemDriver
from kvmem.backends.vmem.mapahead import MapAhead
from kvmem.backends.vmem.prefix import PrefixIndex
from kvmem.backends.vmem.rowpages import RowPages
from kvmem.backends.vmem.seq import VSeq
from kvmem.backends.vmem.space import VirtualKV
from kvmem.spec import KVSpec
from kvmem.swap.manager import SwapManager
from kvmem.tiers import TierManager

__all__ = ["VMemState"]


class VMemState(Protocol):
    """The allocator's slots, groups, prefix index and workers (see ``VMemAllocator``)."""

    spec: KVSpec
    space: VirtualKV
    driver: VMemDriver
    page_bytes: int
    page_size: int
    max_seqs: int
    max_seq_len: int
    _seqs: dict[Hashable, VSeq]
    _owner: list[VSeq | None]
    _free_slots: OrderedDict[int, None]
    _quarantine: set[int]
    _held_sum: int
    _lock: threading.Lock
    _mapper: MapAhead
    _swapper: SwapManager
    _prefix: PrefixIndex | None
    _tiers: TierManager | None
    _tier_pages: RowPages

    def _pick_slot(self, want: int) -> int: ...
    def _reclaim(self, short: int, slot: int, target: int) -> None: ...

    def _held(self) -> int: ...
    def _set_held(self, s: VSeq, n: int) -> None: ...
    def _make_room(self, groups: int, slots: int) -> None: ...
    def _check_host(self) -> None: ...
    def _swap_extra(self) -> dict[str, float]: ...
