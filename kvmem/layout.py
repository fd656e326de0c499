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

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvmem.errors import InvalidArgument
from kvmem.native import layout_arrays

#: The tensors of a :class:`BatchLayout`, in the order kernels take them.
TENSOR_FIELDS = (
    "kv_indptr",
    "kv_indices",
    "kv_last_page_len",
    "block_table",
    "seq_lens",
    "query_start_loc",
    "slot_mapping",
)


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

    def to(self, device: torch.device | str, pin: bool = False) -> BatchLayout:
        """The same layout with every tensor on ``device``.

        ``pin``: stage host tensors through pinned memory and copy without
        blocking (host to CUDA), so the copies queue behind the step's work.
        """
        moved = {}
        for k in TENSOR_FIELDS:
            t: torch.Tensor = getattr(self, k)
            if pin:
                t = t.pin_memory()
            moved[k] = t.to(device, non_blocking=pin)
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
    rows: np.ndarray | None = None,
) -> BatchLayout:
    """Build a :class:`BatchLayout` from dense page rows, in one pass over the batch.

    ``table`` is int32 [B, W], row b holding at least ``ceil(seq_lens[b] /
    page_size)`` valid page ids; ``seq_lens`` and ``query_lens`` are int [B]
    with ``0 <= query_lens <= seq_lens``, else :class:`InvalidArgument`.
    ``zero_padded`` promises that every entry past those is already 0, which
    saves the Python version a pass. ``table`` may be modified, unless
    ``rows`` (int [B]) is given: sequence b's pages are then row ``rows[b]``
    of ``table``, read in place. The arrays come from
    :func:`kvmem.native.layout_arrays` (the csrc/ extension, or numpy with
    the same results).
    """
    b = len(seq_ids)
    if len(seq_lens) != b:
        raise InvalidArgument(f"{b} sequence ids for {len(seq_lens)} sequence lengths")
    a = layout_arrays(table, seq_lens, query_lens, page_size, zero_padded, rows=rows)
    max_len = int(seq_lens.max()) if b else 0
    return from_arrays(
        page_size, a, seq_ids, device, spec, max_len, int(query_lens.max()) if b else 0
    )


def from_arrays(
    page_size: int,
    arrays: Sequence[torch.Tensor],
    seq_ids: tuple[Hashable, ...],
    device: torch.device,
    spec: Any,
    max_seq_len: int,
    max_query_len: int,
) -> BatchLayout:
    """A :class:`BatchLayout` of cpu ``arrays`` (:data:`TENSOR_FIELDS` in order), on ``device``.

    On the meta device (bookkeeping-only allocators) the tensors are shapes only.
    """
    dev = torch.device(device)
    kind = dev.type

    def t(x: torch.Tensor) -> torch.Tensor:
        if kind == "cpu":
            return x
        if kind == "meta":
            return torch.empty_like(x, device=dev)
        return x.to(dev)

    a = [t(x) for x in arrays]
    return BatchLayout(
        page_size=page_size,
        kv_indptr=a[0],
        kv_indices=a[1],
        kv_last_page_len=a[2],
        block_table=a[3],
        seq_lens=a[4],
        query_start_loc=a[5],
        slot_mapping=a[6],
        seq_ids=seq_ids,
        max_seq_len=max_seq_len,
        max_query_len=max_query_len,
        spec=spec,
    )
