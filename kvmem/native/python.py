"""The pure-Python versions of the native operations, and the argument checks both share.

Each function here computes exactly what its csrc/ counterpart does and
raises :class:`~kvmem.errors.InvalidArgument` with the same message on the
same bad input; ``kvmem.native`` picks one or the other.
"""

from __future__ import annotations

import ctypes
import mmap as _mmap
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvmem.errors import InvalidArgument

MASK = (1 << 64) - 1
P1 = 0x9E3779B97F4A7C15
P2 = 0xC2B2AE3D27D4EB4F
_MAP_FIXED = 0x10
_MAP_NORESERVE = getattr(_mmap, "MAP_NORESERVE", 0x4000)


# --------------------------------------------------------------------- checks
def flat(t: Any, what: str) -> torch.Tensor:
    """``t`` as a flat uint8 view; it must be a contiguous uint8 tensor."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise InvalidArgument(f"{what} must be a uint8 tensor")
    if not t.is_contiguous():
        raise InvalidArgument(f"{what} must be contiguous")
    return t.view(-1)


def _array(a: Any) -> np.ndarray:
    try:
        return a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    except (ValueError, TypeError, OverflowError):
        return np.zeros((0, 0, 0), dtype=object)  # ragged or not numbers: rejected by the caller


def int_rows(a: Any, cols: int, what: str) -> np.ndarray:
    """``a`` as a contiguous int64 array ``[n, cols]``."""
    arr = _array(a)
    if arr.size == 0 and arr.ndim <= 2:
        return np.zeros((0, cols), dtype=np.int64)
    if arr.dtype.kind not in "iu" or arr.ndim != 2 or arr.shape[1] != cols:
        raise InvalidArgument(f"{what} must be an integer array [n, {cols}]")
    return np.ascontiguousarray(arr, dtype=np.int64)


def int_vec(a: Any, what: str) -> np.ndarray:
    """``a`` as a contiguous int64 array ``[n]``."""
    arr = _array(a)
    if arr.size == 0 and arr.ndim <= 1:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise InvalidArgument(f"{what} must be a 1-d integer array")
    return np.ascontiguousarray(arr, dtype=np.int64)


def tokens_array(tokens: Any) -> np.ndarray:
    """Token ids as an int64 array; they must be ints that fit in int64."""
    try:
        arr = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    except (ValueError, TypeError, OverflowError):
        arr = np.zeros((0, 0))  # ragged or not numbers
    ok = arr.ndim == 1 and (arr.size == 0 or arr.dtype.kind in "iub")
    if ok and arr.dtype == np.uint64 and arr.size:
        ok = int(arr.max()) <= np.iinfo(np.int64).max
    if not ok:
        raise InvalidArgument("tokens must be a 1-d sequence of ints that fit in int64")
    return np.ascontiguousarray(arr, dtype=np.int64)


# --------------------------------------------------------------------- copies
def check_segments(s: np.ndarray, src_len: int, dst_len: int, delta: int | None) -> None:
    """Segments in bounds, no destination byte written twice, none read after it is written.

    ``delta`` (source address minus destination address) is given when the
    two buffers share memory.
    """
    a, b, n = s[:, 0], s[:, 1], s[:, 2]
    out = (a < 0) | (b < 0) | (n < 0) | (n > src_len - a) | (n > dst_len - b)
    if out.any():
        i = int(np.argmax(out))
        raise InvalidArgument(f"copy segment {i} ({a[i]}, {b[i]}, {n[i]}) is out of range")
    nz = n > 0
    order = np.argsort(b[nz], kind="stable")
    lo, hi = b[nz][order], (b[nz] + n[nz])[order]
    if (lo[1:] < hi[:-1]).any():
        raise InvalidArgument("copy segments overlap in the destination")
    if delta is not None and len(lo):
        rlo = a[nz] + delta
        j = np.searchsorted(lo, rlo + n[nz], side="left")
        if ((j > 0) & (hi[np.maximum(j - 1, 0)] > rlo)).any():
            raise InvalidArgument("a copy segment reads bytes that the copy writes")


def copy_segments(s: torch.Tensor, d: torch.Tensor, segs: np.ndarray) -> None:
    """Check, then one ``copy_`` per segment between the flat buffers."""
    sp, dp = s.data_ptr(), d.data_ptr()
    aliased = sp < dp + d.numel() and dp < sp + s.numel()
    check_segments(segs, s.numel(), d.numel(), sp - dp if aliased else None)
    nb = s.is_cuda or d.is_cuda
    for a, b, n in segs.tolist():
        if n:
            d[b : b + n].copy_(s[a : a + n], non_blocking=nb)


# ------------------------------------------------------------------- host VMM
_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
        libc.mmap.argtypes += [ctypes.c_int, ctypes.c_int64]
        _libc = libc
    return _libc


def check_pages(base: int, length: int, addrs: np.ndarray, size: int) -> None:
    """Aligned pages of ``size`` bytes, each inside the reserved ``[base, base + length)``."""
    pg = _mmap.PAGESIZE
    if size <= 0 or size % pg:
        raise InvalidArgument(f"page size must be a positive multiple of {pg}")
    if base < 0 or length < 0 or base % pg or length % pg:
        raise InvalidArgument("reserved range is not page aligned")
    bad = (addrs % pg != 0) | (addrs < base) | (addrs - base > length - size)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgument(
            f"page {i} at address {addrs[i]} is not a page-aligned address inside the "
            "reserved range"
        )


def host_map(
    fd: int, base: int, length: int, a: np.ndarray, o: np.ndarray, size: int
) -> tuple[int, int]:
    """The checks, then one ctypes ``mmap(MAP_FIXED | MAP_SHARED)`` per page."""
    if fd < 0:
        raise InvalidArgument("bad file descriptor")
    check_pages(base, length, a, size)
    bad = (o < 0) | (o % _mmap.PAGESIZE != 0)
    if bad.any():
        raise InvalidArgument(f"file offset {o[int(np.argmax(bad))]} is not page aligned")
    mmap_, rw = _c().mmap, _mmap.PROT_READ | _mmap.PROT_WRITE
    flags = _mmap.MAP_SHARED | _MAP_FIXED
    for i, (addr, off) in enumerate(zip(a.tolist(), o.tolist(), strict=True)):
        if mmap_(addr, size, rw, flags, fd, off) != addr:
            return i, ctypes.get_errno()
    return len(a), 0


def host_unmap(base: int, length: int, a: np.ndarray, size: int) -> tuple[int, int]:
    """The checks, then one ctypes ``mmap(PROT_NONE, MAP_FIXED)`` per page."""
    check_pages(base, length, a, size)
    mmap_ = _c().mmap
    flags = _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED
    for i, addr in enumerate(a.tolist()):
        if mmap_(addr, size, 0, flags, -1, 0) != addr:
            return i, ctypes.get_errno()
    return len(a), 0


# ------------------------------------------------------------------- CUDA VMM
def cuda_map(a: np.ndarray, h: np.ndarray, size: int, device: int) -> tuple[int, str | None]:
    """cuMemMap + cuMemSetAccess per page through cuda-python (the ``cuda`` extra)."""
    from cuda.bindings import driver as cu

    desc = cu.CUmemAccessDesc()
    desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = device
    desc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    ok = cu.CUresult.CUDA_SUCCESS
    for i, (addr, handle) in enumerate(zip(a.tolist(), h.tolist(), strict=True)):
        (r,) = cu.cuMemMap(addr, size, 0, handle, 0)
        if r == ok:
            (r,) = cu.cuMemSetAccess(addr, size, [desc], 1)
            if r != ok:
                cu.cuMemUnmap(addr, size)
        if r != ok:
            return i, str(r)
    return len(a), None


def cuda_unmap(a: np.ndarray, size: int) -> tuple[int, str | None]:
    """cuMemUnmap per page through cuda-python."""
    from cuda.bindings import driver as cu

    for i, addr in enumerate(a.tolist()):
        (r,) = cu.cuMemUnmap(addr, size)
        if r != cu.CUresult.CUDA_SUCCESS:
            return i, str(r)
    return len(a), None


# --------------------------------------------------------------------- layout
def check_layout(tab: np.ndarray, sl: np.ndarray, ql: np.ndarray, ps: int) -> None:
    """``0 <= query_len <= seq_len`` and enough table columns for every sequence."""
    bad = (sl < 0) | (ql < 0) | (ql > sl)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgument(
            f"sequence {i}: need 0 <= query_len <= seq_len, got {ql[i]} and {sl[i]}"
        )
    need = (sl.astype(np.int64) + ps - 1) // ps
    if len(need) and need.max() > tab.shape[1]:
        i = int(np.argmax(need > tab.shape[1]))
        raise InvalidArgument(f"sequence {i} needs {need[i]} pages; the table has {tab.shape[1]}")


def layout_arrays(
    table: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray, ps: int, zero_padded: bool
) -> tuple[np.ndarray, ...]:
    """kv_indptr, kv_indices, kv_last_page_len, block_table, seq_lens, query_start_loc, slots."""
    b = len(seq_lens)
    num_pages = (seq_lens + ps - 1) // ps
    max_pages = int(num_pages.max()) if b else 0
    dense = table[:, :max_pages]
    valid = np.arange(max_pages, dtype=np.int32)[None, :] < num_pages[:, None]
    kv_indices = dense[valid]
    if not zero_padded:
        dense[~valid] = 0
    kv_indptr = np.zeros(b + 1, dtype=np.int32)
    np.cumsum(num_pages, out=kv_indptr[1:])
    last = seq_lens - (num_pages - 1) * ps
    qsl = np.zeros(b + 1, dtype=np.int32)
    np.cumsum(query_lens, out=qsl[1:])
    n = int(qsl[-1])
    owner = np.repeat(np.arange(b), query_lens)
    pos = np.arange(n, dtype=np.int64) - qsl[:-1][owner] + (seq_lens - query_lens)[owner]
    slots = dense[owner, pos // ps].astype(np.int64) * ps + pos % ps
    return (
        kv_indptr,
        np.ascontiguousarray(kv_indices),
        last.astype(np.int32),
        dense,
        seq_lens.copy(),
        qsl,
        slots,
    )


# ------------------------------------------------------------------ page keys
def fmix_int(x: int) -> int:
    """MurmurHash3's 64-bit finalizer on a Python int."""
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & MASK
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & MASK
    return x ^ (x >> 33)


