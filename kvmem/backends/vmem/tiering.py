r"""Cache tiers under the vmem prefix cache (:class:`~kvmem.tiers.TierManager`).

The tiers copy whole prefix pages, a page group (one physical page per
layer), by page id (:class:`~kvmem.backends.vmem.rowpages.RowPages`).
Only mapped pages are ever named. A keyed page loses its key when its slot
is reclaimed, cleared, taken by a new sequence or unshared; the allocator
calls :func:`evict_tail` first, while the page is still mapped and intact,
so that ``write_back`` writes down keys no other slot holds. ``write_through``
copies pages down as they are keyed (``on_commit``). ``add`` extends the
device hit with pages the tiers hold (:func:`load`): the sequence's slot is
mapped as far as the hit reaches and the loads run on the tiers' workers;
calls naming the sequence wait for them (:func:`finish_load`), and a page
that fails to load ends the hit there.
"""

from __future__ import annotations

import os

from kvmem.backends.vmem.prefix import PageKey
from kvmem.backends.vmem.rowpages import RowPages
from kvmem.backends.vmem.seq import VSeq
from kvmem.backends.vmem.space import VirtualKV
from kvmem.backends.vmem.state import VMemState
from kvmem.errors import DriverError, InvalidArgument
from kvmem.tiers import EventHub, LoadHandle, TierManager, WritePolicy

__all__ = [
    "check_options",
    "evict_before_shrink",
    "evict_tail",
    "finish_load",
    "load",
    "make_tiers",
]


def check_options(
    page_tokens: int | None,
    host_tokens: int | None,
    disk_dir: str | os.PathLike[str] | None,
    disk_tokens: int | None,
) -> bool:
    """Whether tiers are asked for; InvalidArgument for sizes below a page or no prefix caching.

    ``page_tokens`` is the prefix page size (None: no prefix caching).
    """
    for name, v in (("host_cache_tokens", host_tokens), ("disk_cache_tokens", disk_tokens)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < (page_tokens or 1):
            raise InvalidArgument(f"{name} must be an int of at least one page, got {v!r}")
    if host_tokens is None and disk_dir is None and disk_tokens is None:
        return False
    if page_tokens is None:
        raise InvalidArgument("host and disk cache tiers need prefix caching")
    return True


def make_tiers(
    space: VirtualKV,
    events: EventHub,
    host_tokens: int | None,
    disk_dir: str | os.PathLike[str] | None,
    disk_tokens: int | None,
    policy: WritePolicy,
) -> tuple[TierManager, RowPages]:
    """The tier manager over ``space``'s rows (its own copy worker), and the page ids."""
    pages = RowPages(space)
    bpt = space.token_bytes * space.num_layers
    tiers = TierManager(
        pages,
        host_bytes=None if host_tokens is None else host_tokens * bpt,
        disk_dir=disk_dir,
        disk_bytes=None if disk_tokens is None else disk_tokens * bpt,
        write_policy=policy,
        events=events,
    )
    return tiers, pages


def evict_tail(a: VMemState, slot: int, keep: int) -> None:
    """(Lock held.) ``slot``'s keyed pages from ``keep`` on are about to be unmapped or reused.

    With tiers: waits for write-through copies reading them, writes down
    (``write_back``) those whose key no other slot holds, and trims them
    from the index now, so that another holder of a key, dropped next, finds
    it gone and writes it down. Without tiers it does nothing (the callers
    trim as they always do).
    """
    px, tiers = a._prefix, a._tiers
    if px is None or tiers is None:
        return
    pages = a._tier_pages
    lst = px.keys[slot][keep:]
    if not lst:
        return
    ids = [pages.page(slot, keep + i) for i in range(len(lst))]
    tiers.settle_reads(ids)
    gone = [(k, p) for k, p in zip(lst, ids, strict=True) if px.holders(k) == {slot}]
    if gone:
        tiers.evicted(gone)
    px.trim(slot, keep)


def evict_before_shrink(a: VMemState, slot: int, keep: int, count: int) -> None:
    """(Lock held.) :func:`evict_tail` of the pages ``space.shrink(slot, keep, count)`` unmaps."""
    if a._tiers is None:
        return
    sp = a.space
    lst, floor = sp.groups[slot], sp.pages(keep)
    tail = freed = 0
    while freed < count and len(lst) - tail > floor:  # as VirtualKV.shrink walks the tail
        tail += 1
        freed += sp.ref[lst[-tail]] == 1
    evict_tail(a, slot, len(lst) - tail)


def load(a: VMemState, s: VSeq, keys: list[PageKey], depth: int) -> None:
    """(Lock held.) Extend ``s``'s device hit of ``depth`` pages with pages the tiers hold.

    Maps the slot (taking a free one if ``s`` has none) as far as the hit
    reaches, then starts the loads (``s.transfer``). Maps first and asks the
    tiers again, since making room may write pages down and push others
    out. No hit when groups or slots are short, or the driver fails.
    """
    tiers, px, sp = a._tiers, a._prefix, a.space
    assert tiers is not None and px is not None
    g = px.page_tokens
    rest = keys[depth : a.max_seq_len // g]
    n = min(len(tiers.match(rest)), sp.num_groups - a._held())
    if n <= 0 or (s.slot < 0 and not a._free_slots):
        return
    target = (depth + n) * g
    slot = s.slot if s.slot >= 0 else a._pick_slot(target)
    a._mapper.settle(slot)
    if s.slot < 0:
        evict_tail(a, slot, 0)
    short = sp.pages(target) - len(sp.groups[slot]) - len(sp.pool)
    try:
        if short > 0:
            a._reclaim(short, slot, target)
        sp.grow(slot, target)
    except DriverError:
        return  # a cache: the engine computes the pages instead
    n = len(tiers.match(rest[:n]))
    if not n:
        return
    if s.slot < 0:
        del a._free_slots[slot]
        a._owner[slot] = s
        s.slot = slot
        px.trim(slot, 0)
    pages = a._tier_pages
    s.transfer = tiers.load(rest[:n], [pages.page(slot, depth + i) for i in range(n)])
    s.num_computed = s.reserved = (depth + n) * g
    s.hashes += [hash(k) for k in rest[:n]]
    a._set_held(s, s.reserved)


def finish_load(a: VMemState, s: VSeq) -> None:
    """Wait for ``s``'s tier load: key what loaded; the pages after a failed one are recomputed."""
    h = s.transfer
    assert isinstance(h, LoadHandle) and a._prefix is not None
    loaded = h.result()
    s.transfer = None
    g = a._prefix.page_tokens
    d = len(s.hashes) - len(h.pages)
    with a._lock:
        for i in range(loaded):
            a._prefix.append(s.slot, d + i, h.keys[i])
        if loaded < len(h.pages):
            s.num_computed = (d + loaded) * g
            del s.hashes[d + loaded :]
