"""Page ids over the vmem virtual rows, for the cache tiers (:class:`~kvmem.tiers.TierManager`).

Page ``j`` of slot ``s`` is page id ``s * pages_per_row + j``; its bytes are
that page of the slot's row in every layer::

    layer 0 row of slot 2  [ p0 | p1 | p2 | ...]   page id 2 * per_row + 1 = (slot 2, page 1)
    layer 1 row of slot 2  [ p0 | p1 | p2 | ...]   its layer-1 part
"""

from __future__ import annotations

import torch

from kvmem.backends.vmem.space import VirtualKV

__all__ = ["RowPages"]


class RowPages:
    """The virtual rows of every layer as pages by id, for :class:`~kvmem.tiers.TierManager`."""

    def __init__(self, space: VirtualKV) -> None:
        self.layer_bytes = space.page_bytes
        self.page_bytes = space.page_bytes * space.num_layers
        self.device: torch.device = space.driver.device
        self.per_row = space.row_bytes // space.page_bytes
        self.buffers: list[torch.Tensor] = [r.view(-1, space.page_bytes) for r in space.rows]

    def page(self, slot: int, j: int) -> int:
        """The id of page ``j`` of ``slot``'s row."""
        return slot * self.per_row + j
