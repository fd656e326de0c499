"""Swapping KV between the device page pool and host memory.

* :class:`HostPagePool`: host pages laid out like the device pool's pages
  (pinned where CUDA is used), so a run of pages is one copy per buffer.
* :class:`HostCache`: whose KV each host page holds, how much of it is
  still current (multi-turn reuse), and LRU eviction of the copies that may go.
* :class:`CopyPlan`: page pairs folded into runs, copied one run at a time
  or one page and layer at a time (``"per_block"``, the vLLM 0.x baseline).
* :class:`SwapManager`: runs plans on a worker thread (CPU) or a dedicated
  CUDA stream, returning :class:`Transfer` handles that complete in order.

Backends (``paged``, ``grouped``) build on these; see their ``swap_out``,
``swap_in`` and ``free(keep_on_host=True)``.
"""

from kvmem.swap.cache import TIERS, HostCache, HostCopy, Tier
from kvmem.swap.host import HostPagePool, free_runs
from kvmem.swap.manager import SwapManager, Transfer
from kvmem.swap.plan import COPY_MODES, CopyMode, CopyPlan, block_runs, page_runs

__all__ = [
    "COPY_MODES",
    "TIERS",
    "CopyMode",
    "CopyPlan",
    "HostCache",
    "HostCopy",
    "HostPagePool",
    "SwapManager",
    "Tier",
    "Transfer",
    "block_runs",
    "free_runs",
    "page_runs",
]
