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

import torch

from kvmem import native
from kvmem.backends.vmem.driver import PageHandle, VMemDriver
from kvmem.errors import DriverError, InvalidArgument

__all__ = ["HostDriver"]

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
            self._backed.update(offs)
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
            if h in self._backed:
                self._backed.discard(h)
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
        if off in self._backed:
            return
        if self._libc.fallocate(self.fd, 0, off, size) != 0:
            raise self._err(f"fallocate of page at offset {off} ({size} bytes)")
        self._backed.add(off)

    def release(self, handle: int) -> None:
        """Give the page's memory back (punch its hole in the memfd)."""
        size = self._pages.pop(handle, None)
        if size is None:
            raise InvalidArgument(f"release: no page at offset {handle!r}")
        if handle in self._backed:
            mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if self._libc.fallocate(self.fd, mode, handle, size) != 0:
                raise self._err(f"fallocate(PUNCH_HOLE) at offset {handle}")
            self._backed.discard(handle)

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

    def map_many(
        self, pages: Sequence[tuple[int, PageHandle]], size: int
    ) -> tuple[int, DriverError | None]:
        """:meth:`map` for many pages: backing checked here, the mmap loop in one native call.

        Pages are mapped in order, one :func:`kvmem.native.host_map_pages`
        call per reserved range they fall in (the native loop checks every
        address against that range); the Python loop is its fallback.
        """
        self._check("map", 0, size)
        done = 0
        for start, n, base, length in self._groups(pages, size):
            group = pages[start : start + n]
            for _, handle in group:
                if handle not in self._backed:
                    if self._pages.get(handle) != size:
                        msg = f"map: no page of {size} bytes at offset {handle!r}"
                        return done, DriverError(msg)
                    try:
                        self._back(handle, size)
                    except DriverError as e:
                        return done, e
            if base is None:
                return done, DriverError(
                    f"map: address {group[0][0]:#x} is not inside a reserved range"
                )
            addrs = [a for a, _ in group]
            offs = [h for _, h in group]
            try:
                got, errno = native.host_map_pages(self.fd, base, length, addrs, offs, size)
            except InvalidArgument as e:
                return done, DriverError(str(e))
            done += got
            if errno:
                return done, DriverError(
                    f"mmap(MAP_FIXED | MAP_SHARED) of offset {offs[got]} failed: "
                    f"{os.strerror(errno)} (errno {errno})"
                )
        return done, None

    def _groups(
        self, pages: Sequence[tuple[int, PageHandle]], size: int
    ) -> list[tuple[int, int, int | None, int]]:
        """Consecutive runs of ``pages`` inside one reserved range: (first, count, start, size)."""
        out: list[tuple[int, int, int | None, int]] = []
        cur: tuple[int, int] | None = None
        for i, (addr, _) in enumerate(pages):
            if cur is None or not (cur[0] <= addr and addr + size <= cur[0] + cur[1]):
                cur = next(
                    ((b, n) for b, n in self._ranges.items() if b <= addr and addr + size <= b + n),
                    None,
                )
                if cur is None:
                    out.append((i, 1, None, 0))
                    break
                out.append((i, 0, cur[0], cur[1]))
            first, n, b, ln = out[-1]
            out[-1] = (first, n + 1, b, ln)
        return out

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
