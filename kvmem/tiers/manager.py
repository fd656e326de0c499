r"""The tier manager: prefix pages below the device pool, written down and loaded back.

::

    device pool (the allocator's prefix cache)
        |  evicted (write_back) or filled (write_through)   ^ load (async)
        v                                                   |
    host tier   LRU, host_bytes  ---------------------------+
        |  evicted (write_back) or stored (write_through)   ^
        v                                                   |
    disk tier   LRU, disk_bytes, one file per page ---------+
        |  evicted: dropped

The allocator keeps its device prefix cache and calls four hooks:

* :meth:`TierManager.evicted` when cached device pages lose their keys
  (before their slots are reused). ``write_back`` copies them to the host
  tier (or the disk tier when there is no host tier) unless already there;
  the call returns once their bytes are read, so the pages may be
  overwritten.
* :meth:`TierManager.filled` when pages fill up (``commit``):
  ``write_through`` copies them down at once; ``write_back`` does nothing.
* :meth:`TierManager.match` and :meth:`TierManager.load` in ``add``: how many
  pages after the device hit some tier holds, then copies of those into
  device pages the allocator took, returning a :class:`LoadHandle`. Host
  pages come through the swap manager (worker thread or CUDA stream), disk
  pages on the disk tier's worker thread; pages being read are pinned in
  their tier. :meth:`LoadHandle.result` (after waiting) is the count of
  leading pages loaded intact: a disk error or a failed checksum ends the
  hit there, and the corrupt page is dropped from its tier.
* :meth:`device_stored` / :meth:`device_removed` for the KV events of the
  device medium.

A host eviction in ``write_back`` writes the page to the disk tier. Tiers
are inclusive: a loaded page stays in its tier (touched) and is not copied
down again while there; a page written down to a tier that already holds it
is touched there instead. A tier that cannot make room (every page pinned)
skips the store, counted in ``store_skipped``: a cache never fails a caller.

Everything but the byte copies runs on the caller's thread; one manager is
driven from one thread, like its allocator.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Literal

import torch

from kvmem.errors import IntegrityError, InvalidArgument, KVError
from kvmem.swap import CopyPlan, SwapManager, Transfer, page_runs
from kvmem.tiers.events import (
    MEDIUMS,
    AllBlocksCleared,
    BlockKey,
    EventHub,
    block_hash,
    removed,
    stored,
)
from kvmem.tiers.store import DiskTier, HostTier, PageAccess, TierStore

WritePolicy = Literal["write_back", "write_through"]
WRITE_POLICIES: tuple[WritePolicy, ...] = ("write_back", "write_through")
Source = Literal["host", "disk"]


class LoadHandle:
    """Loads of a run of pages into device pages; satisfies :class:`kvmem.allocator.SwapHandle`.

    ``keys[i]`` goes to device page ``pages[i]`` from tier ``sources[i]``.
    A failed page does not raise: it ends the hit, see :meth:`result`.
    """

    def __init__(
        self,
        manager: TierManager,
        keys: list[BlockKey],
        pages: list[int],
        sources: list[Source],
        transfer: Transfer | None,
        future: Future[list[bool]] | None,
    ) -> None:
        self.keys = keys
        self.pages = pages
        self.sources = sources
        self._manager = manager
        self._transfer = transfer
        self._future = future
        self._loaded: int | None = None

    def done(self) -> bool:
        """True once every copy has finished, successfully or not."""
        return (self._transfer is None or self._transfer.done()) and (
            self._future is None or self._future.done()
        )

    def wait(self, timeout: float | None = None) -> None:
        """Block until done (TimeoutError if ``timeout`` passes first); see :meth:`result`."""
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        if not self.done():
            self._manager._counts["load_waits"] += 1
        while not self.done():
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"tier load not done after {timeout} s")
            if self._future is not None and not self._future.done():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    self._future.result(left)
                except (TimeoutError, FutureTimeout):
                    continue
            elif self._transfer is not None:
                time.sleep(50e-6)
        self._manager._counts["load_wait_seconds"] += time.monotonic() - t0
        self.result()

    def result(self) -> int:
        """How many leading pages hold their KV (waits; the tiers' bookkeeping runs here)."""
        if self._loaded is None:
            self._manager._finish(self)
        assert self._loaded is not None
        return self._loaded


class TierManager:
    """Host and disk tiers below ``pool``, the device pages of an allocator.

    ``pool`` is any :class:`~kvmem.tiers.store.PageAccess` (a
    :class:`~kvmem.storage.PagePool`, or the vmem backend's virtual rows);
    the hooks name its pages by id.

    ``host_bytes`` and ``disk_bytes`` are capacities (whole pages of
    ``pool.page_bytes``; None: no such tier); ``disk_dir`` is an existing
    writable directory in which the disk tier makes its own subdirectory
    (removed by :meth:`close`). ``write_policy`` is ``"write_back"``
    (default) or ``"write_through"``. ``swapper`` runs the device<->host
    copies (the allocator's, so they are ordered with its swaps; default a
    manager of its own). ``pin`` pins host pages (default: where CUDA is).
    Subscribers of :attr:`events` receive the KV events.
    """

    def __init__(
        self,
        pool: PageAccess,
        *,
        host_bytes: int | None = None,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_bytes: int | None = None,
        write_policy: WritePolicy = "write_back",
        swapper: SwapManager | None = None,
        pin: bool | None = None,
        events: EventHub | None = None,
    ) -> None:
        if write_policy not in WRITE_POLICIES:
            raise InvalidArgument(
                f"write_policy must be one of {WRITE_POLICIES}, got {write_policy!r}"
            )
        if (disk_dir is None) != (disk_bytes is None):
            raise InvalidArgument("a disk tier needs both a directory and a capacity")
        self.pool = pool
        self.page_bytes = pool.page_bytes
        self.write_policy: WritePolicy = write_policy
        self.meta = pool.device.type == "meta"
        self.host = HostTier(pool, host_bytes, pin) if host_bytes is not None else None
        self.disk = (
            DiskTier(disk_dir, pool.page_bytes, disk_bytes, store_data=not self.meta)
            if disk_dir is not None and disk_bytes is not None
            else None
        )
        self.events = events if events is not None else EventHub()
        self._own_swapper = swapper is None
        self.swapper = swapper if swapper is not None else SwapManager(pool.device)
        self._reads: dict[int, Transfer] = {}  # device page -> write-through copy reading it
        self._loads: list[LoadHandle] = []
        self._counts: defaultdict[str, float] = defaultdict(float)
        self._closed = False

    @property
    def tiers(self) -> list[TierStore]:
        """The tiers, top down."""
        return [t for t in (self.host, self.disk) if t is not None]

    def _check_open(self) -> None:
        if self._closed:
            raise KVError("tier manager is closed")

    # ------------------------------------------------------------ lookups, loads
    def match(self, keys: Sequence[BlockKey]) -> list[Source]:
        """The tier of each leading key some tier holds (stops at the first miss)."""
        self._check_open()
        self._reap()
        out: list[Source] = []
        for key in keys:
            if self.host is not None and key in self.host:
                out.append("host")
            elif self.disk is not None and key in self.disk:
                out.append("disk")
            else:
                break
        return out

    def load(self, keys: Sequence[BlockKey], pages: Sequence[int]) -> LoadHandle:
        """Start copying ``keys`` (each held by a tier) into device ``pages``; return the handle.

        InvalidArgument (nothing started) if the lengths differ or a key is in
        no tier. The device pages must not be read or written until the
        handle is done.
        """
        self._check_open()
        self._reap()
        keys, pages = list(keys), list(pages)
        if len(keys) != len(pages):
            raise InvalidArgument(f"{len(keys)} pages to load into {len(pages)} device pages")
        sources = self.match(keys)
        if len(sources) != len(keys):
            raise InvalidArgument(f"page {len(sources)} of the load is in no tier")
        host_src: list[int] = []
        host_dst: list[int] = []
        disk_items = []
        disk_pages: list[int] = []
        for key, page, src in zip(keys, pages, sources, strict=True):
            tier = self.host if src == "host" else self.disk
            assert tier is not None
            e = tier.get(key)
            assert e is not None
            e.pins += 1
            tier.touch(key)
            self._counts[f"{src}_hit_pages"] += 1
            if src == "host":
                host_src.append(e.slot)
                host_dst.append(page)
            else:
                disk_items.append((key, e))
                disk_pages.append(page)
        transfer = None
        if host_src:
            assert self.host is not None
            transfer = self._copy(self.host.buffers, self.pool.buffers, host_src, host_dst)
        future = None
        if disk_items:
            assert self.disk is not None
            sink = None if self.meta else self._device_writer(disk_pages)
            future = self.disk.read(disk_items, sink)
        handle = LoadHandle(self, keys, pages, sources, transfer, future)
        self._loads.append(handle)
        return handle

    def _finish(self, h: LoadHandle) -> None:
        """Wait for ``h``, unpin its pages, drop corrupt ones, count; set its result."""
        t0 = time.perf_counter()
        if not h.done():
            self._counts["load_waits"] += 1
        host_ok = True
        if h._transfer is not None:
            self.swapper.settle(h._transfer)
            host_ok = h._transfer.error is None
        disk_ok = h._future.result() if h._future is not None else []
        self._counts["load_wait_seconds"] += time.perf_counter() - t0
        ok: list[bool] = []
        d = 0
        for key, src in zip(h.keys, h.sources, strict=True):
            tier = self.host if src == "host" else self.disk
            assert tier is not None
            e = tier.get(key)
            assert e is not None
            e.pins -= 1
            if src == "host":
                ok.append(host_ok)
            else:
                ok.append(disk_ok[d])
                d += 1
                if not disk_ok[d - 1] and not e.pins:
                    self._counts["corrupt_pages"] += 1
                    self._drop(tier, key)
        loaded = ok.index(False) if False in ok else len(ok)
        for src in h.sources[:loaded]:
            self._counts[f"bytes_{src}_to_device"] += self.page_bytes
        self._counts["load_failed_pages"] += len(ok) - loaded
        h._loaded = loaded
        self._loads.remove(h)
        self.events.flush()

    def _device_writer(self, pages: list[int]) -> Callable[[int, bytes], None]:
        bufs = self.pool.buffers

        def write(i: int, payload: bytes) -> None:
            row = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            off = 0
            for b in bufs:
                n = b.shape[1]
                b[pages[i]].copy_(row[off : off + n])
                off += n
            if b.device.type == "cuda":
                torch.cuda.current_stream(b.device).synchronize()

        return write

    # ------------------------------------------------------------------ stores
    def evicted(self, pairs: Sequence[tuple[BlockKey, int]]) -> None:
        """Cached device pages ``(key, page)`` lose their keys; returns once they may be reused."""
        self._check_open()
        self._reap()
        self.settle_reads([page for _, page in pairs])
        if self.write_policy == "write_back":
            t = self._store(pairs)
            if t is not None:
                self.swapper.settle(t)
        self.events.flush()

    def settle_reads(self, pages: Sequence[int]) -> None:
        """Wait for write-through copies reading device ``pages`` (before they are reused)."""
        for page in pages:
            t = self._reads.pop(page, None)
            if t is not None:
                self.swapper.settle(t)

    def filled(self, pairs: Sequence[tuple[BlockKey, int]]) -> None:
        """Device pages ``(key, page)`` filled up; ``write_through`` copies them down now."""
        self._check_open()
        if self.write_policy != "write_through":
            return
        self._reap()
        t = self._store(pairs)
        if t is not None:
            for _, page in pairs:
                self._reads[page] = t
        self.events.flush()

    def _store(self, pairs: Sequence[tuple[BlockKey, int]]) -> Transfer | None:
        """Write device pages to the top tier; the last copy to the host tier, if any."""
        batch: list[tuple[BlockKey, int, int]] = []  # key, device page, host row
        last: Transfer | None = None
        for key, page in pairs:
            if self.host is None:
                if self.disk is not None:
                    self._put_disk(key, self._device_page(page), "device")
                continue
            if key in self.host:
                self.host.touch(key)
                continue
            if self.host.full and any(k == self.host.victim() for k, _, _ in batch):
                last = self._copy_down(batch)  # the victim's bytes must land before it goes
                batch = []
            if self.host.full and not self._evict(self.host):
                self._counts["store_skipped"] += 1
                continue
            e = self.host.insert(key)
            batch.append((key, page, e.slot))
            self._emit_stored(key, "host")
            if self.write_policy == "write_through" and self.disk is not None:
                self._put_disk(key, self._device_page(page), "device")
        return self._copy_down(batch) if batch else last

    def _copy_down(self, batch: list[tuple[BlockKey, int, int]]) -> Transfer:
        """Copy device pages into their new host rows; the rows' entries wait on the copy."""
        assert self.host is not None
        t = self._copy(
            self.pool.buffers, self.host.buffers, [p for _, p, _ in batch], [r for *_, r in batch]
        )
        for key, _, _ in batch:
            e = self.host.get(key)
            assert e is not None
            e.pending = t
        self._counts["bytes_device_to_host"] += len(batch) * self.page_bytes
        return t

    def _put_disk(self, key: BlockKey, data: torch.Tensor | None, origin: str) -> None:
        disk = self.disk
        assert disk is not None
        if key in disk:
            disk.touch(key)
            return
        if disk.full and not self._evict(disk):
            self._counts["store_skipped"] += 1
            return
        disk.insert(key, data)
        self._counts[f"bytes_{origin}_to_disk"] += self.page_bytes
        self._emit_stored(key, "disk")

    def _evict(self, tier: TierStore) -> bool:
        """Evict ``tier``'s LRU unpinned page (written down first in write_back)."""
        key = tier.victim()
        if key is None:
            return False
        if tier is self.host and self.write_policy == "write_back" and self.disk is not None:
            e = self.host.get(key)
            assert e is not None
            if key in self.disk:
                self.disk.touch(key)
            else:
                if e.pending is not None:
                    self.swapper.settle(e.pending)
                    e.pending = None
                self._put_disk(key, None if self.meta else self.host.snapshot(e), "host")
        self._counts[f"{tier.name}_evictions"] += 1
        self._drop(tier, key)
        return True

    def _drop(self, tier: TierStore, key: BlockKey) -> None:
        tier.remove(key)
        if self.events.active:
            self.events.emit(removed([key], tier.name))

    def _emit_stored(self, key: BlockKey, tier: str) -> None:
        if self.events.active:
            self.events.emit(stored([key], tier))

    def _device_page(self, page: int) -> torch.Tensor | None:
        """A CPU copy of device page ``page``'s bytes (None on meta)."""
        if self.meta:
            return None
        return torch.cat([b[page].to("cpu") for b in self.pool.buffers])

    def _copy(
        self,
        src_bufs: list[torch.Tensor],
        dst_bufs: list[torch.Tensor],
        src: list[int],
        dst: list[int],
    ) -> Transfer:
        if self.meta:
            return Transfer.completed()
        plan = CopyPlan(
            src_bufs,
            dst_bufs,
            page_runs(src, dst),
            self.pool.layer_bytes,
            non_blocking=self.pool.device.type == "cuda",
        )
        return self.swapper.submit(plan.run, None, plan.nbytes, plan.num_copies)

    def _reap(self) -> None:
        """Finish loads that are done; drop disk pages whose write failed."""
        for h in [h for h in self._loads if h.done()]:
            self._finish(h)
        if self.disk is not None:
            for key in self.disk.reap():
                e = self.disk.get(key)
                if e is not None and not e.pins:
                    self._counts["write_failures"] += 1
                    self._drop(self.disk, key)
        self.events.flush()

    # ------------------------------------------------------------- device events
    def device_stored(self, keys: Sequence[BlockKey]) -> None:
        """Device pages became findable under ``keys`` (one chain, in order): a KV event."""
        if self.events.active and keys:
            self.events.emit(stored(keys, "device"))
            self.events.flush()

    def device_removed(self, keys: Sequence[BlockKey]) -> None:
        """Device pages lost ``keys``: a KV event."""
        if self.events.active and keys:
            self.events.emit(removed(keys, "device"))
            self.events.flush()

    # ------------------------------------------------------------------ upkeep
    def clear(self) -> None:
        """Drop every tier page (after loads in flight) and emit AllBlocksCleared.

        AllBlocksCleared means every medium, so call it with the device
        prefix cache reset as well.
        """
        self._check_open()
        for h in list(self._loads):
            self._finish(h)
        for t in list(self._reads.values()):
            self.swapper.settle(t)
        self._reads.clear()
        if self.disk is not None:
            self.disk.flush()
            self.disk.reap()
        for tier in self.tiers:
            for key in tier.lru_keys():
                tier.remove(key)
        self.events.emit(AllBlocksCleared())
        self.events.flush()

    def block_hashes(self) -> dict[str, set[int]]:
        """Medium (as in the events) -> hashes of the pages each tier holds; empty ones left out."""
        self._reap()
        out = {MEDIUMS[t.name]: {block_hash(k) for k in t.lru_keys()} for t in self.tiers}
        return {m: h for m, h in out.items() if h}

    def stats(self) -> dict[str, float]:
        """Per tier capacity, use, hits, evictions; bytes moved per direction; load waits."""
        out: dict[str, float] = {}
        for t in self.tiers:
            out[f"{t.name}_capacity_bytes"] = float(t.capacity_bytes)
            out[f"{t.name}_used_bytes"] = float(t.used_bytes)
            for k in ("hit_pages", "evictions"):
                out[f"{t.name}_{k}"] = float(self._counts[f"{t.name}_{k}"])
        for k in (
            "bytes_device_to_host",
            "bytes_device_to_disk",
            "bytes_host_to_disk",
            "bytes_host_to_device",
            "bytes_disk_to_device",
            "load_waits",
            "load_wait_seconds",
            "load_failed_pages",
            "corrupt_pages",
            "write_failures",
            "store_skipped",
        ):
            out[k] = float(self._counts[k])
        out["loads_in_flight"] = float(len(self._loads))
        return out

    def check_integrity(self) -> None:
        """Each tier's invariants, and pins exactly those of the loads in flight."""
        self._check_open()
        self._reap()
        want: Counter[tuple[str, BlockKey]] = Counter()
        for h in self._loads:
            for key, src in zip(h.keys, h.sources, strict=True):
                want[(src, key)] += 1
        for t in self.tiers:
            t.check_integrity()
            for key in t.lru_keys():
                e = t.get(key)
                assert e is not None
                if e.pins != want[(t.name, key)]:
                    raise IntegrityError(
                        f"{t.name} page {block_hash(key):#x}: {e.pins} pins, "
                        f"{want[(t.name, key)]} loads read it"
                    )

    def close(self) -> None:
        """Finish loads in flight, stop the workers, free the host tier, delete the disk tier."""
        if self._closed:
            return
        for h in list(self._loads):
            self._finish(h)
        if self._own_swapper:
            self.swapper.close()
        if self.disk is not None:
            self.disk.close()
        if self.host is not None:
            self.host.buffers.clear()
        self._closed = True

    def __enter__(self) -> TierManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["WRITE_POLICIES", "LoadHandle", "Source", "TierManager", "WritePolicy"]
