"""The state the block-table backends keep per sequence, and the members their batched calls use.

Apart from :mod:`kvmem.backends.blocks` so that :mod:`kvmem.backends.blockbatch`
can type against it without importing the backend.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Protocol

import numpy as np
import torch

from kvmem.backends.base import SeqState
from kvmem.spec import KVSpec


class BlockSeq(SeqState):
    """A sequence of a block-table backend: its pages, their prefix keys, its table row."""

    __slots__ = ("blocks", "hashes", "row", "root", "parked")

    def __init__(self, tokens: list[int], row: int, root: int) -> None:
        super().__init__(tokens)
        self.blocks: list[int] = []
        self.hashes: list[int] = []  # hash of the key of each full, computed page
        self.row = row
        self.root = root  # chain seed: hash of the cache salt
        self.parked = False  # swapped and finished: evictable (free(keep_on_host=True))


class BlockTables(Protocol):
    """What :mod:`kvmem.backends.blockbatch` reads and calls of a block-table backend."""

    spec: KVSpec
    device: torch.device
    page_size: int
    prefix_caching: bool
    max_seq_len: int | None
    native_passes: bool | None
    _seqs: dict[Hashable, BlockSeq]
    _ref: list[int]
    _key: list[Any]
    _index: dict[int, int]
    _page_hash: list[int]
    _tiers: Any
    _num_cached_free: int
    kv_events: Any
    _free: Any
    _table: np.ndarray
    _table_view: tuple[np.ndarray, torch.Tensor] | None

    def _check_open(self) -> None: ...
    def _resident(self, seq_id: Hashable) -> BlockSeq: ...
    def _ensure_free(self, n: int) -> bool: ...
    def _needed(self, s: BlockSeq, target: int) -> tuple[int, bool]: ...
    def _grow(self, seq_id: Hashable, s: BlockSeq, target: int) -> None: ...
    def _grow_into(self, s: BlockSeq, target: int, new: int, cow: bool) -> None: ...
    def _on_commit(self, s: BlockSeq, end: int) -> None: ...


__all__ = ["BlockSeq", "BlockTables"]