def _fmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


def page_keys(tok: np.ndarray, ps: int, prev: int, first: int) -> np.ndarray:
    """Chained keys of the full pages of ``tok`` (int64), vectorised over pages."""
    n = len(tok) - len(tok) % ps
    t = tok[:n].view(np.uint64).reshape(-1, ps)
    h = np.full(len(t), P2, dtype=np.uint64)
    for j in range(ps):
        x = h ^ t[:, j]
        h = ((x << np.uint64(27)) | (x >> np.uint64(37))) * np.uint64(P1)
    idx = np.arange(first + 1, first + 1 + len(t), dtype=np.uint64)
    inc = _fmix(_fmix(h) + idx * np.uint64(P1))
    return np.cumsum(inc, dtype=np.uint64) + np.uint64(prev)


# ------------------------------------------------------------ prefix-cache hashes
def check_chain(tokens: Any, ps: int, first: int, count: int) -> None:
    """A token list and pages ``first .. first + count - 1`` of ``ps`` tokens inside it."""
    if not isinstance(tokens, list):
        raise InvalidArgument("tokens must be a list")
    if ps <= 0:
        raise InvalidArgument("page_size must be positive")
    if first < 0 or count < 0:
        raise InvalidArgument("first and count must be >= 0")
    if (first + count) * ps > len(tokens):
        raise InvalidArgument("the pages run past the tokens")


