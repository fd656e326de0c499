"""Batched primitives: the csrc/ extension, or pure-Python versions with the same results.

Each operation here does in one call what would otherwise be a Python loop of
small calls (a ``copy_`` per page, an ``mmap`` per page, a dict per page)::

    copy_segments      byte ranges between two flat buffers   (one memcpy / cudaMemcpyBatchAsync
                                                                call, GIL released, threads on cpu)
    host_map_pages     mmap(MAP_FIXED | MAP_SHARED) of memfd pages, and PROT_NONE back
    cuda_map_pages     cuMemMap + cuMemSetAccess of CUDA VMM pages (CUDA builds only)
    layout_arrays      the arrays of a BatchLayout from dense block tables
    page_keys          chained 64-bit prefix-cache keys of a prompt's full pages
    chain_hashes       the paged prefix cache's page hashes, hash((parent, tuple(page))),
                       equal to Python's own (CPython's tuple hash, checked once)
    release_pages      a freed sequence's pages: reference counts down, the free ones queued
    token_list         a prompt's token ids checked (plain non-negative ints) and copied
    batch_passes       the block-table backends' batched calls (reserve_many, commit_many,
                       append_many, layout) over their sequence states, common case only

The extension is compiled from ``csrc/`` with ``torch.utils.cpp_extension``
the first time an operation is used (a message says so; it takes about a
minute), into ``$KVMEM_NATIVE_CACHE`` or ``~/.cache/kvmem/native/<tag>``,
where the tag covers the sources, torch and Python versions, so a change of
any rebuilds. CUDA sources are added only when torch is a CUDA build and
nvcc is found. ``KVMEM_NATIVE=0`` forces the Python versions; so does a
failed build, and :func:`status` says which path is in use and why.

Both paths check every argument before anything changes and raise
:class:`~kvmem.errors.InvalidArgument` with the same message on a bad one
(out-of-range or overlapping segments, wrong dtypes, non-contiguous buffers).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from kvmem.errors import InvalidArgument
from kvmem.native import python as _py
from kvmem.native.build import CSRC, NativeStatus, call, enabled, pick, python_only, status

__all__ = [
    "CSRC",
    "LayoutArrays",
    "NativeStatus",
    "batch_passes",
    "chain_hashes",
    "page_publisher",
    "copy_layer_blocks",
    "copy_page_runs",
    "copy_segments",
    "cuda_map_pages",
    "cuda_unmap_pages",
    "enabled",
    "host_map_pages",
    "host_unmap_pages",
    "layout_arrays",
    "page_keys",
    "native_hashes",
    "page_releaser",
    "python_only",
    "release_pages",
    "root_key",
    "runs_to_segments",
    "status",
    "token_list",
]

# Every operation takes ``native``: None uses the extension when it loaded,
# False the Python version, True the extension (KVError if it is not in use).


# --------------------------------------------------------------------- copies
def copy_segments(
    src: torch.Tensor,
    dst: torch.Tensor,
    segments: Any,
    *,
    threads: int = 0,
    native: bool | None = None,
) -> None:
    """Copy byte ranges ``(src_offset, dst_offset, nbytes)`` from ``src`` to ``dst``, in one call.

    ``src`` and ``dst`` are contiguous uint8 tensors (read as flat bytes),
    on the cpu or a CUDA device; ``segments`` is an int array ``[n, 3]``. No
    destination byte may be written twice, and when the buffers share memory
    no segment may read what another writes; nothing is copied if any
    segment breaks a rule. On CUDA the copies are issued on the current
    stream (not waited for); on the cpu the call returns when they are done,
    split across ``threads`` (0: torch's intra-op thread count) when large.
    Buffers on the meta device (bookkeeping-only pools) are only checked.
    """
    s = _py.flat(src, "source buffer")
    d = _py.flat(dst, "destination buffer")
    segs = _py.int_rows(segments, 3, "segments")
    if "meta" in (s.device.type, d.device.type):  # bookkeeping-only pools: nothing to move
        _py.check_segments(segs, s.numel(), d.numel(), None)
        return
    cuda = s.is_cuda or d.is_cuda
    if not cuda and (s.device.type != "cpu" or d.device.type != "cpu"):
        raise InvalidArgument("buffers must be on the cpu or a CUDA device")
    ext = pick(native)
    if ext is not None and (not cuda or ext.with_cuda()):
        stream = torch.cuda.current_stream(d.device if d.is_cuda else s.device) if cuda else None
        handle = 0 if stream is None else stream.cuda_stream
        nthreads = threads if threads > 0 else torch.get_num_threads()
        call(ext.copy_segments, s, d, torch.from_numpy(segs), handle, nthreads)
        return
    _py.copy_segments(s, d, segs)


def runs_to_segments(runs: Any, row_bytes: int, layer_bytes: int | None = None) -> np.ndarray:
    """Byte segments of page runs ``(src_page, dst_page, n)`` over rows of ``row_bytes``.

    One segment per run; with ``layer_bytes``, one per page per layer (rows
    are ``row_bytes // layer_bytes`` layer regions), in the order vLLM 0.x
    issued them: page by page, layer by layer.
    """
    r = _py.int_rows(runs, 3, "runs")
    if (r[:, 2] < 0).any():
        raise InvalidArgument("run lengths must be >= 0")
    if layer_bytes is None:
        return r * row_bytes
    if layer_bytes <= 0 or row_bytes % layer_bytes:
        raise InvalidArgument(f"layer_bytes {layer_bytes} does not divide rows of {row_bytes}")
    nl = row_bytes // layer_bytes
    n = r[:, 2]
    idx = np.repeat(np.arange(len(r)), n)
    within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    pages = np.stack([r[idx, 0] + within, r[idx, 1] + within], axis=1) * row_bytes
    layers = np.arange(nl, dtype=np.int64) * layer_bytes
    out = np.empty((len(pages), nl, 3), dtype=np.int64)
    out[:, :, 0] = pages[:, :1] + layers
    out[:, :, 1] = pages[:, 1:] + layers
    out[:, :, 2] = layer_bytes
    return out.reshape(-1, 3)


def _pools(src: torch.Tensor, dst: torch.Tensor) -> int:
    if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)):
        raise InvalidArgument("pools must be tensors")
    if src.dim() != 2 or dst.dim() != 2 or src.shape[1] != dst.shape[1]:
        raise InvalidArgument("pools must be [pages, row_bytes] with equal row sizes")
    return int(src.shape[1])


def copy_page_runs(
    src: torch.Tensor, dst: torch.Tensor, runs: Any, *, native: bool | None = None
) -> None:
    """Copy page runs ``(src_page, dst_page, n)`` between uint8 ``[pages, row_bytes]`` pools."""
    copy_segments(src, dst, runs_to_segments(runs, _pools(src, dst)), native=native)


def copy_layer_blocks(
    src: torch.Tensor,
    dst: torch.Tensor,
    runs: Any,
    layer_bytes: int,
    *,
    native: bool | None = None,
) -> None:
    """:func:`copy_page_runs` as one copy per page per layer (vLLM 0.x's), in one call."""
    segs = runs_to_segments(runs, _pools(src, dst), layer_bytes)
    copy_segments(src, dst, segs, native=native)


# ------------------------------------------------------------------- host VMM
def host_map_pages(
    fd: int,
    base: int,
    length: int,
    addrs: Any,
    offsets: Any,
    size: int,
    *,
    native: bool | None = None,
) -> tuple[int, int]:
    """Map memfd pages: ``mmap(addrs[i], size, RW, MAP_FIXED | MAP_SHARED, fd, offsets[i])``.

    Every address must be page aligned and lie, with its ``size`` bytes,
    inside the reserved range ``[base, base + length)``, and every offset be
    page aligned (:class:`InvalidArgument` before anything is mapped).
    Returns ``(pages mapped, errno)``: ``errno`` is 0 when all were, else
    that of the failed ``mmap`` (the first ``pages mapped`` stay mapped).
    """
    a = _py.int_vec(addrs, "addresses")
    o = _py.int_vec(offsets, "offsets")
    if len(a) != len(o):
        raise InvalidArgument("as many offsets as addresses are needed")
    ext = pick(native)
    if ext is None:
        return _py.host_map(fd, base, length, a, o, size)
    done, err = call(ext.host_map, fd, base, length, torch.from_numpy(a), torch.from_numpy(o), size)
    return int(done), int(err)


def host_unmap_pages(
    base: int, length: int, addrs: Any, size: int, *, native: bool | None = None
) -> tuple[int, int]:
    """Put a fresh PROT_NONE mapping over each page (the addresses stay reserved).

    The same checks and ``(pages done, errno)`` result as :func:`host_map_pages`.
    """
    a = _py.int_vec(addrs, "addresses")
    ext = pick(native)
    if ext is None:
        return _py.host_unmap(base, length, a, size)
    done, err = call(ext.host_unmap, base, length, torch.from_numpy(a), size)
    return int(done), int(err)


# ------------------------------------------------------------------- CUDA VMM
def cuda_map_pages(
    addrs: Any, handles: Any, size: int, device: int, *, native: bool | None = None
) -> tuple[int, str | None]:
    """``cuMemMap`` + ``cuMemSetAccess`` (read/write from ``device``) for each page, one call.

    Returns ``(pages mapped, None)`` or, when a driver call fails, the pages
    mapped before it and the driver's error text (the failed page is left
    unmapped). Without a CUDA build of the extension the same loop runs
    through cuda-python.
    """
    a = _py.int_vec(addrs, "addresses")
    h = _py.int_vec(handles, "handles")
    if len(a) != len(h):
        raise InvalidArgument("as many handles as addresses are needed")
    if size <= 0:
        raise InvalidArgument("page size must be positive")
    ext = pick(native)
    if ext is None or not ext.with_cuda():
        return _py.cuda_map(a, h, size, device)
    done, rc, msg = call(ext.cuda_map, torch.from_numpy(a), torch.from_numpy(h), size, device)
    return int(done), (msg or f"CUresult {rc}") if rc else None


def cuda_unmap_pages(
    addrs: Any, size: int, *, native: bool | None = None
) -> tuple[int, str | None]:
    """``cuMemUnmap`` of each page in one call; the result as :func:`cuda_map_pages`."""
    a = _py.int_vec(addrs, "addresses")
    if size <= 0:
        raise InvalidArgument("page size must be positive")
    ext = pick(native)
    if ext is None or not ext.with_cuda():
        return _py.cuda_unmap(a, size)
    done, rc, msg = call(ext.cuda_unmap, torch.from_numpy(a), size)
    return int(done), (msg or f"CUresult {rc}") if rc else None


# --------------------------------------------------------------------- layout
class LayoutArrays(NamedTuple):
    """The cpu arrays of a :class:`~kvmem.layout.BatchLayout`."""

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    slot_mapping: torch.Tensor


def layout_arrays(
    table: np.ndarray,
    seq_lens: np.ndarray,
    query_lens: np.ndarray,
    page_size: int,
    zero_padded: bool = False,
    *,
    rows: np.ndarray | None = None,
    native: bool | None = None,
) -> LayoutArrays:
    """BatchLayout arrays for a batch; see :func:`kvmem.layout.build_layout`.

    ``table`` is int [B, W], row b holding at least ``ceil(seq_lens[b] /
    page_size)`` page ids; ``0 <= query_lens[b] <= seq_lens[b]``. With
    ``rows`` (int [B]), sequence b's pages are row ``rows[b]`` of a larger
    ``table`` instead (a backend's whole block table, read in place). The
    Python version may modify ``table`` and return a view of it as the block
    table (``zero_padded`` promises the entries past each row's pages are 0,
    which saves it a pass); the native one leaves it alone.
    """
    if rows is not None:
        r = np.asarray(rows)
        tab = np.asarray(table)
        if r.ndim != 1 or (r.size and r.dtype.kind not in "iu") or len(r) != len(seq_lens):
            raise InvalidArgument("rows must be an integer array [B]")
        if tab.ndim != 2:
            raise InvalidArgument("table, seq_lens and query_lens disagree on the batch size")
        bad = (r < 0) | (r >= len(tab))
        if bad.any():
            raise InvalidArgument(f"row {r[int(np.argmax(bad))]} is not a row of the table")
        ext = pick(native)
        if ext is None:
            sl = np.asarray(seq_lens)
            need = -(-int(sl.max()) // page_size) if sl.size and page_size > 0 else 0
            sub = tab[r, : max(need, 0)]  # the columns the batch reads (fewer: the check says so)
            return layout_arrays(sub, seq_lens, query_lens, page_size, zero_padded, native=False)
        table = tab if tab.dtype == np.int32 and tab.strides[1] == 4 else tab.astype(np.int32)
        rows = np.ascontiguousarray(r, dtype=np.int64)
    if isinstance(page_size, bool) or not isinstance(page_size, int | np.integer):
        raise InvalidArgument("page_size must be a positive int")
    if page_size <= 0:
        raise InvalidArgument("page_size must be a positive int")
    tab, sl, ql = np.asarray(table), np.asarray(seq_lens), np.asarray(query_lens)
    if tab.ndim != 2 or sl.ndim != 1 or ql.ndim != 1:
        raise InvalidArgument("table must be [B, W], seq_lens and query_lens [B]")
    for x in (tab, sl, ql):  # whole floats are accepted (np.ones(b) as query lengths)
        if x.size and not (
            x.dtype.kind in "iu" or (x.dtype.kind == "f" and np.array_equal(x, np.floor(x)))
        ):
            raise InvalidArgument("table, seq_lens and query_lens must hold integers")
    if not (len(sl) == len(ql) and (rows is not None or len(tab) == len(sl))):
        raise InvalidArgument("table, seq_lens and query_lens disagree on the batch size")
    sl = np.ascontiguousarray(sl, dtype=np.int32)
    ql = np.ascontiguousarray(ql, dtype=np.int32)
    tab = tab if tab.dtype == np.int32 else tab.astype(np.int32)
    if any(st < 0 for st in tab.strides):
        tab = np.ascontiguousarray(tab)
    ext = pick(native)
    if ext is not None:
        args = (torch.from_numpy(tab), torch.from_numpy(sl), torch.from_numpy(ql), page_size)
        rt = None if rows is None else torch.from_numpy(rows)
        return LayoutArrays(*call(ext.layout_arrays, *args, rt))
    _py.check_layout(tab, sl, ql, page_size)
    out = _py.layout_arrays(tab, sl, ql, page_size, zero_padded)
    return LayoutArrays(*(torch.from_numpy(x) for x in out))


# ------------------------------------------------------------------ page keys
def root_key(root: int = 0) -> int:
    """The key "before page 0" of a prompt whose cache root (salt hash) is ``root``."""
    return _py.fmix_int((int(root) & _py.MASK) ^ _py.P2)


def page_keys(
    tokens: Any,
    page_size: int,
    root: int = 0,
    *,
    first: int = 0,
    prev: int | None = None,
    native: bool | None = None,
) -> np.ndarray:
    """Chained 64-bit keys of the full pages of ``tokens`` (uint64 ``[len // page_size]``).

    Key i covers every token up to the end of page i and the root::

        key[-1] = root_key(root)
        digest  = fmix64(h), h = P2 then h = rotl64(h ^ token, 27) * P1 for each token of the page
        key[i]  = key[i-1] + fmix64(digest(page i) + (i + 1) * P1)        (mod 2**64)

    (fmix64 is MurmurHash3's finalizer; P1, P2 are in kvmem.native.python.)
    ``tokens`` is a list, tuple, numpy array or int64 tensor of token ids.
    To extend a prompt's keys, pass the tokens from page ``first`` on and the
    key of page ``first - 1`` as ``prev`` (``root`` is then unused).
    Partial trailing pages get no key. Keys are hashes: a cache must still
    compare the exact tokens (and the parent page) on a hit.
    """
    if isinstance(page_size, bool) or not isinstance(page_size, int | np.integer):
        raise InvalidArgument("page_size must be a positive int")
    if page_size <= 0:
        raise InvalidArgument("page_size must be a positive int")
    if first < 0 or (first > 0 and prev is None):
        raise InvalidArgument("pages after the first need first >= 0 and the previous key")
    p = root_key(root) if prev is None else int(prev)
    if not 0 <= p <= _py.MASK:
        raise InvalidArgument("prev must be a 64-bit unsigned key")
    ext = pick(native)
    if ext is None:
        return _py.page_keys(_py.tokens_array(tokens), page_size, p, first)
    if isinstance(tokens, list | tuple):
        arg: Any = tokens
    elif isinstance(tokens, torch.Tensor) and tokens.dtype == torch.int64 and tokens.dim() == 1:
        arg = tokens.cpu().contiguous()
    else:
        arg = torch.from_numpy(_py.tokens_array(tokens))
    out = call(ext.page_keys, arg, page_size, p, first)
    return out.numpy().view(np.uint64)


# --------------------------------------------------------- prefix-cache hashes
_hashes_agree: bool | None = None


def _native_hashes(ext: Any) -> bool:
    """Whether the extension's tuple hash equals this interpreter's (checked once)."""
    global _hashes_agree
    if _hashes_agree is None:
        toks = [0, 1, 2**40, 7, 2**61, 5, 12345, 3]
        agree = True
        for parent in (0, -1, -(2**63), 2**63 - 1, hash(("kvmem", None))):
            for ps in (1, 4):
                want = _py.chain_hashes(toks, ps, 0, len(toks) // ps, parent)
                agree = agree and ext.chain_hashes(toks, ps, 0, len(toks) // ps, parent) == want
        _hashes_agree = agree
    return _hashes_agree


def token_list(tokens: Any) -> list[int] | None:
    """A copy of ``tokens`` if it is a non-empty list of plain non-negative ints, checked and
    copied natively; None for anything else and on the Python path (the caller then checks
    the long way: :func:`kvmem.allocator.check_tokens`). The copy is untracked by the cycle
    collector (a list of ints is in no cycle; the allocator only ever adds ints to it), so
    collections do not walk a sequence's tokens."""
    ext = pick(None)
    return None if ext is None else ext.token_list(tokens)  # type: ignore[no-any-return]


def native_hashes() -> bool:
    """Whether the prefix-cache hashes are computed natively (the extension is in use and its
    tuple hash equals this interpreter's)."""
    ext = pick(None)
    return ext is not None and _native_hashes(ext)


def page_publisher() -> Callable[..., tuple[list[int], list[tuple[Any, int]]]]:
    """The block tables' prefix-cache publication of a run of pages, native where
    :func:`chain_hashes` is: ``(tokens, page_size, first, count, parent, blocks, keys,
    index, page_hashes) -> (hashes, [(key, block) published])`` (see ``publish_pages`` in
    csrc/). No
    argument checks beyond the native ones: for callers whose arguments are known good."""
    ext = pick(None)
    if ext is not None and _native_hashes(ext):
        return ext.publish_pages  # type: ignore[no-any-return]
    return _py.publish_pages


def release_pages(
    pages: list[int],
    ref: list[int],
    keys: list[Any],
    queue: OrderedDict[int, None],
    *,
    native: bool | None = None,
) -> int:
    """Drop one hold of each of ``pages`` (a freed sequence's block table), last first.

    ``ref[page] -= 1``; a page no longer held joins ``queue`` (the paged
    backend's free queue) at the back if ``keys[page]`` is set (it holds
    prefix-cached KV: evicted last, least recently freed first), else at the
    front. Returns how many of the freed pages hold cached KV. Every page is
    checked before anything changes (an index of ``ref``, held, named once):
    :class:`~kvmem.errors.InvalidArgument` otherwise.
    """
    ext = pick(native)
    if ext is None:
        return _py.release_pages(pages, ref, keys, queue, queue.move_to_end)
    return call(ext.release_pages, pages, ref, keys, queue, queue.move_to_end)  # type: ignore[no-any-return]


def page_releaser() -> Callable[..., int]:
    """:func:`release_pages` without the wrapper, native when the extension is in use:
    ``(pages, ref, keys, queue, queue.move_to_end) -> int``, for callers whose arguments are
    known good (errors come as ValueError natively)."""
    ext = pick(None)
    return _py.release_pages if ext is None else ext.release_pages  # type: ignore[no-any-return]


def chain_hashes(
    tokens: list[int],
    page_size: int,
    first: int,
    count: int,
    parent: int,
    *,
    native: bool | None = None,
) -> list[int]:
    """The paged prefix cache's hashes of pages ``first .. first + count - 1`` of ``tokens``.

    Page i's hash is ``hash((hash of page i - 1, tuple(tokens of page i)))``,
    page ``first - 1``'s hash being ``parent``: exactly the values Python
    computes, so that keys built either way meet in one cache::

        tokens   [ t0 .. t15 ][ t16 .. t31 ][ t32 .. ]     (page_size 16)
        hashes   h0 = hash((parent, (t0..t15)))  h1 = hash((h0, (t16..t31)))

    ``tokens`` is a list of ints; the native path is used only where its
    tuple hash was found to equal the interpreter's (CPython >= 3.8).
    """
    for name, v in (("page_size", page_size), ("first", first), ("count", count)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidArgument(f"{name} must be an int")
    ext = pick(native)
    if ext is not None and _native_hashes(ext):
        return call(ext.chain_hashes, tokens, page_size, first, count, parent)  # type: ignore[no-any-return]
    _py.check_chain(tokens, page_size, first, count)
    return _py.chain_hashes(tokens, page_size, first, count, parent)


# ---------------------------------------------------------- batch passes
def batch_passes(native: bool | None = None) -> Any:
    """The extension's block-table batch passes, or None on the Python path.

    ``reserve_pass``, ``commit_pass``, ``append_pass`` and ``layout_pass``
    run the common case of :class:`~kvmem.backends.blocks.BlockTableBackend`'s
    batched calls over its sequence states in one C++ loop each; each
    returns None, having changed nothing, for anything else (an unknown,
    swapped or loading sequence, a bad count, ...), and the backend then runs
    its Python version, which computes the same or raises the right error.
    """
    ext = pick(native)
    return ext if ext is not None and hasattr(ext, "reserve_pass") else None
