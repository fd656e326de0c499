"""The vmem backend: contiguous virtual KV per sequence, physical pages mapped on demand.

This is the vAttention model. Each layer's KV is one virtual tensor with a
row per sequence slot, ``[max_seqs, max_seq_len]`` tokens, each token's K
and V side by side; ``LayerKV.k`` and ``.v`` view it as ``[max_seqs,
max_seq_len, heads, code_dim]``. A sequence owns one row (its *slot*),
contiguous in virtual memory, sized for the longest sequence the allocator
accepts. Physical pages, created once up front in a pool, are mapped under
the row only as far as the sequence's reserved KV reaches (see
:mod:`kvmem.backends.vmem.space`)::

    slot 0  [####|####|##..|    |    |    ...]   seq A: 10 tokens, 3 pages
    slot 1  [####|#...|    |    |    |    ...]   seq B:  5 tokens, 2 pages
    slot 2  [    |    |    |    |    |    ...]   free, nothing mapped
             ^ mapped page      ^ reserved address space only

Kernels see it through the common :class:`~kvmem.layout.BatchLayout` with
one page per sequence: page ``slot``, ``page_size = max_seq_len`` (so
``slot_mapping = slot * max_seq_len + position``); kernels must read only
the first ``seq_lens[b]`` slots of a page, the rest may be unmapped. Or
through :meth:`VMemAllocator.kv_view`: the sequence's K and V as plain
``[tokens, heads, code_dim]`` tensors over its row (one stride per token),
which kernels written for unpaged KV (torch SDPA, flash-attn with a batch
index) read unchanged.

Two techniques from vAttention:

- Deferred reclamation. ``free`` keeps the slot's pages mapped. A new
  sequence gets the free slot whose mapped size fits its prompt best, so
  steady serving maps almost nothing. Pages are unmapped only when a
  ``reserve`` finds the pool empty: first from free slots (least recently
  freed first), then pages mapped beyond what live sequences reserved.
- Mapping ahead (``map_ahead=True``). A background thread maps, from the
  pool only, the next page(s) of sequences about to cross into an unmapped
  page, so the decode step rarely calls the driver. It is safe: ``reserve``
  itself guarantees that every reserved slot is mapped before it returns
  (mapping synchronously when the worker is behind), the worker only ever
  adds mappings beyond what is reserved, and only the caller's thread
  unmaps.

Accounting is in page *groups* (one page for every layer). A sequence
*holds* the groups its reserved tokens need; ``OutOfKVMemory`` means the
groups held by all sequences would exceed the pool. Pages mapped but not
held (free slots, room mapped ahead) are reclaimable and count as free.

``fork`` is copy-on-write at page granularity: the child's row maps the
parent's physical pages a second time, and a shared page is copied when a
sequence reserves room in it.

Differences from the paged backend: no prefix caching (``add`` returns 0);
a sequence cannot grow past ``max_seq_len`` (InvalidArgument); at most
``max_seqs`` sequences hold KV at once (OutOfKVMemory when a reserve or a
fork needs a slot and none is free). The allocator serves one caller
thread (its own workers aside).

Swap. ``swap_out`` copies each sequence's computed KV, the start of its
slot's row in every layer (codes, and int4 scales and zeros, together), to a
host tensor of its own (pinned where CUDA is used): one contiguous copy per
layer, on the swap manager's worker thread (CPU) or stream (CUDA, not run
yet). Once the copy is done the sequence gives its slot back like ``free``
does (deferred reclamation: the slot keeps its pages mapped, reclaimable and
counted free, so the next sequence or swap-in to take it maps nothing).
``swap_in`` takes a slot and maps its reserved length, all or nothing, and
copies the KV back. Until a copy is done the sequence keeps what it holds,
and calls naming it wait for the copy; ``reserve``, ``can_reserve``,
``fork`` and ``swap_in`` wait for in-flight swap-outs when they need what
those free. A copy that fails leaves the sequence where it was. Host copies
are dropped on swap-in: reuse across turns (``free(keep_on_host=True)``,
``resume``) is not implemented by this backend.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch

from kvmem.allocator import (
    Capabilities,
    KVAllocator,
    KVStats,
    SeqInfo,
    SwapHandle,
    batch_ids,
    check_commit,
    check_count,
    check_new_tokens,
    check_seq_ids,
    check_tokens,
    raise_unknown,
)
from kvmem.backends.vmem.driver import MetaDriver, VMemDriver
from kvmem.backends.vmem.drivers import make_driver
from kvmem.backends.vmem.space import VirtualKV, round_seq_len
from kvmem.backends.vmem.swapping import HostKV, copy_in, copy_out
from kvmem.errors import (
    DriverError,
    DuplicateSequence,
    IntegrityError,
    InvalidArgument,
    KVError,
    OutOfHostMemory,
    OutOfKVMemory,
)
from kvmem.layout import BatchLayout, build_layout
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV
from kvmem.swap.manager import SwapManager, Transfer

__all__ = ["MetaDriver", "VMemAllocator", "VMemDriver"]

_KIB = 1024


class _Seq:
    """Per-sequence state: tokens, counts, slot, and the groups it holds."""

    __slots__ = (
        "tokens", "num_computed", "reserved", "slot", "held", "held_cover",
        "swapped", "host", "transfer",
    )  # fmt: skip

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.num_computed = 0
        self.reserved = 0
        self.slot = -1
        self.held = 0  # groups its reserved tokens need
        self.held_cover = 0  # tokens those groups can hold
        self.swapped = False  # KV on the host (once ``transfer`` is done, no slot)
        self.host: HostKV | None = None  # the host copy while swapped
        self.transfer: Transfer | None = None  # a swap of this sequence in flight


_Item = list[int] | threading.Event | None


def _worker(ref: weakref.ReferenceType[VMemAllocator], q: queue.SimpleQueue[_Item]) -> None:
    """Map-ahead loop: map the next pages of the slots queued; set queued events once done."""
    while True:
        items = [q.get()]
        while not q.empty():
            items.append(q.get())
        slots = [slot for item in items if isinstance(item, list) for slot in item]
        if slots:
            alloc = ref()
            if alloc is None:
                return
            alloc._map_ahead(slots)
            del alloc
        for item in items:
            if isinstance(item, threading.Event):
                item.set()
        if any(item is None for item in items):
            return


class VMemAllocator(KVAllocator):
    """vAttention-style KV: a virtual row per sequence, pages mapped as it grows.

    Options:

    - ``num_tokens`` or ``num_bytes``: physical capacity, as page groups:
      ``ceil(num_tokens * token_bytes / page_bytes)`` or ``num_bytes //
      (num_layers * page_bytes)``, never more than ``max_seqs`` full rows.
    - ``device``: ``"cpu"`` (host driver: memfd + mmap), ``"cuda"`` (CUDA
      VMM through cuda-python; not run yet), ``"meta"`` (bookkeeping only,
      nothing allocated: for benchmarks).
    - ``max_seq_len`` (default 32768): longest sequence, rounded up so each
      row is whole pages (the rounded value is ``self.max_seq_len``).
    - ``max_seqs`` (default 256): slots, i.e. sequences holding KV at once.
    - ``page_bytes``: physical page size, a multiple of the driver's
      granularity (4 KiB on the host, 2 MiB on CUDA). Default 64 KiB on
      the host, the granularity on CUDA.
    - ``map_ahead`` (default True): map upcoming pages on a worker thread.
    - ``map_ahead_tokens``: how far ahead of the reserved KV the worker
      keeps pages mapped (default: the tokens one page holds).
    - ``driver``: ``"host"``, ``"cuda"``, ``"meta"`` or a
      :class:`~kvmem.backends.vmem.driver.VMemDriver` instance (default:
      chosen by ``device``).
    - ``host_num_tokens``: how many KV entries swapped-out sequences may
      keep on the host in all (default: the device capacity); a swap-out
      beyond it raises OutOfHostMemory.

    Tensors from :meth:`layer` and :meth:`kv_view` point into the virtual
    ranges: valid until :meth:`close`, and only their mapped parts (the
    reserved KV of live sequences) may be touched. The allocator owns its
    driver and closes it.
    """

    capabilities = Capabilities(swap=True, fork=True)

    def __init__(
        self,
        spec: KVSpec,
        *,
        num_tokens: int | None = None,
        num_bytes: int | None = None,
        device: torch.device | str = "cpu",
        max_seq_len: int = 32768,
        max_seqs: int = 256,
        page_bytes: int | None = None,
        map_ahead: bool = True,
        map_ahead_tokens: int | None = None,
        driver: str | VMemDriver | None = None,
        host_num_tokens: int | None = None,
    ) -> None:
        self._closed = True  # until fully built: close() and __del__ do nothing
        check_count("max_seq_len", max_seq_len)
        check_count("max_seqs", max_seqs)
        if (num_tokens is None) == (num_bytes is None):
            raise InvalidArgument("give exactly one of num_tokens or num_bytes")
        if num_tokens is not None:
            check_count("num_tokens", num_tokens)
        if num_bytes is not None:
            check_count("num_bytes", num_bytes)
        if not isinstance(map_ahead, bool):
            raise InvalidArgument(f"map_ahead must be a bool, got {map_ahead!r}")
        if map_ahead_tokens is not None:
            check_count("map_ahead_tokens", map_ahead_tokens)
        if host_num_tokens is not None:
            check_count("host_num_tokens", host_num_tokens)
        self.spec = spec
        drv = make_driver(driver, device)
        try:
            self._build(drv, max_seqs, max_seq_len, page_bytes, num_tokens, num_bytes)
        except BaseException:
            if drv is not driver:  # made here: nobody else will close it
                drv.close()
            raise
        self.driver = drv
        self._lock = threading.Lock()
        self._seqs: dict[Hashable, _Seq] = {}
        self._owner: list[_Seq | None] = [None] * max_seqs
        self._free_slots: OrderedDict[int, None] = OrderedDict.fromkeys(range(max_seqs))
        self._held_sum = 0  # sum over sequences of the groups each holds
        self._quarantine: set[int] = set()
        tb = spec.bytes_per_token_layer
        self.tokens_per_page = self.page_bytes / tb
        self._ahead = min(map_ahead_tokens or max(1, self.page_bytes // tb), self.max_seq_len)
        self.map_ahead = map_ahead
        self._cv = threading.Condition(self._lock)  # signalled when map-ahead work lands
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._wanted = [False] * max_seqs  # slot already asked of the worker
        self._requests: list[int] = []  # slots to hand the worker at the next wake-up
        self._inflight: set[int] = set()  # slots the worker is mapping (lock not held)
        self._thread: threading.Thread | None = None
        self._ahead_groups = 0
        self._ahead_error: str | None = None  # the worker's last driver error
        self._ahead_errors = 0
        group_tokens = spec.num_layers * self.page_bytes // spec.bytes_per_token
        self.host_num_tokens = (
            host_num_tokens if host_num_tokens is not None else self.space.num_groups * group_tokens
        )
        self._host_tokens = 0  # KV entries in host copies
        self._swapper = SwapManager(self.device)
        self._swap_counts = {"swap_out_bytes": 0, "swap_in_bytes": 0, "swap_copies": 0}
        self._closed = False

    def _build(
        self,
        drv: VMemDriver,
        max_seqs: int,
        max_seq_len: int,
        page_bytes: int | None,
        num_tokens: int | None,
        num_bytes: int | None,
    ) -> None:
        """Geometry, capacity and the virtual space (the part of construction that may fail)."""
        spec = self.spec
        self.device = drv.device
        if page_bytes is None:
            page_bytes = max(64 * _KIB, drv.granularity)
        pb = drv.check_page_size(page_bytes)
        self.page_bytes = pb
        self.max_seqs = max_seqs
        tb = spec.bytes_per_token_layer
        self.max_seq_len = round_seq_len(tb, max_seq_len, pb)
        self.page_size = self.max_seq_len
        self.granularity = max(1, pb // tb)
        row_groups = self.max_seq_len * tb // pb
        if num_tokens is not None:
            groups = -(-num_tokens * tb // pb)
        else:
            assert num_bytes is not None
            groups = num_bytes // (spec.num_layers * pb)
        groups = min(groups, row_groups * max_seqs)
        if groups <= 0:
            raise InvalidArgument(
                f"capacity is smaller than one page per layer ({spec.num_layers} x {pb} bytes)"
            )
        limit = drv.max_mappings
        # each mapped page may be its own mapping, plus one unmapped gap per row of each layer
        if limit is not None and (groups + max_seqs) * spec.num_layers > limit:
            raise InvalidArgument(
                f"{groups * spec.num_layers} pages of {pb} bytes in {max_seqs} rows could need "
                f"more memory mappings than the system allows ({limit}); use larger page_bytes"
            )
        self.space = VirtualKV(spec, drv, max_seqs, self.max_seq_len, pb, groups)

    # ------------------------------------------------------------------ helpers
    def _get(self, seq_id: Hashable) -> _Seq:
        """The sequence, its swap (if one is in flight) finished first."""
        if self._closed:
            raise KVError("allocator is closed")
        s = self._seqs.get(seq_id)
        if s is None:
            raise raise_unknown(seq_id)
        if s.transfer is not None:
            self._swapper.settle(s.transfer)
        return s

    def _resident(self, seq_id: Hashable) -> _Seq:
        """The sequence, which must not be swapped out."""
        s = self._get(seq_id)
        if s.swapped:
            raise InvalidArgument(f"sequence {seq_id!r} is swapped out; swap it in first")
        return s

    def _make_room(self, groups: int, slots: int) -> None:
        """Wait for in-flight swaps (oldest first) until ``groups`` and ``slots`` are free."""
        sw = self._swapper
        sw.reap()
        while (t := sw.oldest()) is not None and (
            groups > self.space.num_groups - self._held() or slots > len(self._free_slots)
        ):
            sw.settle(t)

    def _check_len(self, seq_id: Hashable, n: int) -> None:
        if n > self.max_seq_len:
            raise InvalidArgument(
                f"sequence {seq_id!r} would have {n} tokens, more than max_seq_len "
                f"{self.max_seq_len}"
            )

    def _held(self) -> int:
        """Distinct page groups held by sequences (a shared group counts once)."""
        return self._held_sum - self.space.extra_refs

    def _set_held(self, s: _Seq, n: int) -> None:
        if n > s.held_cover or n == 0:
            g = self.space.pages(n)
            self._held_sum += g - s.held
            s.held = g
            s.held_cover = self.space.cover(g)

    def _pick_slot(self, want: int) -> int:
        """The free slot whose mapping fits ``want`` tokens best (-1 if none is free)."""
        covered = self.space.covered
        best, best_key = -1, None
        for slot in self._free_slots:
            c = covered[slot]
            key = (0, c) if c >= want else (1, -c)  # smallest that fits, else the largest
            if best_key is None or key < best_key:
                best, best_key = slot, key
        return best

    def _reclaim(self, short: int, slot: int, target: int) -> None:
        """Return ``short`` groups to the pool for ``slot``: free slots first, then unheld tails."""
        sp = self.space
        self._settle()  # groups the worker holds are in no slot yet: let them land
        for victim in list(self._free_slots):
            if short <= 0:
                return
            if victim != slot and sp.covered[victim] > 0:
                short -= sp.shrink(victim, 0, short)
        for victim, owner in enumerate(self._owner):
            if short <= 0:
                return
            if owner is not None and victim != slot:
                short -= sp.shrink(victim, owner.reserved, short)
        if short > 0:
            short -= sp.shrink(slot, target, short)
        if short > 0:
            raise IntegrityError(f"reclaim came {short} groups short of what accounting promised")

    def _want_ahead(self, s: _Seq) -> None:
        """Ask the worker for the slot's next pages if fewer than ``map_ahead_tokens`` remain."""
        slot = s.slot
        if self._wanted[slot] or self.space.covered[slot] - s.reserved >= self._ahead:
            return
        if self.space.covered[slot] >= self.max_seq_len:
            return
        self._wanted[slot] = True
        self._requests.append(slot)
        if len(self._requests) >= 64:
            self._wake()

    def _wake(self) -> None:
        """Hand the queued requests to the worker (started on first use)."""
        if not self._requests or self._closed:
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=_worker,
                args=(weakref.ref(self), self._queue),
                name="kvmem-vmem-map-ahead",
                daemon=True,
            )
            self._thread.start()
        self._queue.put(self._requests)
        self._requests = []

    def _map_ahead(self, slots: list[int]) -> None:
        """Worker side: map, from the pool only and without the lock, the slots' next pages."""
        sp = self.space
        claims: list[tuple[int, list[int]]] = []
        with self._lock:
            for slot in slots:
                self._wanted[slot] = False
                s = self._owner[slot]
                if self._closed or s is None or slot in self._inflight:
                    continue
                groups = sp.claim(slot, min(self.max_seq_len, s.reserved + 2 * self._ahead))
                if groups:
                    claims.append((slot, groups))
                    self._inflight.add(slot)
        results: dict[int, tuple[int, int, DriverError | None]] = {}
        try:
            for slot, groups in claims:
                results[slot] = sp.map_claimed(slot, groups)
        finally:  # whatever happened, every claim lands (unmapped ones back in the pool)
            with self._lock:
                for slot, groups in claims:
                    done, calls, err = results.get(slot, (0, 0, None))
                    sp.publish(slot, groups, done, calls)
                    self._inflight.discard(slot)
                    self._ahead_groups += done
                    if err is not None:  # the caller's reserve maps (and reports) itself
                        self._ahead_error = str(err)
                        self._ahead_errors += 1
                self._cv.notify_all()

    def _settle(self, slot: int | None = None) -> None:
        """(Lock held.) Wait until the worker is not mapping ``slot`` (any slot if None)."""
        while self._inflight if slot is None else slot in self._inflight:
            self._cv.wait()

    def wait_map_ahead(self, timeout: float | None = None) -> bool:
        """Block until the map-ahead worker has handled everything queued so far.

        Returns False on timeout. Never needed for correctness (``reserve``
        maps what the worker has not); for tests and benchmarks.
        """
        self._wake()
        if self._thread is None or self._closed:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    # --------------------------------------------------------------- interface
    def add(self, seq_id: Hashable, token_ids: Sequence[int], cache_salt: Hashable = None) -> int:
        """Register a sequence with its prompt; returns 0 (no prefix caching here).

        ``cache_salt`` is accepted for the common interface and has no effect.
        No slot or memory is taken until the first ``reserve``. Raises
        DuplicateSequence, and InvalidArgument for a prompt longer than
        ``max_seq_len``.
        """
        if self._closed:
            raise KVError("allocator is closed")
        if seq_id in self._seqs:
            raise DuplicateSequence(f"sequence {seq_id!r} is already registered")
        toks = check_tokens(token_ids)
        self._check_len(seq_id, len(toks))
        self._seqs[seq_id] = _Seq(toks)
        return 0

    def append(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Add known tokens whose KV is still to be written (at most ``max_seq_len`` in all)."""
        s = self._get(seq_id)
        if len(token_ids) == 1 and type(token_ids[0]) is int and token_ids[0] >= 0:
            if len(s.tokens) >= self.max_seq_len:
                self._check_len(seq_id, len(s.tokens) + 1)
            s.tokens.append(token_ids[0])
            return
        toks = check_tokens(token_ids)
        self._check_len(seq_id, len(s.tokens) + len(toks))
        s.tokens.extend(toks)

    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        """Ensure mapped, private slots for the next ``num_tokens`` KV entries (all or nothing).

        The first reserve of a sequence gives it a slot (best fit among the
        free ones). On return every reserved position is mapped, and the
        page the next KV goes to is the sequence's own (a page still shared
        with a fork is copied first). Raises OutOfKVMemory (pool or slots
        short), InvalidArgument (beyond ``max_seq_len``), DriverError (the
        driver failed: nothing the sequences hold changed, though mappings
        nobody held may have been dropped), InvalidArgument for a swapped-out
        sequence.
        """
        s = self._resident(seq_id)
        if type(num_tokens) is not int or num_tokens <= 0:
            check_count("num_tokens", num_tokens)
        target = s.num_computed + num_tokens
        if target <= s.reserved:
            return
        if target > self.max_seq_len:
            raise InvalidArgument(
                f"sequence {seq_id!r}: {target} KV entries exceed max_seq_len {self.max_seq_len}"
            )
        slot = s.slot
        sp = self.space
        if slot >= 0 and target <= sp.covered[slot] and s.num_computed >= sp.shared_below[slot]:
            s.reserved = target  # fast path: mapped already, nothing shared in the way
            if target > s.held_cover:
                self._set_held(s, target)
            if self.map_ahead:
                self._want_ahead(s)
            return
        if self._swapper.pending:
            self._make_room(sp.pages(target) - s.held, int(slot < 0))
        with self._lock:
            if slot < 0:
                slot = self._pick_slot(max(target, len(s.tokens)))
                if slot < 0:
                    raise OutOfKVMemory(
                        f"sequence {seq_id!r} needs a slot; all {self.max_seqs} are in use"
                    )
            self._settle(slot)
            cow = sp.shared_pages(slot, s.num_computed, target) if s.slot >= 0 else []
            need = sp.pages(target) - s.held + len(cow)
            free = sp.num_groups - self._held()
            if need > free:
                raise OutOfKVMemory(
                    f"sequence {seq_id!r} needs {need} more page groups, {free} are free"
                )
            short = len(cow) - len(sp.pool) + max(0, sp.pages(target) - len(sp.groups[slot]))
            if short > 0:
                self._reclaim(short, slot, target)
            sp.grow(slot, target)
            sp.cow(slot, cow)
            if s.slot < 0:
                del self._free_slots[slot]
                self._owner[slot] = s
                s.slot = slot
            s.reserved = target
            self._set_held(s, target)
        if self.map_ahead:
            self._want_ahead(s)
            self._wake()

    def can_reserve(self, requests: Mapping[Hashable, int]) -> bool:
        """Whether every ``reserve(seq, n)`` of ``requests`` fits at once.

        Waits for in-flight swap-outs when what they free is needed.
        """
        need = 0
        slots = 0
        sp = self.space
        for sid, n in requests.items():
            check_count("num_tokens", n)
            s = self._resident(sid)
            target = s.num_computed + n
            if target <= s.reserved:
                continue
            if target > self.max_seq_len:
                return False
            need += sp.pages(target) - s.held
            if s.slot < 0:
                slots += 1
            elif s.num_computed < sp.shared_below[s.slot]:
                need += len(sp.shared_pages(s.slot, s.num_computed, target))
        if self._swapper.pending:
            self._make_room(need, slots)
        return need <= sp.num_groups - self._held() and slots <= len(self._free_slots)

    def layout(self, batch: Sequence[tuple[Hashable, int]]) -> BatchLayout:
        """One page per sequence: its slot, ``page_size = max_seq_len``."""
        if not batch:
            raise InvalidArgument("layout of an empty batch")
        if self._closed:
            raise KVError("allocator is closed")
        b = len(batch)
        rows = np.empty((b, 1), dtype=np.int32)
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
            rows[i, 0] = s.slot
            seq_lens[i] = end
            qlens[i] = n
        ids = batch_ids(batch)
        if self._requests:
            self._wake()  # the batch is about to run: the worker maps meanwhile
        return build_layout(
            self.max_seq_len, rows, seq_lens, qlens, ids, self.device, self.spec, zero_padded=True
        )

    def commit(self, seq_id: Hashable, num_tokens: int) -> None:
        """Record that ``num_tokens`` more KV entries are written."""
        s = self._resident(seq_id)
        end = check_commit(seq_id, s.num_computed, s.reserved, len(s.tokens), num_tokens)
        s.num_computed = end

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Make the child a copy of the parent that shares its KV, copy-on-write.

        The child gets its own slot, and under it the parent's physical pages
        holding the computed KV are mapped a second time: no data is copied
        and no memory taken. A sequence that reserves room in a shared page
        gets a private copy of it first (in ``reserve``); the parent may keep
        writing into room it reserved before the fork, since the child only
        reads positions before the fork point and copies the page before it
        writes. Raises OutOfKVMemory when no slot is free; nothing changes then.
        """
        p = self._resident(parent_id)
        if child_id in self._seqs:
            raise DuplicateSequence(f"sequence {child_id!r} is already registered")
        c = _Seq(list(p.tokens))
        n = p.num_computed
        if n:
            if self._swapper.pending:
                self._make_room(0, 1)
            with self._lock:
                self._fork_slot(parent_id, p, c, n)
        self._seqs[child_id] = c

    def _fork_slot(self, parent_id: Hashable, p: _Seq, c: _Seq, n: int) -> None:
        if not self._free_slots:
            raise OutOfKVMemory(f"fork of {parent_id!r}: all {self.max_seqs} slots are in use")
        sp = self.space
        slot = min(self._free_slots, key=lambda i: sp.covered[i])
        self._settle(slot)
        sp.clear(slot)
        sp.share(p.slot, slot, n)
        del self._free_slots[slot]
        self._owner[slot] = c
        c.slot = slot
        c.num_computed = c.reserved = n
        self._set_held(c, n)

    def free(self, seq_id: Hashable, keep_on_host: bool = False) -> None:
        """Release the sequence; its slot keeps its own pages mapped for the next sequence.

        Pages the slot shares with a fork are unmapped from it, so a free
        slot never holds another sequence's KV. A swapped-out sequence's
        host copy is dropped. ``keep_on_host`` is not supported (InvalidArgument).
        """
        if keep_on_host:
            raise InvalidArgument("the vmem backend does not keep KV on the host after free")
        s = self._get(seq_id)
        with self._lock:
            del self._seqs[seq_id]
            self._drop_host(s)
            self._release_slot(s)

    def _drop_host(self, s: _Seq) -> None:
        if s.host is not None:
            self._host_tokens -= s.host.tokens
            s.host = None

    def _release_slot(self, s: _Seq) -> None:
        """(Lock held.) Give back the sequence's groups and slot; its pages stay mapped there."""
        self._held_sum -= s.held
        s.held = s.held_cover = 0
        slot = s.slot
        if slot >= 0:
            s.slot = -1
            self._owner[slot] = None
            self._wanted[slot] = False
            try:
                if self.space.shared_below[slot]:
                    self._settle(slot)
                    self.space.unshare(slot)
            except DriverError:
                self._quarantine.add(slot)  # may still map shared pages: never hand it out
                raise
            self._free_slots[slot] = None

    # -------------------------------------------------------------------- swap
    def swap_out(self, seq_ids: Iterable[Hashable]) -> SwapHandle:
        """Copy the sequences' KV to host memory and give back their slots and pages.

        One contiguous copy per layer per sequence. All or nothing: raises
        UnknownSequence, InvalidArgument (a sequence already swapped out, or
        named twice) or OutOfHostMemory (beyond ``host_num_tokens``) and
        changes nothing. The reservation is kept (``seq_info().capacity``)
        and taken again by ``swap_in``. The slot and its groups stay held
        until the copy is done; a copy that fails leaves the sequences
        resident, as they were.
        """
        ids = self._swap_ids(seq_ids)
        seqs = [self._get(sid) for sid in ids]
        for sid, s in zip(ids, seqs, strict=True):
            if s.swapped:
                raise InvalidArgument(f"sequence {sid!r} is already swapped out")
        want = sum(s.num_computed for s in seqs)
        if self._host_tokens + want > self.host_num_tokens:
            raise OutOfHostMemory(
                f"swap-out of {want} KV entries: {self.host_num_tokens - self._host_tokens} "
                f"of the {self.host_num_tokens} host entries are free"
            )
        sp = self.space
        hosts = [HostKV(sp.num_layers, s.num_computed, sp.token_bytes, self.device) for s in seqs]
        for s, h in zip(seqs, hosts, strict=True):
            s.host = h
            s.swapped = True
            self._host_tokens += h.tokens
        work = [(s.slot, h) for s, h in zip(seqs, hosts, strict=True) if h.tokens]
        rows = sp.rows

        def run() -> None:
            for slot, h in work:
                copy_out(rows, slot, h)

        nbytes = sum(h.nbytes for h in hosts)
        copies = len(work) * sp.num_layers
        t = self._swapper.submit(run, lambda err: self._swapped_out(seqs, err), nbytes, copies)
        self._swap_counts["swap_out_bytes"] += nbytes
        self._swap_counts["swap_copies"] += copies
        for s in seqs:
            s.transfer = t
        return t

    def _swapped_out(self, seqs: list[_Seq], err: BaseException | None) -> None:
        with self._lock:
            for s in seqs:
                s.transfer = None
                if err is None:
                    self._release_slot(s)
                else:  # back where it was
                    self._drop_host(s)
                    s.swapped = False

    def swap_in(self, seq_ids: Iterable[Hashable]) -> SwapHandle:
        """Take a slot for each swapped-out sequence, map its reservation, copy its KV back.

        All or nothing: raises UnknownSequence, InvalidArgument (a sequence
        not swapped out, or named twice) or OutOfKVMemory (not enough free
        page groups or slots for every reservation; waits for in-flight
        swap-outs first) and changes nothing: the sequences stay on the host,
        intact. The sequences can be used at once; calls that need their KV
        wait for the copy. The host copy is dropped once the copy is done
        (no reuse across turns in this backend).
        """
        ids = self._swap_ids(seq_ids)
        seqs = [self._get(sid) for sid in ids]
        for sid, s in zip(ids, seqs, strict=True):
            if not s.swapped:
                raise InvalidArgument(f"sequence {sid!r} is not swapped out")
        sp = self.space
        mapped = [s for s in seqs if s.reserved]
        need = sum(sp.pages(s.reserved) for s in mapped)
        self._make_room(need, len(mapped))
        with self._lock:
            free = sp.num_groups - self._held()
            if need > free or len(mapped) > len(self._free_slots):
                raise OutOfKVMemory(
                    f"swap-in needs {need} page groups and {len(mapped)} slots; "
                    f"{free} and {len(self._free_slots)} are free"
                )
            done: list[_Seq] = []
            try:
                for s in mapped:
                    self._take_slot(s)
                    done.append(s)
            except BaseException:
                for s in done:
                    self._release_slot(s)
                raise
        for s in seqs:
            s.swapped = False
        work = [(s.slot, s.host) for s in mapped if s.host is not None and s.host.tokens]
        rows = sp.rows

        def run() -> None:
            for slot, h in work:
                copy_in(rows, slot, h)

        nbytes = sum(h.nbytes for _, h in work)
        copies = len(work) * sp.num_layers
        t = self._swapper.submit(run, lambda err: self._swapped_in(seqs, err), nbytes, copies)
        self._swap_counts["swap_in_bytes"] += nbytes
        self._swap_counts["swap_copies"] += copies
        for s in seqs:
            s.transfer = t
        if self.map_ahead:
            for s in mapped:
                self._want_ahead(s)
            self._wake()
        return t

    def _take_slot(self, s: _Seq) -> None:
        """(Lock held; room checked.) A slot for ``s`` with its reservation mapped."""
        sp = self.space
        target = s.reserved
        slot = self._pick_slot(target)
        self._settle(slot)
        short = max(0, sp.pages(target) - len(sp.groups[slot])) - len(sp.pool)
        if short > 0:
            self._reclaim(short, slot, target)
        sp.grow(slot, target)
        del self._free_slots[slot]
        self._owner[slot] = s
        s.slot = slot
        self._set_held(s, target)

    def _swapped_in(self, seqs: list[_Seq], err: BaseException | None) -> None:
        with self._lock:
            for s in seqs:
                s.transfer = None
                if err is None:
                    self._drop_host(s)
                else:  # back on the host, as it was
                    self._release_slot(s)
                    s.swapped = True

    def _swap_ids(self, seq_ids: Iterable[Hashable]) -> list[Hashable]:
        if self._closed:
            raise KVError("allocator is closed")
        return check_seq_ids(seq_ids)

    def layer(self, i: int) -> LayerKV:
        """Layer ``i``: ``k``, ``v`` are virtual [max_seqs, max_seq_len, heads, code_dim]."""
        if self._closed:
            raise KVError("allocator is closed")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.spec.num_layers:
            raise InvalidArgument(f"layer {i!r} out of range 0..{self.spec.num_layers - 1}")
        return self.space.layers[i]

    def kv_view(
        self, seq_id: Hashable, layer: int, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's K and V codes of one layer, ``[length, heads, code_dim]``, contiguous.

        ``length`` defaults to the tokens with KV written and may reach the
        reserved ones. Plain views of the slot's row, no copy: kernels for
        unpaged KV (e.g. ``torch.nn.functional.scaled_dot_product_attention``)
        read them directly.
        """
        s = self._resident(seq_id)
        n = s.num_computed if length is None else length
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= s.reserved:
            raise InvalidArgument(
                f"sequence {seq_id!r}: view length {n!r} must be in 0..{s.reserved} (reserved)"
            )
        lay = self.layer(layer)
        slot = max(s.slot, 0)
        return lay.k[slot, :n], lay.v[slot, :n]

    def slot(self, seq_id: Hashable) -> int:
        """The sequence's row in the virtual tensors (-1 before its first reserve)."""
        return self._get(seq_id).slot

    def held_tokens(self, seq_id: Hashable) -> int:
        """Tokens the page groups held by the sequence can store (its reservation, page-rounded)."""
        return self._get(seq_id).held_cover

    def seq_info(self, seq_id: Hashable) -> SeqInfo:
        """Counts of one sequence."""
        s = self._get(seq_id)
        return SeqInfo(len(s.tokens), s.num_computed, s.reserved, s.swapped)

    def seq_ids(self) -> list[Hashable]:
        """Every registered sequence, swapped-out ones included."""
        return list(self._seqs)

    def stats(self) -> KVStats:
        """Memory use in tokens; physical/virtual bytes and driver call counts in ``extra``.

        ``used`` is what the groups held by sequences can store; ``free`` the
        rest of the pool, including groups still mapped under free slots or
        ahead of reservations (``extra['idle_mapped_bytes']``). ``cached`` is
        0: there is no prefix cache. A sequence whose swap-out is in flight
        holds its groups until the copy is done. ``extra`` also has the host
        side (``host_capacity_tokens``, ``host_used_tokens``,
        ``swaps_in_flight``) and cumulative ``swap_out_bytes``,
        ``swap_in_bytes``, ``swap_copies``.
        """
        if self._closed:
            raise KVError("allocator is closed")
        self._swapper.reap()
        with self._lock:
            self._settle()
            sp = self.space
            bpt = self.spec.bytes_per_token
            group_bytes = self.spec.num_layers * self.page_bytes
            capacity = sp.num_groups * group_bytes // bpt
            held = self._held()
            used = held * group_bytes // bpt
            swapped = [s for s in self._seqs.values() if s.swapped]
            resident = [s for s in self._seqs.values() if not s.swapped]
            extra: dict[str, float] = {
                "physical_bytes_pooled": sp.num_groups * group_bytes,
                "physical_bytes_mapped": sp.mapped_groups * group_bytes,
                "physical_bytes_held": held * group_bytes,
                "idle_mapped_bytes": (sp.mapped_groups - held) * group_bytes,
                "shared_pages": sp.extra_refs * self.spec.num_layers,
                "virtual_bytes_reserved": sp.virtual_bytes,
                "pages_pooled": sp.num_groups * self.spec.num_layers,
                "pages_mapped": sp.mapped_groups * self.spec.num_layers,
                "map_calls": sp.map_calls,
                "unmap_calls": sp.unmap_calls,
                "map_ahead_groups": self._ahead_groups,
                "map_ahead_errors": self._ahead_errors,
                "page_bytes": self.page_bytes,
                "max_seq_len": self.max_seq_len,
                "free_slots": len(self._free_slots),
                "host_capacity_tokens": self.host_num_tokens,
                "host_used_tokens": self._host_tokens,
                "swaps_in_flight": self._swapper.pending,
                **self._swap_counts,
            }
            drv_bytes = self.driver.allocated_bytes()
            if drv_bytes is not None:
                extra["driver_allocated_bytes"] = drv_bytes
            return KVStats(
                page_size=self.page_size,
                bytes_per_token=bpt,
                capacity_tokens=capacity,
                used_tokens=used,
                filled_tokens=self._filled(resident),
                reserved_tokens=sum(s.reserved - s.num_computed for s in resident),
                cached_tokens=0,
                free_tokens=capacity - used,
                swapped_tokens=sum(s.num_computed for s in swapped),
                num_seqs=len(self._seqs),
                num_swapped_seqs=len(swapped),
                extra=extra,
            )

    def _filled(self, resident: list[_Seq]) -> int:
        """(Lock held.) Tokens of KV written, KV shared by forks counted once."""
        sp = self.space
        if not sp.extra_refs:
            return sum(s.num_computed for s in resident)
        pb, tb = self.page_bytes, self.spec.bytes_per_token_layer
        written: dict[int, int] = {}  # group: bytes of it written
        for s in resident:
            n = s.num_computed * tb
            for j, g in enumerate(sp.groups[s.slot][: sp.pages(s.num_computed)]):
                written[g] = max(written.get(g, 0), min(pb, n - j * pb))
        return sum(written.values()) // tb

    def check_integrity(self) -> None:
        """Verify slots, page groups and their counts, held totals, and the safety rules.

        Every reserved token is mapped; a page shared between slots lies
        inside the reserved KV of live sequences only, and at most one of
        them may write into it (the others copy it first, in ``reserve``).
        """
        if self._closed:
            raise KVError("allocator is closed")
        self._swapper.reap()
        with self._lock:
            self._settle()
            self._check_pages()
            self._check_seqs()

    def _check_pages(self) -> None:
        sp = self.space
        refs = [0] * sp.num_groups
        for slot, lst in enumerate(sp.groups):
            for g in lst:
                refs[g] += 1
            if sp.covered[slot] != sp.cover(len(lst)):
                raise IntegrityError(f"slot {slot}: covered count out of date")
        for slot, lst in enumerate(sp.groups):
            shared = [j for j, g in enumerate(lst) if refs[g] > 1]
            if shared and sp.page_of(sp.shared_below[slot] - 1) < shared[-1]:
                raise IntegrityError(f"slot {slot}: shared pages beyond its shared bound")
        if refs != sp.ref:
            raise IntegrityError("group reference counts do not match the slot mappings")
        if sorted(sp.pool) != [g for g, r in enumerate(refs) if r == 0]:
            raise IntegrityError("the pool is not exactly the unmapped groups")
        if sp.extra_refs != sum(max(0, r - 1) for r in refs):
            raise IntegrityError("shared mapping count is off")
        if sp.map_calls - sp.unmap_calls != sum(refs) * self.spec.num_layers:
            raise IntegrityError("map and unmap calls do not add up to the mapped pages")

    def _check_seqs(self) -> None:
        sp = self.space
        held = host_tokens = 0
        owned: set[int] = set()
        writers: set[int] = set()
        for sid, s in self._seqs.items():
            if not 0 <= s.num_computed <= s.reserved <= self.max_seq_len:
                raise IntegrityError(f"{sid!r}: counts out of order")
            if s.num_computed > len(s.tokens) or len(s.tokens) > self.max_seq_len:
                raise IntegrityError(f"{sid!r}: token count out of range")
            if s.swapped != (s.host is not None):
                raise IntegrityError(f"{sid!r}: swapped state and host copy disagree")
            if s.host is not None:
                host_tokens += s.host.tokens
                if s.host.tokens != s.num_computed:
                    raise IntegrityError(f"{sid!r}: host copy does not cover its KV")
            if s.swapped and s.transfer is None:
                if s.slot >= 0 or s.held:
                    raise IntegrityError(f"{sid!r}: swapped out but holds a slot or pages")
                continue
            if s.held != sp.pages(s.reserved):
                raise IntegrityError(f"{sid!r}: held groups out of date")
            held += s.held
            if s.slot < 0:
                if s.reserved:
                    raise IntegrityError(f"{sid!r}: reserved KV but no slot")
                continue
            if self._owner[s.slot] is not s or s.slot in owned:
                raise IntegrityError(f"{sid!r}: slot {s.slot} owned by another sequence")
            owned.add(s.slot)
            lst = sp.groups[s.slot]
            if sp.covered[s.slot] < s.reserved:
                raise IntegrityError(f"{sid!r}: reserved tokens are not all mapped")
            if any(sp.ref[g] > 1 for g in lst[s.held :]):
                raise IntegrityError(f"{sid!r}: a shared page lies beyond its reservation")
            for j in sp.shared_pages(s.slot, s.num_computed, s.reserved):
                if lst[j] in writers:
                    raise IntegrityError(f"{sid!r}: writes into a page another sequence writes")
                writers.add(lst[j])
        if held != self._held_sum:
            raise IntegrityError("held group total is off")
        if host_tokens != self._host_tokens or host_tokens > self.host_num_tokens:
            raise IntegrityError("host KV total is off")
        if self._held() > sp.num_groups:
            raise IntegrityError("more groups held than pooled")
        for slot, owner in enumerate(self._owner):
            if owner is None:
                if slot not in self._quarantine and any(sp.ref[g] > 1 for g in sp.groups[slot]):
                    raise IntegrityError(f"free slot {slot} maps pages shared with a sequence")
            elif slot not in owned:
                raise IntegrityError(f"slot {slot} is owned by an unregistered sequence")
        rest = set(self._free_slots) | self._quarantine
        if owned & rest or len(owned) + len(rest) != self.max_seqs:
            raise IntegrityError("slots leaked")

    def close(self) -> None:
        """Stop the map-ahead worker, unmap and release every page, free the ranges.

        Idempotent. Raises DriverError (after releasing everything it can)
        if the driver failed along the way.
        """
        if self._closed:
            return
        errors: list[DriverError] = []
        self._swapper.close()  # every copy done, every callback run
        with self._lock:
            self._closed = True
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            if thread is not threading.current_thread():
                thread.join()
        with self._lock:
            self._seqs.clear()
            self._owner = [None] * self.max_seqs
            self._free_slots = OrderedDict.fromkeys(range(self.max_seqs))
            self._quarantine.clear()
            self._held_sum = 0
            self._host_tokens = 0
            self.space.close(errors.append)
            try:
                self.driver.close()
            except DriverError as e:
                errors.append(e)
        if errors:
            raise DriverError(f"close: {len(errors)} driver call(s) failed; first: {errors[0]}")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
