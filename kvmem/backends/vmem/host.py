"""Host driver: physical pages are pieces of a memfd, virtual ranges are PROT_NONE mmaps.

::

    memfd (the physical pages)    | p0 | p1 | p2 | p3 | ...      file offsets
                                     \\         \\
    reserved range (PROT_NONE)    [ p0 | -- | p2 | -- | -- | ... ]
                                    mmap(MAP_FIXED | MAP_SHARED, fd, offset)

``reserve`` is ``mmap(PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)``;
``map`` replaces a piece of it with ``mmap(PROT_READ | PROT_WRITE, MAP_FIXED |
MAP_SHARED)`` of the page's file offset; ``unmap`` puts a fresh ``PROT_NONE``
mapping back over the piece (so the addresses stay reserved); ``free_range``
is ``munmap``. Everything goes through ctypes over libc: no C extension.

Physical memory: ``create`` gives a page its file offset (the file grows by
``ftruncate``, which allocates nothing). The page's memory is allocated with
``fallocate`` the first time it is mapped (or at ``create`` with
``prealloc=True``), so the memfd's allocated size (``os.fstat(fd).st_blocks``)
grows by whole pages as sequences grow into pages that were never used, and
never when a page already used is mapped again. ``release`` punches the
page's hole back.

Page sizes are multiples of the system page size (4 KiB) and may be as large
as you like; 4 KiB to 2 MiB are the tested ones. Each mapped page is one
kernel memory mapping, so a pool is limited by ``vm.max_map_count``
(:attr:`HostDriver.max_mappings`).
"""

from __future__ import annotations

import ctypes
import mmap as _mmap
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvmem import native
from kvmem.backends.vmem.driver import MapWorker, Pages, VMemDriver
from kvmem.backends.vmem.mapworker import NativeHostWorker
from kvmem.errors import DriverError, InvalidArgument
from kvmem.native.build import pick

__all__ = ["HostDriver", "MapPlan"]

_PROT_NONE = 0
_PROT_RW = _mmap.PROT_READ | _mmap.PROT_WRITE
_MAP_SHARED = _mmap.MAP_SHARED
_MAP_PRIVATE = _mmap.MAP_PRIVATE
_MAP_ANONYMOUS = _mmap.MAP_ANONYMOUS
_MAP_FIXED = 0x10
_MAP_NORESERVE = getattr(_mmap, "MAP_NORESERVE", 0x4000)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int64,
    ]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.fallocate.restype = ctypes.c_int
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return libc


class MapPlan:
    """The ``mmap`` calls of one :meth:`HostDriver.map_many`, and how to report their outcome.

    ``runs`` are ``(range start, range size, addresses, file offsets, bytes per call, pages
    per call)``, in order; ``error`` is what stops the pages after them (None if nothing
    does). A plan that failed before any call has no runs.
    """

    def __init__(self, pages: np.ndarray, runs: list[tuple[Any, ...]], error: DriverError | None):
        self.pages = pages
        self.runs = runs
        self.error = error

    @classmethod
    def failed(cls, message: str) -> MapPlan:
        """A plan that maps nothing and reports ``message``."""
        return cls(_NO_PAGES, [], DriverError(message))

    def outcome(self, done: int, errno: int) -> tuple[int, DriverError | None]:
        """``map_many``'s result after ``done`` pages mapped and ``errno`` (0: no failure)."""
        if errno:
            return done, DriverError(
                f"mmap(MAP_FIXED | MAP_SHARED) of offset {int(self.pages[done, 1])} failed: "
                f"{os.strerror(errno)} (errno {errno})"
            )
        return done, self.error


_NO_PAGES = np.zeros((0, 2), dtype=np.int64)


def _max_map_count() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


