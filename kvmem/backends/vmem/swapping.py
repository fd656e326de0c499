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
from collections.abc import Hashable
from typing import Protocol

import torch

from kvmem.allocator import SwapHandle
from kvmem.backends.vmem.hostkv import HostKV, copy_in, copy_out
from kvmem.backends.vmem.mapahead import MapAhead
from kvmem.backends.vmem.seq import VSeq
from kvmem.backends.vmem.space import VirtualKV
from kvmem.errors import IntegrityError, InvalidArgument, OutOfHostMemory, OutOfKVMemory
from kvmem.swap.manager import SwapManager

__all__ = ["SwapHost", "SwapMixin"]


class SwapHost(Protocol):
    """What :class:`SwapMixin` needs from the allocator it is mixed into."""

    space: VirtualKV
    device: torch.device
    _seqs: dict[Hashable, VSeq]
    map_ahead: bool
    host_num_tokens: int
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
    def _swapped_out(self, seqs: list[VSeq], err: BaseException | None) -> None: ...
    def _swapped_in(self, seqs: list[VSeq], err: BaseException | None) -> None: ...


class SwapMixin:
    """The swap hooks of :class:`~kvmem.backends.vmem.VMemAllocator`, and its host accounting.

    :class:`~kvmem.backends.base.KVBackend` checks the capability, that the
    allocator is open and that the ids are distinct before it calls them.
    """

    host_num_tokens: int
    _host_tokens: int
    _swapper: SwapManager
    _swap_counts: dict[str, int]

    def _init_swap(self: SwapHost, host_num_tokens: int | None, default: int) -> None:
        """The host budget (``host_num_tokens``, else ``default``) and the swap manager."""
        self.host_num_tokens = host_num_tokens if host_num_tokens is not None else default
        self._host_tokens = 0  # KV entries in host copies
        self._swapper = SwapManager(self.device)
        self._swap_counts = {"swap_out_bytes": 0, "swap_in_bytes": 0, "swap_copies": 0}

    def _make_room(self: SwapHost, groups: int, slots: int) -> None:
        """Wait for in-flight swaps (oldest first) until ``groups`` and ``slots`` are free."""
        sw = self._swapper
        sw.reap()
        while (t := sw.oldest()) is not None and (
            groups > self.space.num_groups - self._held() or slots > len(self._free_slots)
        ):
            sw.settle(t)

    def _swap_extra(self: SwapHost) -> dict[str, float]:
        """The host side and the swap counters, for ``stats().extra``."""
        return {
            "host_capacity_tokens": self.host_num_tokens,
            "host_used_tokens": self._host_tokens,
            "swaps_in_flight": self._swapper.pending,
            **self._swap_counts,
        }

    def _check_host(self: SwapHost) -> None:
        """(Lock held.) Host copies match the swapped sequences and add up to the total."""
        total = 0
        for sid, s in self._seqs.items():
            # a swap-in in flight is resident and keeps its host copy until the copy lands
            if s.swapped != (s.host is not None) and not (s.transfer is not None and not s.swapped):
                raise IntegrityError(f"{sid!r}: swapped state and host copy disagree")
            if s.host is not None:
                total += s.host.tokens
                if s.host.tokens != s.num_computed:
                    raise IntegrityError(f"{sid!r}: host copy does not cover its KV")
        if total != self._host_tokens or total > self.host_num_tokens:
            raise IntegrityError("host KV total is off")

    def _start_swap_out(self: SwapHost, ids: list[Hashable]) -> SwapHandle:
        """``swap_out``: copy the sequences' KV to host memory, give back their slots and pages.

        One contiguous copy per layer per sequence. All or nothing: raises
        UnknownSequence, InvalidArgument (a sequence already swapped out, or
        named twice) or OutOfHostMemory (beyond ``host_num_tokens``) and
        changes nothing. The reservation is kept (``seq_info().capacity``)
        and taken again by ``swap_in``. The slot and its groups stay held
        until the copy is done; a copy that fails leaves the sequences
        resident, as they were.
        """
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

    def _start_swap_in(self: SwapHost, ids: list[Hashable]) -> SwapHandle:
        """``swap_in``: take a slot per sequence, map its reservation, copy its KV back.

        All or nothing: raises UnknownSequence, InvalidArgument (a sequence
        not swapped out, or named twice) or OutOfKVMemory (not enough free
        page groups or slots for every reservation; waits for in-flight
        swap-outs first) and changes nothing: the sequences stay on the host,
        intact. The sequences can be used at once; calls that need their KV
        wait for the copy. The host copy is dropped once the copy is done
        (no reuse across turns in this backend).
        """
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
