"""Virtual KV tensors and the physical pages mapped under them, slot by slot.

Every layer has one virtual tensor per *part*: ``k`` and ``v`` codes, and for
int4 one ``meta`` part holding ``k_scale, k_zero, v_scale, v_zero``. A part
is ``[max_seqs, max_seq_len, ...]``: row ``s`` is slot ``s``'s KV, contiguous
in virtual memory. Physical pages of ``page_bytes`` are mapped under a row
from its start, as far as the slot's KV reaches::

    layer 0, part k   slot 0 [ pg | pg | pg | -- | -- | ... ]   3 pages mapped
                      slot 1 [ pg | -- | -- | -- | -- | ... ]   1 page mapped
    layer 0, part v   slot 0 [ pg | pg | pg | -- | -- | ... ]
    ...               (-- is reserved address space that faults if touched)

All layers grow together, so physical pages are handed out in *groups*: one
page for every layer. Page ``j`` of part ``p`` of a slot is one group. A
slot's mapped state is, per part, the list of its groups; the tokens it
covers are what every part's mapped prefix holds.

``max_seq_len`` is rounded up so that every part's row is a whole number of
pages (pages never straddle slots, and each part is a plain contiguous
``[max_seqs, max_seq_len, ...]`` tensor).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from kvmem.backends.vmem.driver import PageHandle, VMemDriver
from kvmem.errors import DriverError
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV

__all__ = ["VirtualKV", "groups_for", "part_token_bytes", "round_seq_len"]


def _parts(spec: KVSpec) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, per-token shape) of each virtual tensor of a layer."""
    fmt = spec.fmt
    codes = (spec.num_kv_heads, spec.code_dim)
    parts = [("k", fmt.storage_dtype, codes), ("v", fmt.storage_dtype, codes)]
    if fmt.kind == "int4":
        parts.append(("meta", torch.float16, (4, spec.num_kv_heads, spec.num_groups)))
    return parts


def part_token_bytes(spec: KVSpec) -> list[int]:
    """Bytes one token takes in each part of one layer."""
    return [dt.itemsize * math.prod(shape) for _, dt, shape in _parts(spec)]


