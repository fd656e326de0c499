"""The vmem allocator's prefix-cache hooks over :class:`~kvmem.backends.vmem.prefix.PrefixIndex`.

Functions of the allocator (its hooks call them) kept apart to keep the
allocator's module short.
"""

from __future__ import annotations

from collections.abc import Hashable

from kvmem.backends.vmem import tiering
from kvmem.backends.vmem.seq import VSeq
from kvmem.backends.vmem.state import VMemState

__all__ = ["admit", "cached_tokens", "claim_prefix", "on_commit", "trim_keys"]


def admit(a: VMemState, tokens: list[int], cache_salt: Hashable) -> VSeq:
    """A new sequence, sharing the longest prefix of full pages a slot holds.

    Without a hit it takes no slot or memory until its first ``reserve``.
    A hit in a free slot takes that slot (its pages are already mapped); a
    hit in a live sequence's slot maps its pages under a free slot, as
    ``fork`` does. Never the last token's page; no hit when the pool or
    the slots are short. With cache tiers, pages after the device hit that a
    tier holds are loaded (:func:`.tiering.load`).
    """
    s = VSeq(tokens)
    px = a._prefix
    if px is None:
        return s
    s.root = px.root(cache_salt)
    px.queries += len(tokens)
    keys = px.chain(s.root, tokens, (len(tokens) - 1) // px.page_tokens)
    depth, slots = px.match(keys)
    if depth:
        if a._swapper.pending:
            a._make_room(depth, 1)  # finished swap-outs give slots back: match again
            depth, slots = px.match(keys)
        with a._lock:
            depth = claim_prefix(a, s, depth, slots)
        s.hashes = [hash(k) for k in keys[:depth]]
        px.hits += depth * px.page_tokens
    if a._tiers is not None and depth < len(keys):
        if a._swapper.pending:
            a._make_room(len(keys) - depth, int(s.slot < 0))
        with a._lock:
            tiering.load(a, s, keys, depth)
    return s


def claim_prefix(a: VMemState, s: VSeq, depth: int, slots: list[int]) -> int:
    """(Lock held.) Give ``s`` a slot holding the first ``depth`` pages of ``slots``'.

    Returns the pages it got (0: none, nothing changed).
    """
    px, sp = a._prefix, a.space
    assert px is not None
    n = depth * px.page_tokens
    free = [x for x in slots if x in a._free_slots]
    live = [x for x in slots if (o := a._owner[x]) is not None and o.slot == x]
    if free and sp.pages(n) <= sp.num_groups - a._held():
        slot = free[0]
        a._mapper.settle(slot)
        tiering.evict_tail(a, slot, depth)
        px.trim(slot, depth)
    elif live and a._free_slots:
        src = live[0]
        slot = min(a._free_slots, key=lambda i: sp.covered[i])
        a._mapper.settle(slot)
        tiering.evict_tail(a, slot, 0)
        sp.clear(slot)
        px.trim(slot, 0)
        sp.share(src, slot, n)
        px.assign(slot, px.keys[src][:depth])
    else:
        return 0
    del a._free_slots[slot]
    a._owner[slot] = s
    s.slot = slot
    s.num_computed = s.reserved = n
    a._set_held(s, n)
    return depth


def on_commit(a: VMemState, s: VSeq, end: int) -> None:
    """Key the pages that filled up, findable by later prompts (and, write-through, tiered)."""
    px = a._prefix
    if px is None or s.slot < 0:
        return
    g = px.page_tokens
    first = s.num_computed // g
    keys = []
    for i in range(first, end // g):
        key = (s.hashes[i - 1] if i else s.root, tuple(s.tokens[i * g : (i + 1) * g]))
        s.hashes.append(hash(key))
        px.append(s.slot, i, key)
        keys.append(key)
    if keys and a._tiers is not None:
        pages = a._tier_pages
        a._tiers.filled([(k, pages.page(s.slot, first + i)) for i, k in enumerate(keys)])


def trim_keys(a: VMemState) -> None:
    """(Lock held.) Cut every slot's prefix keys to the pages still mapped there."""
    if a._prefix is not None:
        for slot, groups in enumerate(a.space.groups):
            a._prefix.trim(slot, len(groups))


def cached_tokens(a: VMemState) -> int:
    """(Lock held.) Tokens of keyed pages under free slots: reusable, and counted free."""
    px = a._prefix
    return 0 if px is None else sum(len(px.keys[s]) for s in a._free_slots) * px.page_tokens
