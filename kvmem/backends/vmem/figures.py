"""The vmem allocator's figures: :class:`~kvmem.allocator.KVStats` from its slots and pool."""

from __future__ import annotations

from kvmem.allocator import KVStats
from kvmem.backends.vmem import prefixing
from kvmem.backends.vmem.state import VMemState

__all__ = ["stats"]


def stats(a: VMemState) -> KVStats:
    """(Lock held, map-ahead settled.) See :meth:`VMemAllocator.stats`."""
    tier_extra = {} if a._tiers is None else {f"tier_{k}": v for k, v in a._tiers.stats().items()}
    sp = a.space
    bpt = a.spec.bytes_per_token
    group_bytes = a.spec.num_layers * a.page_bytes
    capacity = sp.num_groups * group_bytes // bpt
    held = a._held()
    used = held * group_bytes // bpt
    swapped = [s for s in a._seqs.values() if s.swapped]
    resident = [s for s in a._seqs.values() if not s.swapped]
    extra: dict[str, float] = {
        "physical_bytes_pooled": sp.num_groups * group_bytes,
        "physical_bytes_mapped": sp.mapped_groups * group_bytes,
        "physical_bytes_held": held * group_bytes,
        "idle_mapped_bytes": (sp.mapped_groups - held) * group_bytes,
        "shared_pages": sp.extra_refs * a.spec.num_layers,
        "virtual_bytes_reserved": sp.virtual_bytes,
        "pages_pooled": sp.num_groups * a.spec.num_layers,
        "pages_mapped": sp.mapped_groups * a.spec.num_layers,
        "map_calls": sp.map_calls,
        "unmap_calls": sp.unmap_calls,
        "map_ahead_groups": a._mapper.groups,
        "map_ahead_errors": a._mapper.errors,
        "page_bytes": a.page_bytes,
        "max_seq_len": a.max_seq_len,
        "free_slots": len(a._free_slots),
        **a._swap_extra(),
        **tier_extra,
    }
    drv_bytes = a.driver.allocated_bytes()
    if drv_bytes is not None:
        extra["driver_allocated_bytes"] = drv_bytes
    return KVStats(
        page_size=a.page_size,
        bytes_per_token=bpt,
        capacity_tokens=capacity,
        used_tokens=used,
        filled_tokens=sp.filled_tokens([(s.slot, s.num_computed) for s in resident]),
        reserved_tokens=sum(s.reserved - s.num_computed for s in resident),
        cached_tokens=prefixing.cached_tokens(a),
        free_tokens=capacity - used,
        swapped_tokens=sum(s.num_computed for s in swapped),
        num_seqs=len(a._seqs),
        num_swapped_seqs=len(swapped),
        prefix_queries=0 if a._prefix is None else a._prefix.queries,
        prefix_hits=0 if a._prefix is None else a._prefix.hits,
        extra=extra,
    )
