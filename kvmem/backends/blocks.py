r"""Block-table memory: a pool of fixed-size pages, prefix caching, copy-on-write fork.

The memory half of the paged and grouped backends (their swap layer is
:mod:`kvmem.backends.paged`; the sequence bookkeeping is
:mod:`kvmem.backends.base`).

Memory is a pool of pages of ``page_size`` token slots (see
:class:`~kvmem.storage.PagePool`). A sequence holds a list of pages, its
block table; KV entry ``i`` lives in slot ``i % page_size`` of page
``blocks[i // page_size]``. Block tables are rows of one dense int32 array,
so a layout slices rows instead of building them::

    row 0  [ 7  2  9  0  0 ]     seq "a": 3 pages
    row 1  [ 5  0  0  0  0 ]     seq "b": 1 page
    row 2  [ 0  0  0  0  0 ]     free row

Prefix caching. When a page fills up (``commit``), it gets a key chained
from the keys before it, ``(hash(previous key), its tokens)``, and becomes
findable. ``add`` walks a new prompt's full pages through those keys and
shares every leading page it finds. The index maps ``hash(key)`` to the
page, and a hit is confirmed against the page's exact key (its parent hash
and token tuple), so a hash collision is a miss, never wrong KV. The hashes
of a run of pages come from one :func:`kvmem.native.chain_hashes` call
(Python's own ``hash`` values, computed natively). Pages no sequence holds sit in one free
queue, which is also the eviction order::

    front (taken first)                                        back
    [ never-filled pages ] [ cached pages, least recently freed first ]

A cached page found again by ``add`` leaves the queue; a cached page taken
for new KV loses its key (eviction).

Fork shares every page holding the parent's KV. The page that the next KV
entry goes to is copied on the first ``reserve`` that would write into it
while it is shared (copy-on-write); full pages are never written again and
stay shared.

Cache tiers (:mod:`kvmem.tiers`, options ``host_cache_tokens``,
``disk_cache_dir``, ``disk_cache_tokens``). A cached page evicted from the
pool is written down to a host tier, and from there to a disk tier, each an
LRU of its own capacity (``write_through``: pages are copied down as they
fill instead). ``add`` extends the device hit with the pages the tiers hold::

    prompt pages   [ p0 ][ p1 ][ p2 ][ p3 ][ p4 ][ last, partial ]
    found in       device device host  disk  --     (never cached)
    add returns    4 pages' tokens; p2 and p3 start loading into new pages

The loads run asynchronously (``s.transfer``); any call naming the sequence
waits for them, as for a swap. A page that fails to load (a disk error, a
checksum) ends the hit there: ``seq_info().num_computed`` then shows what
loaded, and the pages after it stay reserved for the engine to compute.
Every page that gains or loses a key in any tier is a KV event
(:attr:`BlockTableBackend.kv_events`).

Which free page a sequence gets is a pluggable policy
(:mod:`kvmem.backends.freepages`); the grouped backend uses a buddy policy
and keeps everything else.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch

from kvmem.allocator import Capabilities, KVStats, capacity_pages
from kvmem.backends import blockbatch
from kvmem.backends.base import KVBackend, ceil_div
from kvmem.backends.blockstate import BlockSeq
from kvmem.backends.freepages import FreePages, FreeQueue
from kvmem.errors import IntegrityError, InvalidArgument, OutOfKVMemory
from kvmem.layout import BatchLayout, build_layout
from kvmem.native import chain_hashes, page_publisher
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV, PagePool, StorageLayout
from kvmem.swap import block_runs
from kvmem.tiers import LoadHandle, TierManager, WritePolicy
from kvmem.tiers.events import EventHub, removed, stored

__all__ = ["BlockKey", "BlockSeq", "BlockTableBackend"]

BlockKey = tuple[int, tuple[int, ...]]


class BlockTableBackend(KVBackend[BlockSeq]):
    """Pages, prefix cache and block tables; no swap (the paged backend adds it).

    Options: ``num_tokens`` or ``num_bytes`` (capacity), ``page_size`` (a
    power of two, default 16), ``device``, ``storage_layout`` (``"block"``
    or ``"layer"``, see :mod:`kvmem.storage`), ``prefix_caching`` (default
    True). Cache tiers (default off): ``host_cache_tokens``,
    ``disk_cache_dir`` with ``disk_cache_tokens``, ``tier_write_policy``
    (``"write_back"`` or ``"write_through"``); see the module docstring.
    :attr:`kv_events` publishes the cache's KV events to its subscribers.
    """

    capabilities = Capabilities(prefix_caching=True, fork=True)
    native_passes: bool | None = None
    """The batched calls' common case in C++ (:mod:`kvmem.backends.blockbatch`): None uses it
    when the extension is in use, False never (the Python version, same results)."""

    def __init__(
        self,
        spec: KVSpec,
        *,
        num_tokens: int | None = None,
        num_bytes: int | None = None,
        page_size: int = 16,
        device: torch.device | str = "cpu",
        storage_layout: StorageLayout = "block",
        prefix_caching: bool = True,
        host_cache_tokens: int | None = None,
        disk_cache_dir: str | os.PathLike[str] | None = None,
        disk_cache_tokens: int | None = None,
        tier_write_policy: WritePolicy = "write_back",
    ) -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise InvalidArgument(f"page_size must be a positive int, got {page_size!r}")
        if page_size & (page_size - 1):
            raise InvalidArgument(f"page_size must be a power of two, got {page_size}")
        super().__init__()
        self.spec = spec
        self.page_size = page_size
        self.granularity = page_size
        self.device = torch.device(device)
        self.prefix_caching = prefix_caching
        if not prefix_caching:
            self.capabilities = replace(self.capabilities, prefix_caching=False)
        self.num_pages = capacity_pages(spec, page_size, num_tokens, num_bytes)
        self.pool = PagePool(spec, self.num_pages, page_size, self.device, storage_layout)
        self._ref = [0] * self.num_pages
        self._key: list[BlockKey | None] = [None] * self.num_pages
        self._index: dict[int, int] = {}  # hash(key) -> the page holding that key
        self._page_hash = [0] * self.num_pages  # hash(key) of each keyed page
        self._free: FreePages = self._make_free_pages()
        self._num_cached_free = 0
        self._table = np.zeros((16, 16), dtype=np.int32)
        self._table_view: tuple[np.ndarray, torch.Tensor] | None = None  # _table as a tensor
        self._free_rows = list(range(15, -1, -1))
        self._prefix_queries = 0
        self._prefix_hits = 0
        self.kv_events = EventHub()
        self._tiers = self._make_tiers(
            host_cache_tokens, disk_cache_dir, disk_cache_tokens, tier_write_policy
        )

    def _make_tiers(
        self,
        host_tokens: int | None,
        disk_dir: str | os.PathLike[str] | None,
        disk_tokens: int | None,
        policy: WritePolicy,
    ) -> TierManager | None:
        """The host and disk tiers below the prefix cache (None when neither is asked for)."""
        for name, v in (("host_cache_tokens", host_tokens), ("disk_cache_tokens", disk_tokens)):
            bad = isinstance(v, bool) or not isinstance(v, int) or v < self.page_size
            if v is not None and bad:
                raise InvalidArgument(f"{name} must be an int >= page_size, got {v!r}")
        if host_tokens is None and disk_dir is None and disk_tokens is None:
            return None
        if not self.prefix_caching:
            raise InvalidArgument("host and disk cache tiers need prefix_caching=True")
        bpt = self.pool.page_bytes // self.page_size
        return TierManager(
            self.pool,
            host_bytes=None if host_tokens is None else host_tokens * bpt,
            disk_dir=disk_dir,
            disk_bytes=None if disk_tokens is None else disk_tokens * bpt,
            write_policy=policy,
            events=self.kv_events,
        )

    def _make_free_pages(self) -> FreePages:
        """The free-page policy (subclasses hand out pages differently)."""
        return FreeQueue(self.num_pages)

    # ------------------------------------------------------------------ pages
    def _take_row(self) -> int:
        if not self._free_rows:
            n = self._table.shape[0]
            self._table = np.concatenate([self._table, np.zeros_like(self._table)])
            self._free_rows = list(range(2 * n - 1, n - 1, -1))
        return self._free_rows.pop()

    def _set_row(self, s: BlockSeq, start: int) -> None:
        n = len(s.blocks)
        if n == start + 1 and n <= self._table.shape[1]:  # one page more: a decode step's
            self._table[s.row, start] = s.blocks[start]
            return
        if n > self._table.shape[1]:
            w = max(n, 2 * self._table.shape[1])
            self._table = np.pad(self._table, ((0, 0), (0, w - self._table.shape[1])))
        self._table[s.row, start:n] = s.blocks[start:]

    def _take(self, s: BlockSeq, n: int, after: int | None) -> list[int]:
        """``n`` free pages for ``s`` (the caller checked there are), held once each."""
        pages = self._free.take(n, s, len(s.blocks), after)
        evicted: list[tuple[BlockKey, int]] = []
        keys, ref = self._key, self._ref
        for b in pages:
            key = keys[b]
            if key is not None:  # evict its cached prefix
                self._num_cached_free -= 1
                h = self._page_hash[b]  # hash(key), without reading its tokens again
                if self._index.get(h) == b:
                    del self._index[h]
                keys[b] = None
                evicted.append((key, b))
            ref[b] = 1
        if evicted:
            self._drop_cached(evicted)
        return pages

    def _drop_cached(self, pairs: list[tuple[BlockKey, int]]) -> None:
        """Cached pages lost their keys: events; the tiers write them down (before reuse)."""
        if self.kv_events.active:
            self.kv_events.emit(removed([k for k, _ in pairs], "device"))
        if self._tiers is not None:
            self._tiers.evicted(pairs)
        self.kv_events.flush()

    def _release(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            cached = self._key[b] is not None
            self._free.put(b, cached)
            self._num_cached_free += cached

    def _ensure_free(self, n: int) -> bool:
        """Whether ``n`` pages are free (the swap layer first waits for swaps that free some)."""
        return len(self._free) >= n

    def _key_of(self, s: BlockSeq, i: int) -> BlockKey:
        ps = self.page_size
        return (s.hashes[i - 1] if i else s.root, tuple(s.tokens[i * ps : (i + 1) * ps]))

    def _publish(self, b: int, key: BlockKey, h: int | None = None) -> bool:
        """Make page ``b`` findable under ``key`` (``h``: its hash, if known); False if the page
        has a key already or another page holds this one."""
        if h is None:
            h = hash(key)
        if self._key[b] is None and h not in self._index:
            self._index[h] = b
            self._key[b] = key
            self._page_hash[b] = h
            if self.kv_events.active:
                self.kv_events.emit(stored([key], "device"))
            return True
        return False

    def _needed(self, s: BlockSeq, target: int) -> tuple[int, bool]:
        """(new pages, copy-on-write needed) to reserve up to ``target`` (> ``s.reserved``)."""
        new = max(0, ceil_div(target, self.page_size) - len(s.blocks))
        idx = s.num_computed // self.page_size
        return new, idx < len(s.blocks) and self._ref[s.blocks[idx]] > 1

    # ------------------------------------------------------------------ hooks
    def _admit(self, seq_id: Hashable, tokens: list[int], cache_salt: Hashable) -> BlockSeq:
        """Share the longest cached prefix of full pages (never the last token's page)."""
        ps = self.page_size
        s = BlockSeq(tokens, -1, hash(("kvmem", cache_salt)))
        if self.prefix_caching:
            parent = s.root
            full = (len(tokens) - 1) // ps
            index, keys = self._index, self._key
            hashes = chain_hashes(tokens, ps, 0, min(full, 1), parent)  # most prompts miss at once
            for i in range(full):
                if i == len(hashes):
                    hashes += chain_hashes(tokens, ps, i, full - i, parent)
                b = index.get(hashes[i])
                if b is None:
                    break
                key = keys[b]
                if (
                    key is None
                    or key[0] != parent
                    or key[1] != tuple(tokens[i * ps : (i + 1) * ps])
                ):
                    break  # a hash collision: another prefix
                parent = hashes[i]
                s.blocks.append(b)
                s.hashes.append(parent)
            for b in s.blocks:
                if self._ref[b] == 0:
                    self._free.remove(b)
                    self._num_cached_free -= 1
                self._ref[b] += 1
            self._prefix_queries += len(tokens)
            self._prefix_hits += len(s.blocks) * ps
            if self._tiers is not None:
                self._load_from_tiers(s, tokens)
        s.num_computed = s.reserved = len(s.blocks) * ps
        s.row = self._take_row()
        self._set_row(s, 0)
        return s

    def _load_from_tiers(self, s: BlockSeq, tokens: list[int]) -> None:
        """Extend ``s``'s device hit with pages the tiers hold; their loads start now.

        Takes free pages (evicting cached ones, which may write pages down)
        before asking the tiers again, so every page asked for is still
        there. ``s.transfer`` is the load: calls naming ``s`` wait for it.
        """
        assert self._tiers is not None
        ps = self.page_size
        d = len(s.blocks)
        parent = s.hashes[-1] if s.hashes else s.root
        keys: list[BlockKey] = []
        for i in range(d, (len(tokens) - 1) // ps):
            key = (parent, tuple(tokens[i * ps : (i + 1) * ps]))
            keys.append(key)
            parent = hash(key)
        n = min(len(self._tiers.match(keys)), len(self._free))
        if not n:
            return
        pages = self._take(s, n, s.blocks[-1] if s.blocks else None)
        n = len(self._tiers.match(keys[:n]))
        for b in reversed(pages[n:]):
            self._release(b)
        if not n:
            return
        s.transfer = self._tiers.load(keys[:n], pages[:n])
        s.blocks += pages[:n]
        s.hashes += [hash(k) for k in keys[:n]]

    def _await_transfer(self, s: BlockSeq) -> None:
        """Finish ``s``'s tier load: publish what loaded, compute the rest again."""
        h = s.transfer
        assert isinstance(h, LoadHandle)
        loaded = h.result()
        s.transfer = None
        d = len(s.blocks) - len(h.pages)
        for i in range(loaded):
            self._publish(s.blocks[d + i], h.keys[i])
        if loaded < len(h.pages):  # the pages after a failed one hold no KV; keep them as slots
            s.num_computed = (d + loaded) * self.page_size
            del s.hashes[d + loaded :]
        self.kv_events.flush()

    def _grow(self, seq_id: Hashable, s: BlockSeq, target: int) -> None:
        ps = self.page_size
        if target <= len(s.blocks) * ps and self._ref[s.blocks[s.num_computed // ps]] == 1:
            s.reserved = target  # fits in pages already held, none shared: the common step
            return
        new, cow = self._needed(s, target)
        if not self._ensure_free(new + cow):
            raise OutOfKVMemory(
                f"sequence {seq_id!r} needs {new + cow} pages, {len(self._free)} free"
            )
        self._grow_into(s, target, new, cow)

    def _grow_into(self, s: BlockSeq, target: int, new: int, cow: bool) -> None:
        """Take ``new`` pages (and copy the shared one, ``cow``) for ``s``: they are free."""
        ps = self.page_size
        if cow:
            idx = s.num_computed // ps
            old = s.blocks[idx]
            (b,) = self._take(s, 1, s.blocks[idx - 1] if idx else None)
            self.pool.copy_pages([old], [b])
            self._release(old)
            s.blocks[idx] = b
            self._table[s.row, idx] = b
        if new:
            start = len(s.blocks)
            s.blocks.extend(self._take(s, new, s.blocks[-1] if s.blocks else None))
            self._set_row(s, start)
        s.reserved = target

    def _can_grow(self, grow: list[tuple[BlockSeq, int]]) -> bool:
        total = 0
        for s, target in grow:
            new, cow = self._needed(s, target)
            total += new + cow
        return self._ensure_free(total)

    def _pages(self, s: BlockSeq) -> Sequence[int]:
        return s.blocks

    # ------------------------------------------------------------ batched calls
    def reserve_many(self, seq_ids: Sequence[Hashable], num_tokens: int | Sequence[int]) -> None:
        """:meth:`KVBackend.reserve_many` in one pass (see :mod:`kvmem.backends.blockbatch`)."""
        blockbatch.reserve_many(self, seq_ids, num_tokens)

    def commit_many(self, seq_ids: Sequence[Hashable], num_tokens: int | Sequence[int]) -> None:
        """:meth:`KVBackend.commit_many` in one pass (see :mod:`kvmem.backends.blockbatch`)."""
        blockbatch.commit_many(self, seq_ids, num_tokens)

    def append_many(self, seq_ids: Sequence[Hashable], token_ids: Sequence[Sequence[int]]) -> None:
        """:meth:`KVBackend.append_many` in one pass (see :mod:`kvmem.backends.blockbatch`)."""
        if not blockbatch.append_many(self, seq_ids, token_ids):
            super().append_many(seq_ids, token_ids)

    def layout(self, batch: Sequence[tuple[Hashable, int]]) -> BatchLayout:
        """:meth:`KVBackend.layout`, checked and gathered in one native pass where it can be."""
        lay = blockbatch.layout(self, batch)
        return super().layout(batch) if lay is None else lay

    def _make_layout(
        self,
        ids: tuple[Hashable, ...],
        seqs: list[BlockSeq],
        seq_lens: np.ndarray,
        query_lens: np.ndarray,
    ) -> BatchLayout:
        """The layout read straight from the block table's rows (no gathered copy of them)."""
        rows = np.fromiter((s.row for s in seqs), dtype=np.int64, count=len(seqs))
        return build_layout(
            self.page_size,
            self._table,
            seq_lens,
            query_lens,
            ids,
            self.device,
            self.spec,
            rows=rows,
        )

    def _on_commit(self, s: BlockSeq, end: int) -> None:
        """Publish the pages that filled up to the prefix cache."""
        if self.prefix_caching:
            ps = self.page_size
            first, last = s.num_computed // ps, end // ps
            if last == first:
                return
            parent = s.hashes[first - 1] if first else s.root
            publish = page_publisher()
            hashes, published = publish(
                s.tokens,
                ps,
                first,
                last - first,
                parent,
                s.blocks,
                self._key,
                self._index,
                self._page_hash,
            )
            s.hashes += hashes
            if published:
                if self.kv_events.active:
                    for key, _ in published:
                        self.kv_events.emit(stored([key], "device"))
                if self._tiers is not None:
                    self._tiers.filled(published)
            self.kv_events.flush()

    def _fork(self, parent_id: Hashable, p: BlockSeq, child_id: Hashable) -> BlockSeq:
        """The child shares the parent's computed pages and knows its tokens."""
        c = BlockSeq(list(p.tokens), self._take_row(), p.root)
        c.blocks = p.blocks[: ceil_div(p.num_computed, self.page_size)]
        c.hashes = list(p.hashes)
        c.num_computed = c.reserved = p.num_computed
        for b in c.blocks:
            self._ref[b] += 1
        self._set_row(c, 0)
        return c

    def _drop(self, seq_id: Hashable, s: BlockSeq) -> None:
        """Release the sequence's pages; full ones stay cached until evicted."""
        del self._seqs[seq_id]
        self._clear_blocks(s)
        self._free_rows.append(s.row)

    def _clear_blocks(self, s: BlockSeq) -> None:
        """Release every page ``s`` holds (last first) and empty its table row."""
        self._num_cached_free += self._free.release(s.blocks, self._ref, self._key)
        self._table[s.row, : len(s.blocks)] = 0
        s.blocks = []
        self._free.forget(s)

    def _layer(self, i: int) -> LayerKV:
        return self.pool.layer(i)

    def _shutdown(self) -> None:
        if self._tiers is not None:
            self._tiers.close()
        self._index.clear()
        self.pool.buffers.clear()

    # ---------------------------------------------------------------- queries
    def block_table(self, seq_id: Hashable) -> list[int]:
        """The pages the sequence holds, in order (none while swapped out)."""
        return list(self._get(seq_id).blocks)

    def runs(self, seq_id: Hashable) -> list[tuple[int, int]]:
        """``(first_page, length)`` of each run of consecutive pages of the block table."""
        return block_runs(self._get(seq_id).blocks)

    def _stats_extra(self) -> dict[str, float]:
        """Backend figures for ``KVStats.extra``: the tiers' as ``tier_*`` (see
        :meth:`kvmem.tiers.TierManager.stats`)."""
        if self._tiers is None:
            return {}
        return {f"tier_{k}": v for k, v in self._tiers.stats().items()}

    def stats(self) -> KVStats:
        """Memory use; ``filled`` counts shared pages once."""
        self._sync()
        ps = self.page_size
        filled: dict[int, int] = {}
        for s in self._seqs.values():
            for i, b in enumerate(s.blocks):
                f = min(ps, max(0, s.num_computed - i * ps))
                if f > filled.get(b, 0):
                    filled[b] = f
        swapped = [s for s in self._seqs.values() if s.swapped]
        return KVStats(
            page_size=ps,
            bytes_per_token=self.spec.bytes_per_token,
            capacity_tokens=self.num_pages * ps,
            used_tokens=(self.num_pages - len(self._free)) * ps,
            filled_tokens=sum(filled.values()),
            reserved_tokens=sum(
                s.reserved - s.num_computed for s in self._seqs.values() if not s.swapped
            ),
            cached_tokens=self._num_cached_free * ps,
            free_tokens=len(self._free) * ps,
            swapped_tokens=sum(s.num_computed for s in swapped),
            num_seqs=len(self._seqs),
            num_swapped_seqs=len(swapped),
            prefix_queries=self._prefix_queries,
            prefix_hits=self._prefix_hits,
            extra=self._stats_extra(),
        )

    # -------------------------------------------------------------- integrity
    def _pinned(self) -> Mapping[int, int]:
        """Pages held outside the block tables (e.g. read by swaps in flight): page -> count."""
        return {}

    def _check_swapped(self, sid: Hashable, s: BlockSeq) -> None:
        """Check a swapped-out sequence (the swap layer's; here none may exist)."""
        raise IntegrityError(f"{sid!r}: swapped out in a backend without swap")

    def _check_backend(self) -> None:
        """Verify reference counts, free pages, the cache index and the block tables."""
        ps = self.page_size
        refs = [0] * self.num_pages
        for b, n in self._pinned().items():
            refs[b] += n
        rows: set[int] = set()
        for sid, s in self._seqs.items():
            for b in s.blocks:
                refs[b] += 1
            if s.swapped:
                self._check_swapped(sid, s)
            elif s.reserved > len(s.blocks) * ps or len(s.blocks) != ceil_div(s.reserved, ps):
                raise IntegrityError(f"{sid!r}: {len(s.blocks)} pages for {s.reserved} slots")
            elif s.parked:
                raise IntegrityError(f"{sid!r}: parked but not swapped out")
            if self.prefix_caching and len(s.hashes) != s.num_computed // ps:
                raise IntegrityError(f"{sid!r}: {len(s.hashes)} page keys")
            row, n = self._table[s.row], len(s.blocks)
            if s.row in rows or list(row[:n]) != s.blocks or row[n:].any():
                raise IntegrityError(f"{sid!r}: block table row out of sync")
            rows.add(s.row)
        if refs != self._ref:
            raise IntegrityError("reference counts do not match the block tables")
        free = set(self._free)
        if len(free) != len(self._free) or free != {b for b, r in enumerate(refs) if r == 0}:
            raise IntegrityError("free pages are not exactly the unreferenced pages")
        self._free.check()
        for h, b in self._index.items():
            key = self._key[b]
            if key is None or hash(key) != h:
                raise IntegrityError(f"cache entry points at page {b}, which has another key")
        for b, key in enumerate(self._key):
            if key is not None and hash(key) != self._page_hash[b]:
                raise IntegrityError(f"page {b}: its recorded hash is not its key's")
        keyed = [b for b, k in enumerate(self._key) if k is not None]
        if len(keyed) != len(self._index):
            raise IntegrityError("pages with keys and the cache index differ")
        if self._num_cached_free != sum(1 for b in free if self._key[b] is not None):
            raise IntegrityError("cached page count is off")
        if rows & set(self._free_rows) or len(rows) + len(self._free_rows) != self._table.shape[0]:
            raise IntegrityError("block table rows leaked")
        if self._tiers is not None:
            self._tiers.check_integrity()
