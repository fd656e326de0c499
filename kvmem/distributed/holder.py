"""The rBlocks one rank holds, for any owner, and the attention it computes over them.

Each rBlock is one sequence of the rank's local allocator (any registered
backend), reserved to ``rblock_size`` slots once and never committed: the
owner tracks which slots hold KV. Its pages are looked up once with the
local ``layout``. A *view* lists, for one sequence (its ``handle``), the
rBlocks held here in position order; concatenated they form this rank's
local KV of that sequence::

    handle 7 here:  (blk 0, rb 3)   (blk 1, rb 4)   (blk 5, rb 9)        rblock_size R
    local index:    0 .. R-1        R .. 2R-1       2R .. 3R-1
    position:       0 .. R-1        R .. 2R-1       5R .. 6R-1

Positions held here that are <= p are always a prefix of the local index
range, so attention of a query at position p over this rank's part of the
sequence is a decode over the first ``visible(p)`` local slots; a chunk of
new tokens is one decode row per token (the causal mask across ranks).
Shared rBlocks (after ``fork``) carry a reference count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvmem import attention
from kvmem.allocator import KVAllocator
from kvmem.errors import DuplicateSequence, IntegrityError, InvalidArgument, UnknownSequence
from kvmem.layout import build_layout

#: LayerKV parts that have one entry per slot (fp8 scales are per layer, not copied)
_SLOT_PARTS = ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero")


@dataclass
class _View:
    """The rBlocks of one sequence held on this rank, sorted by block index."""

    idx: list[int] = field(default_factory=list)
    rbs: list[int] = field(default_factory=list)
    row: np.ndarray | None = None  # concatenated pages, cached

    def find(self, i: int) -> int:
        j = int(np.searchsorted(self.idx, i))
        if j == len(self.idx) or self.idx[j] != i:
            raise InvalidArgument(f"rBlock {i} is not held here")
        return j


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Holder:
    """The rBlocks this rank holds and the operations other ranks ask of them.

    Every method is atomic under ``lock``: it either completes or raises a
    KVError with nothing changed. Capacity accounting (the directory's free
    counts) is the caller's job; methods that release rBlocks return how
    many they released.
    """

    def __init__(self, local: KVAllocator, rblock_size: int, impl: str = "auto") -> None:
        self.local = local
        self.rblock_size = rblock_size
        self.page_size = local.page_size
        if rblock_size % self.page_size:
            raise InvalidArgument(
                f"rblock_size {rblock_size} must be a multiple of the local page size "
                f"{self.page_size}"
            )
        self.pages_per_block = rblock_size // self.page_size
        self.capacity_blocks = local.stats().capacity_tokens // rblock_size
        if self.capacity_blocks <= 0:
            raise InvalidArgument(
                f"the local capacity holds no rBlock of {rblock_size} tokens; raise num_tokens"
            )
        self.impl = impl
        self.device = local.device
        self.lock = threading.RLock()
        self._next_rb = 0
        self._pages: dict[int, np.ndarray] = {}
        self._refs: dict[int, int] = {}
        self._views: dict[int, _View] = {}

    # ------------------------------------------------------------ helpers
    @property
    def held_blocks(self) -> int:
        """rBlocks allocated on this rank (shared ones once)."""
        return len(self._pages)

    def handles(self) -> list[int]:
        """Sequences with rBlocks here."""
        return list(self._views)

    def view(self, handle: int) -> list[int]:
        """Block indices of ``handle`` held here, sorted ([] if none)."""
        v = self._views.get(handle)
        return list(v.idx) if v else []

    def row(self, handle: int) -> np.ndarray:
        """The pages of ``handle``'s rBlocks held here, concatenated in position order."""
        return self._row(self._views.get(handle, _View()))

    def lent_blocks(self, rank: int, handle_bits: int) -> int:
        """rBlocks held here for sequences owned by other ranks than ``rank``."""
        rbs = {rb for h, v in self._views.items() if h >> handle_bits != rank for rb in v.rbs}
        return len(rbs)

    def _get(self, handle: int) -> _View:
        v = self._views.get(handle)
        if v is None:
            raise UnknownSequence(f"no rBlocks of sequence handle {handle} are held here")
        return v

    def _new_block(self) -> int:
        rb = self._next_rb
        self.local.add(rb, [0])
        try:
            self.local.reserve(rb, self.rblock_size)
            lay = self.local.layout([(rb, self.rblock_size)])
        except BaseException:
            self.local.free(rb)
            raise
        pages = lay.kv_indices.cpu().numpy().astype(np.int64)
        if pages.shape[0] != self.pages_per_block:
            self.local.free(rb)
            raise IntegrityError(f"local layout gave {pages.shape[0]} pages for one rBlock")
        self._next_rb += 1
        self._pages[rb] = pages
        self._refs[rb] = 1
        return rb

    def _release(self, rb: int) -> int:
        self._refs[rb] -= 1
        if self._refs[rb]:
            return 0
        del self._refs[rb], self._pages[rb]
        self.local.free(rb)
        return 1

    def _row(self, v: _View) -> np.ndarray:
        if v.row is None:
            v.row = (
                np.concatenate([self._pages[rb] for rb in v.rbs]).astype(np.int32)
                if v.rbs
                else np.zeros(0, dtype=np.int32)
            )
        return v.row

    def _slots(self, rb: int, nslots: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = np.arange(nslots)
        page = torch.from_numpy(self._pages[rb][j // self.page_size]).to(self.device)
        off = torch.from_numpy(j % self.page_size).to(self.device)
        return page, off

    def _parts(self) -> list[tuple[int, str]]:
        out = []
        for i in range(self.local.spec.num_layers):
            layer = self.local.layer(i)
            for name in _SLOT_PARTS:
                t = getattr(layer, name)
                if t is not None and t.dim() >= 3:
                    out.append((i, name))
        return out

    # ------------------------------------------------------------ placement
    def place(self, handle: int, idxs: Sequence[int], parts: Sequence[torch.Tensor] = ()) -> None:
        """Allocate rBlocks for positions ``idxs`` of ``handle``; ``parts`` fills the first slots
        of a single new rBlock with KV read elsewhere (see :meth:`read`)."""
        with self.lock:
            v = self._views.get(handle) or _View()
            idxs = [int(i) for i in idxs]
            if len(set(idxs)) != len(idxs) or set(idxs) & set(v.idx):
                raise InvalidArgument(f"handle {handle}: rBlocks {idxs} are already held here")
            if parts and len(idxs) != 1:
                raise InvalidArgument("KV can be copied into one rBlock at a time")
            new: list[int] = []
            try:
                for _ in idxs:
                    new.append(self._new_block())
                if parts:
                    self._write_raw(new[0], parts)
            except BaseException:
                for rb in new:
                    self._release(rb)
                raise
            for i, rb in zip(idxs, new, strict=True):
                j = int(np.searchsorted(v.idx, i))
                v.idx.insert(j, i)
                v.rbs.insert(j, rb)
            v.row = None
            self._views[handle] = v

    def drop(self, handle: int, idxs: Sequence[int] | None = None) -> int:
        """Stop holding rBlocks ``idxs`` (all if None) of ``handle``; returns rBlocks released."""
        with self.lock:
            v = self._get(handle)
            targets = list(v.idx) if idxs is None else [int(i) for i in idxs]
            pos = [v.find(i) for i in targets]
            if len(set(pos)) != len(pos):
                raise InvalidArgument(f"handle {handle}: rBlock listed twice")
            released = 0
            for j in sorted(pos, reverse=True):
                released += self._release(v.rbs[j])
                del v.idx[j], v.rbs[j]
            v.row = None
            if not v.idx:
                del self._views[handle]
            return released

    def fork(self, parent: int, child: int, nblocks: int) -> None:
        """``child`` shares the rBlocks of ``parent`` with block index < ``nblocks``."""
        with self.lock:
            v = self._get(parent)
            if child in self._views:
                raise DuplicateSequence(f"handle {child} already has rBlocks here")
            k = int(np.searchsorted(v.idx, nblocks))
            if k == 0:
                return
            c = _View(v.idx[:k], v.rbs[:k])
            for rb in c.rbs:
                self._refs[rb] += 1
            self._views[child] = c

    def cow(self, handle: int, idx: int, nslots: int) -> int:
        """Copy-on-write: give ``handle`` a private copy of its rBlock ``idx`` (first ``nslots``
        slots of KV); returns rBlocks released (the old one, if no one else held it)."""
        with self.lock:
            v = self._get(handle)
            j = v.find(idx)
            old = v.rbs[j]
            new = self._new_block()
            try:
                self._write_raw(new, self._read_raw(old, nslots))
            except BaseException:
                self._release(new)
                raise
            v.rbs[j] = new
            v.row = None
            return self._release(old)

    def read(self, handle: int, idx: int, nslots: int) -> list[torch.Tensor]:
        """The stored KV (codes and per-slot scales, every layer) of the first ``nslots`` slots of
        rBlock ``idx`` of ``handle``, as CPU tensors."""
        with self.lock:
            v = self._get(handle)
            return [t.cpu() for t in self._read_raw(v.rbs[v.find(idx)], nslots)]

    def _read_raw(self, rb: int, nslots: int) -> list[torch.Tensor]:
        if not 0 <= nslots <= self.rblock_size:
            raise InvalidArgument(f"{nslots} slots is outside one rBlock")
        page, off = self._slots(rb, nslots)
        return [getattr(self.local.layer(i), n)[page, off].clone() for i, n in self._parts()]

    def _write_raw(self, rb: int, parts: Sequence[torch.Tensor]) -> None:
        names = self._parts()
        if len(parts) != len(names):
            raise InvalidArgument(f"expected {len(names)} KV parts, got {len(parts)}")
        nslots = int(parts[0].shape[0]) if parts else 0
        page, off = self._slots(rb, nslots)
        for (i, n), t in zip(names, parts, strict=True):
            dst = getattr(self.local.layer(i), n)
            if t.shape[1:] != dst.shape[2:] or t.dtype != dst.dtype:
                raise InvalidArgument(f"KV part {n} of layer {i} does not fit this rank's storage")
            dst[page, off] = t.to(dst.device)

    # ------------------------------------------------------------ attention
    def attend(
        self,
        layer_idx: int,
        seqs: Sequence[tuple[int, int, int]],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Write new KV held here and attend queries over this rank's part of each sequence.

        ``seqs`` lists ``(handle, p0, p1)``: the sequence's new tokens are
        positions ``[p0, p1)``. ``k``/``v`` hold, sequence after sequence,
        the rows of the new tokens whose rBlock is here (see
        :meth:`held_mask`); ``q`` the rows of every new token of every
        sequence.
        Returns ``(out, lse, seconds)`` for the rows of ``q``, both in float32
        (float64 for float64 queries); a query that sees no KV here gets
        output 0 and LSE -inf (it merges as nothing).
        """
        with self.lock:
            t0 = time.perf_counter()
            layer = self.local.layer(layer_idx)
            views = [self._views.get(h, _View()) for h, *_ in seqs]
            rows = [self._row(w) for w in views]
            width = max([len(r) for r in rows] + [1])
            table = np.zeros((len(seqs), width), dtype=np.int32)
            for i, r in enumerate(rows):
                table[i, : len(r)] = r
            self._write(layer, seqs, views, table, k, v)
            out, lse = self._attend(layer, seqs, views, table, q, scale)
            return out, lse, time.perf_counter() - t0

    def _held(self, idx: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index in ``idx`` of each position's block, whether that block is held here)."""
        blk = positions // self.rblock_size
        j = np.searchsorted(idx, blk)
        if not len(idx):
            return j, np.zeros(len(positions), dtype=bool)
        return j, (j < len(idx)) & (idx[np.minimum(j, len(idx) - 1)] == blk)

    def held_mask(self, handle: int, p0: int, p1: int) -> np.ndarray:
        """Which positions of ``[p0, p1)`` of ``handle`` lie in rBlocks held here."""
        v = self._views.get(handle, _View())
        return self._held(np.asarray(v.idx, dtype=np.int64), np.arange(p0, p1))[1]

    def _held_range(self, idx: np.ndarray, p0: int, p1: int) -> tuple[int, int]:
        pos = np.arange(p0, p1, dtype=np.int64)
        j, held = self._held(idx, pos)
        if not held.any():
            return 0, 0
        local = j[held] * self.rblock_size + pos[held] % self.rblock_size
        a, b = int(local[0]), int(local[-1]) + 1
        if b - a != int(held.sum()):
            raise IntegrityError("new tokens held here are not contiguous locally")
        return a, b

    def visible(self, handle: int, positions: np.ndarray) -> np.ndarray:
        """For each position, how many KV slots of ``handle`` held here are at or before it."""
        v = self._views.get(handle, _View())
        return self._visible(np.asarray(v.idx, dtype=np.int64), positions)

    def _visible(self, idx: np.ndarray, positions: np.ndarray) -> np.ndarray:
        j, held = self._held(idx, positions)
        return j * self.rblock_size + np.where(held, positions % self.rblock_size + 1, 0)

    def _write(
        self,
        layer: Any,
        seqs: Sequence[tuple[int, int, int]],
        views: list[_View],
        table: np.ndarray,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        rows, ends, counts = [], [], []
        for i, ((_, p0, p1), w) in enumerate(zip(seqs, views, strict=True)):
            a, b = self._held_range(np.asarray(w.idx, dtype=np.int64), p0, p1)
            if b > a:
                rows.append(i)
                ends.append(b)
                counts.append(b - a)
        if sum(counts) != k.shape[0] or k.shape != v.shape:
            raise InvalidArgument(
                f"got {k.shape[0]} new K/V rows, this rank holds {sum(counts)} of the new tokens"
            )
        if not rows:
            return
        lay = build_layout(
            self.page_size,
            table[rows],
            np.asarray(ends),
            np.asarray(counts),
            tuple(range(len(rows))),
            self.device,
            self.local.spec,
        )
        attention.write_kv(layer, lay, k.to(self.device), v.to(self.device), impl=self.impl)

    def _attend(
        self,
        layer: Any,
        seqs: Sequence[tuple[int, int, int]],
        views: list[_View],
        table: np.ndarray,
        q: torch.Tensor,
        scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        row_seq, row_len = [], []
        for i, ((_, p0, p1), w) in enumerate(zip(seqs, views, strict=True)):
            pos = np.arange(p0, p1, dtype=np.int64)
            row_seq.append(np.full(len(pos), i))
            row_len.append(self._visible(np.asarray(w.idx, dtype=np.int64), pos))
        n = sum(len(x) for x in row_seq)
        if q.shape[0] != n:
            raise InvalidArgument(f"got {q.shape[0]} query rows for {n} new tokens")
        wd = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(q.shape, dtype=wd, device=self.device)
        lse = torch.full(q.shape[:2], -torch.inf, dtype=wd, device=self.device)
        if n == 0:
            return out, lse
        seq_of = np.concatenate(row_seq)
        lens = np.concatenate(row_len)
        sel = np.nonzero(lens > 0)[0]
        if len(sel):
            lay = build_layout(
                self.page_size,
                table[seq_of[sel]],
                lens[sel],
                np.ones(len(sel), dtype=np.int32),
                tuple(range(len(sel))),
                self.device,
                self.local.spec,
            )
            idx = torch.from_numpy(sel).to(self.device)
            o, s = attention.decode(q.to(self.device)[idx], layer, lay, scale, impl=self.impl)
            out[idx] = o.to(wd)
            lse[idx] = s.to(wd)
        return out, lse

    # ------------------------------------------------------------ checking
    def check(self) -> None:
        """Raise IntegrityError if views, reference counts and the local allocator disagree."""
        with self.lock:
            refs: dict[int, int] = {}
            for h, v in self._views.items():
                if not v.idx or v.idx != sorted(set(v.idx)) or len(v.idx) != len(v.rbs):
                    raise IntegrityError(f"handle {h}: rBlock list out of order")
                for rb in v.rbs:
                    refs[rb] = refs.get(rb, 0) + 1
            if refs != self._refs:
                raise IntegrityError("rBlock reference counts do not match the views")
            if set(self.local.seq_ids()) != set(self._pages):
                raise IntegrityError("local allocator sequences differ from the rBlocks held")
            for rb in self._pages:
                if self.local.seq_info(rb).capacity < self.rblock_size:
                    raise IntegrityError(f"rBlock {rb} has fewer than {self.rblock_size} slots")
            self.local.check_integrity()

    # ------------------------------------------------------------ messages
    def handle(self, src: int, meta: Any, tensors: list[torch.Tensor]) -> tuple[Any, list]:
        """Serve one request from rank ``src`` (see :class:`ShardedAllocator` for the ops)."""
        op = meta[0]
        if op == "attend":
            _, layer_idx, scale, seqs = meta
            q, k, v = tensors
            out, lse, dt = self.attend(layer_idx, seqs, q, k, v, scale)
            return dt, [out, lse]
        if op == "place":
            self.place(meta[1], meta[2], tensors)
            return None, []
        if op == "drop":
            return self.drop(meta[1], meta[2]), []
        if op == "fork":
            self.fork(meta[1], meta[2], meta[3])
            return None, []
        if op == "cow":
            return self.cow(meta[1], meta[2], meta[3]), []
        if op == "read":
            return None, self.read(meta[1], meta[2], meta[3])
        if op == "views":
            with self.lock:
                return ({h: self.view(h) for h in meta[1]}, self.held_blocks), []
        if op == "check":
            self.check()
            return None, []
        raise InvalidArgument(f"unknown request {op!r} from rank {src}")


__all__ = ["Holder"]
