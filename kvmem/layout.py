"""BatchLayout: everything an attention kernel needs to find one batch's KV.

The page table is kept in two equivalent forms, both compatible with
FlashInfer's paged API and vLLM's block tables. For a batch of two
sequences with ``page_size = 4``::

    seq 0: 6 tokens in pages [7, 2]      seq 1: 3 tokens in page [5]
    kv_indptr        = [0, 2, 3]
    kv_indices       = [7, 2, 5]
    kv_last_page_len = [2, 3]
    block_table      = [[7, 2],
                        [5, 0]]          (padding is page 0: always in bounds)
    seq_lens         = [6, 3]            KV length after this step

If this step adds 2 tokens to seq 0 and 1 to seq 1::

    query_start_loc  = [0, 2, 3]
    slot_mapping     = [2*4+0, 2*4+1, 5*4+2] = [8, 9, 22]

Host copies of the sizes (``max_seq_len``, ``max_query_len``) are kept so
that kernels can size their grids without a device sync.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class BatchLayout:
    """Kernel inputs for one batch; tensors live on the allocator's device."""

    page_size: int
    kv_indptr: torch.Tensor  # int32 [B + 1]
    kv_indices: torch.Tensor  # int32 [nnz]
    kv_last_page_len: torch.Tensor  # int32 [B]
    block_table: torch.Tensor  # int32 [B, max_pages]
    seq_lens: torch.Tensor  # int32 [B]
    query_start_loc: torch.Tensor  # int32 [B + 1]
    slot_mapping: torch.Tensor  # int64 [num_new_tokens]
    seq_ids: tuple[Hashable, ...]
    max_seq_len: int
    max_query_len: int
    #: The spec of the allocator that made the layout (kernels check it).
    spec: Any = field(default=None, compare=False)

    @property
    def batch_size(self) -> int:
        """Number of sequences in the batch."""
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        """New tokens in the batch (rows of the flattened query)."""
        return int(self.slot_mapping.shape[0])

    @property
    def query_lens(self) -> torch.Tensor:
        """New tokens per sequence, int32 [B]."""
        return self.query_start_loc[1:] - self.query_start_loc[:-1]

    @property
    def context_lens(self) -> torch.Tensor:
        """KV entries per sequence before this step, int32 [B]."""
        return self.seq_lens - self.query_lens

    def to(self, device: torch.device | str) -> BatchLayout:
        """The same layout with every tensor on ``device``."""
        moved = {
            k: getattr(self, k).to(device)
            for k in (
                "kv_indptr",
                "kv_indices",
                "kv_last_page_len",
                "block_table",
                "seq_lens",
                "query_start_loc",
                "slot_mapping",
            )
        }
        return BatchLayout(
            page_size=self.page_size,
            seq_ids=self.seq_ids,
            max_seq_len=self.max_seq_len,
            max_query_len=self.max_query_len,
            spec=self.spec,
            **moved,
        )


def build_layout(
    page_size: int,
    table: np.ndarray,
    seq_lens: np.ndarray,
    query_lens: np.ndarray,
    seq_ids: tuple[Hashable, ...],
    device: torch.device,
    spec: Any = None,
    zero_padded: bool = False,
) -> BatchLayout:
    """Build a :class:`BatchLayout` from dense page rows, vectorised.

    ``table`` is int32 [B, W], row b holding at least ``ceil(seq_lens[b] /
    page_size)`` valid page ids; ``seq_lens`` and ``query_lens`` are int [B].
    ``zero_padded`` promises that every entry past those is already 0, which
    saves a pass. ``table`` may be modified.
    """
    b = len(seq_ids)
    seq_lens = seq_lens.astype(np.int32, copy=False)
    query_lens = query_lens.astype(np.int32, copy=False)
    num_pages = (seq_lens + page_size - 1) // page_size
    max_pages = int(num_pages.max()) if b else 0
    dense = (
        table[:, :max_pages] if table.dtype == np.int32 else table[:, :max_pages].astype(np.int32)
    )
    valid = np.arange(max_pages, dtype=np.int32)[None, :] < num_pages[:, None]
    kv_indices = dense[valid]
    if not zero_padded:
        dense[~valid] = 0
    kv_indptr = np.zeros(b + 1, dtype=np.int32)
    np.cumsum(num_pages, out=kv_indptr[1:])
    last = seq_lens - (num_pages - 1) * page_size
    qsl = np.zeros(b + 1, dtype=np.int32)
    np.cumsum(query_lens, out=qsl[1:])
    n = int(qsl[-1])
    owner = np.repeat(np.arange(b), query_lens)
    pos = np.arange(n, dtype=np.int64) - qsl[:-1][owner] + (seq_lens - query_lens)[owner]
    slots = dense[owner, pos // page_size].astype(np.int64) * page_size + pos % page_size

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    return BatchLayout(
        page_size=page_size,
        kv_indptr=t(kv_indptr),
        kv_indices=t(np.ascontiguousarray(kv_indices)),
        kv_last_page_len=t(last.astype(np.int32)),
        block_table=t(dense),
        seq_lens=t(seq_lens.copy()),
        query_start_loc=t(qsl),
        slot_mapping=t(slots),
        seq_ids=seq_ids,
        max_seq_len=int(seq_lens.max()) if b else 0,
        max_query_len=int(query_lens.max()) if b else 0,
        spec=spec,
    )
