"""The small virtual-memory driver interface the vmem allocator is built on.

A driver manages two kinds of object, as the CUDA VMM API does::

    virtual range   reserve(size) -> addr ... free_range(addr, size)
                    [ addr .................................. addr+size )
                      |page|page|    |page|     (unmapped parts fault)
                        ^    ^         ^
    physical page   create(size) -> handle ... release(handle)
                    map(addr, size, handle) / unmap(addr, size)

Addresses and sizes are in bytes and must be multiples of ``granularity``.
``unmap`` does not wait for the device: callers call ``synchronize`` once
before a batch of unmaps of pages the device may still be using.
``tensor(addr, size)`` views a piece of a range as a uint8 torch tensor
without a copy; reading or writing an unmapped part of it faults (SIGSEGV on
the host, an illegal-address error on a GPU), so callers touch only what is
mapped. Every failure raises :class:`~kvmem.errors.DriverError` carrying the
driver's own message.

Implementations: :class:`~kvmem.backends.vmem.host.HostDriver` (memfd and
mmap, ``device="cpu"``), :class:`~kvmem.backends.vmem.cuda.CudaDriver`
(cuda-python VMM, ``device="cuda"``) and :class:`MetaDriver` (bookkeeping
only, ``device="meta"``); :func:`~kvmem.backends.vmem.drivers.make_driver`
picks one. This module imports none of the implementations: they import it.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from kvmem.errors import DriverError, InvalidArgument

#: A physical page as the driver names it (a file offset, a CUDA handle, ...).
PageHandle = Any
#: Pages to map: ``(addr, handle)`` pairs, or an int64 array of such rows.
Pages = Sequence[tuple[int, PageHandle]] | np.ndarray
#: A map job's outcome: (ticket, pages mapped, the error that stopped it or None).
MapResult = tuple[int, int, DriverError | None]

__all__ = ["MapResult", "MapWorker", "MetaDriver", "PageHandle", "Pages", "VMemDriver"]


class MapWorker(Protocol):
    """Runs ``driver.map_many(pages, size)`` jobs in order, off the caller's thread."""

    def start(self) -> None:
        """Start the thread, if it does not run yet (submit starts it too)."""
        ...

    def submit(self, pages: Pages, size: int) -> int:
        """Queue a job; returns its ticket (tickets count up from 1)."""
        ...

    def poll(self) -> list[MapResult]:
        """The results of the jobs finished since the last poll, in ticket order."""
        ...

    def wait(self, ticket: int = 0, timeout: float | None = None) -> bool:
        """Block until job ``ticket`` (every job, for 0) is finished; False on timeout."""
        ...

    def close(self) -> None:
        """Finish the queued jobs and stop the thread."""
        ...

    @property
    def running(self) -> bool:
        """Its thread runs (until :meth:`close`)."""
        ...


