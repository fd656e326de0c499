"""The vmem allocator: slots, page-group accounting, and the allocator contract over them.

See :mod:`kvmem.backends.vmem` for the memory model. The sequence
bookkeeping and argument checks are :class:`~kvmem.backends.base.KVBackend`'s;
this module implements its hooks. It decides
which slot a sequence gets, how many page groups each sequence holds, and
when pages are mapped (``reserve``), shared (``fork``) or reclaimed (a
``reserve`` that finds the pool empty); :class:`~kvmem.backends.vmem.space.VirtualKV`
does the mapping, :class:`~kvmem.backends.vmem.mapahead.MapAhead` maps
ahead on its thread, :class:`~kvmem.backends.vmem.swapping.SwapMixin` swaps.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import replace

import numpy as np
import torch

from kvmem.allocator import Capabilities, KVStats, check_count
from kvmem.backends.base import KVBackend
from kvmem.backends.vmem import checks, figures, prefixing, tiering
from kvmem.backends.vmem.driver import VMemDriver
from kvmem.backends.vmem.drivers import make_driver
from kvmem.backends.vmem.mapahead import MapAhead
from kvmem.backends.vmem.prefix import PrefixIndex
from kvmem.backends.vmem.seq import VSeq
from kvmem.backends.vmem.space import VirtualKV, round_seq_len
from kvmem.backends.vmem.swapping import SwapMixin
from kvmem.errors import DriverError, IntegrityError, InvalidArgument, OutOfKVMemory
from kvmem.layout import BatchLayout, from_arrays
from kvmem.native import batch_passes
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV
from kvmem.tiers import EventHub, LoadHandle, TierManager, WritePolicy

__all__ = ["VMemAllocator"]

_KIB = 1024


class VMemAllocator(SwapMixin, KVBackend[VSeq]):
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
    - ``prefix_caching`` (default True; off where a token's bytes do not
      divide ``page_bytes``): full pages of live and freed sequences are
      shared with new sequences of the same prefix (:mod:`.prefix`); its
      KV events (vLLM's schema) are on :attr:`kv_events` then.
    - Cache tiers below the prefix cache (default off, :mod:`.tiering`):
      ``host_cache_tokens``, ``disk_cache_dir`` with ``disk_cache_tokens``,
      ``tier_write_policy`` (``"write_back"``: a keyed page is written down
      when it loses its last slot; ``"write_through"``: when it is keyed),
      as for the paged backend. ``add`` extends its device hit with pages
      the tiers hold and loads them asynchronously; a page that fails to
      load is computed again (``seq_info().num_computed`` shows what
      loaded). Tier figures are ``stats().extra['tier_*']``.

    Tensors from :meth:`layer` and :meth:`kv_view` point into the virtual
    ranges: valid until :meth:`close`, and only their mapped parts (the
    reserved KV of live sequences) may be touched. The allocator owns its
    driver and closes it.
    """

    capabilities = Capabilities(swap=True, fork=True, prefix_caching=True)
    max_seq_len: int
    #: False: ``layout`` always takes the Python path (tests compare the two).
    native_passes: bool | None = None

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
        prefix_caching: bool = True,
        host_cache_tokens: int | None = None,
        disk_cache_dir: str | os.PathLike[str] | None = None,
        disk_cache_tokens: int | None = None,
        tier_write_policy: WritePolicy = "write_back",
    ) -> None:
        super().__init__()
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
        if not isinstance(prefix_caching, bool):
            raise InvalidArgument(f"prefix_caching must be a bool, got {prefix_caching!r}")
        self.spec = spec
        tb = spec.bytes_per_token_layer
        tier_opts = (host_cache_tokens, disk_cache_dir, disk_cache_tokens)
        tiers = tiering.check_options(1, *tier_opts)
        drv = make_driver(driver, device)
        events = EventHub()
        self._tiers: TierManager | None = None
        try:
            self._build(drv, max_seqs, max_seq_len, page_bytes, num_tokens, num_bytes)
            if tiers:
                prefixed = prefix_caching and self.page_bytes % tb == 0
                tiering.check_options(self.page_bytes // tb if prefixed else None, *tier_opts)
                self._tiers, self._tier_pages = tiering.make_tiers(
                    self.space, events, *tier_opts, tier_write_policy
                )
        except BaseException:
            if getattr(self, "space", None) is not None:
                self.space.close()
            if drv is not driver:  # made here: nobody else will close it
                drv.close()
            raise
        self.driver = drv
        self._lock = threading.Lock()
        self._owner: list[VSeq | None] = [None] * max_seqs
        self._free_slots: OrderedDict[int, None] = OrderedDict.fromkeys(range(max_seqs))
        self._held_sum = 0  # sum over sequences of the groups each holds
        self._quarantine: set[int] = set()
        self.tokens_per_page = self.page_bytes / tb
        ahead = min(map_ahead_tokens or max(1, self.page_bytes // tb), self.max_seq_len)
        self.map_ahead = map_ahead
        self._mapper = MapAhead(self.space, self._lock, ahead, self._target)
        group_tokens = spec.num_layers * self.page_bytes // spec.bytes_per_token
        self._init_swap(host_num_tokens, self.space.num_groups * group_tokens)
        self._prefix: PrefixIndex | None = None
        if prefix_caching and self.page_bytes % tb == 0:
            self._prefix = PrefixIndex(max_seqs, self.page_bytes // tb, events)
            self.kv_events = events
        else:
            self.capabilities = replace(self.capabilities, prefix_caching=False)
        if map_ahead:
            self._mapper.start()  # now: a step would wait for it to start
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
        # row s is [s]: the page table of slot s (one page of max_seq_len tokens)
        self._slot_table = torch.arange(max_seqs, dtype=torch.int32).reshape(-1, 1)

    # ------------------------------------------------------------------ helpers
    def _held(self) -> int:
        """Distinct page groups held by sequences (a shared group counts once)."""
        return self._held_sum - self.space.extra_refs

    def _set_held(self, s: VSeq, n: int) -> None:
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
        """Return ``short`` groups to the pool for ``slot``: free slots first, then unheld tails.

        One batch of unmaps: the device is synchronized once for all of them.
        """
        self._mapper.settle()  # groups the worker holds are in no slot yet: let them land
        try:
            self._reclaim_groups(short, slot, target)
        finally:
            prefixing.trim_keys(self)

    def _reclaim_groups(self, short: int, slot: int, target: int) -> None:
        sp = self.space
        with sp.unmapping():
            for victim in list(self._free_slots):
                if short <= 0:
                    return
                if victim != slot and sp.covered[victim] > 0:
                    tiering.evict_before_shrink(self, victim, 0, short)
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

    def _target(self, slot: int) -> int | None:
        """(Lock held.) Tokens the slot's sequence reserved, None for a free slot."""
        s = self._owner[slot]
        return None if s is None else s.reserved

    def wait_map_ahead(self, timeout: float | None = None) -> bool:
        """Block until the map-ahead worker has handled everything queued so far.

        Returns False on timeout. Never needed for correctness (``reserve``
        maps what the worker has not); for tests and benchmarks.
        """
        return self._mapper.wait(timeout)

    # ------------------------------------------------------ hooks of KVBackend
    def _admit(self, seq_id: Hashable, tokens: list[int], cache_salt: Hashable) -> VSeq:
        """A new sequence, with the longest prefix a slot holds (:func:`.prefixing.admit`)."""
        return prefixing.admit(self, tokens, cache_salt)

    def _on_commit(self, s: VSeq, end: int) -> None:
        """Key the pages that filled up, findable by later prompts."""
        prefixing.on_commit(self, s, end)

    def _grow(self, seq_id: Hashable, s: VSeq, target: int) -> None:
        """Map, privately, every position up to ``target`` under the sequence's slot.

        The first growth gives the sequence a slot (best fit among the free
        ones). On return every reserved position is mapped, and the page the
        next KV goes to is the sequence's own (a page still shared with a
        fork is copied first). Raises OutOfKVMemory (pool or slots short),
        InvalidArgument (beyond ``max_seq_len``), DriverError (the driver
        failed: nothing the sequences hold changed, though mappings nobody
        held may have been dropped).
        """
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
                self._mapper.want(slot, target)
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
            self._mapper.settle(slot)
            cow = sp.shared_pages(slot, s.num_computed, target) if s.slot >= 0 else []
            need = sp.pages(target) - s.held + len(cow)
            free = sp.num_groups - self._held()
            if need > free:
                raise OutOfKVMemory(
                    f"sequence {seq_id!r} needs {need} more page groups, {free} are free"
                )
            if s.slot < 0:
                tiering.evict_tail(self, slot, 0)
            short = len(cow) - len(sp.pool) + max(0, sp.pages(target) - len(sp.groups[slot]))
            if short > 0:
                self._reclaim(short, slot, target)
            sp.grow(slot, target)
            sp.cow(slot, cow)
            if s.slot < 0:
                del self._free_slots[slot]
                self._owner[slot] = s
                s.slot = slot
                if self._prefix is not None:
                    self._prefix.trim(slot, 0)  # the new owner writes from position 0
            s.reserved = target
            self._set_held(s, target)
        if self.map_ahead:
            self._mapper.want(slot, target)
            self._mapper.wake()

    def _can_grow(self, grow: list[tuple[VSeq, int]]) -> bool:
        """Whether the pool and the free slots cover every growth at once.

        Waits for in-flight swap-outs when what they free is needed.
        """
        need = slots = 0
        sp = self.space
        for s, target in grow:
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

    def _pages(self, s: VSeq) -> Sequence[int]:
        """One page per sequence: its slot's row (``page_size = max_seq_len``)."""
        return (s.slot,)

    def _page_rows(self, seqs: list[VSeq], seq_lens: np.ndarray) -> tuple[np.ndarray, bool]:
        """The batch's slots as a [B, 1] page table."""
        rows = np.fromiter((s.slot for s in seqs), dtype=np.int32, count=len(seqs))
        return rows.reshape(-1, 1), True

    def layout(self, batch: Sequence[tuple[Hashable, int]]) -> BatchLayout:
        """Kernel inputs for ``[(seq_id, num_new_tokens), ...]``: page ``s`` is slot ``s``'s row.

        The common case (a list of resident sequences) is checked and laid
        out in one native pass; anything else takes the base class's path,
        which raises the right error. Then the map-ahead worker gets what was
        asked of it.
        """
        ext = None if self.native_passes is False else batch_passes()
        got = None
        if ext is not None and type(batch) is list and not self._closed:
            got = ext.layout_pass(self._seqs, batch, self._slot_table, self.page_size, True)
        if got is None:
            out = super().layout(batch)
        else:
            ids, max_len, max_q, arrays = got
            out = from_arrays(self.page_size, arrays, ids, self.device, self.spec, max_len, max_q)
        self._mapper.batch_starts()  # the batch is about to run: the worker maps meanwhile
        return out

    def _fork(self, parent_id: Hashable, p: VSeq, child_id: Hashable) -> VSeq:
        """The child, sharing the parent's computed KV, copy-on-write.

        The child gets its own slot, and under it the parent's physical pages
        holding the computed KV are mapped a second time: no data is copied
        and no memory taken. A sequence that reserves room in a shared page
        gets a private copy of it first (in ``reserve``); the parent may keep
        writing into room it reserved before the fork, since the child only
        reads positions before the fork point and copies the page before it
        writes. Raises OutOfKVMemory when no slot is free; nothing changes then.
        """
        c = VSeq(list(p.tokens))
        n = p.num_computed
        if n:
            if self._swapper.pending:
                self._make_room(0, 1)
            with self._lock:
                self._fork_slot(parent_id, p, c, n)
        return c

    def _fork_slot(self, parent_id: Hashable, p: VSeq, c: VSeq, n: int) -> None:
        if not self._free_slots:
            raise OutOfKVMemory(f"fork of {parent_id!r}: all {self.max_seqs} slots are in use")
        sp = self.space
        slot = min(self._free_slots, key=lambda i: sp.covered[i])
        self._mapper.settle(slot)
        tiering.evict_tail(self, slot, 0)
        sp.clear(slot)
        sp.share(p.slot, slot, n)
        del self._free_slots[slot]
        self._owner[slot] = c
        c.slot = slot
        c.num_computed = c.reserved = n
        c.root, c.hashes = p.root, list(p.hashes)
        if self._prefix is not None:
            self._prefix.assign(slot, self._prefix.keys[p.slot][: len(p.hashes)])
        self._set_held(c, n)

    def _drop(self, seq_id: Hashable, s: VSeq) -> None:
        """Release the sequence; its slot keeps its own pages mapped for the next sequence.

        Pages the slot shares with a fork are unmapped from it, so a free
        slot never holds another sequence's KV. A swapped-out sequence's
        host copy is dropped.
        """
        with self._lock:
            del self._seqs[seq_id]
            self._drop_host(s)
            self._release_slot(s)

    def _await_transfer(self, s: VSeq) -> None:
        if isinstance(s.transfer, LoadHandle):
            tiering.finish_load(self, s)
        elif s.transfer is not None:
            self._swapper.settle(s.transfer)

    def _sync(self) -> None:
        self._swapper.reap()

    def _layer(self, i: int) -> LayerKV:
        """Layer ``i``: ``k``, ``v`` are virtual [max_seqs, max_seq_len, heads, code_dim]."""
        return self.space.layers[i]

    def _release_slot(self, s: VSeq) -> None:
        """(Lock held.) Give back the sequence's groups and slot; its pages stay mapped there."""
        self._held_sum -= s.held
        s.held = s.held_cover = 0
        slot = s.slot
        if slot >= 0:
            s.slot = -1
            self._owner[slot] = None
            self._mapper.forget(slot)
            try:
                if self.space.shared_below[slot]:
                    self._mapper.settle(slot)
                    lst, ref = self.space.groups[slot], self.space.ref
                    first = next((j for j, g in enumerate(lst) if ref[g] > 1), len(lst))
                    tiering.evict_tail(self, slot, first)  # the pages unshare unmaps
                    self.space.unshare(slot)
            except DriverError:
                self._quarantine.add(slot)  # may still map shared pages: never hand it out
                raise
            finally:
                if self._prefix is not None:
                    keep = 0 if slot in self._quarantine else len(self.space.groups[slot])
                    self._prefix.trim(slot, keep)
            self._free_slots[slot] = None

    def _take_slot(self, s: VSeq) -> None:
        """(Lock held; room checked.) A slot for ``s`` with its reservation mapped."""
        sp = self.space
        target = s.reserved
        slot = self._pick_slot(target)
        self._mapper.settle(slot)
        tiering.evict_tail(self, slot, 0)
        short = max(0, sp.pages(target) - len(sp.groups[slot])) - len(sp.pool)
        if short > 0:
            self._reclaim(short, slot, target)
        sp.grow(slot, target)
        del self._free_slots[slot]
        self._owner[slot] = s
        s.slot = slot
        self._set_held(s, target)
        if self._prefix is not None:
            self._prefix.trim(slot, 0)  # the swap-in writes the slot from position 0

    # -------------------------------------------------------------- vmem extras
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

    def stats(self) -> KVStats:
        """Memory use in tokens; physical/virtual bytes and driver call counts in ``extra``.

        ``used`` is what the groups held by sequences can store; ``free`` the
        rest of the pool, including groups still mapped under free slots or
        ahead of reservations (``extra['idle_mapped_bytes']``). ``cached`` is
        the keyed prefix pages under free slots (reusable, counted free). A
        sequence whose swap-out is in flight holds its groups until the copy
        is done. ``extra`` also has the host side (``host_capacity_tokens``, ``host_used_tokens``,
        ``swaps_in_flight``) and cumulative ``swap_out_bytes``,
        ``swap_in_bytes``, ``swap_copies``; with cache tiers, their ``tier_*``
        figures (:meth:`kvmem.tiers.TierManager.stats`).
        """
        self._check_open()
        self._swapper.reap()
        with self._lock:
            self._mapper.settle()
            return figures.stats(self)

    def _check_backend(self) -> None:
        """Verify slots, page groups, sharing and prefix keys (:mod:`.checks`)."""
        checks.check_backend(self)

    def _shutdown(self) -> None:
        """Stop the map-ahead worker, unmap and release every page, free the ranges.

        Raises DriverError (after releasing everything it can) if the driver
        failed along the way.
        """
        errors: list[DriverError] = []
        if self._tiers is not None:
            self._tiers.close()  # loads in flight land first
        self._swapper.close()  # every copy done, every callback run
        with self._lock:
            self._mapper.closed = True
        self._mapper.stop()  # its jobs land first: nothing maps into a range being freed
        with self._lock:
            self._owner = [None] * self.max_seqs
            self._free_slots = OrderedDict.fromkeys(range(self.max_seqs))
            self._quarantine.clear()
            if self._prefix is not None:
                self._prefix.clear()
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
