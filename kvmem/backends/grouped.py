"""The grouped backend: the paged backend with pages handed out in contiguous runs.

FastSwitch's point: a request whose KV lies in a few contiguous runs of
pages swaps with a few large copies (one per run, covering every layer with
the block-major pool) instead of one small copy per page per layer.

Everything but the choice of free pages is the paged backend's (prefix
caching, fork with copy-on-write, swap, reuse across turns). Free pages are
kept by :class:`BuddyPages`, a buddy allocator::

    order 3  [0 ........ 7]                      free blocks are aligned runs
    order 2                [8 .. 11]             of 2^k pages; a block is split
    order 0                         [12]         in halves to serve a smaller
                                                 request, and a freed page merges
                                                 with its free buddy, repeatedly

A sequence that needs pages gets them, in this order of preference:

1. from its *group*: the free pages left over from the last block it was
   given, which follow its last page;
2. pages right after its last page, if free (growing in place);
3. a new block of ``2^k`` pages, ``2^k`` the smallest power of two at least
   ``max(pages needed, pages held, min_group_pages)`` and at most
   ``max_group_pages``: a growing sequence's groups double in size, so a
   sequence of n pages lies in O(log n) runs; the unused rest of the block
   becomes its group;
4. when no free block is that large (a busy pool), the longer of: the
   longest run of free pages (up to ``2^k``; neighbouring blocks that are
   not buddies still hold consecutive pages), and the back half of the
   largest group of another sequence (or what it needs, if more).

Group pages are free: they count as free capacity and any sequence takes
them when nothing else is left, so grouping never causes OutOfKVMemory.
Prefix-cached free pages are free pages in the buddy blocks (they merge
with their neighbours) and are evicted when a block covering them is handed
out; unlike the paged backend's LRU queue, eviction follows addresses.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kvmem.backends.freepages import FreePages, release_each
from kvmem.backends.paged import PagedAllocator
from kvmem.errors import IntegrityError, InvalidArgument
from kvmem.spec import KVSpec


class BuddyPages:
    """Free pages as buddy blocks plus per-owner groups (see the module docstring)."""

    def __init__(self, num_pages: int, max_group_pages: int, min_group_pages: int = 1) -> None:
        self.num_pages = num_pages
        self.max_group = max_group_pages
        self.min_group = min(min_group_pages, max_group_pages)
        self._top = num_pages.bit_length() - 1
        self._blocks: list[set[int]] = [set() for _ in range(self._top + 1)]
        self._order: dict[int, int] = {}  # start page of each free block -> its order
        self._groups: dict[object, list[int]] = {}  # owner -> [start, end) of its group
        self._num_blocks_pages = 0
        self._num_group_pages = 0
        p = 0
        while p < num_pages:  # largest aligned blocks covering [0, num_pages)
            k = min(self._top, (p & -p).bit_length() - 1 if p else self._top)
            while p + (1 << k) > num_pages:
                k -= 1
            self._add(p, k)
            p += 1 << k

    # ---------------------------------------------------------------- blocks
    def _add(self, p: int, k: int) -> None:
        self._blocks[k].add(p)
        self._order[p] = k
        self._num_blocks_pages += 1 << k

    def _remove(self, p: int, k: int) -> None:
        self._blocks[k].remove(p)
        del self._order[p]
        self._num_blocks_pages -= 1 << k

    def _free_page(self, p: int) -> None:
        k = 0
        while k < self._top:
            buddy = p ^ (1 << k)
            if self._order.get(buddy) != k:
                break
            self._remove(buddy, k)
            p = min(p, buddy)
            k += 1
        self._add(p, k)

    def _alloc_block(self, k: int) -> int | None:
        """Start of a free block of order ``k``, split from the smallest larger one if need be."""
        j = next((j for j in range(k, self._top + 1) if self._blocks[j]), None)
        if j is None:
            return None
        p = min(self._blocks[j])
        self._remove(p, j)
        while j > k:
            j -= 1
            self._add(p + (1 << j), j)
        return p

    def _longest_run(self) -> tuple[int, int]:
        """(start, length) of the longest run of free pages in the blocks (adjacent blocks
        that are not buddies do not merge, but their pages are still consecutive)."""
        best = (0, 0)
        start = end = -1
        for p in sorted(self._order):
            if p != end:
                start = p
            end = p + (1 << self._order[p])
            if end - start > best[1]:
                best = (start, end - start)
        return best

    def _block_of(self, page: int) -> tuple[int, int] | None:
        """(start, order) of the free block holding ``page``, if any."""
        for k in range(self._top + 1):
            start = page & ~((1 << k) - 1)
            if self._order.get(start) == k:
                return start, k
        return None

    def _claim(self, page: int) -> bool:
        """Take ``page`` out of the free blocks, splitting its block; False if not there."""
        found = self._block_of(page)
        if found is None:
            return False
        start, k = found
        self._remove(start, k)
        while k > 0:
            k -= 1
            half = 1 << k
            if page < start + half:
                self._add(start + half, k)
            else:
                self._add(start, k)
                start += half
        return True

    # ---------------------------------------------------------------- groups
    def _set_group(self, owner: object, start: int, end: int) -> None:
        self.forget(owner)
        if start < end:
            self._groups[owner] = [start, end]
            self._num_group_pages += end - start

    def _take_group(self, owner: object, n: int, from_end: bool = False) -> list[int]:
        g = self._groups.get(owner)
        if g is None or n <= 0:
            return []
        k = min(n, g[1] - g[0])
        if from_end:
            pages = list(range(g[1] - k, g[1]))
            g[1] -= k
        else:
            pages = list(range(g[0], g[0] + k))
            g[0] += k
        self._num_group_pages -= k
        if g[0] == g[1]:
            del self._groups[owner]
        return pages

    def _group_size(self, need: int, held: int) -> int:
        want = max(need, held, self.min_group)
        return min(1 << (want - 1).bit_length(), self.max_group)

    # --------------------------------------------------------------- FreePages
    def __len__(self) -> int:
        return self._num_blocks_pages + self._num_group_pages

    def __iter__(self) -> Iterator[int]:
        for p, k in self._order.items():
            yield from range(p, p + (1 << k))
        for start, end in self._groups.values():
            yield from range(start, end)

    def take(self, n: int, owner: object, held: int, after: int | None) -> list[int]:
        """``n`` pages for ``owner``, as contiguous as the free pages allow."""
        out = self._take_group(owner, n)
        last = out[-1] if out else after
        while len(out) < n and last is not None and last + 1 < self.num_pages:
            if not self._claim(last + 1):
                break
            last += 1
            out.append(last)
        while len(out) < n:
            need = n - len(out)
            size = self._group_size(need, held + len(out))
            p = self._alloc_block(size.bit_length() - 1)
            if p is not None:
                got = list(range(p, p + size))
            else:  # no block that large: the longest free run, or half the largest group
                start, length = self._longest_run() if self._order else (0, 0)
                victim = max(self._groups, key=self._group_len, default=None)
                vlen = self._group_len(victim) if victim is not None else 0
                steal = min(vlen, max(need, min(size, vlen // 2)))
                if length >= steal:
                    got = list(range(start, start + min(size, length)))
                    for q in got:
                        self._claim(q)
                else:  # its owner keeps the front half
                    got = self._take_group(victim, steal, from_end=True)
            out += got[:need]
            if len(got) > need:
                self._set_group(owner, got[need], got[-1] + 1)
        return out

    def _group_len(self, owner: object) -> int:
        g = self._groups[owner]
        return g[1] - g[0]

    def put(self, page: int, cached: bool) -> None:
        """A freed page rejoins the buddy blocks (cached or not) and merges."""
        self._free_page(page)

    def release(self, pages: list[int], ref: list[int], keys: list[Any]) -> int:
        """:meth:`FreePages.release`: each page no longer held is :meth:`put`."""
        return release_each(self, pages, ref, keys)

    def remove(self, page: int) -> None:
        """A free cached page is held again: take it out of its block or group."""
        if self._claim(page):
            return
        for owner, (start, end) in list(self._groups.items()):
            if start <= page < end:  # cut the group there; the pages after go back
                self._groups[owner][1] = page
                self._num_group_pages -= end - page
                for q in range(page + 1, end):
                    self._free_page(q)
                if page == start:
                    del self._groups[owner]
                return
        raise InvalidArgument(f"page {page} is not free")

    def forget(self, owner: object) -> None:
        """The owner's group goes back to the buddy blocks."""
        g = self._groups.pop(owner, None)
        if g is not None:
            self._num_group_pages -= g[1] - g[0]
            for q in range(g[0], g[1]):
                self._free_page(q)

    def check(self) -> None:
        """Blocks aligned, in range, unmerged buddies only, disjoint from each other and groups."""
        seen: set[int] = set()
        for k, starts in enumerate(self._blocks):
            for p in starts:
                if p % (1 << k) or p + (1 << k) > self.num_pages or self._order.get(p) != k:
                    raise IntegrityError(f"free block {p} of order {k} is malformed")
                if k < self._top and self._order.get(p ^ (1 << k)) == k:
                    raise IntegrityError(f"free buddies {p} and {p ^ (1 << k)} not merged")
                if not seen.isdisjoint(range(p, p + (1 << k))):
                    raise IntegrityError(f"free block {p} of order {k} overlaps another")
                seen.update(range(p, p + (1 << k)))
        if len(self._order) != sum(len(s) for s in self._blocks):
            raise IntegrityError("free block index out of sync")
        for start, end in self._groups.values():
            if not 0 <= start < end <= self.num_pages or not seen.isdisjoint(range(start, end)):
                raise IntegrityError(f"group [{start}, {end}) is malformed or overlaps")
            seen.update(range(start, end))
        if len(seen) != len(self):
            raise IntegrityError("free page counts are off")


class GroupedAllocator(PagedAllocator):
    """FastSwitch-style KV: paged KV whose pages come in contiguous, buddy-allocated runs.

    Options: those of the paged backend (``swap_mode="runs"`` by default:
    one copy per run) plus ``max_group_pages`` (default 256: the largest
    block a growing sequence is given at once) and ``min_group_pages``
    (default 4: the smallest), both powers of two.
    """

    def __init__(
        self,
        spec: KVSpec,
        *,
        max_group_pages: int = 256,
        min_group_pages: int = 4,
        **options: Any,
    ) -> None:
        for name, v in (("max_group_pages", max_group_pages), ("min_group_pages", min_group_pages)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v & (v - 1):
                raise InvalidArgument(f"{name} must be a power of two, got {v!r}")
        self.max_group_pages = max_group_pages
        self.min_group_pages = min_group_pages
        super().__init__(spec, **options)

    def _make_free_pages(self) -> FreePages:
        return BuddyPages(self.num_pages, self.max_group_pages, self.min_group_pages)


__all__ = ["BuddyPages", "GroupedAllocator"]