class VMemDriver(ABC):
    """Reserve virtual ranges, create physical pages, map pages into ranges."""

    #: Short name ("host", "cuda", "meta").
    name: str = "?"
    #: The torch device that :meth:`tensor` views live on.
    device: torch.device
    #: True when nothing is really mapped (tensors are meta tensors).
    bookkeeping_only: bool = False
    #: Upper bound on live mappings the driver can hold, None when unbounded.
    max_mappings: int | None = None
    #: True when ``free_range`` also removes the pages mapped in the range.
    free_unmaps: bool = False
    #: True when :meth:`map_many` also takes an int64 numpy array of ``(addr, handle)`` rows
    #: (handles are ints): callers then build it without a Python loop.
    array_pages: bool = False

    @property
    @abstractmethod
    def granularity(self) -> int:
        """Smallest page size in bytes; page sizes and addresses are multiples of it."""

    @abstractmethod
    def reserve(self, size: int) -> int:
        """Reserve ``size`` bytes of address space, nothing mapped; return its address."""

    @abstractmethod
    def free_range(self, addr: int, size: int) -> None:
        """Give back a range from :meth:`reserve` (its pages must be unmapped first)."""

    @abstractmethod
    def create(self, size: int) -> PageHandle:
        """Create one physical page of ``size`` bytes."""

    @abstractmethod
    def release(self, handle: PageHandle) -> None:
        """Destroy a physical page (it must not be mapped anywhere)."""

    def create_many(self, count: int, size: int) -> list[PageHandle]:
        """Create ``count`` pages of ``size`` bytes (all or none: created ones are released)."""
        out: list[PageHandle] = []
        try:
            for _ in range(count):
                out.append(self.create(size))
        except BaseException:
            self.release_many(out)
            raise
        return out

    def release_many(self, handles: Sequence[PageHandle]) -> DriverError | None:
        """Release every page of ``handles``, going on after failures; return the first error."""
        first: DriverError | None = None
        for h in handles:
            try:
                self.release(h)
            except DriverError as e:
                first = first or e
        return first

    @abstractmethod
    def map(self, addr: int, size: int, handle: PageHandle) -> None:
        """Map a page at ``addr`` (inside a reserved range), readable and writable."""

    def map_many(self, pages: Pages, size: int) -> tuple[int, DriverError | None]:
        """Map each ``(addr, handle)`` in order, stopping at the first failure.

        Returns how many were mapped and the error that stopped it (None if
        all were). Drivers override it to cut per-call overhead.
        """
        for i, (addr, handle) in enumerate(pages):
            try:
                self.map(addr, size, handle)
            except DriverError as e:
                return i, e
        return len(pages), None

    def map_worker(self) -> MapWorker | None:
        """A worker of the driver's own that maps off the GIL, or None (the default): the
        allocator's map-ahead then calls :meth:`map_many` on a Python thread."""
        return None

    @abstractmethod
    def unmap(self, addr: int, size: int) -> None:
        """Unmap ``[addr, addr + size)``; the addresses stay reserved and fault on access.

        Does not wait for the device: call :meth:`synchronize` first when work
        queued on it may still touch the page (once for a batch of unmaps).
        """

    def unmap_many(
        self, addrs: Sequence[int] | np.ndarray, size: int
    ) -> tuple[int, DriverError | None]:
        """Unmap the page at each address in order, stopping at the first failure.

        Returns how many were unmapped and the error that stopped it (None if
        all were). Does not synchronize; drivers override it to cut per-call
        overhead.
        """
        for i, addr in enumerate(addrs):
            try:
                self.unmap(addr, size)
            except DriverError as e:
                return i, e
        return len(addrs), None

    def synchronize(self) -> None:  # noqa: B027 - optional hook, nothing to wait for by default
        """Wait until the device has finished the work queued on it (kernels, copies).

        After it, pages the device used may be unmapped. The host driver has
        no queue: nothing to wait for.
        """

    @abstractmethod
    def tensor(self, addr: int, size: int) -> torch.Tensor:
        """A uint8 tensor over ``[addr, addr + size)``, sharing the memory (no copy)."""

    def allocated_bytes(self) -> int | None:
        """Physical bytes the driver currently holds, where it can tell (else None)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the driver itself holds (call after every page and range is given back)."""

    def check_page_size(self, page_bytes: int) -> int:
        """``page_bytes`` if a positive multiple of :attr:`granularity`, else InvalidArgument."""
        g = self.granularity
        if isinstance(page_bytes, bool) or not isinstance(page_bytes, int) or page_bytes <= 0:
            raise InvalidArgument(f"page_bytes must be a positive int, got {page_bytes!r}")
        if page_bytes % g:
            raise InvalidArgument(
                f"page_bytes {page_bytes} is not a multiple of the {self.name} driver's "
                f"page granularity {g}"
            )
        return page_bytes


class MetaDriver(VMemDriver):
    """Bookkeeping only: addresses and handles are numbers, tensors are meta tensors.

    Lets benchmarks run the real allocator logic on pools far larger than
    the machine (``device="meta"``); nothing can be read or written.
    """

    name = "meta"
    bookkeeping_only = True
    free_unmaps = True

    def __init__(self, granularity: int = 4096) -> None:
        self.device = torch.device("meta")
        self._granularity = granularity
        self._next_addr = granularity
        self._ids = itertools.count()

    @property
    def granularity(self) -> int:
        """Nominal page granularity (4 KiB unless given)."""
        return self._granularity

    def reserve(self, size: int) -> int:
        """A fresh fake address."""
        addr = self._next_addr
        self._next_addr += size + self._granularity
        return addr

    def free_range(self, addr: int, size: int) -> None:
        """Nothing to give back."""

    def create(self, size: int) -> int:
        """A fresh page number."""
        return next(self._ids)

    def release(self, handle: PageHandle) -> None:
        """Nothing to release."""

    def map(self, addr: int, size: int, handle: PageHandle) -> None:
        """Nothing to map."""

    def unmap(self, addr: int, size: int) -> None:
        """Nothing to unmap."""

    def tensor(self, addr: int, size: int) -> torch.Tensor:
        """A meta tensor of ``size`` bytes."""
        return torch.empty(size, dtype=torch.uint8, device="meta")
