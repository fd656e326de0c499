"""The host page pool and the host cache (validity, tiers, LRU eviction)."""

from __future__ import annotations

import pytest

from kvmem import InvalidArgument, KVSpec, OutOfKVMemory, PagePool
from kvmem.errors import OutOfHostMemory
from kvmem.swap import HostCache, HostPagePool, free_runs


def host_pool(pages: int = 16) -> HostPagePool:
    pool = PagePool(KVSpec(2, 1, 4), 4, 4, layout="layer")
    return HostPagePool(pool, pages)


def test_host_pool_mirrors_device_rows_and_is_not_pinned_on_cpu():
    pool = PagePool(KVSpec(3, 2, 8), 4, 4, layout="layer")
    host = HostPagePool(pool, 7)
    assert [b.shape for b in host.buffers] == [(7, b.shape[1]) for b in pool.buffers]
    assert host.page_bytes == pool.page_bytes and not host.pinned
    assert host.nbytes == 7 * pool.page_bytes
    with pytest.raises(InvalidArgument):
        HostPagePool(pool, 0)


def test_alloc_prefers_continuing_then_best_fit_then_largest_runs():
    h = host_pool(16)
    a = h.alloc(4)
    assert a == [0, 1, 2, 3]
    assert h.alloc(2, after=3) == [4, 5]  # continues the run
    b = h.alloc(3)
    assert b == [6, 7, 8]
    h.free([1, 2])  # holes: [1, 2] (2 pages) and [9, 16) (7 pages)
    assert h.alloc(2) == [1, 2]  # best fit, not the big run
    h.free([0, 4])
    assert h.alloc(8) == [*range(9, 16), 0]  # no single run fits: largest runs first
    assert h.num_free == 1 and h.is_free(4)
    before = h.free_mask()
    with pytest.raises(OutOfHostMemory):
        h.alloc(h.num_free + 1)
    assert (h.free_mask() == before).all()
    with pytest.raises(InvalidArgument):
        h.free([b[0], b[0]])
    assert (h.free_mask() == before).all()
    starts, lens = free_runs(h.free_mask())
    assert int(lens.sum()) == h.num_free
    assert issubclass(OutOfHostMemory, OutOfKVMemory)


def test_cache_grows_copies_and_evicts_resident_before_parked_lru():
    evicted = []
    c = HostCache(host_pool(10), lambda key, tier: evicted.append((key, tier)))
    c.ensure({"a": 3, "b": 3})
    c.ensure({"p": 2})
    assert len(c.get("a").pages) == 3 and c.get("a").valid == 0
    c.get("a").valid = 10
    c.ensure({"a": 4})  # grows in place, keeps what it had
    assert c.get("a").pages == [0, 1, 2, 8]  # page 3 is b's: the best-fitting run
    assert c.get("a").valid == 10
    c.set_tier("p", "parked")
    c.set_tier("b", "resident")
    c.set_tier("a", "resident")  # a is now the most recently used resident copy
    assert c.evictable_pages() == 9 and c.evictable_pages(exclude=["a"]) == 5
    c.check()
    c.ensure({"new": 3})  # 1 free: must evict 2 pages -> b (resident, LRU) goes first
    assert evicted == [("b", "resident")] and c.get("b") is None
    c.ensure({"new2": 5})  # needs 5 more with 1 free... evicts a (resident) before p (parked)
    assert evicted[1] == ("a", "resident")
    c.check()
    used = c.used_pages()
    with pytest.raises(OutOfHostMemory):
        c.ensure({"huge": 100})
    assert c.used_pages() == used and "huge" not in c.copies and len(evicted) == 2
    c.ensure({"last": 2})
    assert evicted[-1] == ("p", "parked")
    c.truncate("last", 1, 0)
    assert len(c.get("last").pages) == 1
    c.release("last")
    c.release("last")  # no-op
    c.check()
