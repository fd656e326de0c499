"""Host memory for swapped KV: pages laid out exactly as in the device pool.

A :class:`HostPagePool` has one buffer per device buffer of the
:class:`~kvmem.storage.PagePool` it mirrors, with the same row size, so a
host page and a device page are byte-for-byte the same thing and a run of
consecutive pages on both sides is one ``copy_`` per buffer::

    device buffer  [num_pages,      row_bytes]   ("block": 1 buffer, "layer": 1 per layer)
    host buffer    [num_host_pages, row_bytes]   (same count, same row_bytes; pinned on CUDA)

Pages are handed out as few runs as possible (the page right after a given
one when it is free, else the smallest free run that fits, else the largest
runs first), because host runs bound device-host copy runs as much as the
device side does.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from kvmem.errors import InvalidArgument, OutOfHostMemory
from kvmem.storage import PagePool


def free_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the runs of True in a bool vector, in address order."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2]
    return starts, ends - starts


class HostPagePool:
    """``num_pages`` host pages mirroring ``pool``'s buffers (pinned where CUDA is used).

    ``pin=None`` pins when ``pool`` lives on a CUDA device. Allocation is
    all-or-nothing: :meth:`alloc` raises :class:`OutOfHostMemory` and takes
    nothing when it cannot give every page asked for.
    """

    def __init__(self, pool: PagePool, num_pages: int, pin: bool | None = None) -> None:
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages <= 0:
            raise InvalidArgument(f"a host pool needs a positive page count, got {num_pages!r}")
        if pin is None:
            pin = pool.device.type == "cuda" and torch.cuda.is_available()
        self.num_pages = num_pages
        self.layer_bytes = pool.layer_bytes
        self.page_bytes = pool.page_bytes
        self.pinned = bool(pin)
        self.buffers: list[torch.Tensor] = [
            torch.empty(num_pages, b.shape[1], dtype=torch.uint8, pin_memory=self.pinned)
            for b in pool.buffers
        ]
        self._free = np.ones(num_pages, dtype=bool)
        self.num_free = num_pages

    @property
    def nbytes(self) -> int:
        """Bytes of every page of the host pool."""
        return self.page_bytes * self.num_pages

    def is_free(self, page: int) -> bool:
        """Whether host page ``page`` is unallocated."""
        return bool(self._free[page])

    def alloc(self, n: int, after: int | None = None) -> list[int]:
        """``n`` free pages in as few runs as possible, preferring to continue after ``after``."""
        if n <= 0:
            return []
        if n > self.num_free:
            raise OutOfHostMemory(f"host pool: {n} pages wanted, {self.num_free} free")
        if (
            after is not None
            and after + 1 + n <= self.num_pages
            and self._free[after + 1 : after + 1 + n].all()
        ):
            pages = list(range(after + 1, after + 1 + n))
        else:
            starts, lens = free_runs(self._free)
            fits = np.flatnonzero(lens >= n)
            if len(fits):
                best = fits[np.argmin(lens[fits])]
                pages = list(range(int(starts[best]), int(starts[best]) + n))
            else:
                pages = []
                for i in np.argsort(-lens, kind="stable"):
                    take = min(n - len(pages), int(lens[i]))
                    pages.extend(range(int(starts[i]), int(starts[i]) + take))
                    if len(pages) == n:
                        break
        self._free[pages] = False
        self.num_free -= n
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Give pages back; freeing a page that is free raises InvalidArgument (nothing changed)."""
        idx = np.fromiter(pages, dtype=np.int64)
        if len(idx) == 0:
            return
        if self._free[idx].any() or len(np.unique(idx)) != len(idx):
            raise InvalidArgument("host pages freed twice")
        self._free[idx] = True
        self.num_free += len(idx)

    def free_mask(self) -> np.ndarray:
        """A copy of the free map (True = free), for integrity checks."""
        return self._free.copy()


__all__ = ["HostPagePool", "free_runs"]
