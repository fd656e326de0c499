"""The paged backend: fixed-size pages, prefix caching, copy-on-write fork.

Memory is a pool of pages of ``page_size`` token slots (see
:class:`~kvmem.storage.PagePool`). A sequence holds a list of pages, its
block table; KV entry ``i`` lives in slot ``i % page_size`` of page
``blocks[i // page_size]``.

Prefix caching. When a page fills up (``commit``), it gets a key chained
from the keys before it, ``(hash(previous key), its tokens)``, and becomes
findable. ``add`` walks a new prompt's full pages through those keys and
shares every leading page it finds. Pages no sequence holds sit in one free
queue, which is also the eviction order::

    front (taken first)                                        back
    [ never-filled pages ] [ cached pages, least recently freed first ]

A cached page found again by ``add`` leaves the queue; a cached page taken
for new KV loses its key (eviction).

Fork shares every page holding the parent's KV. The page that the next KV
entry goes to is copied on the first ``reserve`` that would write into it
while it is shared (copy-on-write); full pages are never written again and
stay shared.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch

from kvmem.allocator import (
    KVAllocator,
    KVStats,
    SeqInfo,
    SwapHandle,
    capacity_pages,
    check_count,
    check_tokens,
    raise_unknown,
    register_backend,
)
from kvmem.errors import DuplicateSequence, IntegrityError, InvalidArgument, KVError, OutOfKVMemory
from kvmem.layout import BatchLayout, build_layout
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV, PagePool, StorageLayout

BlockKey = tuple[int, tuple[int, ...]]


class _Seq:
    """Per-sequence state: tokens, pages, counts."""

    __slots__ = ("tokens", "blocks", "hashes", "num_computed", "reserved", "row", "root")

    def __init__(self, tokens: list[int], row: int, root: int) -> None:
        self.tokens = tokens
        self.blocks: list[int] = []
        self.hashes: list[int] = []  # hash of the key of each full, computed page
        self.num_computed = 0
        self.reserved = 0
        self.row = row
        self.root = root  # chain seed: hash of the cache salt


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@register_backend("paged")
class PagedAllocator(KVAllocator):
    """vLLM-style paged KV with prefix caching.

    Options: ``num_tokens`` or ``num_bytes`` (capacity), ``page_size`` (a
    power of two, default 16), ``device``, ``storage_layout`` (``"block"``
    or ``"layer"``, see :mod:`kvmem.storage`), ``prefix_caching`` (default
    True).
    """

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
    ) -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise InvalidArgument(f"page_size must be a positive int, got {page_size!r}")
        if page_size & (page_size - 1):
            raise InvalidArgument(f"page_size must be a power of two, got {page_size}")
        self.spec = spec
        self.page_size = page_size
        self.device = torch.device(device)
        self.prefix_caching = prefix_caching
        self.num_pages = capacity_pages(spec, page_size, num_tokens, num_bytes)
        self.pool = PagePool(spec, self.num_pages, page_size, self.device, storage_layout)
        self._ref = [0] * self.num_pages
        self._key: list[BlockKey | None] = [None] * self.num_pages
        self._cached: dict[BlockKey, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.num_pages))
        self._num_cached_free = 0
        self._seqs: dict[Hashable, _Seq] = {}
        self._table = np.zeros((16, 16), dtype=np.int32)
        self._free_rows = list(range(15, -1, -1))
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._closed = False

    # ------------------------------------------------------------------ helpers
    def _get(self, seq_id: Hashable) -> _Seq:
        if self._closed:
            raise KVError("allocator is closed")
        s = self._seqs.get(seq_id)
        if s is None:
            raise raise_unknown(seq_id)
        return s

    def _take_row(self) -> int:
        if not self._free_rows:
            n = self._table.shape[0]
            self._table = np.concatenate([self._table, np.zeros_like(self._table)])
            self._free_rows = list(range(2 * n - 1, n - 1, -1))
        return self._free_rows.pop()

    def _set_row(self, s: _Seq, start: int) -> None:
        n = len(s.blocks)
        if n > self._table.shape[1]:
            w = max(n, 2 * self._table.shape[1])
            self._table = np.pad(self._table, ((0, 0), (0, w - self._table.shape[1])))
        self._table[s.row, start:n] = s.blocks[start:]

    def _pop_free(self) -> int:
        b, _ = self._free.popitem(last=False)
        key = self._key[b]
        if key is not None:  # evict its cached prefix
            self._num_cached_free -= 1
            if self._cached.get(key) == b:
                del self._cached[key]
            self._key[b] = None
        self._ref[b] = 1
        return b

    def _release(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            self._free[b] = None
            if self._key[b] is None:
                self._free.move_to_end(b, last=False)
            else:
                self._num_cached_free += 1

    def _needed(self, s: _Seq, n: int) -> tuple[int, bool]:
        """(new pages, copy-on-write needed) for reserve(s, n)."""
        target = s.num_computed + n
        if target <= s.reserved:
            return 0, False
        new = max(0, _ceil_div(target, self.page_size) - len(s.blocks))
        idx = s.num_computed // self.page_size
        cow = idx < len(s.blocks) and self._ref[s.blocks[idx]] > 1
        return new, cow

    # --------------------------------------------------------------- interface
    def add(self, seq_id: Hashable, token_ids: Sequence[int], cache_salt: Hashable = None) -> int:
        """Register a sequence; share the longest cached prefix of full pages."""
        if self._closed:
            raise KVError("allocator is closed")
        if seq_id in self._seqs:
            raise DuplicateSequence(f"sequence {seq_id!r} is already registered")
        toks = check_tokens(token_ids)
        ps = self.page_size
        s = _Seq(toks, -1, hash(("kvmem", cache_salt)))
        if self.prefix_caching:
            parent = s.root
            for i in range((len(toks) - 1) // ps):
                key = (parent, tuple(toks[i * ps : (i + 1) * ps]))
                b = self._cached.get(key)
                if b is None:
                    break
                parent = hash(key)
                s.blocks.append(b)
                s.hashes.append(parent)
            for b in s.blocks:
                if self._ref[b] == 0:
                    del self._free[b]
                    self._num_cached_free -= 1
                self._ref[b] += 1
            self._prefix_queries += len(toks)
            self._prefix_hits += len(s.blocks) * ps
        s.num_computed = s.reserved = len(s.blocks) * ps
        s.row = self._take_row()
        self._set_row(s, 0)
        self._seqs[seq_id] = s
        return s.num_computed

    def append(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Add known tokens whose KV is still to be written."""
        s = self._get(seq_id)
        if len(token_ids) == 1 and type(token_ids[0]) is int and token_ids[0] >= 0:
            s.tokens.append(token_ids[0])
        else:
            s.tokens.extend(check_tokens(token_ids))

    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        """Ensure slots for the next ``num_tokens`` KV entries (all or nothing)."""
        s = self._get(seq_id)
        if type(num_tokens) is not int or num_tokens <= 0:
            check_count("num_tokens", num_tokens)
        target = s.num_computed + num_tokens
        if target <= s.reserved:
            return
        if target <= len(s.blocks) * self.page_size and (
            self._ref[s.blocks[s.num_computed // self.page_size]] == 1
        ):
            s.reserved = target  # fits in pages already held, none shared: the common step
            return
        new, cow = self._needed(s, num_tokens)
        if new + cow > len(self._free):
            raise OutOfKVMemory(
                f"sequence {seq_id!r} needs {new + cow} pages, {len(self._free)} free"
            )
        if cow:
            idx = s.num_computed // self.page_size
            old = s.blocks[idx]
            b = self._pop_free()
            self.pool.copy_pages([old], [b])
            self._release(old)
            s.blocks[idx] = b
            self._table[s.row, idx] = b
        if new:
            start = len(s.blocks)
            s.blocks.extend(self._pop_free() for _ in range(new))
            self._set_row(s, start)
        s.reserved = target

    def can_reserve(self, requests: Mapping[Hashable, int]) -> bool:
        """Whether every ``reserve(seq, n)`` of ``requests`` fits at once."""
        total = 0
        for sid, n in requests.items():
            check_count("num_tokens", n)
            new, cow = self._needed(self._get(sid), n)
            total += new + cow
        return total <= len(self._free)

    def layout(self, batch: Sequence[tuple[Hashable, int]]) -> BatchLayout:
        """Block-table layout of ``[(seq_id, num_new_tokens), ...]``."""
        if not batch:
            raise InvalidArgument("layout of an empty batch")
        b = len(batch)
        rows = np.empty(b, dtype=np.int64)
        seq_lens = np.empty(b, dtype=np.int32)
        qlens = np.empty(b, dtype=np.int32)
        seqs = self._seqs
        for i, (sid, n) in enumerate(batch):
            s = seqs.get(sid)
            if s is None:
                raise raise_unknown(sid)
            if type(n) is not int or n <= 0:
                check_count("num_new_tokens", n)
            end = s.num_computed + n
            if end > s.reserved:
                raise InvalidArgument(
                    f"sequence {sid!r}: {n} new tokens need {end} reserved slots, "
                    f"{s.reserved} are; call reserve first"
                )
            rows[i] = s.row
            seq_lens[i] = end
            qlens[i] = n
        ids = tuple(sid for sid, _ in batch)
        if len(set(ids)) != b:
            raise InvalidArgument("a sequence appears twice in the batch")
        max_pages = -(-int(seq_lens.max()) // self.page_size)
        return build_layout(
            self.page_size,
            self._table[rows, :max_pages],
            seq_lens,
            qlens,
            ids,
            self.device,
            self.spec,
            zero_padded=True,
        )

    def commit(self, seq_id: Hashable, num_tokens: int) -> None:
        """Mark ``num_tokens`` more KV entries written; publish pages that filled up."""
        s = self._get(seq_id)
        if type(num_tokens) is not int or num_tokens <= 0:
            check_count("num_tokens", num_tokens)
        end = s.num_computed + num_tokens
        if end > s.reserved:
            raise InvalidArgument(
                f"sequence {seq_id!r}: commit to {end} tokens beyond the {s.reserved} reserved"
            )
        if end > len(s.tokens):
            raise InvalidArgument(
                f"sequence {seq_id!r}: commit to {end} tokens but only {len(s.tokens)} are known; "
                "append them first"
            )
        if self.prefix_caching:
            ps = self.page_size
            for i in range(s.num_computed // ps, end // ps):
                key = (s.hashes[-1] if s.hashes else s.root, tuple(s.tokens[i * ps : (i + 1) * ps]))
                s.hashes.append(hash(key))
                b = s.blocks[i]
                if self._key[b] is None and key not in self._cached:
                    self._cached[key] = b
                    self._key[b] = key
        s.num_computed = end

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares the parent's computed pages and knows its tokens."""
        p = self._get(parent_id)
        if child_id in self._seqs:
            raise DuplicateSequence(f"sequence {child_id!r} is already registered")
        c = _Seq(list(p.tokens), self._take_row(), p.root)
        c.blocks = p.blocks[: _ceil_div(p.num_computed, self.page_size)]
        c.hashes = list(p.hashes)
        c.num_computed = c.reserved = p.num_computed
        for b in c.blocks:
            self._ref[b] += 1
        self._set_row(c, 0)
        self._seqs[child_id] = c

    def free(self, seq_id: Hashable) -> None:
        """Release the sequence's pages; full ones stay cached until evicted."""
        s = self._get(seq_id)
        del self._seqs[seq_id]
        for b in reversed(s.blocks):
            self._release(b)
        self._table[s.row, : len(s.blocks)] = 0
        self._free_rows.append(s.row)

    def swap_out(self, seq_ids: Iterable[Hashable]) -> SwapHandle:
        """Not available in this backend yet: raises NotImplementedError."""
        raise NotImplementedError("the paged backend does not swap yet; use recompute")

    def swap_in(self, seq_ids: Iterable[Hashable]) -> SwapHandle:
        """Not available in this backend yet: raises NotImplementedError."""
        raise NotImplementedError("the paged backend does not swap yet; use recompute")

    def layer(self, i: int) -> LayerKV:
        """The KV storage of layer ``i``."""
        if self._closed:
            raise KVError("allocator is closed")
        return self.pool.layer(i)

    def seq_info(self, seq_id: Hashable) -> SeqInfo:
        """Counts of one sequence."""
        s = self._get(seq_id)
        return SeqInfo(len(s.tokens), s.num_computed, s.reserved, False)

    def seq_ids(self) -> list[Hashable]:
        """Every registered sequence."""
        return list(self._seqs)

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The pages the sequence holds, in order."""
        return list(self._get(seq_id).blocks)

    def stats(self) -> KVStats:
        """Memory use; ``filled`` counts shared pages once."""
        ps = self.page_size
        filled: dict[int, int] = {}
        for s in self._seqs.values():
            for i, b in enumerate(s.blocks):
                f = min(ps, max(0, s.num_computed - i * ps))
                if f > filled.get(b, 0):
                    filled[b] = f
        used = self.num_pages - len(self._free)
        return KVStats(
            page_size=ps,
            bytes_per_token=self.spec.bytes_per_token,
            capacity_tokens=self.num_pages * ps,
            used_tokens=used * ps,
            filled_tokens=sum(filled.values()),
            reserved_tokens=sum(s.reserved - s.num_computed for s in self._seqs.values()),
            cached_tokens=self._num_cached_free * ps,
            free_tokens=len(self._free) * ps,
            swapped_tokens=0,
            num_seqs=len(self._seqs),
            num_swapped_seqs=0,
            prefix_queries=self._prefix_queries,
            prefix_hits=self._prefix_hits,
        )

    def check_integrity(self) -> None:
        """Verify reference counts, the free queue, the cache index and every block table."""
        ps = self.page_size
        refs = [0] * self.num_pages
        rows: set[int] = set()
        for sid, s in self._seqs.items():
            for b in s.blocks:
                refs[b] += 1
            if not 0 <= s.num_computed <= s.reserved <= len(s.blocks) * ps:
                raise IntegrityError(f"{sid!r}: counts out of order")
            if len(s.blocks) != _ceil_div(s.reserved, ps):
                raise IntegrityError(f"{sid!r}: {len(s.blocks)} pages for {s.reserved} slots")
            if s.num_computed > len(s.tokens):
                raise IntegrityError(f"{sid!r}: more KV than tokens")
            if self.prefix_caching and len(s.hashes) != s.num_computed // ps:
                raise IntegrityError(f"{sid!r}: {len(s.hashes)} page keys")
            row = self._table[s.row]
            if s.row in rows or list(row[: len(s.blocks)]) != s.blocks or row[len(s.blocks) :].any():
                raise IntegrityError(f"{sid!r}: block table row out of sync")
            rows.add(s.row)
        if refs != self._ref:
            raise IntegrityError("reference counts do not match the block tables")
        free = set(self._free)
        if len(free) != len(self._free) or free != {b for b, r in enumerate(refs) if r == 0}:
            raise IntegrityError("free queue is not exactly the unreferenced pages")
        for key, b in self._cached.items():
            if self._key[b] != key:
                raise IntegrityError(f"cache entry points at page {b}, which has another key")
        keyed = [b for b, k in enumerate(self._key) if k is not None]
        if len(keyed) != len(self._cached):
            raise IntegrityError("pages with keys and the cache index differ")
        if self._num_cached_free != sum(1 for b in free if self._key[b] is not None):
            raise IntegrityError("cached page count is off")
        if rows & set(self._free_rows) or len(rows) + len(self._free_rows) != self._table.shape[0]:
            raise IntegrityError("block table rows leaked")

    def close(self) -> None:
        """Drop every sequence and the page pool."""
        self._seqs.clear()
        self._cached.clear()
        self._closed = True
        self.pool.buffers.clear()


__all__ = ["PagedAllocator"]
