"""Copy plans: which pages move where, and how many copy calls that takes.

A swap moves page ``src[i]`` of one set of buffers to page ``dst[i]`` of
another (device to host or back). :func:`page_runs` folds the pairs into
runs, consecutive on both sides::

    src  12 13 14 15  40 41   7        runs (src, dst, len)
    dst   0  1  2  3   4  5   6   ->   (12, 0, 4), (40, 4, 2), (7, 6, 1)

Two ways to execute a plan (``mode``):

``"runs"``
    one copy per run per buffer. With the block-major pool (one
    buffer, all layers of a page in one row) a run of any length is a
    single copy covering every layer.
``"per_block"``
    one copy per page per layer, as vLLM 0.x did (its swap issued one
    cudaMemcpyAsync per block per layer): the baseline of the swap benchmark.

Either way the copies of one buffer pair go to :func:`kvmem.native.copy_segments`
in one call (a C++ loop of memcpy, or one ``cudaMemcpyBatchAsync`` on the
current stream; a loop of ``copy_`` when the extension is not in use), so a
copy costs its bytes and not a Python call each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from kvmem.errors import InvalidArgument
from kvmem.native import copy_segments, runs_to_segments

CopyMode = Literal["runs", "per_block"]
COPY_MODES: tuple[CopyMode, ...] = ("runs", "per_block")


def page_runs(src: Sequence[int], dst: Sequence[int]) -> np.ndarray:
    """int64 ``[R, 3]`` rows ``(src_start, dst_start, length)`` covering the pairs in order."""
    if len(src) != len(dst):
        raise InvalidArgument(f"{len(src)} source pages for {len(dst)} destination pages")
    if not len(src):
        return np.zeros((0, 3), dtype=np.int64)
    s = np.asarray(src, dtype=np.int64)
    d = np.asarray(dst, dtype=np.int64)
    brk = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    starts = np.concatenate(([0], brk))
    lens = np.diff(np.concatenate((starts, [len(s)])))
    return np.stack([s[starts], d[starts], lens], axis=1)


def block_runs(pages: Sequence[int]) -> list[tuple[int, int]]:
    """``(first_page, length)`` of each run of consecutive pages in a block table."""
    r = page_runs(pages, pages)
    return [(int(a), int(n)) for a, _, n in r]


@dataclass(frozen=True)
class CopyPlan:
    """Copy ``runs`` from ``src`` buffers to the matching ``dst`` buffers.

    ``src`` and ``dst`` are lists of uint8 ``[pages, row_bytes]`` buffers of
    the same row sizes (a :class:`~kvmem.storage.PagePool` and its
    :class:`~kvmem.swap.host.HostPagePool`); ``layer_bytes`` is the size of
    one layer's region of a row, which ``"per_block"`` copies one at a time.
    """

    src: list[torch.Tensor]
    dst: list[torch.Tensor]
    runs: np.ndarray
    layer_bytes: int
    mode: CopyMode = "runs"
    non_blocking: bool = False

    def __post_init__(self) -> None:
        if self.mode not in COPY_MODES:
            raise InvalidArgument(f"copy mode must be one of {COPY_MODES}, got {self.mode!r}")
        if len(self.src) != len(self.dst) or any(
            a.shape[1] != b.shape[1] for a, b in zip(self.src, self.dst, strict=True)
        ):
            raise InvalidArgument("source and destination buffers do not match")

    @property
    def num_pages(self) -> int:
        """Pages moved."""
        return int(self.runs[:, 2].sum()) if len(self.runs) else 0

    @property
    def nbytes(self) -> int:
        """Bytes moved."""
        return self.num_pages * sum(b.shape[1] for b in self.src)

    @property
    def num_copies(self) -> int:
        """``copy_`` calls the plan makes."""
        if self.mode == "runs":
            return len(self.runs) * len(self.src)
        return self.num_pages * sum(b.shape[1] // self.layer_bytes for b in self.src)

    def run(self) -> None:
        """Issue every copy (on the current CUDA stream when the buffers are on a GPU).

        Without ``non_blocking`` the call returns once CUDA copies are done.
        """
        lb = self.layer_bytes if self.mode == "per_block" else None
        devices = set()
        for src, dst in zip(self.src, self.dst, strict=True):
            copy_segments(src, dst, runs_to_segments(self.runs, int(src.shape[1]), lb))
            devices |= {t.device for t in (src, dst) if t.is_cuda}
        if not self.non_blocking:
            for dev in devices:
                torch.cuda.current_stream(dev).synchronize()


__all__ = ["COPY_MODES", "CopyMode", "CopyPlan", "block_runs", "page_runs"]
