"""The vmem backend: contiguous virtual KV per sequence, physical pages mapped on demand.

This is the vAttention model. Each layer's KV is one virtual tensor with a
row per sequence slot, ``[max_seqs, max_seq_len]`` tokens, each token's K
and V side by side; ``LayerKV.k`` and ``.v`` view it as ``[max_seqs,
max_seq_len, heads, code_dim]``. A sequence owns one row (its *slot*),
contiguous in virtual memory, sized for the longest sequence the allocator
accepts. Physical pages, created once up front in a pool, are mapped under
the row only as far as the sequence's reserved KV reaches (see
:mod:`kvmem.backends.vmem.space`)::

    slot 0  [####|####|##..|    |    |    ...]   seq A: 10 tokens, 3 pages
    slot 1  [####|#...|    |    |    |    ...]   seq B:  5 tokens, 2 pages
    slot 2  [    |    |    |    |    |    ...]   free, nothing mapped
             ^ mapped page      ^ reserved address space only

Kernels see it through the common :class:`~kvmem.layout.BatchLayout` with
one page per sequence: page ``slot``, ``page_size = max_seq_len`` (so
``slot_mapping = slot * max_seq_len + position``); kernels must read only
the first ``seq_lens[b]`` slots of a page, the rest may be unmapped. Or
through :meth:`VMemAllocator.kv_view`: the sequence's K and V as plain
``[tokens, heads, code_dim]`` tensors over its row (one stride per token),
which kernels written for unpaged KV (torch SDPA, flash-attn with a batch
index) read unchanged.

Two techniques from vAttention:

- Deferred reclamation. ``free`` keeps the slot's pages mapped. A new
  sequence gets the free slot whose mapped size fits its prompt best, so
  steady serving maps almost nothing. Pages are unmapped only when a
  ``reserve`` finds the pool empty: first from free slots (least recently
  freed first), then pages mapped beyond what live sequences reserved.
- Mapping ahead (``map_ahead=True``, :mod:`.mapahead`). A background thread maps, from the
  pool only, the next page(s) of sequences about to cross into an unmapped
  page, so the decode step rarely calls the driver. It is safe: ``reserve``
  itself guarantees that every reserved slot is mapped before it returns
  (mapping synchronously when the worker is behind), the worker only ever
  adds mappings beyond what is reserved, and only the caller's thread
  unmaps.

Accounting is in page *groups* (one page for every layer). A sequence
*holds* the groups its reserved tokens need; ``OutOfKVMemory`` means the
groups held by all sequences would exceed the pool. Pages mapped but not
held (free slots, room mapped ahead) are reclaimable and count as free.

``fork`` is copy-on-write at page granularity: the child's row maps the
parent's physical pages a second time, and a shared page is copied when a
sequence reserves room in it.

Prefix caching (:mod:`.prefix`): full physical pages get the paged
backend's chained keys (cache salt included) once computed. ``add`` shares
the longest chain a slot holds: a free slot (its pages kept mapped after
``free``) is taken whole, a live sequence's pages are mapped a second time
under a free slot, as for ``fork``. A prefix page is a page group, usually
more than 16 tokens (``granularity``).

Cache tiers (:mod:`.tiering`, options ``host_cache_tokens``,
``disk_cache_dir``, ``disk_cache_tokens``, ``tier_write_policy``, as for the
paged backend). A keyed page that loses its last slot (reclaimed, cleared,
taken by a new sequence) is written down to a host tier, and from there to
a disk tier, before it is unmapped or overwritten (``write_through``: as it
is keyed). ``add`` extends the device hit with pages the tiers hold: the
slot is mapped as far as the hit reaches and the pages load asynchronously;
calls naming the sequence wait for them, and a page that fails to load ends
the hit (``seq_info().num_computed``). The tiers name pages by
``slot * pages_per_row + page``, the virtual rows of every layer.

Differences from the paged backend: prefix pages are physical pages;
a sequence cannot grow past ``max_seq_len`` (InvalidArgument); at most
``max_seqs`` sequences hold KV at once (OutOfKVMemory when a reserve or a
fork needs a slot and none is free). The allocator serves one caller
thread (its own workers aside).

Swap (:mod:`.swapping`). ``swap_out`` copies each sequence's computed KV, the start of its
slot's row in every layer (codes, and int4 scales and zeros, together), to a
host tensor of its own (pinned where CUDA is used): one contiguous copy per
layer, on the swap manager's worker thread (CPU) or stream (CUDA, not run
yet). Once the copy is done the sequence gives its slot back like ``free``
does (deferred reclamation: the slot keeps its pages mapped, reclaimable and
counted free, so the next sequence or swap-in to take it maps nothing).
``swap_in`` takes a slot and maps its reserved length, all or nothing, and
copies the KV back. Until a copy is done the sequence keeps what it holds,
and calls naming it wait for the copy; ``reserve``, ``can_reserve``,
``fork`` and ``swap_in`` wait for in-flight swap-outs when they need what
those free. A copy that fails leaves the sequence where it was. Host copies
are dropped on swap-in: reuse across turns (``free(keep_on_host=True)``,
``resume``) is not implemented by this backend.

Modules::

    allocator.py   VMemAllocator: slots, page-group accounting, the allocator contract
    prefix.py      PrefixIndex: keyed pages per slot; prefixing.py: the prefix-cache hooks
    tiering.py     cache tiers: write-down before unmap, loads; rowpages.py: page ids
    figures.py     stats(); checks.py: check_integrity
    space.py       VirtualKV: the virtual tensors, the page-group pool, mappings per slot
    mapahead.py    MapAhead: the worker thread that maps the next pages ahead of reserve
    swapping.py    swap_out / swap_in (SwapMixin); hostkv.py: host copies, copy in and out
    seq.py         VSeq: what is kept per sequence
    driver.py      VMemDriver: the driver interface; MetaDriver (bookkeeping only)
    host.py        HostDriver: memfd + mmap          cuda.py  CudaDriver: cuda-python VMM
    drivers.py     make_driver: a driver by name or device (imports host/cuda lazily)
    dlpack.py      tensor_at: a tensor over a raw device address, no pointer query
"""

from __future__ import annotations

from kvmem.backends.vmem.allocator import VMemAllocator
from kvmem.backends.vmem.driver import MetaDriver, VMemDriver
from kvmem.backends.vmem.drivers import make_driver

__all__ = ["MetaDriver", "VMemAllocator", "VMemDriver", "make_driver"]
