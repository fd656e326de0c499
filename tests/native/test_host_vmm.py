"""Host VMM pages mapped and unmapped in one call: native and Python map the same memory."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kvmem import native
from kvmem.errors import InvalidArgument

PG = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
_libc.mmap.argtypes += [ctypes.c_int, ctypes.c_int64]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@pytest.fixture
def space() -> Iterator[tuple[int, int, int]]:
    """(memfd of 8 two-page pages with known bytes, reserved base, reserved length)."""
    if not hasattr(os, "memfd_create"):
        pytest.skip("needs Linux memfd_create")
    fd = os.memfd_create("kvmem-test", os.MFD_CLOEXEC)
    size = 2 * PG
    os.ftruncate(fd, 8 * size)
    for p in range(8):
        os.pwrite(fd, bytes([p + 1]) * size, p * size)
    length = 16 * size
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000
    base = _libc.mmap(None, length, 0, flags, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    yield fd, base, length
    _libc.munmap(base, length)
    os.close(fd)


def _perms(addr: int) -> str:
    with open("/proc/self/maps") as f:
        for line in f:
            rng, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in rng.split("-"))
            if lo <= addr < hi:
                return perms
    return ""


def _read(addr: int, size: int) -> torch.Tensor:
    return torch.frombuffer((ctypes.c_uint8 * size).from_address(addr), dtype=torch.uint8)


def test_map_write_unmap_remap(space, path):
    fd, base, length = space
    size = 2 * PG
    slots = [3, 0, 9, 15]
    pages = [5, 1, 7, 2]
    addrs = np.array([base + s * size for s in slots])
    offs = np.array([p * size for p in pages])
    assert native.host_map_pages(fd, base, length, addrs, offs, size, native=path) == (4, 0)
    for a, p in zip(addrs.tolist(), pages, strict=True):
        assert _perms(a).startswith("rw") and _perms(a + size - 1).startswith("rw")
        assert torch.all(_read(a, size) == p + 1)
    _read(int(addrs[0]), size).fill_(200)  # shared: the memfd page changes
    assert os.pread(fd, 4, 5 * size) == bytes([200]) * 4
    assert native.host_unmap_pages(base, length, addrs[:2], size, native=path) == (2, 0)
    assert _perms(int(addrs[0])).startswith("---") and _perms(int(addrs[2])).startswith("rw")
    native.host_map_pages(fd, base, length, addrs[:1], [3 * size], size, native=path)
    assert torch.all(_read(int(addrs[0]), size) == 4)
    native.host_unmap_pages(base, length, addrs, size, native=path)
    assert all(_perms(a).startswith("---") for a in addrs.tolist())


def test_bad_pages_raise_before_mapping_anything(space, path):
    fd, base, length = space
    size = 2 * PG
    good = base + size
    cases = [
        ([good, base + length], [0, size]),  # past the reserved range
        ([good, base + length - PG], [0, size]),  # page would end past it
        ([good, base - size], [0, size]),  # before it
        ([good, base + 100], [0, size]),  # unaligned address
        ([good, base], [0, 100]),  # unaligned offset
        ([good, base], [0, -size]),  # negative offset
        ([good], [0, size]),  # lengths differ
        ([float(good)], [0]),  # not ints
    ]
    for addrs, offs in cases:
        with pytest.raises(InvalidArgument):
            native.host_map_pages(fd, base, length, addrs, offs, size, native=path)
        assert _perms(good).startswith("---")
    for bad_size in (0, PG + 1, -PG):
        with pytest.raises(InvalidArgument):
            native.host_map_pages(fd, base, length, [good], [0], bad_size, native=path)
        with pytest.raises(InvalidArgument):
            native.host_unmap_pages(base, length, [good], bad_size, native=path)
    with pytest.raises(InvalidArgument):
        native.host_map_pages(-1, base, length, [good], [0], size, native=path)
    with pytest.raises(InvalidArgument):
        native.host_unmap_pages(base, length, [base + length], size, native=path)
    assert _perms(good).startswith("---")


def test_a_failing_mmap_reports_pages_done_and_errno(space, path):
    fd, base, length = space
    size = 2 * PG
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)  # MAP_SHARED + PROT_WRITE: EACCES
    try:
        done, err = native.host_map_pages(ro, base, length, [base], [0], size, native=path)
    finally:
        os.close(ro)
    assert (done, err) == (0, 13)
    assert _perms(base).startswith("---")
