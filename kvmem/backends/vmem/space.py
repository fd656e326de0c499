"""Virtual KV tensors and the physical pages mapped under them, slot by slot.

Every layer has one virtual tensor ``[max_seqs, max_seq_len, token_bytes]``:
row ``s`` is slot ``s``'s KV, contiguous in virtual memory; one token's
entry holds its K and V (and, for int4, their scales and zeros first)::

    one token of one layer:  [ k_scale k_zero v_scale v_zero | k codes | v codes ]
                               (int4 only, fp16)               [heads, code_dim] each

``LayerKV.k`` and ``.v`` are strided views of it, ``[max_seqs, max_seq_len,
heads, code_dim]``. Physical pages of ``page_bytes`` are mapped under a row
from its start, as far as the slot's KV reaches::

    layer 0   slot 0 [ g3 | g7 | g1 | -- | -- | ... ]   3 pages mapped
              slot 1 [ g3 | g4 | -- | -- | -- | ... ]   g3 shared with slot 0 (a fork)
    layer 1   slot 0 [ g3 | g7 | g1 | -- | -- | ... ]   same groups, layer 1's pages
    ...       (-- is reserved address space that faults if touched)

All layers grow together, so physical pages are handed out in *groups*
(``g0, g1, ...``): one page for every layer. A slot's mapped state is the
list of its groups; it covers ``len * page_bytes // token_bytes`` tokens.

A group may be mapped under several slots at once (a forked sequence shares
its parent's pages: the same physical page mapped at two addresses);
``ref[g]`` counts its mappings and it returns to the pool at zero.
:meth:`VirtualKV.cow` gives a slot a private copy of a shared page.

``max_seq_len`` is rounded up so that a row is a whole number of pages
(pages never straddle slots).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from kvmem.backends.vmem.driver import PageHandle, Pages, VMemDriver
from kvmem.errors import DriverError, IntegrityError
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV

__all__ = ["VirtualKV", "round_seq_len", "token_fields"]


def token_fields(spec: KVSpec) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
    """(name, dtype, shape, byte offset) of each field of one token's entry in a layer.

    The fp16 int4 scales and zeros come first, so that every field is
    aligned to its dtype; the entry is exactly ``spec.bytes_per_token_layer``.
    """
    fmt = spec.fmt
    shapes: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    if fmt.kind == "int4":
        meta = (spec.num_kv_heads, spec.num_groups)
        shapes += [(n, torch.float16, meta) for n in ("k_scale", "k_zero", "v_scale", "v_zero")]
    codes = (spec.num_kv_heads, spec.code_dim)
    shapes += [("k", fmt.storage_dtype, codes), ("v", fmt.storage_dtype, codes)]
    out, off = [], 0
    for name, dtype, shape in shapes:
        out.append((name, dtype, shape, off))
        off += dtype.itemsize * math.prod(shape)
    return out


def round_seq_len(token_bytes: int, max_seq_len: int, page_bytes: int) -> int:
    """The smallest length >= ``max_seq_len`` whose row is a whole number of pages."""
    step = page_bytes // math.gcd(page_bytes, token_bytes)
    return -(-max_seq_len // step) * step


class VirtualKV:
    """The virtual tensors of every layer, the page-group pool, and per-slot mappings.

    Not thread-safe: the allocator serialises calls. Every method that maps
    either completes or undoes its own mappings and raises DriverError.
    """

    def __init__(
        self,
        spec: KVSpec,
        driver: VMemDriver,
        max_seqs: int,
        max_seq_len: int,
        page_bytes: int,
        num_groups: int,
    ) -> None:
        self.spec = spec
        self.driver = driver
        self.max_seqs = max_seqs
        self.max_seq_len = max_seq_len
        self.page_bytes = page_bytes
        self.num_layers = spec.num_layers
        self.token_bytes = spec.bytes_per_token_layer
        self.row_bytes = max_seq_len * self.token_bytes
        if self.row_bytes % page_bytes:
            raise ValueError("max_seq_len must be rounded with round_seq_len first")
        self.layer_bytes = max_seqs * self.row_bytes
        self.virtual_bytes = self.layer_bytes * self.num_layers
        self.num_groups = num_groups
        self.map_calls = 0
        self.unmap_calls = 0
        self.pool: list[int] = list(range(num_groups - 1, -1, -1))
        self.ref = [0] * num_groups
        self.extra_refs = 0  # sum over groups of (mappings - 1)
        self.groups: list[list[int]] = [[] for _ in range(max_seqs)]
        self.covered = [0] * max_seqs
        #: Per slot: token positions below this may lie in shared pages.
        self.shared_below = [0] * max_seqs
        self._layer_offsets = np.arange(self.num_layers, dtype=np.int64) * self.layer_bytes
        self._handles: list[PageHandle] = []
        self._int_handles: np.ndarray | None = None  # [group, layer], when handles are ints
        self._range = False
        self._batching = False  # inside unmapping(): one device sync for every unmap
        self._synced = False  # the device was synchronized in this batch
        try:
            self.base = driver.reserve(self.virtual_bytes)
            self._range = True
            if not driver.bookkeeping_only:
                # layer-major creation: a layer's pages of consecutive groups are adjacent in
                # the driver (on the host, adjacent mappings of adjacent file pages merge)
                nl = self.num_layers
                handles: list[PageHandle] = [None] * (num_groups * nl)
                self._handles = handles
                for li in range(nl):
                    handles[li::nl] = driver.create_many(num_groups, page_bytes)
                if driver.array_pages and all(type(h) is int for h in handles):
                    self._int_handles = np.array(handles, dtype=np.int64).reshape(num_groups, nl)
        except BaseException:
            self.close()
            raise
        self.fp8_scales = (
            torch.ones(
                spec.num_layers, 2, spec.num_kv_heads, dtype=torch.float32, device=driver.device
            )
            if spec.fmt.kind == "fp8"
            else None
        )
        #: Per layer, the raw bytes ``[max_seqs, row_bytes]``: a slot's KV is one contiguous row.
        self.rows: list[torch.Tensor] = []
        self.layers = [self._make_layer(li) for li in range(self.num_layers)]

    # -------------------------------------------------------------- geometry
    def pages(self, n: int) -> int:
        """Pages (groups) a slot needs to hold ``n`` tokens."""
        return -(-n * self.token_bytes // self.page_bytes)

    def cover(self, num_pages: int) -> int:
        """Tokens ``num_pages`` pages of a slot can hold."""
        return min(num_pages * self.page_bytes // self.token_bytes, self.max_seq_len)

    def page_of(self, pos: int) -> int:
        """Index of the page that token position ``pos`` lies in."""
        return pos * self.token_bytes // self.page_bytes

    @property
    def mapped_groups(self) -> int:
        """Groups mapped under at least one slot."""
        return self.num_groups - len(self.pool)

    # ---------------------------------------------------------------- tensors
    def _make_layer(self, li: int) -> LayerKV:
        raw = self.driver.tensor(self.base + li * self.layer_bytes, self.layer_bytes)
        self.rows.append(raw.view(self.max_seqs, self.row_bytes))
        rows = raw.view(self.max_seqs, self.max_seq_len, self.token_bytes)
        views: dict[str, torch.Tensor] = {}
        for name, dtype, shape, off in token_fields(self.spec):
            n = dtype.itemsize * math.prod(shape)
            views[name] = rows[:, :, off : off + n].view(dtype).unflatten(2, shape)
        if self.fp8_scales is not None:
            views["k_scale"] = self.fp8_scales[li, 0]
            views["v_scale"] = self.fp8_scales[li, 1]
        return LayerKV(self.spec, self.max_seq_len, li, **views)

    # ---------------------------------------------------------------- mapping
    def _addr(self, li: int, slot: int, j: int) -> int:
        return self.base + li * self.layer_bytes + slot * self.row_bytes + j * self.page_bytes

    def _page_addrs(self, slot: int, start: int, count: int) -> np.ndarray:
        """Addresses of pages ``start .. start + count - 1`` of ``slot``, layer by layer.

        Layer-major, so that a layer's pages are adjacent in the list as in
        memory: the driver maps or unmaps such a run with one call.
        """
        first = self.base + slot * self.row_bytes + start * self.page_bytes
        pages = np.arange(count, dtype=np.int64) * self.page_bytes
        return (first + self._layer_offsets[:, None] + pages[None, :]).ravel()

    def _map_pages(
        self, slot: int, start: int, groups: list[int]
    ) -> tuple[int, DriverError | None]:
        """Map ``groups`` as pages ``start, start + 1, ...`` of ``slot`` on every layer.

        Returns how many leading groups got mapped on every layer (their
        pages stay mapped) and the error that stopped it; pages of the other
        groups that did get mapped are unmapped again.
        """
        if self.driver.bookkeeping_only or not groups:
            return len(groups), None
        pages = self.map_request(slot, start, groups)
        try:
            done, err = self.driver.map_many(pages, self.page_bytes)
        except Exception as e:  # not the driver's contract: undo everything, report it
            done, err = len(pages), DriverError(f"map_many failed unexpectedly: {e!r}")
        return self.map_outcome(slot, start, len(groups), done, err)

    def map_request(self, slot: int, start: int, groups: list[int]) -> Pages:
        """The ``(addr, handle)`` pages that map ``groups`` from page ``start`` of ``slot``.

        Layer-major (a layer's pages adjacent, as in memory); an int64 array
        when the driver takes one. Touches no shared state.
        """
        k = len(groups)
        if self._int_handles is not None:  # [addr, handle] rows, built without a Python loop
            rows = np.empty((self.num_layers, k, 2), dtype=np.int64)
            first = self.base + slot * self.row_bytes + start * self.page_bytes
            pages = np.arange(first, first + k * self.page_bytes, self.page_bytes, dtype=np.int64)
            rows[:, :, 0] = self._layer_offsets[:, None] + pages
            rows[:, :, 1] = self._int_handles[groups].T
            return rows.reshape(-1, 2)
        addrs = self._page_addrs(slot, start, k)
        h, nl = self._handles, self.num_layers
        handles = [h[g * nl + li] for li in range(nl) for g in groups]
        return list(zip(addrs.tolist(), handles, strict=True))

    def map_outcome(
        self, slot: int, start: int, k: int, done: int, err: DriverError | None
    ) -> tuple[int, DriverError | None]:
        """After ``done`` pages of :meth:`map_request`'s ``k`` groups mapped and ``err``: the
        leading groups mapped on every layer, and ``err``; the other groups' mapped pages are
        unmapped again (never used by the device: no sync)."""
        if err is None:
            return k, None
        drv, pb, nl = self.driver, self.page_bytes, self.num_layers
        layer, i = divmod(done, k)  # layers below `layer` are mapped, and `i` pages of it
        full = i if layer == nl - 1 else 0
        for n, a in enumerate(self._page_addrs(slot, start, k)[:done].tolist()):
            if n % k >= full:
                with contextlib.suppress(Exception):
                    drv.unmap(a, pb)
        return full, err

    @contextlib.contextmanager
    def unmapping(self) -> Iterator[None]:
        """A batch of unmaps: the device is synchronized once, before the first of them.

        Every unmapping method is a batch of its own; wrap several calls (a
        reclaim that shrinks many slots) to make them one.
        """
        outer = self._batching
        self._batching = True
        try:
            yield
        finally:
            if not outer:
                self._batching = self._synced = False

    def _unmap(
        self, addrs: Sequence[int] | np.ndarray, keep_going: bool = False
    ) -> tuple[int, DriverError | None]:
        """Unmap the pages at ``addrs`` in order after one device sync (per batch).

        Stops at the first failure unless ``keep_going``; returns how many
        were unmapped and the first error.
        """
        drv, pb = self.driver, self.page_bytes
        if drv.bookkeeping_only:
            self.unmap_calls += len(addrs)
            return len(addrs), None
        if not len(addrs):
            return 0, None
        if not self._synced:
            try:
                drv.synchronize()
            except DriverError as e:
                return 0, e
            self._synced = self._batching
        done, first, pos = 0, None, 0
        while pos < len(addrs):
            got, err = drv.unmap_many(addrs[pos:], pb)
            done, pos = done + got, pos + got
            if err is None:
                break
            first = first or err
            if not keep_going:
                break
            pos += 1
        self.unmap_calls += done
        return done, first

    def _take(self, g: int) -> None:
        if self.ref[g]:
            self.extra_refs += 1
        self.ref[g] += 1

    def _drop(self, g: int) -> bool:
        """One mapping of ``g`` fewer; True when it went back to the pool."""
        self.ref[g] -= 1
        if self.ref[g]:
            self.extra_refs -= 1
            return False
        self.pool.append(g)
        return True

    def _pop_tail(self, slot: int, count: int = 1) -> int:
        """Unmap the last ``count`` groups of ``slot`` in one batch; return those pooled again.

        All or nothing: on a driver failure the pages this call unmapped are
        mapped back (same physical pages, bytes kept) and the error raised.
        """
        lst = self.groups[slot]
        if count <= 0:
            return 0
        start = len(lst) - count
        addrs = self._page_addrs(slot, start, count)
        done, err = self._unmap(addrs)
        if err is not None:
            nl, h, tail = self.num_layers, self._handles, lst[start:]
            back = [
                (a, h[tail[n % count] * nl + n // count])
                for n, a in enumerate(addrs[:done].tolist())
            ]
            self.map_calls += self.driver.map_many(back, self.page_bytes)[0] if back else 0
            raise err
        freed = 0
        for _ in range(count):
            freed += self._drop(lst.pop())
        self.covered[slot] = self.cover(len(lst))
        return freed

    def grow(self, slot: int, n: int) -> int:
        """Map pool groups under ``slot`` until it covers ``n`` tokens; return groups mapped.

        The caller made sure the pool has them. A driver failure unmaps what
        this call mapped, puts those groups back in the pool and re-raises.
        """
        want = max(0, self.pages(n) - len(self.groups[slot]))
        if not want:
            return 0
        groups = [self.pool.pop() for _ in range(want)]
        done, err = self._map_pages(slot, len(self.groups[slot]), groups)
        self.publish(slot, groups, done)
        if err is not None:
            self._pop_tail(slot, done)
            raise err
        return want

    # Mapping ahead happens in three steps so that the driver calls run on the map-ahead
    # worker's thread: claim -> map_request, the worker maps, map_outcome -> publish.
    # Until published, claimed groups are in neither the pool nor any slot.

    def claim(self, slot: int, n: int) -> list[int]:
        """Take from the pool the groups ``slot`` lacks to cover ``n`` tokens (as many as are)."""
        want = min(max(0, self.pages(n) - len(self.groups[slot])), len(self.pool))
        return [self.pool.pop() for _ in range(want)]

    def publish(self, slot: int, groups: list[int], done: int) -> None:
        """Record the first ``done`` claimed groups as mapped under ``slot``; pool the rest."""
        lst = self.groups[slot]
        for g in groups[:done]:
            self.ref[g] = 1
            lst.append(g)
        self.pool.extend(reversed(groups[done:]))
        self.map_calls += done * self.num_layers
        self.covered[slot] = self.cover(len(lst))

    def shrink(self, slot: int, keep: int, count: int) -> int:
        """Unmap groups from the tail of ``slot`` until ``count`` went back to the pool.

        Never unmaps pages the first ``keep`` tokens need. Returns the groups
        given back to the pool (a shared group unmapped here stays mapped
        elsewhere).
        """
        lst, floor = self.groups[slot], self.pages(keep)
        tail = freed = 0
        while freed < count and len(lst) - tail > floor:
            tail += 1
            freed += self.ref[lst[-tail]] == 1  # the last mapping: it goes back to the pool
        return self._pop_tail(slot, tail)

    def clear(self, slot: int) -> None:
        """Unmap everything under ``slot``."""
        self._pop_tail(slot, len(self.groups[slot]))
        self.shared_below[slot] = 0

    def unshare(self, slot: int) -> None:
        """Unmap the first shared page of ``slot`` and every page after it."""
        lst = self.groups[slot]
        first = next((j for j, g in enumerate(lst) if self.ref[g] > 1), len(lst))
        self._pop_tail(slot, len(lst) - first)
        self.shared_below[slot] = 0

    def share(self, src: int, dst: int, n: int) -> None:
        """Map under the empty slot ``dst`` the groups ``src``'s first ``n`` tokens use."""
        lst = self.groups[dst]
        groups = self.groups[src][: self.pages(n)]
        done, err = self._map_pages(dst, 0, groups)
        for g in groups[:done]:
            self._take(g)
            lst.append(g)
        self.map_calls += done * self.num_layers
        self.covered[dst] = self.cover(len(lst))
        if err is not None:
            self._pop_tail(dst, len(lst))
            raise err
        bound = self._shared_bound(dst)
        self.shared_below[dst] = bound
        self.shared_below[src] = max(self.shared_below[src], bound)

    def _shared_bound(self, slot: int) -> int:
        """First token position after every shared page of ``slot``."""
        lst = self.groups[slot]
        last = max((j for j, g in enumerate(lst) if self.ref[g] > 1), default=-1)
        return -(-(last + 1) * self.page_bytes // self.token_bytes)

    def shared_pages(self, slot: int, start: int, end: int) -> list[int]:
        """The mapped pages of ``slot`` holding positions ``[start, end)`` that are shared."""
        if end <= start:
            return []
        lst = self.groups[slot]
        hi = min(len(lst), self.pages(end))
        return [j for j in range(self.page_of(start), hi) if self.ref[lst[j]] > 1]

    def cow(self, slot: int, pages: list[int]) -> None:
        """Give ``slot`` private copies of its shared ``pages`` (taking pool groups).

        Each copy saves the page, maps a pool group in its place and writes
        the saved bytes back, for every layer. A driver failure restores the
        pages already replaced and re-raises.
        """
        done: list[tuple[int, int]] = []  # (page, old group)
        try:
            for j in pages:
                old, new = self.groups[slot][j], self.pool[-1]
                self._replace(slot, j, old, new)
                self.pool.pop()
                self.ref[new] = 1
                self._drop(old)
                done.append((j, old))
        except DriverError:
            for j, old in reversed(done):
                new = self.groups[slot][j]
                with contextlib.suppress(DriverError):
                    self._replace(slot, j, new, old, copy=False)
                    self._take(old)
                    self._drop(new)
            raise
        finally:
            self.shared_below[slot] = self._shared_bound(slot)

    def _replace(self, slot: int, j: int, old: int, new: int, copy: bool = True) -> None:
        """Map group ``new`` where ``old`` is (page ``j``), keeping the bytes if ``copy``.

        Saves the page of every layer first, so that one device sync covers
        the reads and the unmaps. A driver failure maps ``old`` back.
        """
        drv, pb, nl, h = self.driver, self.page_bytes, self.num_layers, self._handles
        if drv.bookkeeping_only:
            self.unmap_calls += nl
            self.map_calls += nl
            self.groups[slot][j] = new
            return
        addrs = [self._addr(li, slot, j) for li in range(nl)]
        saved = [drv.tensor(a, pb).clone() for a in addrs] if copy else []
        self._synced = False  # the copies were queued after any earlier sync of this batch
        with self.unmapping():
            unmapped, err = self._unmap(addrs)
        if err is None:
            mapped, err = drv.map_many([(a, h[new * nl + li]) for li, a in enumerate(addrs)], pb)
            self.map_calls += mapped
            if err is not None:
                for a in addrs[:mapped]:  # never used by the device: no sync needed
                    with contextlib.suppress(DriverError):
                        drv.unmap(a, pb)
                        self.unmap_calls += 1
        if err is not None:
            back = [(a, h[old * nl + li]) for li, a in enumerate(addrs[:unmapped])]
            self.map_calls += drv.map_many(back, pb)[0]
            raise err
        for a, t in zip(addrs, saved, strict=False):
            drv.tensor(a, pb).copy_(t)
        self._synced = False
        self.groups[slot][j] = new

    def filled_tokens(self, rows: list[tuple[int, int]]) -> int:
        """Tokens of KV written, for ``(slot, tokens written)`` rows; shared pages count once."""
        if not self.extra_refs:
            return sum(n for _, n in rows)
        pb, tb = self.page_bytes, self.token_bytes
        written: dict[int, int] = {}  # group: bytes of it written
        for slot, n in rows:
            for j, g in enumerate(self.groups[slot][: self.pages(n)]):
                written[g] = max(written.get(g, 0), min(pb, n * tb - j * pb))
        return sum(written.values()) // tb

    # ------------------------------------------------------------- integrity
    def check(self) -> None:
        """Raise IntegrityError unless mappings, reference counts, pool and call counts agree."""
        refs = [0] * self.num_groups
        for slot, lst in enumerate(self.groups):
            for g in lst:
                refs[g] += 1
            if self.covered[slot] != self.cover(len(lst)):
                raise IntegrityError(f"slot {slot}: covered count out of date")
        for slot, lst in enumerate(self.groups):
            shared = [j for j, g in enumerate(lst) if refs[g] > 1]
            if shared and self.page_of(self.shared_below[slot] - 1) < shared[-1]:
                raise IntegrityError(f"slot {slot}: shared pages beyond its shared bound")
        if refs != self.ref:
            raise IntegrityError("group reference counts do not match the slot mappings")
        if sorted(self.pool) != [g for g, r in enumerate(refs) if r == 0]:
            raise IntegrityError("the pool is not exactly the unmapped groups")
        if self.extra_refs != sum(max(0, r - 1) for r in refs):
            raise IntegrityError("shared mapping count is off")
        if self.map_calls - self.unmap_calls != sum(refs) * self.num_layers:
            raise IntegrityError("map and unmap calls do not add up to the mapped pages")

    # ----------------------------------------------------------------- close
    def close(self, on_error: Callable[[DriverError], None] | None = None) -> None:
        """Unmap every page, release every page, free the range (idempotent).

        Keeps going after a driver error; ``on_error`` is told of each.
        """
        drv = self.driver

        def attempt(fn: Callable[..., object], *args: object) -> None:
            try:
                fn(*args)
            except DriverError as e:
                if on_error is not None:
                    on_error(e)

        each = not (drv.free_unmaps and self._range)  # else freeing the range unmaps them all
        with self.unmapping():
            for slot, lst in enumerate(self.groups):
                if each and lst:
                    err = self._unmap(self._page_addrs(slot, 0, len(lst)), keep_going=True)[1]
                    if err is not None and on_error is not None:
                        on_error(err)
                while lst:
                    self._drop(lst.pop())
                self.covered[slot] = 0
                self.shared_below[slot] = 0
        handles = [h for h in self._handles if h is not None]  # None: never created
        self._handles = []
        err = drv.release_many(handles) if handles else None
        if err is not None and on_error is not None:
            on_error(err)
        if self._range:
            self._range = False
            attempt(lambda: drv.free_range(self.base, self.virtual_bytes))
