"""The vmem backend's prefix cache: which slots hold which chains of full pages.

A prefix page is one physical page group (every layer's page at one
position of a row), ``page_tokens`` tokens. A page gets the chained key the
paged backend uses, ``(hash(previous key), its tokens)`` from a root of the
cache salt, once its KV is computed. Each slot lists the keys of its leading
pages, a chain: page ``j`` of the slot holds the KV of key ``j``::

    slot 3 (live)  [ k0 | k1 | k2 |    ]      k0..k2 findable
    slot 5 (free)  [ k0 | k1 | q2 ]           kept mapped after free: still findable
    new prompt     k0 k1 q2 q3 ...  ->  longest chain: slot 5, 3 pages

The allocator keeps the lists true: a slot taken by a new sequence, pages
unmapped from a slot (reclaim, unshare) or overwritten (swap-in) cut its
list. Full pages are never written again while their slot is owned.

A key that enters the index (its first slot) or leaves it (its last) is a
KV event (``stored`` / ``removed``, medium ``GPU``) on :attr:`PrefixIndex.events`,
sent as one batch per change.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from kvmem.errors import IntegrityError
from kvmem.tiers.events import EventHub, removed, stored

__all__ = ["PageKey", "PrefixIndex"]

PageKey = tuple[int, tuple[int, ...]]


class PrefixIndex:
    """Per slot, the keys of its leading full pages; per key, the slots holding it."""

    def __init__(self, max_seqs: int, page_tokens: int, events: EventHub | None = None) -> None:
        self.page_tokens = page_tokens
        self.keys: list[list[PageKey]] = [[] for _ in range(max_seqs)]
        self._where: dict[PageKey, set[int]] = {}
        self.events = events if events is not None else EventHub()
        self.queries = 0  # prompt tokens offered to ``add``
        self.hits = 0  # prompt tokens found

    @staticmethod
    def root(cache_salt: Hashable) -> int:
        """The chain seed of a cache salt (the paged backend's)."""
        return hash(("kvmem", cache_salt))

    def chain(self, root: int, tokens: Sequence[int], num_pages: int) -> list[PageKey]:
        """The keys of the first ``num_pages`` pages of ``tokens``."""
        g = self.page_tokens
        out: list[PageKey] = []
        parent = root
        for i in range(num_pages):
            key = (parent, tuple(tokens[i * g : (i + 1) * g]))
            out.append(key)
            parent = hash(key)
        return out

    def match(self, keys: Sequence[PageKey]) -> tuple[int, list[int]]:
        """(pages, slots): the longest run of ``keys`` some slots hold, and those slots."""
        found: list[int] = []
        depth = 0
        for j, key in enumerate(keys):
            slots = [s for s in self._where.get(key, ()) if self.keys[s][j : j + 1] == [key]]
            if not slots:
                break
            found, depth = slots, j + 1
        return depth, sorted(found)

    def holders(self, key: PageKey) -> set[int]:
        """The slots holding ``key`` (a copy; empty if none)."""
        return set(self._where.get(key, ()))

    def append(self, slot: int, page: int, key: PageKey) -> None:
        """Page ``page`` of ``slot`` holds ``key``'s KV (ignored unless it extends the chain)."""
        lst = self.keys[slot]
        if len(lst) == page:
            lst.append(key)
            where = self._where.setdefault(key, set())
            if not where and self.events.active:
                self.events.emit(stored([key], "device"))
                self.events.flush()
            where.add(slot)

    def trim(self, slot: int, keep: int) -> None:
        """``slot`` holds at most its first ``keep`` keyed pages any more."""
        lst = self.keys[slot]
        gone = []
        for key in lst[keep:]:
            where = self._where[key]
            where.discard(slot)
            if not where:
                del self._where[key]
                gone.append(key)
        del lst[keep:]
        if gone and self.events.active:
            self.events.emit(removed(gone, "device"))
            self.events.flush()

    def assign(self, slot: int, keys: Sequence[PageKey]) -> None:
        """``slot``'s leading pages now hold exactly ``keys``."""
        self.trim(slot, 0)
        for j, key in enumerate(keys):
            self.append(slot, j, key)

    def clear(self) -> None:
        """Forget every key."""
        for slot in range(len(self.keys)):
            self.trim(slot, 0)

    def check(self, mapped: Sequence[int], computed: Sequence[int | None]) -> None:
        """IntegrityError unless each slot's keys lie in its mapped pages (``mapped[slot]``)
        and, for an owned slot, in its computed KV (``computed[slot]`` tokens, None if free)."""
        for slot, lst in enumerate(self.keys):
            if len(lst) > mapped[slot]:
                raise IntegrityError(f"slot {slot}: {len(lst)} keyed pages, {mapped[slot]} mapped")
            n = computed[slot]
            if n is not None and len(lst) * self.page_tokens > n:
                raise IntegrityError(f"slot {slot}: keyed pages beyond its computed KV")
            for key in lst:
                if slot not in self._where.get(key, ()):
                    raise IntegrityError(f"slot {slot}: a key missing from the index")
        if sum(len(v) for v in self._where.values()) != sum(len(lst) for lst in self.keys):
            raise IntegrityError("the prefix index lists keys no slot holds")