def chain_hashes(tokens: list[int], ps: int, first: int, count: int, parent: int) -> list[int]:
    """``parent = hash((parent, tuple(page)))`` for each page, the hashes in order."""
    out = []
    for i in range(first, first + count):
        parent = hash((parent, tuple(tokens[i * ps : (i + 1) * ps])))
        out.append(parent)
    return out


def publish_pages(
    tokens: list[int],
    ps: int,
    first: int,
    count: int,
    parent: int,
    blocks: list[int],
    keys: list[Any],
    index: dict[int, int],
    page_hashes: list[int],
) -> tuple[list[int], list[tuple[Any, int]]]:
    """The hashes of pages ``first ..`` and the ``(key, block)`` of each page newly keyed:
    a block without a key whose hash ``index`` lacks gets ``(parent hash, tuple(page))``
    (and its hash in ``page_hashes``)."""
    if len(page_hashes) != len(keys):
        raise InvalidArgument("keys and page_hashes must be alike")
    hashes: list[int] = []
    published: list[tuple[Any, int]] = []
    for i in range(first, first + count):
        page = tuple(tokens[i * ps : (i + 1) * ps])
        h = hash((parent, page))
        b = blocks[i]
        if keys[b] is None and h not in index:
            key = (parent, page)
            index[h] = b
            keys[b] = key
            page_hashes[b] = h
            published.append((key, b))
        hashes.append(h)
        parent = h
    return hashes, published


def release_pages(
    pages: list[int],
    ref: list[int],
    keys: list[Any],
    queue: OrderedDict[int, None],
    to_front: Callable[[int, bool], None],
) -> int:
    """Drop one hold of each page, last first; a page no longer held joins ``queue`` at the
    back if it has a key, else at the front (``to_front(page, False)``, the queue's
    ``move_to_end``). Returns how many of those had keys. Every page is checked first: an
    index of ``ref``, held, named once."""
    if not (isinstance(pages, list) and isinstance(ref, list) and isinstance(keys, list)) or len(
        keys
    ) != len(ref):
        raise InvalidArgument("pages, ref and keys must be lists (the last two alike)")
    for b in pages:
        if not isinstance(b, int) or not 0 <= b < len(ref):
            raise InvalidArgument(f"page {b} is not a page of the pool")
        if not isinstance(ref[b], int) or ref[b] < 1:
            raise InvalidArgument(f"page {b} is not held")
    if len(set(pages)) != len(pages):
        raise InvalidArgument("a page is named twice")
    cached = 0
    for b in reversed(pages):
        ref[b] -= 1
        if not ref[b]:
            queue[b] = None
            if keys[b] is not None:
                cached += 1
            else:
                to_front(b, False)
    return cached
