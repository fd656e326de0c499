r"""The paged backend: fixed-size pages, prefix caching, copy-on-write fork.

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

Which free page a sequence gets is a pluggable policy
(:mod:`kvmem.backends.freepages`); the grouped backend subclasses this one
with a buddy policy and keeps everything else.

Swap. ``swap_out`` copies a sequence's KV pages to a host pool laid out like
the device pool (:mod:`kvmem.swap`) and releases its device pages;
``swap_in`` takes pages again (all or nothing) and copies the KV back. The
copies run on the swap manager's worker thread (CPU) or stream (CUDA); the
handle completes in submission order. A sequence's states::

             swap_out                 free(keep_on_host=True)
    resident --------> swapped <------------------------------ resident
        ^                 |  \                                   (finished)
        +---- swap_in ----+   parked: swapped, evictable from the host
                                      pool (LRU); resume() or swap_in()

* While a copy is in flight the device pages it reads stay held (not free)
  and the sequence cannot be used; any call naming the sequence first waits
  for its copy, and ``reserve``/``can_reserve``/``swap_in`` wait for
  in-flight swap-outs when they need the pages those will free.
* A copy that fails leaves the sequence where it was (a swap-out failure
  gives the sequence its device pages back; a swap-in failure returns them
  and the sequence stays on the host); the handle re-raises the error. A
  failed ``free(keep_on_host=True)`` frees the sequence.
* Reuse across turns: after ``swap_in`` the host copy is kept (evictable),
  with the count of leading KV entries it still matches; the next
  ``swap_out`` copies only the pages from the first one not fully on the
  host. Host copies are evicted LRU, copies of resident sequences before
  parked sequences (evicting a parked sequence unregisters it).
* One allocator is driven from one thread; only the copies run elsewhere.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import replace
from functools import partial

import numpy as np
import torch

from kvmem.allocator import (
    Capabilities,
    KVAllocator,
    KVStats,
    SeqInfo,
    SwapHandle,
    batch_ids,
    capacity_pages,
    check_commit,
    check_count,
    check_new_tokens,
    check_seq_ids,
    check_tokens,
    raise_unknown,
)
from kvmem.backends.freepages import FreePages, FreeQueue
from kvmem.errors import (
    DuplicateSequence,
    IntegrityError,
    InvalidArgument,
    KVError,
    OutOfHostMemory,
    OutOfKVMemory,
)
from kvmem.layout import BatchLayout, build_layout
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV, PagePool, StorageLayout
from kvmem.swap import (
    COPY_MODES,
    CopyMode,
    CopyPlan,
    HostCache,
    HostPagePool,
    SwapManager,
    Tier,
    Transfer,
    block_runs,
    page_runs,
)

BlockKey = tuple[int, tuple[int, ...]]


class _Seq:
    """Per-sequence state: tokens, pages, counts."""

    __slots__ = (
        "tokens",
        "blocks",
        "hashes",
        "num_computed",
        "reserved",
        "row",
        "root",
        "swapped",
        "parked",
        "transfer",
    )

    def __init__(self, tokens: list[int], row: int, root: int) -> None:
        self.tokens = tokens
        self.blocks: list[int] = []
        self.hashes: list[int] = []  # hash of the key of each full, computed page
        self.num_computed = 0
        self.reserved = 0
        self.row = row
        self.root = root  # chain seed: hash of the cache salt
        self.swapped = False  # KV on the host, no device pages
        self.parked = False  # swapped and finished: evictable (free(keep_on_host=True))
        self.transfer: Transfer | None = None  # a swap of this sequence in flight


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _nothing() -> None:
    """The work of a swap of no sequences."""


class PagedAllocator(KVAllocator):
    """vLLM-style paged KV with prefix caching.

    Options: ``num_tokens`` or ``num_bytes`` (capacity), ``page_size`` (a
    power of two, default 16), ``device``, ``storage_layout`` (``"block"``
    or ``"layer"``, see :mod:`kvmem.storage`), ``prefix_caching`` (default
    True). Swap: ``host_num_tokens`` (host pool capacity, default the device
    capacity; allocated on the first swap-out), ``swap_mode`` (``"runs"``:
    one copy per run of consecutive pages per buffer, default;
    ``"per_block"``: one copy per page per layer, the vLLM 0.x baseline),
    ``swap_reuse`` (keep host copies after swap-in for reuse, default True).
    """


    capabilities = Capabilities(prefix_caching=True, swap=True, keep_on_host=True, fork=True)
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
        host_num_tokens: int | None = None,
        swap_mode: CopyMode = "runs",
        swap_reuse: bool = True,
    ) -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise InvalidArgument(f"page_size must be a positive int, got {page_size!r}")
        if page_size & (page_size - 1):
            raise InvalidArgument(f"page_size must be a power of two, got {page_size}")
        if swap_mode not in COPY_MODES:
            raise InvalidArgument(f"swap_mode must be one of {COPY_MODES}, got {swap_mode!r}")
        if host_num_tokens is not None and (
            isinstance(host_num_tokens, bool)
            or not isinstance(host_num_tokens, int)
            or host_num_tokens < page_size
        ):
            raise InvalidArgument(
                f"host_num_tokens must be an int >= page_size, got {host_num_tokens!r}"
            )
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
        self._cached: dict[BlockKey, int] = {}
        self._free: FreePages = self._make_free_pages()
        self._num_cached_free = 0
        self._seqs: dict[Hashable, _Seq] = {}
        self._table = np.zeros((16, 16), dtype=np.int32)
        self._free_rows = list(range(15, -1, -1))
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._closed = False
        self.swap_mode: CopyMode = swap_mode
        self.swap_reuse = bool(swap_reuse)
        self._host_pages = (host_num_tokens or self.num_pages * page_size) // page_size
        self._host: HostCache | None = None
        self._swapper = SwapManager(self.device)
        self._held: dict[int, int] = {}  # pages read by in-flight swap-outs: count
        self._swap_counts = {"swap_out_bytes": 0, "swap_in_bytes": 0, "swap_copies": 0}

    def _make_free_pages(self) -> FreePages:
        """The free-page policy (subclasses hand out pages differently)."""
        return FreeQueue(self.num_pages)

    # ------------------------------------------------------------------ helpers
    def _lookup(self, seq_id: Hashable) -> _Seq | None:
        """The sequence, its swap (if one is in flight) finished first."""
        if self._closed:
            raise KVError("allocator is closed")
        s = self._seqs.get(seq_id)
        if s is not None and s.transfer is not None:
            self._swapper.settle(s.transfer)
            s = self._seqs.get(seq_id)
        return s

    def _get(self, seq_id: Hashable) -> _Seq:
        s = self._seqs.get(seq_id)
        if s is None or s.transfer is not None:
            s = self._lookup(seq_id)
            if s is None:
                raise raise_unknown(seq_id)
        return s

    def _resident(self, seq_id: Hashable) -> _Seq:
        s = self._get(seq_id)
        if s.swapped:
            raise self._swapped_error(seq_id)
        return s

    @staticmethod
    def _swapped_error(seq_id: Hashable) -> InvalidArgument:
        return InvalidArgument(f"sequence {seq_id!r} is swapped out; swap it in first")

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

    def _take(self, s: _Seq, n: int, after: int | None) -> list[int]:
        """``n`` free pages for ``s`` (the caller checked there are), held once each."""
        pages = self._free.take(n, s, len(s.blocks), after)
        for b in pages:
            key = self._key[b]
            if key is not None:  # evict its cached prefix
                self._num_cached_free -= 1
                if self._cached.get(key) == b:
                    del self._cached[key]
                self._key[b] = None
            self._ref[b] = 1
        return pages

    def _release(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            cached = self._key[b] is not None
            self._free.put(b, cached)
            self._num_cached_free += cached

    def _ensure_free(self, n: int) -> bool:
        """Whether ``n`` pages are free, after waiting for in-flight swaps if that helps."""
        self._swapper.reap()
        while len(self._free) < n and (t := self._swapper.oldest()) is not None:
            self._swapper.settle(t)
        return len(self._free) >= n

    def _key_of(self, s: _Seq, i: int) -> BlockKey:
        ps = self.page_size
        return (s.hashes[i - 1] if i else s.root, tuple(s.tokens[i * ps : (i + 1) * ps]))

    def _publish(self, b: int, key: BlockKey) -> None:
        if self._key[b] is None and key not in self._cached:
            self._cached[key] = b
            self._key[b] = key

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
        self._swapper.reap()  # finished swap-ins publish their pages to the cache
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
                    self._free.remove(b)
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
        if s.swapped:
            raise self._swapped_error(seq_id)
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
        if not self._ensure_free(new + cow):
            raise OutOfKVMemory(
                f"sequence {seq_id!r} needs {new + cow} pages, {len(self._free)} free"
            )
        if cow:
            idx = s.num_computed // self.page_size
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

    def can_reserve(self, requests: Mapping[Hashable, int]) -> bool:
        """Whether every ``reserve(seq, n)`` of ``requests`` fits at once.

        Waits for in-flight swap-outs when the pages they free are needed.
        """
        total = 0
        for sid, n in requests.items():
            check_count("num_tokens", n)
            new, cow = self._needed(self._resident(sid), n)
            total += new + cow
        return self._ensure_free(total)

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
            if s is None or s.swapped or s.transfer is not None:
                s = self._resident(sid)
            if type(n) is not int or n <= 0 or s.num_computed + n > s.reserved:
                check_new_tokens(sid, s.num_computed, s.reserved, n)  # raises
            end = s.num_computed + n
            rows[i] = s.row
            seq_lens[i] = end
            qlens[i] = n
        ids = batch_ids(batch)
        max_pages = -(-int(seq_lens.max()) // self.page_size)
        return build_layout(
            self.page_size,
            self._table[rows, :max_pages],
            seq_lens,
            qlens,
            ids,
            self.device,
            self.spec,
            zero_padded=False,  # rows also hold pages reserved past seq_lens
        )

    def commit(self, seq_id: Hashable, num_tokens: int) -> None:
        """Mark ``num_tokens`` more KV entries written; publish pages that filled up."""
        s = self._get(seq_id)
        if s.swapped:
            raise self._swapped_error(seq_id)
        end = check_commit(seq_id, s.num_computed, s.reserved, len(s.tokens), num_tokens)
        if self.prefix_caching:
            ps = self.page_size
            for i in range(s.num_computed // ps, end // ps):
                key = self._key_of(s, i)
                s.hashes.append(hash(key))
                self._publish(s.blocks[i], key)
        s.num_computed = end

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares the parent's computed pages and knows its tokens."""
        p = self._resident(parent_id)
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

    def free(self, seq_id: Hashable, keep_on_host: bool = False) -> None:
        """Release the sequence's pages; full ones stay cached until evicted.

        ``keep_on_host=True`` parks the finished sequence instead: its KV is
        swapped out (only pages not already current on the host are copied)
        and kept for its next turn (see :meth:`resume`), until evicted from
        the host pool (LRU), which unregisters it. Best effort: if the host
        pool has no room, or the copy fails, the sequence is simply freed.
        """
        s = self._get(seq_id)
        if keep_on_host:
            if s.swapped:
                s.parked = True
                assert self._host is not None
                self._host.set_tier(seq_id, "parked")
                return
            try:
                self._swap_out([seq_id], park=True)
                return
            except OutOfHostMemory:
                pass
        self._drop(seq_id, s)

    def _drop(self, seq_id: Hashable, s: _Seq) -> None:
        del self._seqs[seq_id]
        for b in reversed(s.blocks):
            self._release(b)
        self._table[s.row, : len(s.blocks)] = 0
        s.blocks = []
        self._free_rows.append(s.row)
        self._free.forget(s)
        if self._host is not None:
            self._host.release(seq_id)

    # -------------------------------------------------------------------- swap
    def swap_out(self, seq_ids: Iterable[Hashable]) -> SwapHandle:
        """Copy the sequences' KV to the host pool and release their device pages.

        All or nothing: raises UnknownSequence, InvalidArgument (a sequence
        already swapped out, or named twice) or OutOfHostMemory (the host
        pool cannot take them even after evicting) and changes nothing.
        Reserved slots are kept in ``seq_info().capacity`` and taken again
        by ``swap_in``. The device pages stay held until the copy is done.
        """
        ids = self._swap_ids(seq_ids)
        if not ids:
            return self._swapper.submit(_nothing)
        return self._swap_out(ids, park=False)

    def swap_in(self, seq_ids: Iterable[Hashable]) -> SwapHandle:
        """Take device pages for swapped-out (or parked) sequences and copy their KV back.

        All or nothing: raises UnknownSequence, InvalidArgument (a sequence
        not swapped out, or named twice) or OutOfKVMemory (not enough free
        pages for every sequence's reserved slots) and changes nothing: the
        sequences stay on the host, intact. The sequences can be used at
        once; calls that need their KV wait for the copy.
        """
        ids = self._swap_ids(seq_ids)
        if not ids:
            return self._swapper.submit(_nothing)
        seqs = [self._get(sid) for sid in ids]
        for sid, s in zip(ids, seqs, strict=True):
            if not s.swapped:
                raise InvalidArgument(f"sequence {sid!r} is not swapped out")
        ps = self.page_size
        need = sum(_ceil_div(s.reserved, ps) for s in seqs)
        if not self._ensure_free(need):
            raise OutOfKVMemory(f"swap-in needs {need} pages, {len(self._free)} free")
        host = self._host
        assert host is not None
        src: list[int] = []
        dst: list[int] = []
        done: list[tuple[Hashable, _Seq, bool]] = []
        for sid, s in zip(ids, seqs, strict=True):
            s.blocks = self._take(s, _ceil_div(s.reserved, ps), None)
            self._set_row(s, 0)
            copy = host.get(sid)
            m = _ceil_div(s.num_computed, ps)
            if m:
                assert copy is not None
                src += copy.pages[:m]
                dst += s.blocks[:m]
            host.set_tier(sid, None)
            done.append((sid, s, s.parked))
            s.swapped = s.parked = False
        t = self._submit(
            host.pool.buffers, self.pool.buffers, src, dst, partial(self._swapped_in, done)
        )
        self._swap_counts["swap_in_bytes"] += t.nbytes
        for s in seqs:
            s.transfer = t
        return t

    def resume(
        self, seq_id: Hashable, token_ids: Sequence[int], cache_salt: Hashable = None
    ) -> int:
        """Start the next turn of a sequence kept with ``free(keep_on_host=True)``.

        If ``seq_id`` is parked with the same ``cache_salt`` and
        ``token_ids`` extends its tokens, it is swapped back in (only its KV
        pages move; OutOfKVMemory if they do not fit, the sequence staying
        parked), the new tokens are appended, and its KV count is returned.
        Otherwise any parked copy is dropped and this is ``add``. Raises
        DuplicateSequence if ``seq_id`` is registered and not parked.
        """
        toks = check_tokens(token_ids)
        s = self._lookup(seq_id)
        if s is not None:
            if not s.parked:
                raise DuplicateSequence(f"sequence {seq_id!r} is already registered")
            n = len(s.tokens)
            if (
                s.root == hash(("kvmem", cache_salt))
                and toks[:n] == s.tokens
                and len(toks) > s.num_computed
            ):
                self.swap_in([seq_id])
                s.tokens.extend(toks[n:])
                return s.num_computed
            self._drop(seq_id, s)
        return self.add(seq_id, toks, cache_salt=cache_salt)

    def _swap_ids(self, seq_ids: Iterable[Hashable]) -> list[Hashable]:
        if self._closed:
            raise KVError("allocator is closed")
        return check_seq_ids(seq_ids)

    def _host_cache(self) -> HostCache:
        if self._host is None:
            self._host = HostCache(HostPagePool(self.pool, self._host_pages), self._evicted)
        return self._host

    def _evicted(self, seq_id: Hashable, tier: Tier) -> None:
        """A host copy was evicted; a parked sequence goes with it."""
        if tier == "parked":
            s = self._seqs[seq_id]
            self._drop(seq_id, s)

    def _submit(
        self,
        src_bufs: list[torch.Tensor],
        dst_bufs: list[torch.Tensor],
        src: list[int],
        dst: list[int],
        on_done: partial[None],
    ) -> Transfer:
        plan = CopyPlan(
            src_bufs,
            dst_bufs,
            page_runs(src, dst),
            self.pool.layer_bytes,
            self.swap_mode,
            non_blocking=self.device.type == "cuda",
        )
        self._swap_counts["swap_copies"] += plan.num_copies
        return self._swapper.submit(plan.run, on_done, plan.nbytes, plan.num_copies)

    def _swap_out(self, ids: list[Hashable], park: bool) -> Transfer:
        seqs = [self._get(sid) for sid in ids]
        for sid, s in zip(ids, seqs, strict=True):
            if s.swapped:
                raise InvalidArgument(f"sequence {sid!r} is already swapped out")
        ps = self.page_size
        host = self._host_cache()
        sizes = {sid: _ceil_div(s.num_computed, ps) for sid, s in zip(ids, seqs, strict=True)}
        before = {sid: (len(c.pages), c.valid) for sid in ids if (c := host.get(sid)) is not None}
        host.ensure(sizes)  # the one step that can fail: nothing changed before it
        src: list[int] = []
        dst: list[int] = []
        done: list[tuple[Hashable, _Seq, list[int], tuple[int, int] | None, int]] = []
        for sid, s in zip(ids, seqs, strict=True):
            copy = host.get(sid)
            assert copy is not None
            n = sizes[sid]
            first = copy.valid // ps if self.swap_reuse else 0
            src += s.blocks[first:n]
            dst += copy.pages[first:n]
            host.set_tier(sid, None)
            for b in s.blocks:
                self._held[b] = self._held.get(b, 0) + 1
            done.append((sid, s, s.blocks, before.get(sid), first))
            self._table[s.row, : len(s.blocks)] = 0
            s.blocks = []
            s.swapped, s.parked = True, park
            self._free.forget(s)
        t = self._submit(
            self.pool.buffers, host.pool.buffers, src, dst, partial(self._swapped_out, done)
        )
        self._swap_counts["swap_out_bytes"] += t.nbytes
        for s in seqs:
            s.transfer = t
        return t

    def _unhold(self, blocks: list[int]) -> None:
        for b in blocks:
            self._held[b] -= 1
            if not self._held[b]:
                del self._held[b]

    def _swapped_out(
        self,
        done: list[tuple[Hashable, _Seq, list[int], tuple[int, int] | None, int]],
        err: BaseException | None,
    ) -> None:
        host = self._host
        assert host is not None
        for sid, s, blocks, before, first in done:
            s.transfer = None
            self._unhold(blocks)
            if err is None:
                copy = host.get(sid)
                assert copy is not None
                copy.valid = s.num_computed
                for b in reversed(blocks):
                    self._release(b)
                host.set_tier(sid, "parked" if s.parked else None)
            elif s.parked:  # a finished sequence whose copy failed: free it
                s.blocks = blocks
                self._drop(sid, s)
            else:  # back where it was; host pages from ``first`` on may be half written
                if before is None:
                    host.release(sid)
                else:
                    host.truncate(sid, before[0], first * self.page_size)
                    host.set_tier(sid, "resident")
                s.blocks = blocks
                s.swapped = False
                self._set_row(s, 0)

    def _swapped_in(
        self, done: list[tuple[Hashable, _Seq, bool]], err: BaseException | None
    ) -> None:
        host = self._host
        assert host is not None
        for sid, s, parked in done:
            s.transfer = None
            if err is None:
                if self.prefix_caching:
                    for i in range(s.num_computed // self.page_size):
                        self._publish(s.blocks[i], self._key_of(s, i))
                if self.swap_reuse:
                    host.set_tier(sid, "resident")
                else:
                    host.release(sid)
            else:
                for b in reversed(s.blocks):
                    self._release(b)
                self._table[s.row, : len(s.blocks)] = 0
                s.blocks = []
                s.swapped, s.parked = True, parked
                self._free.forget(s)
                host.set_tier(sid, "parked" if parked else None)

    def layer(self, i: int) -> LayerKV:
        """The KV storage of layer ``i``."""
        if self._closed:
            raise KVError("allocator is closed")
        return self.pool.layer(i)

    def seq_info(self, seq_id: Hashable) -> SeqInfo:
        """Counts of one sequence."""
        s = self._get(seq_id)
        return SeqInfo(len(s.tokens), s.num_computed, s.reserved, s.swapped)

    def seq_ids(self) -> list[Hashable]:
        """Every registered sequence, swapped-out and parked ones included."""
        return list(self._seqs)

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The pages the sequence holds, in order (none while swapped out)."""
        return list(self._get(seq_id).blocks)

    def runs(self, seq_id: Hashable) -> list[tuple[int, int]]:
        """``(first_page, length)`` of each run of consecutive pages of the block table."""
        return block_runs(self._get(seq_id).blocks)

    def stats(self) -> KVStats:
        """Memory use; ``filled`` counts shared pages once.

        Pages read by an in-flight swap-out count as used until it is done.
        ``extra`` has the host pool (``host_capacity_tokens``,
        ``host_used_tokens``), ``parked_seqs``, ``swaps_in_flight`` and
        cumulative ``swap_out_bytes``, ``swap_in_bytes``, ``swap_copies``.
        """
        if not self._closed:
            self._swapper.reap()
        ps = self.page_size
        filled: dict[int, int] = {}
        for s in self._seqs.values():
            for i, b in enumerate(s.blocks):
                f = min(ps, max(0, s.num_computed - i * ps))
                if f > filled.get(b, 0):
                    filled[b] = f
        used = self.num_pages - len(self._free)
        swapped = [s for s in self._seqs.values() if s.swapped]
        host = self._host
        extra = {
            "host_capacity_tokens": float(self._host_pages * ps),
            "host_used_tokens": float(host.used_pages() * ps if host else 0),
            "parked_seqs": float(sum(s.parked for s in swapped)),
            "swaps_in_flight": float(self._swapper.pending),
            **{k: float(v) for k, v in self._swap_counts.items()},
        }
        return KVStats(
            page_size=ps,
            bytes_per_token=self.spec.bytes_per_token,
            capacity_tokens=self.num_pages * ps,
            used_tokens=used * ps,
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
            extra=extra,
        )

    def check_integrity(self) -> None:
        """Verify reference counts, free pages, the cache index, block tables and the host pool."""
        if self._closed:
            raise KVError("allocator is closed")
        self._swapper.reap()
        ps = self.page_size
        refs = [0] * self.num_pages
        for b, n in self._held.items():
            refs[b] += n
        rows: set[int] = set()
        for sid, s in self._seqs.items():
            for b in s.blocks:
                refs[b] += 1
            if s.swapped:
                self._check_swapped(sid, s)
            elif not 0 <= s.num_computed <= s.reserved <= len(s.blocks) * ps:
                raise IntegrityError(f"{sid!r}: counts out of order")
            elif len(s.blocks) != _ceil_div(s.reserved, ps):
                raise IntegrityError(f"{sid!r}: {len(s.blocks)} pages for {s.reserved} slots")
            elif s.parked:
                raise IntegrityError(f"{sid!r}: parked but not swapped out")
            if s.num_computed > len(s.tokens):
                raise IntegrityError(f"{sid!r}: more KV than tokens")
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
        if self._host is not None:
            self._check_host()

    def _check_swapped(self, sid: Hashable, s: _Seq) -> None:
        host = self._host
        copy = host.get(sid) if host is not None else None
        if s.blocks:
            raise IntegrityError(f"{sid!r}: swapped out but holds device pages")
        if not 0 <= s.num_computed <= s.reserved:
            raise IntegrityError(f"{sid!r}: counts out of order")
        if copy is None or len(copy.pages) < _ceil_div(s.num_computed, self.page_size):
            raise IntegrityError(f"{sid!r}: swapped out without its KV on the host")
        if s.transfer is None and copy.valid < s.num_computed:
            raise IntegrityError(
                f"{sid!r}: host copy holds {copy.valid} of {s.num_computed} entries"
            )

    def _check_host(self) -> None:
        host = self._host
        assert host is not None
        host.check()
        for sid, copy in host.copies.items():
            s = self._seqs.get(sid)
            if s is None:
                raise IntegrityError(f"host copy of unknown sequence {sid!r}")
            if copy.valid > s.num_computed:
                raise IntegrityError(f"{sid!r}: host copy claims more KV than the sequence has")
            want: Tier | None = "parked" if s.parked else None if s.swapped else "resident"
            if s.transfer is not None:
                want = None  # pinned while copying
            if host.tier(sid) != want:
                raise IntegrityError(f"{sid!r}: host copy in tier {host.tier(sid)}, not {want}")

    def close(self) -> None:
        """Wait for swaps in flight, then drop every sequence, the page pool and the host pool."""
        if self._closed:
            return
        self._swapper.close()
        self._seqs.clear()
        self._cached.clear()
        self._closed = True
        self.pool.buffers.clear()
        self._host = None


__all__ = ["PagedAllocator"]