def groups_for(token_bytes: list[int], page_bytes: int, n: int) -> int:
    """Page groups one slot needs for ``n`` tokens, given each part's bytes per token."""
    return sum(-(-n * tb // page_bytes) for tb in token_bytes)


def round_seq_len(spec: KVSpec, max_seq_len: int, page_bytes: int) -> int:
    """The smallest length >= ``max_seq_len`` whose rows are whole pages in every part."""
    step = 1
    for tb in part_token_bytes(spec):
        q = page_bytes // math.gcd(page_bytes, tb)
        step = step * q // math.gcd(step, q)
    return -(-max_seq_len // step) * step


class VirtualKV:
    """The virtual tensors of every layer, the page-group pool, and per-slot mappings.

    Not thread-safe: the allocator serialises calls. ``on_map(n)`` and
    ``on_unmap(n)`` are told how many pages each call mapped or unmapped.
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
        self.token_bytes = part_token_bytes(spec)
        self.row_bytes = [max_seq_len * tb for tb in self.token_bytes]
        if any(rb % page_bytes for rb in self.row_bytes):
            raise ValueError("max_seq_len must be rounded with round_seq_len first")
        self.num_parts = len(self.token_bytes)
        layer_bytes = max_seqs * sum(self.row_bytes)
        self.virtual_bytes = layer_bytes * self.num_layers
        self.map_calls = 0
        self.unmap_calls = 0
        self._handles: list[PageHandle] = []
        self.base = 0
        self._reserved = False
        try:
            self.base = driver.reserve(self.virtual_bytes)
            self._reserved = True
            if not driver.bookkeeping_only:
                for _ in range(num_groups * self.num_layers):
                    self._handles.append(driver.create(page_bytes))
        except BaseException:
            self.close()
            raise
        self.num_groups = num_groups
        # part_base[li][p]: address of slot 0 of part p of layer li
        starts = [max_seqs * sum(self.row_bytes[:p]) for p in range(self.num_parts)]
        self.part_base = [
            [self.base + li * layer_bytes + st for st in starts] for li in range(self.num_layers)
        ]
        self.pool: list[int] = list(range(num_groups - 1, -1, -1))
        self.groups: list[list[list[int]]] = [
            [[] for _ in range(self.num_parts)] for _ in range(max_seqs)
        ]
        self.covered = [0] * max_seqs
        self.mapped_groups = 0
        self.fp8_scales = (
            torch.ones(spec.num_layers, 2, spec.num_kv_heads, dtype=torch.float32,
                       device=driver.device)
            if spec.fmt.kind == "fp8"
            else None
        )
        self.layers = [self._make_layer(li) for li in range(self.num_layers)]

    # -------------------------------------------------------------- geometry
    def pages(self, p: int, n: int) -> int:
        """Pages part ``p`` of a slot needs to hold ``n`` tokens."""
        return -(-n * self.token_bytes[p] // self.page_bytes)

    def groups_for(self, n: int) -> int:
        """Page groups a slot needs to hold ``n`` tokens (all parts)."""
        return groups_for(self.token_bytes, self.page_bytes, n)

    def cover(self, counts: list[int]) -> int:
        """Tokens a slot holding ``counts[p]`` pages of each part can store."""
        pb = self.page_bytes
        n = min(c * pb // tb for c, tb in zip(counts, self.token_bytes, strict=True))
        return min(n, self.max_seq_len)

    def _recover(self, slot: int) -> None:
        self.covered[slot] = self.cover([len(g) for g in self.groups[slot]])

    # ---------------------------------------------------------------- tensors
    def _make_layer(self, li: int) -> LayerKV:
        views: dict[str, torch.Tensor] = {}
        for p, (name, dtype, shape) in enumerate(_parts(self.spec)):
            raw = self.driver.tensor(self.part_base[li][p], self.max_seqs * self.row_bytes[p])
            views[name] = raw.view(dtype).view(self.max_seqs, self.max_seq_len, *shape)
        if "meta" in views:
            meta = views.pop("meta")
            for i, name in enumerate(("k_scale", "k_zero", "v_scale", "v_zero")):
                views[name] = meta[:, :, i]
        if self.fp8_scales is not None:
            views["k_scale"] = self.fp8_scales[li, 0]
            views["v_scale"] = self.fp8_scales[li, 1]
        return LayerKV(self.spec, self.max_seq_len, li, **views)

    def part_views(self, li: int, slot: int) -> list[torch.Tensor]:
        """Slot ``slot``'s row of every part of layer ``li`` (uint8, whole row)."""
        out = []
        for p, rb in enumerate(self.row_bytes):
            out.append(self.driver.tensor(self.part_base[li][p] + slot * rb, rb))
        return out

    def copy_tokens(self, src: int, dst: int, n: int) -> None:
        """Copy the first ``n`` tokens of every part of every layer from slot src to dst."""
        if n <= 0 or self.driver.bookkeeping_only:
            return
        for li in range(self.num_layers):
            pairs = zip(self.part_views(li, src), self.part_views(li, dst), strict=True)
            for p, (s, d) in enumerate(pairs):
                nb = n * self.token_bytes[p]
                d[:nb].copy_(s[:nb])

    # ---------------------------------------------------------------- mapping
    def _addr(self, li: int, p: int, slot: int, j: int) -> int:
        return self.part_base[li][p] + slot * self.row_bytes[p] + j * self.page_bytes

    def _map_group(self, slot: int, p: int, j: int, g: int) -> None:
        drv, pb, L = self.driver, self.page_bytes, self.num_layers
        if drv.bookkeeping_only:
            self.map_calls += L
            return
        done = 0
        try:
            for li in range(L):
                drv.map(self._addr(li, p, slot, j), pb, self._handles[g * L + li])
                done += 1
        except DriverError:
            for li in range(done):
                with contextlib.suppress(DriverError):
                    drv.unmap(self._addr(li, p, slot, j), pb)
            self.map_calls += done
            self.unmap_calls += done
            raise
        self.map_calls += L

    def _unmap_group(self, slot: int, p: int, j: int) -> None:
        drv, pb, L = self.driver, self.page_bytes, self.num_layers
        if not drv.bookkeeping_only:
            for li in range(L):
                drv.unmap(self._addr(li, p, slot, j), pb)
        self.unmap_calls += L

    def grow(self, slot: int, n: int, budget: int | None = None) -> int:
        """Map pool groups under ``slot`` until it covers ``n`` tokens; return groups mapped.

        Maps the part that covers least first, one group at a time, taking at
        most ``budget`` groups (default: as many as needed; the caller made
        sure the pool has them). A driver failure unmaps what this call
        mapped, puts those groups back in the pool and re-raises.
        """
        lists = self.groups[slot]
        want = [max(0, self.pages(p, n) - len(lists[p])) for p in range(self.num_parts)]
        total = sum(want)
        if budget is not None:
            total = min(total, budget, len(self.pool))
        done: list[tuple[int, int]] = []
        try:
            while len(done) < total:
                p = self._least_covered(lists, want)
                g = self.pool.pop()
                try:
                    self._map_group(slot, p, len(lists[p]), g)
                except DriverError:
                    self.pool.append(g)
                    raise
                lists[p].append(g)
                want[p] -= 1
                done.append((p, g))
        except DriverError:
            for p, _ in reversed(done):
                self._unmap_group(slot, p, len(lists[p]) - 1)
                self.pool.append(lists[p].pop())
            self._recover(slot)
            raise
        self.mapped_groups += len(done)
        self._recover(slot)
        return len(done)

    def _least_covered(self, lists: list[list[int]], want: list[int]) -> int:
        pb = self.page_bytes
        best, best_cov = -1, 0
        for p, tb in enumerate(self.token_bytes):
            if want[p] > 0:
                cov = len(lists[p]) * pb // tb
                if best < 0 or cov < best_cov:
                    best, best_cov = p, cov
        return best

    def shrink(self, slot: int, keep: int, count: int) -> int:
        """Unmap up to ``count`` groups from the tail of ``slot``, never below ``keep`` tokens.

        Unmaps the part that covers most first. Returns the groups given
        back to the pool.
        """
        lists = self.groups[slot]
        floor = [self.pages(p, keep) for p in range(self.num_parts)]
        freed = 0
        pb = self.page_bytes
        try:
            while freed < count:
                p, best_cov = -1, -1
                for q, tb in enumerate(self.token_bytes):
                    if len(lists[q]) > floor[q]:
                        cov = len(lists[q]) * pb // tb
                        if cov > best_cov:
                            p, best_cov = q, cov
                if p < 0:
                    break
                self._unmap_group(slot, p, len(lists[p]) - 1)
                self.pool.append(lists[p].pop())
                freed += 1
        finally:
            self.mapped_groups -= freed
            self._recover(slot)
        return freed

    def slot_groups(self, slot: int) -> int:
        """Groups mapped under ``slot``."""
        return sum(len(g) for g in self.groups[slot])

    # ----------------------------------------------------------------- close
    def close(self, on_error: Callable[[DriverError], None] | None = None) -> None:
        """Unmap every page, release every page, free the range (idempotent).

        Keeps going after a driver error; ``on_error`` is told of each.
        """
        drv = self.driver

        def attempt(fn: Callable[[], None]) -> None:
            try:
                fn()
            except DriverError as e:
                if on_error is not None:
                    on_error(e)

        for slot in range(self.max_seqs if hasattr(self, "groups") else 0):
            for p, lst in enumerate(self.groups[slot]):
                for j in range(len(lst) - 1, -1, -1):
                    attempt(lambda p=p, j=j, slot=slot: self._unmap_group(slot, p, j))
                    self.pool.append(lst.pop())
            self.covered[slot] = 0
        self.mapped_groups = 0
        while self._handles:
            h = self._handles.pop()
            attempt(lambda h=h: drv.release(h))
        if self._reserved:
            self._reserved = False
            attempt(lambda: drv.free_range(self.base, self.virtual_bytes))
