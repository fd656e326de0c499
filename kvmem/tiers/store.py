"""The tiers below the device pool: an LRU index of prefix pages per tier, and their bytes.

Every tier holds whole pages under the chained page keys of the paged
backend, ``(parent hash, page tokens)``, so a cache salt (which seeds the
chain) keeps salted prefixes apart in every tier. Each tier has a capacity
in bytes (whole pages of ``page_bytes``) and its own LRU order::

    least recently used                          most recently used
    [ key ][ key ][ key ] ... [ key ]   <- insert / touch moves a key here
       ^ victim: the first key not pinned (pinned = a load reads it)

:class:`HostTier` keeps pages in host buffers laid out like the device
pool's rows (pinned where CUDA exists), so device<->host copies are the swap
path's ``CopyPlan`` runs. :class:`DiskTier` keeps one file per page in a
fresh subdirectory of the given directory, written and read on a worker
thread, each file carrying its key and a CRC32 of its contents; a file that
does not check out is a miss, never served. On the meta device both tiers
keep only the bookkeeping (benchmarks of very large tiers).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from kvmem.errors import IntegrityError, InvalidArgument
from kvmem.tiers.events import BlockKey, block_hash


class PageAccess(Protocol):
    """The device pages the tiers copy from and into, by page id.

    Page ``i``'s bytes are row ``i`` of every buffer, concatenated in buffer
    order: ``page_bytes`` in all, ``layer_bytes`` per layer. A
    :class:`~kvmem.storage.PagePool` is one (its page ids are its pages); the
    vmem backend's virtual rows are another (a page id names a page of a
    slot's row, see :mod:`kvmem.backends.vmem.tiering`). Only pages the
    allocator names are read or written.
    """

    @property
    def buffers(self) -> list[torch.Tensor]:
        """uint8 tensors ``[pages, row bytes]`` on :attr:`device`, one row per page."""
        ...

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over every buffer."""
        ...

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer's part of a page."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the buffers live (``meta``: bookkeeping only)."""
        ...


@dataclass
class Entry:
    """One page of a tier: where its bytes are, who reads them, what still writes them."""

    slot: int
    pins: int = 0
    pending: Any = None  # the copy or file write still filling this page, if any


