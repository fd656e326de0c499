"""Free-page policies of the block-table backends: which free page a sequence gets next.

The block-table backends (:mod:`kvmem.backends.blocks`: paged, grouped)
keep the bookkeeping of pages (reference counts, prefix keys, block tables)
and ask a :class:`FreePages` policy only for *which* free pages to hand out.
A page is free when no sequence holds it; a free page may still hold
prefix-cached KV (it has a key), and handing it out evicts that (the backend
drops the key).

* :class:`FreeQueue` (``paged``): one queue, never-filled pages first, then
  cached pages least recently freed first.
* :class:`~kvmem.backends.grouped.BuddyPages` (``grouped``): contiguous
  runs, split and merged buddy-style.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Protocol

from kvmem.native import page_releaser


class FreePages(Protocol):
    """The free pages of a pool and the order they are handed out in."""

    def __len__(self) -> int:
        """Free pages, cached ones included."""
        ...

    def __iter__(self) -> Iterator[int]:
        """Every free page once."""
        ...

    def take(self, n: int, owner: object, held: int, after: int | None) -> list[int]:
        """Hand out ``n`` free pages (``n <= len(self)``) for ``owner``.

        ``held`` is how many pages the owner already has and ``after`` the
        page the new ones will follow in its block table (None: none).
        """
        ...

    def put(self, page: int, cached: bool) -> None:
        """``page`` became free; ``cached``: it holds prefix-cached KV."""
        ...

    def release(self, pages: list[int], ref: list[int], keys: list[Any]) -> int:
        """Drop one hold of each of ``pages`` (a freed sequence's, released last first):
        ``ref[page] -= 1``, and each page no longer held is :meth:`put` (cached when
        ``keys[page]`` is set). Returns how many of those are cached."""
        ...

    def remove(self, page: int) -> None:
        """A free cached page is held again (a prefix-cache hit)."""
        ...

    def forget(self, owner: object) -> None:
        """``owner`` holds no pages any more (freed or swapped out)."""
        ...

    def check(self) -> None:
        """Raise IntegrityError if the policy's own structures are inconsistent."""
        ...


class FreeQueue:
    """The paged backend's free queue, which is also its eviction order::

    front (taken first)                                        back
    [ never-filled pages ] [ cached pages, least recently freed first ]
    """

    def __init__(self, num_pages: int) -> None:
        self._q: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))

    def __len__(self) -> int:
        return len(self._q)

    @property
    def queue(self) -> OrderedDict[int, None]:
        """The queue itself, front first (the batched passes take from and put to it)."""
        return self._q

    def __iter__(self) -> Iterator[int]:
        return iter(self._q)

    def take(self, n: int, owner: object, held: int, after: int | None) -> list[int]:
        """The ``n`` pages at the front of the queue."""
        return [self._q.popitem(last=False)[0] for _ in range(n)]

    def put(self, page: int, cached: bool) -> None:
        """Cached pages join the back, others the front."""
        self._q[page] = None
        if not cached:
            self._q.move_to_end(page, last=False)

    def release(self, pages: list[int], ref: list[int], keys: list[Any]) -> int:
        """:meth:`FreePages.release` in one pass (:func:`kvmem.native.release_pages`)."""
        return page_releaser()(pages, ref, keys, self._q, self._q.move_to_end)

    def remove(self, page: int) -> None:
        """Take a cached page out of the queue."""
        del self._q[page]

    def forget(self, owner: object) -> None:
        """Nothing to forget: the queue keeps no per-owner state."""

    def check(self) -> None:
        """Nothing to check beyond what the backend checks."""


def release_each(free: FreePages, pages: list[int], ref: list[int], keys: list[Any]) -> int:
    """:meth:`FreePages.release` as a loop of :meth:`FreePages.put` (for policies without a
    batched version)."""
    cached = 0
    for b in reversed(pages):
        ref[b] -= 1
        if not ref[b]:
            c = keys[b] is not None
            free.put(b, c)
            cached += c
    return cached


__all__ = ["FreePages", "FreeQueue", "release_each"]
