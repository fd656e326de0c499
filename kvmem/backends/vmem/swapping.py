"""Swap for the vmem allocator: a sequence's KV to a host tensor and back, one copy per layer.

::

    swap_out:  slot row, every layer  --copy_out-->  HostKV   then the slot is given back
               (held until the copy is done)                  (pages stay mapped there)
    swap_in:   take a slot, map the reservation  --copy_in-->  the row; HostKV dropped

The copies run on the swap manager's worker thread (CPU) or stream (CUDA).
Until a copy is done the sequence keeps what it holds, and calls naming it
wait for the copy; a copy that fails leaves the sequence where it was.
:class:`SwapMixin` holds the operations; the allocator provides the slots,
the lock and the accounting they use (:class:`SwapHost`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Protocol

import torch

from kvmem.allocator import SwapHandle, check_seq_ids
from kvmem.backends.vmem.hostkv import HostKV, copy_in, copy_out
from kvmem.backends.vmem.mapahead import MapAhead
from kvmem.backends.vmem.seq import VSeq
from kvmem.backends.vmem.space import VirtualKV
from kvmem.errors import InvalidArgument, KVError, OutOfHostMemory, OutOfKVMemory
from kvmem.swap.manager import SwapManager

__all__ = ["SwapHost", "SwapMixin"]


class SwapHost(Protocol):
    """What :class:`SwapMixin` needs from the allocator it is mixed into."""

    space: VirtualKV
    device: torch.device
    map_ahead: bool
    host_num_tokens: int
    _closed: bool
    _lock: threading.Lock
    _free_slots: OrderedDict[int, None]
    _mapper: MapAhead
    _swapper: SwapManager
    _swap_counts: dict[str, int]
    _host_tokens: int

    def _get(self, seq_id: Hashable) -> VSeq: ...
    def _held(self) -> int: ...
    def _make_room(self, groups: int, slots: int) -> None: ...
    def _take_slot(self, s: VSeq) -> None: ...
    def _release_slot(self, s: VSeq) -> None: ...
    def _drop_host(self, s: VSeq) -> None: ...
    def _swap_ids(self, seq_ids: Iterable[Hashable]) -> list[Hashable]: ...
    def _swapped_out(self, seqs: list[VSeq], err: BaseException | None) -> None: ...
    def _swapped_in(self, seqs: list[VSeq], err: BaseException | None) -> None: ...


class SwapMixin:
    """``swap_out`` and ``swap_in`` of :class:`~kvmem.backends.vmem.VMemAllocator`."""

    def swap_out(self: SwapHost, seq_ids: Iterable[Hashable]) -> SwapHandle:
        """Copy the sequences' KV to host memory and give back their slots and pages.

        One contiguous copy per layer per sequence. All or nothing: raises
        UnknownSequence, InvalidArgument (a sequence already swapped out, or
        named twice) or OutOfHostMemory (beyond ``host_num_tokens``) and
        changes nothing. The reservation is kept (``seq_info().capacity``)
        and taken again by ``swap_in``. The slot and its groups stay held
        until the copy is done; a copy that fails leaves the sequences
        resident, as they were.
        """
        ids = self._swap_ids(seq_ids)
        seqs = [self._get(sid) for sid in ids]
        for sid, s in zip(ids, seqs, strict=True):
            if s.swapped:
                raise InvalidArgument(f"sequence {sid!r} is already swapped out")
        want = sum(s.num_computed for s in seqs)
        if self._host_tokens + want > self.host_num_tokens:
            raise OutOfHostMemory(
                f"swap-out of {want} KV entries: {self.host_num_tokens - self._host_tokens} "
                f"of the {self.host_num_tokens} host entries are free"
            )
        sp = self.space
        hosts = [HostKV(sp.num_layers, s.num_computed, sp.token_bytes, self.device) for s in seqs]
        for s, h in zip(seqs, hosts, strict=True):
            s.host = h
            s.swapped = True
            self._host_tokens += h.tokens
        work = [(s.slot, h) for s, h in zip(seqs, hosts, strict=True) if h.tokens]
        rows = sp.rows

        def run() -> None:
            for slot, h in work:
                copy_out(rows, slot, h)

        nbytes = sum(h.nbytes for h in hosts)
        copies = len(work) * sp.num_layers
        t = self._swapper.submit(run, lambda err: self._swapped_out(seqs, err), nbytes, copies)
        self._swap_counts["swap_out_bytes"] += nbytes
        self._swap_counts["swap_copies"] += copies
        for s in seqs:
            s.transfer = t
        return t

    def _swapped_out(self: SwapHost, seqs: list[VSeq], err: BaseException | None) -> None:
        with self._lock:
            for s in seqs:
                s.transfer = None
                if err is None:
                    self._release_slot(s)
                else:  # back where it was
                    self._drop_host(s)
                    s.swapped = False

    def swap_in(self: SwapHost, seq_ids: Iterable[Hashable]) -> SwapHandle:
        """Take a slot for each swapped-out sequence, map its reservation, copy its KV back.

        All or nothing: raises UnknownSequence, InvalidArgument (a sequence
        not swapped out, or named twice) or OutOfKVMemory (not enough free
        page groups or slots for every reservation; waits for in-flight
        swap-outs first) and changes nothing: the sequences stay on the host,
        intact. The sequences can be used at once; calls that need their KV
        wait for the copy. The host copy is dropped once the copy is done
        (no reuse across turns in this backend).
        """
        ids = self._swap_ids(seq_ids)
        seqs = [self._get(sid) for sid in ids]
        for sid, s in zip(ids, seqs, strict=True):
            if not s.swapped:
                raise InvalidArgument(f"sequence {sid!r} is not swapped out")
        sp = self.space
        mapped = [s for s in seqs if s.reserved]
        need = sum(sp.pages(s.reserved) for s in mapped)
        self._make_room(need, len(mapped))
        with self._lock:
            free = sp.num_groups - self._held()
            if need > free or len(mapped) > len(self._free_slots):
                raise OutOfKVMemory(
                    f"swap-in needs {need} page groups and {len(mapped)} slots; "
                    f"{free} and {len(self._free_slots)} are free"
                )
            done: list[VSeq] = []
            try:
                for s in mapped:
                    self._take_slot(s)
                    done.append(s)
            except BaseException:
                for s in done:
                    self._release_slot(s)
                raise
        for s in seqs:
            s.swapped = False
        work = [(s.slot, s.host) for s in mapped if s.host is not None and s.host.tokens]
        rows = sp.rows

        def run() -> None:
            for slot, h in work:
                copy_in(rows, slot, h)

        nbytes = sum(h.nbytes for _, h in work)
        copies = len(work) * sp.num_layers
        t = self._swapper.submit(run, lambda err: self._swapped_in(seqs, err), nbytes, copies)
        self._swap_counts["swap_in_bytes"] += nbytes
        self._swap_counts["swap_copies"] += copies
        for s in seqs:
            s.transfer = t
        if self.map_ahead:
            for s in mapped:
                self._mapper.want(s.slot, s.reserved)
            self._mapper.wake()
        return t

    def _swapped_in(self: SwapHost, seqs: list[VSeq], err: BaseException | None) -> None:
        with self._lock:
            for s in seqs:
                s.transfer = None
                if err is None:
                    self._drop_host(s)
                else:  # back on the host, as it was
                    self._release_slot(s)
                    s.swapped = True

    def _drop_host(self: SwapHost, s: VSeq) -> None:
        if s.host is not None:
            self._host_tokens -= s.host.tokens
            s.host = None

    def _swap_ids(self: SwapHost, seq_ids: Iterable[Hashable]) -> list[Hashable]:
        if self._closed:
            raise KVError("allocator is closed")
        return check_seq_ids(seq_ids)