def _check_bytes(name: str, value: object, page_bytes: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < page_bytes:
        raise InvalidArgument(
            f"{name} must be an int of at least one page ({page_bytes} bytes), got {value!r}"
        )
    return value


class TierStore:
    """An LRU index of pages with a capacity in whole pages; subclasses hold the bytes."""

    name: ClassVar[str] = ""

    def __init__(self, page_bytes: int, capacity_bytes: int) -> None:
        self.page_bytes = page_bytes
        self.capacity_bytes = _check_bytes(f"{self.name} capacity", capacity_bytes, page_bytes)
        self.capacity_pages = capacity_bytes // page_bytes
        self._lru: OrderedDict[BlockKey, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: object) -> bool:
        return key in self._lru

    @property
    def full(self) -> bool:
        """Whether an insert needs a victim first."""
        return len(self._lru) >= self.capacity_pages

    @property
    def used_bytes(self) -> int:
        """Bytes of the pages held."""
        return len(self._lru) * self.page_bytes

    def get(self, key: BlockKey) -> Entry | None:
        """The entry of ``key`` (LRU order unchanged)."""
        return self._lru.get(key)

    def touch(self, key: BlockKey) -> None:
        """Make ``key`` the most recently used."""
        self._lru.move_to_end(key)

    def lru_keys(self) -> list[BlockKey]:
        """Keys from least to most recently used."""
        return list(self._lru)

    def victim(self) -> BlockKey | None:
        """The least recently used key no load is reading, or None."""
        for key, e in self._lru.items():
            if not e.pins:
                return key
        return None

    def remove(self, key: BlockKey) -> Entry:
        """Drop ``key`` and release its bytes; InvalidArgument if absent or pinned."""
        raise NotImplementedError

    def _add(self, key: BlockKey, entry: Entry) -> Entry:
        if key in self._lru:
            raise InvalidArgument(f"{self.name} tier already holds page {block_hash(key):#x}")
        if self.full:
            raise InvalidArgument(f"{self.name} tier is full; evict first")
        self._lru[key] = entry
        return entry

    def _pop(self, key: BlockKey) -> Entry:
        e = self._lru.get(key)
        if e is None:
            raise InvalidArgument(f"{self.name} tier does not hold page {block_hash(key):#x}")
        if e.pins:
            raise InvalidArgument(f"{self.name} page {block_hash(key):#x} is being read")
        return self._lru.pop(key)

    def check_integrity(self) -> None:
        """Raise IntegrityError if the index breaks an invariant."""
        if len(self._lru) > self.capacity_pages:
            raise IntegrityError(
                f"{self.name} tier holds {len(self._lru)} pages, room for {self.capacity_pages}"
            )
        for key, e in self._lru.items():
            if e.pins < 0:
                raise IntegrityError(f"{self.name} page {block_hash(key):#x}: negative pins")
            if len(key) != 2 or not isinstance(key[1], tuple):
                raise IntegrityError(f"{self.name} tier holds a malformed key {key!r}")


class HostTier(TierStore):
    """Pages in host memory, one row per page in buffers mirroring the device pool's."""

    name = "host"

    def __init__(self, pool: PageAccess, capacity_bytes: int, pin: bool | None = None) -> None:
        super().__init__(pool.page_bytes, capacity_bytes)
        meta = pool.device.type == "meta"
        if pin is None:
            pin = pool.device.type == "cuda" and torch.cuda.is_available()
        self.pinned = bool(pin) and not meta
        n = self.capacity_pages
        self.buffers: list[torch.Tensor] = [
            torch.empty(n, b.shape[1], dtype=torch.uint8, device="meta")
            if meta
            else torch.empty(n, b.shape[1], dtype=torch.uint8, pin_memory=self.pinned)
            for b in pool.buffers
        ]
        self._free = list(range(n - 1, -1, -1))

    def insert(self, key: BlockKey) -> Entry:
        """Index ``key`` in a free row (the caller fills the row); InvalidArgument if full."""
        e = self._add(key, Entry(self._free[-1]))
        self._free.pop()
        return e

    def remove(self, key: BlockKey) -> Entry:
        """Drop ``key`` and free its row."""
        e = self._pop(key)
        self._free.append(e.slot)
        return e

    def snapshot(self, e: Entry) -> torch.Tensor:
        """A copy of the page's bytes (every buffer's row, concatenated), for a disk write."""
        return torch.cat([b[e.slot] for b in self.buffers])

    def check_integrity(self) -> None:
        """Index invariants, and every row either free or holding exactly one page."""
        super().check_integrity()
        used = [e.slot for e in self._lru.values()]
        if len(set(used)) != len(used) or set(used) & set(self._free):
            raise IntegrityError("host tier rows are shared or both used and free")
        if len(used) + len(self._free) != self.capacity_pages:
            raise IntegrityError("host tier rows leaked")


_HEADER = struct.Struct("<4sHxxqqIQI")  # magic, version, key hash, parent, tokens, payload, crc
_MAGIC = b"KVMP"


def _encode(key: BlockKey, payload: bytes) -> bytes:
    toks = np.asarray(key[1], dtype=np.int64).tobytes()
    crc = zlib.crc32(payload, zlib.crc32(toks))
    head = _HEADER.pack(_MAGIC, 1, block_hash(key), key[0], len(key[1]), len(payload), crc)
    return head + toks + payload


def _decode(key: BlockKey, data: bytes, page_bytes: int) -> bytes | None:
    """The payload of a page file, or None if it is not the page ``key`` intact."""
    if len(data) < _HEADER.size:
        return None
    magic, ver, h, parent, ntok, nbytes, crc = _HEADER.unpack_from(data)
    toks_end = _HEADER.size + 8 * ntok
    if (
        magic != _MAGIC
        or ver != 1
        or h != block_hash(key)
        or parent != key[0]
        or ntok != len(key[1])
        or nbytes != page_bytes
        or len(data) != toks_end + nbytes
    ):
        return None
    toks = data[_HEADER.size : toks_end]
    payload = data[toks_end:]
    if zlib.crc32(payload, zlib.crc32(toks)) != crc:
        return None
    if np.frombuffer(toks, dtype=np.int64).tolist() != list(key[1]):
        return None
    return payload


class DiskTier(TierStore):
    """Pages as files in a fresh subdirectory of ``directory``, moved on one worker thread.

    Raises InvalidArgument at construction when ``directory`` is missing,
    not a directory or not writable. Writes that fail (a full disk, an I/O
    error) are reported by :meth:`reap` and their pages dropped: the tier
    never fails a caller. Work runs in submission order, so a read queued
    after a page's write sees the whole file.
    """

    name = "disk"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        page_bytes: int,
        capacity_bytes: int,
        store_data: bool = True,
    ) -> None:
        super().__init__(page_bytes, capacity_bytes)
        root = Path(directory)
        if not root.is_dir():
            raise InvalidArgument(f"disk cache directory {str(root)!r} does not exist")
        try:
            self.path = Path(tempfile.mkdtemp(prefix="kvmem-tier-", dir=root))
            probe = self.path / ".probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise InvalidArgument(
                f"disk cache directory {str(root)!r} is not writable: {e.strerror or e}"
            ) from e
        self.store_data = store_data
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="kvmem-disk")
        self._serial = 0
        self._writes: dict[BlockKey, Future[bool]] = {}

    def file(self, e: Entry) -> Path:
        """The file of an entry."""
        return self.path / f"{e.slot:012d}.kvp"

    def insert(self, key: BlockKey, data: torch.Tensor | None) -> Entry:
        """Index ``key`` and queue the write of ``data`` (a CPU uint8 page; None on meta)."""
        e = self._add(key, Entry(self._serial))
        self._serial += 1
        if self.store_data and data is not None:
            path = self.file(e)
            payload = data.contiguous().numpy().tobytes()
            e.pending = self._worker.submit(self._write, path, _encode(key, payload))
            self._writes[key] = e.pending
        return e

    @staticmethod
    def _write(path: Path, blob: bytes) -> bool:
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
            return True
        except OSError:
            tmp.unlink(missing_ok=True)
            return False

    def remove(self, key: BlockKey) -> Entry:
        """Drop ``key``; its file is deleted on the worker thread (after its write)."""
        e = self._pop(key)
        self._writes.pop(key, None)
        if self.store_data:
            self._worker.submit(self.file(e).unlink, missing_ok=True)
        return e

    def read(
        self,
        items: list[tuple[BlockKey, Entry]],
        sink: Callable[[int, bytes], None] | None = None,
    ) -> Future[list[bool]]:
        """Queue reads of the pages, each handed to ``sink(i, payload)`` on the worker thread.

        The result says, per page, whether it was read intact and ``sink``
        took it; a missing file, a file of another page, a checksum that
        fails or a ``sink`` that raises is False. Nothing is read on meta.
        """
        jobs = [(key, self.file(e)) for key, e in items]
        if not self.store_data:
            done: Future[list[bool]] = Future()
            done.set_result([True] * len(jobs))
            return done
        return self._worker.submit(self._read_all, jobs, self.page_bytes, sink)

    @staticmethod
    def _read_all(
        jobs: list[tuple[BlockKey, Path]],
        page_bytes: int,
        sink: Callable[[int, bytes], None] | None,
    ) -> list[bool]:
        out: list[bool] = []
        for i, (key, path) in enumerate(jobs):
            try:
                payload = _decode(key, path.read_bytes(), page_bytes)
                if payload is not None and sink is not None:
                    sink(i, payload)
            except Exception:  # noqa: BLE001 - an unreadable page is a miss
                payload = None
            out.append(payload is not None)
        return out

    def reap(self) -> list[BlockKey]:
        """Keys whose file write has failed (the caller removes them)."""
        failed = []
        for key, fut in list(self._writes.items()):
            if fut.done():
                del self._writes[key]
                e = self._lru.get(key)
                if e is not None:
                    e.pending = None
                if not fut.result():
                    failed.append(key)
        return failed

    def flush(self) -> None:
        """Wait until every queued write and delete has run."""
        self._worker.submit(lambda: None).result()

    def check_integrity(self) -> None:
        """Index invariants, and a file for every page whose write has finished (waits)."""
        super().check_integrity()
        if not self.store_data:
            return
        self.flush()
        failed = {k for k, f in self._writes.items() if not f.result()}
        files = {p.name for p in self.path.glob("*.kvp")}
        want = {self.file(e).name for k, e in self._lru.items() if k not in failed}
        if not want <= files:
            raise IntegrityError(f"disk tier files missing: {sorted(want - files)[:4]}")
        if files - want:
            raise IntegrityError(f"disk tier has stray files: {sorted(files - want)[:4]}")

    def close(self) -> None:
        """Stop the worker and delete the tier's directory."""
        self._worker.shutdown(wait=True)
        self._lru.clear()
        self._writes.clear()
        shutil.rmtree(self.path, ignore_errors=True)


__all__ = ["DiskTier", "Entry", "HostTier", "PageAccess", "TierStore"]
