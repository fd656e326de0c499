"""Which host pages hold whose KV, how much of it is current, and what may be evicted.

Every sequence with KV on the host has a :class:`HostCopy`: its host pages
(page ``i`` of the copy holds the sequence's KV entries ``[i * page_size,
(i + 1) * page_size)``) and ``valid``, how many leading KV entries on the
host are identical to the sequence's KV. A swapped-out sequence's copy is
the only one and is pinned; the others sit in one of two eviction tiers,
each least recently used first::

    RESIDENT  copies of sequences that were swapped back in: the device has
              the same KV, so evicting only loses reuse (the next swap-out
              copies every page again)
    PARKED    sequences finished with keep_on_host: the only copy of a
              conversation's KV, kept for its next turn; evicting drops it

RESIDENT copies go first. Eviction calls ``on_evict(key, tier)`` after the
copy and its pages are gone, so the owner can forget the sequence.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from kvmem.errors import IntegrityError, OutOfHostMemory
from kvmem.swap.host import HostPagePool

Tier = Literal["resident", "parked"]
TIERS: tuple[Tier, ...] = ("resident", "parked")


@dataclass
class HostCopy:
    """A sequence's KV pages on the host; the first ``valid`` KV entries are current."""

    pages: list[int] = field(default_factory=list)
    valid: int = 0


class HostCache:
    """Host copies keyed by sequence id, over one :class:`HostPagePool`."""

    def __init__(self, pool: HostPagePool, on_evict: Callable[[Hashable, Tier], None]) -> None:
        self.pool = pool
        self.copies: dict[Hashable, HostCopy] = {}
        self._tiers: dict[Tier, OrderedDict[Hashable, None]] = {t: OrderedDict() for t in TIERS}
        self._tier_of: dict[Hashable, Tier] = {}
        self._on_evict = on_evict

    def get(self, key: Hashable) -> HostCopy | None:
        """The host copy of ``key``, if any."""
        return self.copies.get(key)

    def tier(self, key: Hashable) -> Tier | None:
        """The eviction tier of ``key``'s copy (None: pinned or absent)."""
        return self._tier_of.get(key)

    def set_tier(self, key: Hashable, tier: Tier | None) -> None:
        """Pin ``key``'s copy (None) or make it evictable as most recently used of ``tier``."""
        old = self._tier_of.pop(key, None)
        if old is not None:
            del self._tiers[old][key]
        if tier is not None and key in self.copies:
            self._tiers[tier][key] = None
            self._tier_of[key] = tier

    def evictable_pages(self, exclude: Collection[Hashable] = ()) -> int:
        """Host pages that eviction could free, not counting the copies of ``exclude``."""
        return sum(len(self.copies[k].pages) for k in self._tier_of if k not in exclude)

    def ensure(self, sizes: Mapping[Hashable, int]) -> None:
        """Grow each ``key``'s copy to at least ``sizes[key]`` pages, all or nothing.

        Evicts other copies, RESIDENT tier first, least recently used first,
        only as far as needed. Raises :class:`OutOfHostMemory` having changed
        nothing when even evicting every evictable copy would not make room.
        """
        need = {
            k: n - len(self.copies[k].pages) if k in self.copies else n for k, n in sizes.items()
        }
        total = sum(max(0, n) for n in need.values())
        if total > self.pool.num_free:
            room = self.pool.num_free + self.evictable_pages(exclude=sizes.keys())
            if total > room:
                raise OutOfHostMemory(
                    f"host pool: {total} pages needed, {self.pool.num_free} free and "
                    f"{room - self.pool.num_free} evictable of {self.pool.num_pages}"
                )
            self._evict(total - self.pool.num_free, exclude=sizes.keys())
        for k, n in need.items():
            c = self.copies.setdefault(k, HostCopy())
            if n > 0:
                c.pages += self.pool.alloc(n, after=c.pages[-1] if c.pages else None)

    def _evict(self, pages: int, exclude: Collection[Hashable]) -> None:
        for tier in TIERS:
            for key in list(self._tiers[tier]):
                if pages <= 0:
                    return
                if key in exclude:
                    continue
                pages -= len(self.copies[key].pages)
                self.release(key)
                self._on_evict(key, tier)

    def truncate(self, key: Hashable, num_pages: int, valid: int) -> None:
        """Keep the first ``num_pages`` pages of ``key``'s copy, ``valid`` entries current."""
        c = self.copies[key]
        self.pool.free(c.pages[num_pages:])
        del c.pages[num_pages:]
        c.valid = min(c.valid, valid)

    def release(self, key: Hashable) -> None:
        """Drop ``key``'s copy and free its pages (no-op without one)."""
        c = self.copies.pop(key, None)
        self.set_tier(key, None)
        if c is not None:
            self.pool.free(c.pages)

    def used_pages(self) -> int:
        """Host pages held by copies."""
        return self.pool.num_pages - self.pool.num_free

    def check(self) -> None:
        """Raise IntegrityError unless every host page is in exactly one copy or free."""
        owned = np.zeros(self.pool.num_pages, dtype=np.int64)
        for c in self.copies.values():
            np.add.at(owned, np.asarray(c.pages, dtype=np.int64), 1)
        if (owned > 1).any():
            raise IntegrityError("a host page belongs to two copies")
        if not np.array_equal(owned == 0, self.pool.free_mask()):
            raise IntegrityError("host free map and host copies disagree")
        for tier, keys in self._tiers.items():
            for k in keys:
                if k not in self.copies or self._tier_of.get(k) != tier:
                    raise IntegrityError(f"eviction tier {tier} lists {k!r} wrongly")
        if len(self._tier_of) != sum(len(t) for t in self._tiers.values()):
            raise IntegrityError("eviction tiers out of sync")


__all__ = ["TIERS", "HostCache", "HostCopy", "Tier"]
