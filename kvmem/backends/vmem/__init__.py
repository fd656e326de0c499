"""The vmem backend: contiguous virtual KV per sequence, physical pages mapped on demand.

This is the vAttention model. Each layer's K and V are virtual tensors
``[max_seqs, max_seq_len, heads, code_dim]``; a sequence owns one row (its
*slot*), contiguous in virtual memory, sized for the longest sequence the
allocator accepts. Physical pages, created once up front in a pool, are
mapped under the row only as far as the sequence's reserved KV reaches
(see :mod:`kvmem.backends.vmem.space`)::

    slot 0  [####|####|##..|    |    |    ...]   seq A: 10 tokens, 3 pages
    slot 1  [####|#...|    |    |    |    ...]   seq B:  5 tokens, 2 pages
    slot 2  [    |    |    |    |    |    ...]   free, nothing mapped
             ^ mapped page      ^ reserved address space only

Kernels see it through the common :class:`~kvmem.layout.BatchLayout` with
one page per sequence: page ``slot``, ``page_size = max_seq_len`` (so
``slot_mapping = slot * max_seq_len + position``), or through
:meth:`VMemAllocator.kv_view`, the sequence's plain contiguous
``[tokens, heads, code_dim]`` K and V, which kernels written for unpaged KV
(torch SDPA, flash-attn with a batch index) read unchanged.

Two techniques from vAttention:

- Deferred reclamation. ``free`` keeps the slot's pages mapped. A new
  sequence gets the free slot whose mapped size fits its prompt best, so
  steady serving maps almost nothing. Pages are unmapped only when a
  ``reserve`` finds the pool empty: first from free slots (least recently
  freed first), then pages mapped beyond what live sequences reserved.
- Mapping ahead (``map_ahead=True``). A background thread maps, from the
  pool only, the next page(s) of sequences that are about to cross into an
  unmapped page, so the decode step rarely calls the driver. It is safe:
  ``reserve`` itself guarantees that every reserved slot is mapped before
  it returns (mapping synchronously when the worker is behind), the worker
  only ever adds mappings, and only the caller's thread unmaps.

Accounting is in page *groups* (one page for every layer). A sequence
*holds* the groups its reserved tokens need; ``OutOfKVMemory`` means the
groups held by all sequences would exceed the pool. Pages mapped but not
held (free slots, room mapped ahead) are reclaimable and count as free.

Differences from the paged backend: no prefix caching (``add`` returns 0);
``fork`` copies the parent's KV into the child's own slot at fork time
instead of sharing pages (so it needs free memory and a free slot, and may
raise OutOfKVMemory); a sequence cannot grow past ``max_seq_len``
(InvalidArgument) and at most ``max_seqs`` sequences hold KV at once.
``swap_out``/``swap_in`` are not implemented yet.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kvmem.allocator import (
    KVAllocator,
    KVStats,
    SeqInfo,
    SwapHandle,
    check_count,
    check_tokens,
    raise_unknown,
    register_backend,
)
from kvmem.backends.vmem.driver import MetaDriver, VMemDriver, make_driver
from kvmem.backends.vmem.space import VirtualKV, groups_for, part_token_bytes, round_seq_len
from kvmem.errors import (
    DriverError,
    DuplicateSequence,
    IntegrityError,
    InvalidArgument,
    KVError,
    OutOfKVMemory,
)
from kvmem.layout import BatchLayout, build_layout
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV

__all__ = ["MetaDriver", "VMemAllocator", "VMemDriver"]

_KIB = 1024


class _Seq:
    """Per-sequence state: tokens, counts, slot, and the groups it holds."""

    __slots__ = ("tokens", "num_computed", "reserved", "slot", "held", "held_cover")

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.num_computed = 0
        self.reserved = 0
        self.slot = -1
        self.held = 0  # groups its reserved tokens need
        self.held_cover = 0  # tokens those groups can hold


def _worker(ref: weakref.ReferenceType[VMemAllocator], q: queue.SimpleQueue[int | None]) -> None:
    """Map-ahead loop: map the pages queued slots will need next."""
    while True:
        slot = q.get()
        if slot is None:
            return
        alloc = ref()
        if alloc is None:
            return
        alloc._map_ahead_slot(slot)
        del alloc


@register_backend("vmem")
class VMemAllocator(KVAllocator):
    """vAttention-style KV: a virtual row per sequence, pages mapped as it grows.

    Options:

    - ``num_tokens`` or ``num_bytes``: physical capacity. ``num_tokens``
      creates enough page groups for one sequence of that many tokens;
      ``num_bytes`` creates ``num_bytes // (num_layers * page_bytes)``
      groups. Never more than ``max_seqs`` full rows need.
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
      keeps pages mapped (default: the tokens one K page holds).
    - ``driver``: ``"host"``, ``"cuda"``, ``"meta"`` or a
      :class:`~kvmem.backends.vmem.driver.VMemDriver` instance (default:
      chosen by ``device``).

    Tensors from :meth:`layer` and :meth:`kv_view` point into the virtual
    ranges: valid until :meth:`close`, and only their mapped parts (the
    reserved KV of live sequences) may be touched.
    """

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
        self.spec = spec
        drv = make_driver(driver, device)
        self.device = drv.device
        if page_bytes is None:
            page_bytes = max(64 * _KIB, drv.granularity)
        pb = drv.check_page_size(page_bytes)
        self.page_bytes = pb
        self.max_seqs = max_seqs
        self.max_seq_len = round_seq_len(spec, max_seq_len, pb)
        self.page_size = self.max_seq_len
        token_bytes = part_token_bytes(spec)
        row_groups = groups_for(token_bytes, pb, self.max_seq_len)
        if num_tokens is not None:
            full, rest = divmod(num_tokens, self.max_seq_len)
            groups = full * row_groups + groups_for(token_bytes, pb, rest)
        else:
            assert num_bytes is not None
            groups = num_bytes // (spec.num_layers * pb)
        groups = min(groups, row_groups * max_seqs)
        if groups <= 0:
            raise InvalidArgument(
                f"capacity is smaller than one page per layer ({spec.num_layers} x {pb} bytes)"
            )
        limit = drv.max_mappings
        if limit is not None and 2 * groups * spec.num_layers > limit:
            raise InvalidArgument(
                f"{groups * spec.num_layers} pages of {pb} bytes could need more memory mappings "
                f"than the system allows ({limit}); use a larger page_bytes"
            )
        try:
            self.space = VirtualKV(spec, drv, max_seqs, self.max_seq_len, pb, groups)
        except BaseException:
            if drv is not driver:
                drv.close()
            raise
        self.driver = drv
        self._lock = threading.Lock()
        self._seqs: dict[Hashable, _Seq] = {}
        self._owner: list[_Seq | None] = [None] * max_seqs
        self._free_slots: OrderedDict[int, None] = OrderedDict.fromkeys(range(max_seqs))
        self._held = 0
        k_tokens_per_page = max(1, pb // self.space.token_bytes[0])
        self._ahead = min(map_ahead_tokens or k_tokens_per_page, self.max_seq_len)
        self.map_ahead = map_ahead
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._pending: set[int] = set()
        self._thread: threading.Thread | None = None
        self._ahead_groups = 0
        self._ahead_error: str | None = None
        self._closed = False

    # ------------------------------------------------------------------ helpers
    def _get(self, seq_id: Hashable) -> _Seq:
        if self._closed:
            raise KVError("allocator is closed")
        s = self._seqs.get(seq_id)
        if s is None:
            raise raise_unknown(seq_id)
        return s

    def _check_len(self, seq_id: Hashable, n: int) -> None:
        if n > self.max_seq_len:
            raise InvalidArgument(
                f"sequence {seq_id!r} would have {n} tokens, more than max_seq_len "
                f"{self.max_seq_len}"
            )

    def _set_held(self, s: _Seq, n: int) -> None:
        if n > s.held_cover or n == 0:
            g = self.space.groups_for(n)
            self._held += g - s.held
            s.held = g
            s.held_cover = self.space.cover(
                [self.space.pages(p, n) for p in range(self.space.num_parts)]
            )

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
        """Unmap ``short`` groups for ``slot``: free slots first, then unreserved tails."""
        sp = self.space
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

    def _ensure_mapped(self, slot: int, target: int) -> None:
        """Map under ``slot`` until it covers ``target`` tokens, unmapping elsewhere if needed."""
        sp = self.space
        lists = sp.groups[slot]
        need = sum(max(0, sp.pages(p, target) - len(lists[p])) for p in range(sp.num_parts))
        if need > len(sp.pool):
            self._reclaim(need - len(sp.pool), slot, target)
        sp.grow(slot, target)

    def _want_ahead(self, s: _Seq) -> None:
        slot = s.slot
        if (
            self.map_ahead
            and slot not in self._pending
            and self.space.covered[slot] - s.reserved < self._ahead
            and self.space.covered[slot] < self.max_seq_len
        ):
            self._pending.add(slot)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_worker,
                    args=(weakref.ref(self), self._queue),
                    name="kvmem-vmem-map-ahead",
                    daemon=True,
                )
                self._thread.start()
            self._queue.put(slot)

    def _map_ahead_slot(self, slot: int) -> None:
        """Worker side: map, from the pool only, the next pages of ``slot``'s sequence."""
        with self._lock:
            self._pending.discard(slot)
            s = self._owner[slot]
            if self._closed or s is None or not self.space.pool:
                return
            target = min(self.max_seq_len, s.reserved + 2 * self._ahead)
            try:
                self._ahead_groups += self.space.grow(slot, target, budget=len(self.space.pool))
            except DriverError as e:  # the caller's reserve will map (and report) itself
                self._ahead_error = str(e)

    # --------------------------------------------------------------- interface
    def add(self, seq_id: Hashable, token_ids: Sequence[int], **kwargs: Any) -> int:
        """Register a sequence with its prompt; returns 0 (no prefix caching here).

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
        toks = check_tokens(token_ids)
        self._check_len(seq_id, len(s.tokens) + len(toks))
        s.tokens.extend(toks)

    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        """Ensure mapped slots for the next ``num_tokens`` KV entries (all or nothing).

        The first reserve of a sequence gives it a slot (best fit among the
        free ones). On return every reserved position is mapped. Raises
        OutOfKVMemory (pool or slots short), InvalidArgument (beyond
        ``max_seq_len``), DriverError (the driver failed; nothing changed
        except that reclaimable mappings elsewhere may have been unmapped).
        """
        s = self._get(seq_id)
        check_count("num_tokens", num_tokens)
        target = s.num_computed + num_tokens
        if target <= s.reserved:
            return
        if target > self.max_seq_len:
            raise InvalidArgument(
                f"sequence {seq_id!r}: {target} KV entries exceed max_seq_len {self.max_seq_len}"
            )
        slot = s.slot
        if slot >= 0 and target <= self.space.covered[slot]:  # fast path: already mapped
            s.reserved = target
            self._set_held(s, target)
            self._want_ahead(s)
            return
        with self._lock:
            if slot < 0:
                slot = self._pick_slot(max(target, len(s.tokens)))
                if slot < 0:
                    raise OutOfKVMemory(
                        f"sequence {seq_id!r} needs a slot; all {self.max_seqs} are in use"
                    )
            need = self.space.groups_for(target) - s.held
            free = self.space.num_groups - self._held
            if need > free:
                raise OutOfKVMemory(
                    f"sequence {seq_id!r} needs {need} more page groups, {free} are free"
                )
            self._ensure_mapped(slot, target)
            if s.slot < 0:
                del self._free_slots[slot]
                self._owner[slot] = s
                s.slot = slot
            s.reserved = target
            self._set_held(s, target)
        self._want_ahead(s)

    def can_reserve(self, requests: Mapping[Hashable, int]) -> bool:
        """Whether every ``reserve(seq, n)`` of ``requests`` fits at once."""
        need = 0
        slots = 0
        for sid, n in requests.items():
            check_count("num_tokens", n)
            s = self._get(sid)
            target = s.num_computed + n
            if target <= s.reserved:
                continue
            if target > self.max_seq_len:
                return False
            need += self.space.groups_for(target) - s.held
            slots += s.slot < 0
        return need <= self.space.num_groups - self._held and slots <= len(self._free_slots)

    def layout(self, batch: Sequence[tuple[Hashable, int]]) -> BatchLayout:
        """One page per sequence: its slot, ``page_size = max_seq_len``."""
        if not batch:
            raise InvalidArgument("layout of an empty batch")
        b = len(batch)
        rows = np.empty((b, 1), dtype=np.int32)
        seq_lens = np.empty(b, dtype=np.int32)
        qlens = np.empty(b, dtype=np.int32)
        seen: set[Hashable] = set()
        for i, (sid, n) in enumerate(batch):
            s = self._get(sid)
            check_count("num_new_tokens", n)
            if sid in seen:
                raise InvalidArgument(f"sequence {sid!r} appears twice in the batch")
            seen.add(sid)
            end = s.num_computed + n
            if end > s.reserved:
                raise InvalidArgument(
                    f"sequence {sid!r}: {n} new tokens need {end} reserved slots, "
                    f"{s.reserved} are; call reserve first"
                )
            rows[i, 0] = s.slot
            seq_lens[i] = end
            qlens[i] = n
        return build_layout(
            self.max_seq_len,
            rows,
            seq_lens,
            qlens,
            tuple(sid for sid, _ in batch),
            self.device,
            self.spec,
        )

    def commit(self, seq_id: Hashable, num_tokens: int) -> None:
        """Record that ``num_tokens`` more KV entries are written."""
        s = self._get(seq_id)
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
        s.num_computed = end

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Make the child a copy of the parent: its tokens, and its KV copied into a new slot.

        vmem gives every sequence its own contiguous row, so the child's KV
        is copied now (every layer, the parent's computed tokens) rather
        than shared copy-on-write. Raises OutOfKVMemory when there is no
        free slot or memory for the copy; nothing changes then.
        """
        p = self._get(parent_id)
        if child_id in self._seqs:
            raise DuplicateSequence(f"sequence {child_id!r} is already registered")
        c = _Seq(list(p.tokens))
        n = p.num_computed
        if n:
            with self._lock:
                slot = self._pick_slot(max(n, len(p.tokens)))
                if slot < 0:
                    raise OutOfKVMemory(
                        f"fork of {parent_id!r}: all {self.max_seqs} slots are in use"
                    )
                need = self.space.groups_for(n)
                free = self.space.num_groups - self._held
                if need > free:
                    raise OutOfKVMemory(
                        f"fork of {parent_id!r} needs {need} page groups for the copy, "
                        f"{free} are free"
                    )
                self._ensure_mapped(slot, n)
                self.space.copy_tokens(p.slot, slot, n)
                del self._free_slots[slot]
                self._owner[slot] = c
                c.slot = slot
                c.num_computed = c.reserved = n
                self._set_held(c, n)
        self._seqs[child_id] = c

    def free(self, seq_id: Hashable) -> None:
        """Release the sequence; its slot keeps its pages mapped for the next sequence."""
        s = self._get(seq_id)
        with self._lock:
            del self._seqs[seq_id]
            self._held -= s.held
            if s.slot >= 0:
                self._owner[s.slot] = None
                self._free_slots[s.slot] = None

    def swap_out(self, seq_ids: Iterable[Hashable]) -> SwapHandle:
        """Not available in this backend yet: raises NotImplementedError."""
        raise NotImplementedError("the vmem backend does not swap yet; use recompute")

    def swap_in(self, seq_ids: Iterable[Hashable]) -> SwapHandle:
        """Not available in this backend yet: raises NotImplementedError."""
        raise NotImplementedError("the vmem backend does not swap yet; use recompute")

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
        s = self._get(seq_id)
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
        return SeqInfo(len(s.tokens), s.num_computed, s.reserved, False)

    def seq_ids(self) -> list[Hashable]:
        """Every registered sequence."""
        return list(self._seqs)

    def stats(self) -> KVStats:
        """Memory use in tokens; physical/virtual bytes and driver call counts in ``extra``.

        ``used`` is what the groups held by sequences can store; ``free`` the
        rest of the pool, including groups still mapped under free slots or
        ahead of reservations (``extra['idle_mapped_bytes']``). ``cached`` is
        0: there is no prefix cache.
        """
        if self._closed:
            raise KVError("allocator is closed")
        with self._lock:
            sp = self.space
            bpt = self.spec.bytes_per_token
            group_bytes = self.spec.num_layers * self.page_bytes
            capacity = sp.num_groups * group_bytes // bpt
            used = self._held * group_bytes // bpt
            extra: dict[str, float] = {
                "physical_bytes_pooled": sp.num_groups * group_bytes,
                "physical_bytes_mapped": sp.mapped_groups * group_bytes,
                "physical_bytes_held": self._held * group_bytes,
                "idle_mapped_bytes": (sp.mapped_groups - self._held) * group_bytes,
                "virtual_bytes_reserved": sp.virtual_bytes,
                "pages_pooled": sp.num_groups * self.spec.num_layers,
                "pages_mapped": sp.mapped_groups * self.spec.num_layers,
                "map_calls": sp.map_calls,
                "unmap_calls": sp.unmap_calls,
                "map_ahead_groups": self._ahead_groups,
                "page_bytes": self.page_bytes,
                "max_seq_len": self.max_seq_len,
                "free_slots": len(self._free_slots),
            }
            drv_bytes = self.driver.allocated_bytes()
            if drv_bytes is not None:
                extra["driver_allocated_bytes"] = drv_bytes
            return KVStats(
                page_size=self.page_size,
                bytes_per_token=bpt,
                capacity_tokens=capacity,
                used_tokens=used,
                filled_tokens=sum(s.num_computed for s in self._seqs.values()),
                reserved_tokens=sum(s.reserved - s.num_computed for s in self._seqs.values()),
                cached_tokens=0,
                free_tokens=capacity - used,
                swapped_tokens=0,
                num_seqs=len(self._seqs),
                num_swapped_seqs=0,
                extra=extra,
            )

    def check_integrity(self) -> None:
        """Verify slots, page groups, held counts, and that every reserved token is mapped."""
        if self._closed:
            raise KVError("allocator is closed")
        with self._lock:
            sp = self.space
            seen: list[int] = list(sp.pool)
            for slot in range(self.max_seqs):
                for p, lst in enumerate(sp.groups[slot]):
                    seen.extend(lst)
                    if p >= sp.num_parts:
                        raise IntegrityError("too many parts")
                counts = [len(lst) for lst in sp.groups[slot]]
                if sp.covered[slot] != sp.cover(counts):
                    raise IntegrityError(f"slot {slot}: covered count out of date")
            if sorted(seen) != list(range(sp.num_groups)):
                raise IntegrityError("page groups are not each in the pool or a slot exactly once")
            if sp.mapped_groups != sp.num_groups - len(sp.pool):
                raise IntegrityError("mapped group count is off")
            if sp.map_calls - sp.unmap_calls != sp.mapped_groups * self.spec.num_layers:
                raise IntegrityError("map and unmap calls do not add up to the mapped pages")
            held = 0
            owned: set[int] = set()
            for sid, s in self._seqs.items():
                if not 0 <= s.num_computed <= s.reserved <= self.max_seq_len:
                    raise IntegrityError(f"{sid!r}: counts out of order")
                if s.num_computed > len(s.tokens) or len(s.tokens) > self.max_seq_len:
                    raise IntegrityError(f"{sid!r}: token count out of range")
                if s.slot < 0:
                    if s.reserved or s.held:
                        raise IntegrityError(f"{sid!r}: reserved KV but no slot")
                    continue
                if self._owner[s.slot] is not s or s.slot in owned:
                    raise IntegrityError(f"{sid!r}: slot {s.slot} owned by another sequence")
                owned.add(s.slot)
                if sp.covered[s.slot] < s.reserved:
                    raise IntegrityError(f"{sid!r}: reserved tokens are not all mapped")
                if s.held != sp.groups_for(s.reserved):
                    raise IntegrityError(f"{sid!r}: held groups out of date")
                held += s.held
            if held != self._held:
                raise IntegrityError("held group total is off")
            if held > sp.num_groups:
                raise IntegrityError("more groups held than pooled")
            others = [i for i, o in enumerate(self._owner) if o is not None]
            if set(others) != owned:
                raise IntegrityError("a slot is owned by an unregistered sequence")
            if owned & set(self._free_slots) or len(owned) + len(self._free_slots) != self.max_seqs:
                raise IntegrityError("slots leaked")

    def close(self) -> None:
        """Stop the map-ahead worker, unmap and release every page, free the ranges.

        Idempotent. Raises DriverError (after releasing everything it can)
        if the driver failed along the way.
        """
        if self._closed:
            return
        errors: list[DriverError] = []
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
            self._held = 0
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

