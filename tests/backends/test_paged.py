"""Paged backend specifics: the prefix cache, eviction order, copy-on-write, storage layouts."""

import pytest
import torch

from kvmem import InvalidArgument, KVSpec, create_allocator
from tests.conformance.kvmodel import check_kv, write_step

SPEC = KVSpec(2, 2, 8, dtype=torch.float32)


def make_paged(num_tokens=64, **kw):
    return create_allocator("paged", SPEC, num_tokens=num_tokens, page_size=4, **kw)


def prefill_prompt(a, sid, toks, tokens):
    cached = a.add(sid, toks)
    tokens[sid] = list(toks)
    if len(toks) > cached:
        a.reserve(sid, len(toks) - cached)
        write_step(a, [(sid, len(toks) - cached)], tokens)
    return cached


def test_prefix_cache_shares_full_pages_only_and_never_the_last_token():
    a, tokens = make_paged(), {}
    prefill_prompt(a, "a", list(range(10)), tokens)  # pages [0-3] [4-7] full, [8-9] partial
    assert a.add("b", list(range(10))) == 8  # the partial page is not shared
    assert a.block_table("b") == a.block_table("a")[:2]
    assert a.add("c", list(range(8))) == 4  # 8 tokens: the last is never reported cached
    assert a.add("d", [0, 1, 2, 9, 9]) == 0  # first page differs
    st = a.stats()
    assert st.prefix_hits == 12 and st.prefix_queries == 10 + 10 + 8 + 5
    a.reserve("b", 2)
    check_kv(a, a.layout([("b", 2)]), 0, list(range(8)))


def test_cache_salt_separates_namespaces():
    a, tokens = make_paged(), {}
    prefill_prompt(a, "a", list(range(9)), tokens)
    assert a.add("b", list(range(9)), cache_salt="tenant-2") == 0
    assert a.add("c", list(range(9))) == 8


def test_freed_pages_stay_cached_and_are_evicted_least_recently_freed_first():
    a, tokens = make_paged(num_tokens=32), {}  # 8 pages
    prefill_prompt(a, "old", [1] * 9, tokens)  # 3 pages, 2 full
    prefill_prompt(a, "new", [2] * 9, tokens)
    a.free("old")
    a.free("new")
    st = a.stats()
    assert st.used_tokens == 0 and st.cached_tokens == 16  # 4 full pages kept
    # 6 fresh pages: first the 4 holding no cached KV (2 never used, 2 partial),
    # then the cached ones least recently freed: "old"'s two
    a.add("x", [3])
    a.reserve("x", 24)
    assert a.add("y", [1] * 9) == 0  # "old" was evicted
    assert a.add("z", [2] * 9) == 8  # "new" survived
    a.check_integrity()


def test_a_cache_hit_takes_a_cached_page_out_of_the_free_queue():
    a, tokens = make_paged(num_tokens=16), {}  # 4 pages
    prefill_prompt(a, "a", [5] * 5, tokens)
    a.free("a")
    assert a.add("b", [5] * 5) == 4
    a.reserve("b", 1)
    a.add("c", [6])
    a.reserve("c", 8)  # the 2 free pages left
    assert a.stats().free_tokens == 0
    check_kv(a, a.layout([("b", 1)]), 0, [5] * 4)  # the shared page was not reused
    a.check_integrity()


def test_fork_copies_only_the_shared_partial_page():
    a, tokens = make_paged(), {}
    prefill_prompt(a, "p", list(range(6)), tokens)  # one full page, one partial
    a.fork("p", "c")
    before = a.stats().used_tokens
    a.append("c", [99])
    a.reserve("c", 1)
    assert a.block_table("c")[0] == a.block_table("p")[0]  # the full page stays shared
    assert a.block_table("c")[1] != a.block_table("p")[1]  # the partial one was copied
    assert a.stats().used_tokens == before + 4
    tokens["c"] = list(range(6)) + [99]
    check_kv(a, a.layout([("c", 1)]), 0, list(range(6)))  # the copy holds the parent's KV


@pytest.mark.parametrize("layout", ["block", "layer"])
def test_storage_layouts_hold_the_same_kv(layout):
    a, tokens = make_paged(storage_layout=layout), {}
    prefill_prompt(a, "s", list(range(11)), tokens)
    a.append("s", [1])
    tokens["s"].append(1)
    a.reserve("s", 1)
    write_step(a, [("s", 1)], tokens)
    a.append("s", [2])
    a.reserve("s", 1)
    check_kv(a, a.layout([("s", 1)]), 0, tokens["s"])
    assert len(a.pool.buffers) == (1 if layout == "block" else SPEC.num_layers)


def test_page_size_must_be_a_power_of_two():
    for bad in (0, 3, 12, -4):
        with pytest.raises(InvalidArgument):
            create_allocator("paged", SPEC, num_tokens=64, page_size=bad)


def test_meta_device_allocates_nothing_but_keeps_books():
    big = KVSpec(32, 8, 128)
    a = create_allocator("paged", big, num_bytes=64 << 30, device="meta")
    assert a.stats().capacity_bytes == 64 << 30
    a.add("s", list(range(1000)))
    a.reserve("s", 1000)
    assert a.layout([("s", 1000)]).slot_mapping.shape == (1000,)


def test_stats_count_shared_pages_once():
    a, tokens = make_paged(), {}
    prefill_prompt(a, "a", list(range(9)), tokens)
    a.add("b", list(range(9)))
    st = a.stats()
    assert st.filled_tokens == 9 and st.used_tokens == 12 and st.num_seqs == 2
    assert st.fragmentation == pytest.approx(1 - 9 / 12)