class HostDriver(VMemDriver):
    """memfd + mmap driver for cpu memory (Linux).

    ``prealloc=True`` allocates each page's memory when it is created
    instead of when it is first mapped.
    """

    name = "host"
    free_unmaps = True  # munmap of the range drops the pages mapped in it
    array_pages = True  # handles are file offsets

    def __init__(self, prealloc: bool = False, name: str = "kvmem") -> None:
        if not hasattr(os, "memfd_create"):
            raise DriverError("the host vmem driver needs Linux memfd_create")
        self.device = torch.device("cpu")
        self.prealloc = prealloc
        self._libc = _libc()
        self._page = _mmap.PAGESIZE
        try:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        except OSError as e:
            raise DriverError(f"memfd_create failed: {e.strerror}") from None
        self._size = 0  # file size: the next page's offset
        self._pages: dict[int, int] = {}  # offset -> size of every live page
        # file page numbers (offset // system page) of the pages with memory: consecutive
        # ints hash without collisions, where offsets (multiples of 4 KiB) collide
        self._backed: set[int] = set()
        self._ranges: dict[int, int] = {}  # start -> size of every reserved range
        self._lock = threading.Lock()
        mmc = _max_map_count()
        self.max_mappings = None if mmc is None else max(0, mmc - 4096)

    @property
    def granularity(self) -> int:
        """The system page size."""
        return self._page

    def _err(self, what: str) -> DriverError:
        e = ctypes.get_errno()
        return DriverError(f"{what} failed: {os.strerror(e)} (errno {e})")

    def _check(self, what: str, addr: int, size: int) -> None:
        if size <= 0 or size % self._page or addr % self._page:
            raise InvalidArgument(
                f"{what}: address {addr:#x} and size {size} must be positive multiples "
                f"of the page size {self._page}"
            )

    def reserve(self, size: int) -> int:
        """Reserve ``size`` bytes of address space, PROT_NONE (no memory behind it)."""
        self._check("reserve", 0, size)
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE
        addr = self._libc.mmap(None, size, _PROT_NONE, flags, -1, 0)
        if addr is None or addr == _MAP_FAILED:
            raise self._err(f"mmap(PROT_NONE, {size} bytes)")
        self._ranges[int(addr)] = size
        return int(addr)

    def free_range(self, addr: int, size: int) -> None:
        """munmap the whole range."""
        self._check("free_range", addr, size)
        if self._libc.munmap(addr, size) != 0:
            raise self._err(f"munmap({addr:#x}, {size})")
        self._ranges.pop(addr, None)

    def create(self, size: int) -> int:
        """A page at the end of the memfd; returns its file offset."""
        self._check("create", 0, size)
        with self._lock:
            off = self._size
            try:
                os.ftruncate(self.fd, off + size)
            except OSError as e:
                raise DriverError(f"ftruncate of the page file failed: {e.strerror}") from None
            self._size = off + size
            self._pages[off] = size
        if self.prealloc:
            self._back(off, size)
        return off

    def create_many(self, count: int, size: int) -> list[int]:
        """``count`` pages at the end of the memfd with one ``ftruncate`` (and ``fallocate``)."""
        self._check("create", 0, size)
        with self._lock:
            off = self._size
            try:
                os.ftruncate(self.fd, off + count * size)
            except OSError as e:
                raise DriverError(f"ftruncate of the page file failed: {e.strerror}") from None
            self._size = off + count * size
            offs = list(range(off, off + count * size, size))
            for o in offs:
                self._pages[o] = size
        if self.prealloc and count:
            if self._libc.fallocate(self.fd, 0, off, count * size) != 0:
                err = self._err(f"fallocate of {count} pages of {size} bytes")
                self.release_many(offs)
                raise err
            self._backed.update(o // self._page for o in offs)
        return offs

    def release_many(self, handles: Sequence[int]) -> DriverError | None:
        """Release pages, punching one hole per run of adjacent backed pages."""
        first: DriverError | None = None
        runs: list[list[int]] = []  # [start, end) of backed runs
        for h in sorted(handles):
            size = self._pages.pop(h, None)
            if size is None:
                first = first or DriverError(f"release: no page at offset {h!r}")
                continue
            if h // self._page in self._backed:
                self._backed.discard(h // self._page)
                if runs and runs[-1][1] == h:
                    runs[-1][1] = h + size
                else:
                    runs.append([h, h + size])
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        for start, end in runs:
            if self.fd >= 0 and self._libc.fallocate(self.fd, mode, start, end - start) != 0:
                first = first or self._err(f"fallocate(PUNCH_HOLE) at offset {start}")
        return first

    def _back(self, off: int, size: int) -> None:
        if off // self._page in self._backed:
            return
        if self._libc.fallocate(self.fd, 0, off, size) != 0:
            raise self._err(f"fallocate of page at offset {off} ({size} bytes)")
        self._backed.add(off // self._page)

    def release(self, handle: int) -> None:
        """Give the page's memory back (punch its hole in the memfd)."""
        size = self._pages.pop(handle, None)
        if size is None:
            raise InvalidArgument(f"release: no page at offset {handle!r}")
        if handle // self._page in self._backed:
            mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if self._libc.fallocate(self.fd, mode, handle, size) != 0:
                raise self._err(f"fallocate(PUNCH_HOLE) at offset {handle}")
            self._backed.discard(handle // self._page)

    def map(self, addr: int, size: int, handle: int) -> None:
        """Map the page at file offset ``handle`` over ``[addr, addr + size)``."""
        self._check("map", addr, size)
        if self._pages.get(handle) != size:
            raise InvalidArgument(f"map: no page of {size} bytes at offset {handle!r}")
        self._back(handle, size)
        flags = _MAP_SHARED | _MAP_FIXED
        got = self._libc.mmap(addr, size, _PROT_RW, flags, self.fd, handle)
        if got is None or got == _MAP_FAILED:
            raise self._err(f"mmap(MAP_FIXED | MAP_SHARED) of offset {handle} at {addr:#x}")
        if got != addr:  # cannot happen with MAP_FIXED; never leave a stray mapping
            self._libc.munmap(got, size)
            raise DriverError(f"mmap placed the page at {got:#x}, not {addr:#x}")

    def map_many(self, pages: Pages, size: int) -> tuple[int, DriverError | None]:
        """:meth:`map` for many pages: handles checked here, the mmaps in few native calls.

        ``pages`` may also be an int64 array of ``(addr, offset)`` rows.

        Consecutive pages whose addresses and file offsets both follow on
        (a sequence's next pages of one layer, from adjacent pages of the
        file) become one ``mmap`` of the whole run; runs of equal length go
        to :func:`kvmem.native.host_map_pages` together (the GIL is released
        while it maps). Every handle is looked up (and backed) before
        anything is mapped: an unknown one maps nothing. Pages are mapped in
        order up to the first one outside a reserved range, with an
        unaligned offset, or whose ``mmap`` failed.
        """
        plan = self.plan_map(pages, size)
        done = 0
        for base, length, addrs, offs, call_size, run in plan.runs:
            try:  # an offset that is no page's (unaligned) is refused before any mmap
                got, errno = native.host_map_pages(self.fd, base, length, addrs, offs, call_size)
            except InvalidArgument as e:
                return done, DriverError(f"map: {e}")
            done += got * run
            if errno:
                return plan.outcome(done, errno)
        return plan.outcome(done, 0)

    def plan_map(self, pages: Pages, size: int) -> MapPlan:
        """The ``mmap`` calls :meth:`map_many` makes for ``pages``, the handles backed already.

        Raises InvalidArgument for a size that is no multiple of the page
        size; every other failure is the plan's to report (:meth:`MapPlan.outcome`).
        """
        checked = self._backed_pages(pages, size)
        if isinstance(checked, MapPlan):
            return checked
        addrs = checked[:, 0]
        n, err = self._inside(addrs, size)
        runs = []
        for base, length, first, count, run in self._batches(addrs[:n], checked[:n, 1], size):
            idx = slice(first, first + count * run, run)
            a, o = np.ascontiguousarray(addrs[idx]), np.ascontiguousarray(checked[idx, 1])
            runs.append((base, length, a, o, run * size, run))
        return MapPlan(checked, runs, err)

    def _backed_pages(self, pages: Pages, size: int) -> np.ndarray | MapPlan:
        """``pages`` as int64 ``(addr, offset)`` rows, every page looked up and backed; or a
        plan that maps nothing and says why. InvalidArgument for a bad ``size``."""
        self._check("map", 0, size)
        try:
            arr = np.ascontiguousarray(pages, dtype=np.int64).reshape(len(pages), 2)
        except (TypeError, ValueError, OverflowError) as e:
            return MapPlan.failed(f"map: page addresses and handles must be ints ({e})")
        if not self._backed.issuperset((arr[:, 1] // self._page).tolist()):
            for handle in arr[:, 1].tolist():
                if handle // self._page in self._backed:
                    continue
                if self._pages.get(handle) != size:
                    return MapPlan.failed(f"map: no page of {size} bytes at offset {handle!r}")
                try:
                    self._back(handle, size)
                except DriverError as e:
                    return MapPlan.failed(str(e))
        return arr

    def submit_map(self, mapper: Any, pages: Pages, size: int) -> tuple[int, MapPlan]:
        """Queue :meth:`map_many` of ``pages`` on a native ``HostMapper``: the job's ticket,
        and the plan whose :meth:`~MapPlan.outcome` reads its result.

        Handles are looked up and backed here; the extension checks the
        addresses against the reserved ranges and merges runs of pages.
        """
        checked = self._backed_pages(pages, size)
        if isinstance(checked, MapPlan):  # nothing to map: a job of no pages carries the error
            return int(mapper.submit(self.fd, [], _NO_PAGES, size)[0]), checked
        ticket, taken = mapper.submit(self.fd, list(self._ranges.items()), checked, size)
        err = None
        if taken < len(checked):
            addr, off = (int(x) for x in checked[taken])
            err = DriverError(
                f"map: address {addr:#x} is not inside a reserved range"
                if off % self._page == 0
                else f"map: file offset {off} is not page aligned"
            )
        return int(ticket), MapPlan(checked, [], err)

    def map_worker(self) -> MapWorker | None:
        """The extension's native mapping thread when it is in use, else None.

        The native thread makes :meth:`map_many`'s calls: a subclass that
        changes ``map_many`` gets None.
        """
        ext = pick(None)
        if ext is None or type(self).map_many is not HostDriver.map_many:
            return None
        return NativeHostWorker(self, ext.HostMapper())

    def _inside(
        self, addrs: np.ndarray, size: int, what: str = "map"
    ) -> tuple[int, DriverError | None]:
        """How many leading pages of ``addrs`` lie in reserved ranges, and the error after them."""
        ranges = self._ranges
        if len(ranges) == 1:  # the allocator's one range: two comparisons per page
            ((b, ln),) = ranges.items()
            bad = (addrs < b) | (addrs > b + ln - size)
        else:
            bad = self._range_of(addrs, size) < 0
        if not bad.any():
            return len(addrs), None
        i = int(np.argmax(bad))
        return i, DriverError(f"{what}: address {int(addrs[i]):#x} is not inside a reserved range")

    def _range_of(self, addrs: np.ndarray, size: int) -> np.ndarray:
        """Per page, the index of the reserved range (sorted by start) holding it, else -1."""
        starts = np.array(sorted(self._ranges), dtype=np.int64)
        ends = np.array([s + self._ranges[s] for s in starts.tolist()], dtype=np.int64)
        i = np.searchsorted(starts, addrs, side="right") - 1
        ok = (i >= 0) & (addrs + size <= ends[np.maximum(i, 0)])
        return np.where(ok, i, -1)

    def _batches(
        self, addrs: np.ndarray, offs: np.ndarray | None, size: int
    ) -> list[tuple[int, int, int, int, int]]:
        """Runs of pages one ``mmap`` can cover, grouped for one native call each.

        A run is pages that follow on in address (and in file offset, when
        ``offs`` is given) inside one reserved range; consecutive runs of
        the same length make a batch. Yields ``(range start, range size,
        first page, runs, pages per run)``; every page lies in a range.
        """
        n = len(addrs)
        if n == 0:
            return []
        rng = None if len(self._ranges) == 1 else self._range_of(addrs, size)
        follows = (addrs[1:] - addrs[:-1]) == size
        if offs is not None:
            follows &= (offs[1:] - offs[:-1]) == size
        if rng is not None:
            follows &= rng[1:] == rng[:-1]
        cuts = np.flatnonzero(~follows) + 1
        range_starts = sorted(self._ranges)
        if rng is None:  # one range: runs of one length (the usual case) make one batch
            run = int(cuts[0]) if len(cuts) else n
            if n % run == 0 and (len(cuts) == n // run - 1) and not (cuts % run).any():
                base = range_starts[0]
                return [(base, self._ranges[base], 0, n // run, run)]
        starts = [0, *cuts.tolist()]
        out: list[list[int]] = []
        for first, end in zip(starts, [*starts[1:], n], strict=True):
            run = end - first
            base = range_starts[0 if rng is None else int(rng[first])]
            last = out[-1] if out else None
            if last is not None and last[4] == run and last[0] == base:
                last[3] += 1
            else:
                out.append([base, self._ranges[base], first, 1, run])
        return [(b, ln, f, c, r) for b, ln, f, c, r in out]

    def unmap_many(
        self, addrs: Sequence[int] | np.ndarray, size: int
    ) -> tuple[int, DriverError | None]:
        """:meth:`unmap` for many pages of reserved ranges, runs of adjacent ones at once.

        Consecutive addresses that follow on become one ``mmap(PROT_NONE)``
        of the whole run, runs of equal length one native call. Stops at
        the first page outside a reserved range or the first failure.
        """
        self._check("unmap", 0, size)
        if not len(addrs):
            return 0, None
        try:
            a = np.asarray(addrs, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError, OverflowError) as e:
            return 0, DriverError(f"unmap: addresses must be ints ({e})")
        n, err = self._inside(a, size, "unmap")
        done = 0
        for base, length, first, count, run in self._batches(a[:n], None, size):
            idx = slice(first, first + count * run, run)
            got, errno = native.host_unmap_pages(base, length, a[idx], run * size)
            done += got * run
            if errno:
                return done, DriverError(
                    f"mmap(PROT_NONE) over {int(a[done]):#x} failed: "
                    f"{os.strerror(errno)} (errno {errno})"
                )
        return done, err

    def unmap(self, addr: int, size: int) -> None:
        """Put PROT_NONE back over ``[addr, addr + size)``."""
        self._check("unmap", addr, size)
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED
        got = self._libc.mmap(addr, size, _PROT_NONE, flags, -1, 0)
        if got is None or got == _MAP_FAILED:
            raise self._err(f"mmap(PROT_NONE) over {addr:#x}")

    def tensor(self, addr: int, size: int) -> torch.Tensor:
        """A uint8 cpu tensor over the memory (torch.frombuffer of a ctypes array)."""
        buf = (ctypes.c_uint8 * size).from_address(addr)
        return torch.frombuffer(buf, dtype=torch.uint8)

    def allocated_bytes(self) -> int:
        """Bytes of memory the memfd holds (``st_blocks * 512``)."""
        if self.fd < 0:
            return 0
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        """Close the memfd: its memory goes back to the system."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._backed.clear()
            self._pages.clear()
