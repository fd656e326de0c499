"""The grouped backend: buddy blocks, groups, contiguity, and what it keeps from paged."""

from __future__ import annotations

import math
import random

import pytest
import torch

from kvmem import InvalidArgument, KVSpec, available_backends, create_allocator
from kvmem.backends.grouped import BuddyPages
from kvmem.errors import IntegrityError

SPEC = KVSpec(2, 1, 4, dtype=torch.float32)


def make_with_pages(kind: str, pages: int, **opts):
    return create_allocator(kind, SPEC, num_tokens=pages * 4, page_size=4, **opts)


def test_registered():
    assert "grouped" in available_backends()


def test_buddy_blocks_cover_the_pool_and_merge_back():
    b = BuddyPages(12, 8)
    assert sorted((p, k) for p, k in b._order.items()) == [(0, 3), (8, 2)]
    owner = object()
    got = b.take(5, owner, held=0, after=None)  # a block of 8, 3 left as the owner's group
    assert got == [0, 1, 2, 3, 4] and len(b) == 7 and b._groups[owner] == [5, 8]
    assert b.take(2, owner, held=5, after=4) == [5, 6]  # from the group, contiguous
    other = object()
    assert b.take(3, other, held=0, after=None) == [8, 9, 10]  # block of 4
    b.check()
    for p in [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]:
        b.put(p, cached=False)
    b.forget(owner)
    b.forget(other)
    b.check()
    assert sorted((p, k) for p, k in b._order.items()) == [(0, 3), (8, 2)] and len(b) == 12


def test_buddy_random_operations_keep_invariants():
    rng = random.Random(7)
    n = 50
    b = BuddyPages(n, 8)
    held: dict[int, list[int]] = {}
    owners = [object() for _ in range(5)]
    for _ in range(600):
        o = rng.randrange(5)
        free = len(b)
        if rng.random() < 0.55 and free:
            k = rng.randint(1, min(free, 9))
            pages = held.setdefault(o, [])
            got = b.take(k, owners[o], len(pages), pages[-1] if pages else None)
            assert len(got) == k and len(set(got)) == k
            pages += got
        elif held.get(o):
            pages = held[o]
            for p in rng.sample(pages, rng.randint(1, len(pages))):
                pages.remove(p)
                b.put(p, cached=rng.random() < 0.3)
            if not pages:
                b.forget(owners[o])
        elif rng.random() < 0.3 and free:  # a free page is claimed back (a prefix-cache hit)
            p = rng.choice(sorted(b))
            b.remove(p)
            held.setdefault(o, []).append(p)
        b.check()
        in_use = [p for ps in held.values() for p in ps]
        assert len(in_use) == len(set(in_use)) and set(in_use).isdisjoint(b)
        assert len(in_use) + len(b) == n
    with pytest.raises(InvalidArgument):
        b.remove(in_use[0])


def test_buddy_check_catches_a_broken_structure():
    b = BuddyPages(8, 4)
    b._order[3] = 0  # a page claimed free twice over
    b._blocks[0].add(3)
    with pytest.raises(IntegrityError):
        b.check()


def test_prefill_is_one_run_and_decode_growth_few_runs():
    with make_with_pages("grouped", 512) as a:
        a.add("p", [1] * 400)
        a.reserve("p", 400)
        assert a.runs("p") == [(0, 100)]
        # two sequences growing in turn: groups double, so runs grow like log(pages)
        for sid in ("x", "y"):
            a.add(sid, [2 if sid == "x" else 3])
        for step in range(4 * 150):
            for sid in ("x", "y"):
                a.reserve(sid, step + 1)
        for sid in ("x", "y"):
            pages = len(a.block_table(sid))
            assert pages == 150 and len(a.runs(sid)) <= 2 + math.log2(pages / 4)
        a.check_integrity()


def churn(a, rng: random.Random, rounds: int) -> None:
    live: list[int] = []
    for i in range(rounds):
        if live and (rng.random() < 0.45 or a.stats().free_tokens < 200):
            a.free(live.pop(rng.randrange(len(live))))
        else:
            n = rng.randint(4, 120)
            a.add(i, [i % 97 + 1] * n)
            a.reserve(i, n)
            live.append(i)


def test_after_churn_a_request_lies_in_far_fewer_runs_than_paged():
    runs = {}
    for kind in ("paged", "grouped"):
        with make_with_pages(kind, 256) as a:
            churn(a, random.Random(3), 300)
            free_pages = a.stats().free_tokens // 4
            a.add("req", [5] * 4 * (free_pages // 2))
            a.reserve("req", 4 * (free_pages // 2))
            runs[kind] = len(a.runs("req"))
            a.check_integrity()
    assert runs["grouped"] * 4 <= runs["paged"], runs


def test_group_pages_are_free_capacity_and_get_taken_when_needed():
    with make_with_pages("grouped", 16, max_group_pages=8, min_group_pages=1) as a:
        a.add("a", [1] * 32)
        a.reserve("a", 32)  # 8 pages: the block [0, 8)
        a.reserve("a", 33)  # one more: a new block of 8, 7 left as a's group
        assert a.runs("a") == [(0, 9)]
        assert a.stats().free_tokens == 7 * 4
        assert a.can_reserve({"a": 1 + 7 * 4})
        a.add("b", [2] * 28)
        a.reserve("b", 28)  # takes a's group
        assert a.stats().free_tokens == 0 and len(a.block_table("b")) == 7
        a.check_integrity()
        a.free("a")
        a.free("b")
        a.check_integrity()
        assert a.stats().free_tokens == 64


def test_prefix_cache_and_fork_work_on_groups():
    with make_with_pages("grouped", 64) as a:
        a.add("a", list(range(1, 14)))
        a.reserve("a", 13)
        a.commit("a", 13)
        first = a.block_table("a")[:3]
        a.free("a")
        assert a.add("b", list(range(1, 14)) + [99]) == 12
        assert a.block_table("b") == first
        a.reserve("b", 2)
        a.commit("b", 2)
        a.fork("b", "c")
        a.append("c", [5])
        a.reserve("c", 1)  # copy-on-write of the shared partial page
        assert a.block_table("c")[:3] == first and a.block_table("c")[3] != a.block_table("b")[3]
        a.check_integrity()


@pytest.mark.parametrize("bad", [0, 3, True, 2.0])
def test_group_sizes_must_be_powers_of_two(bad):
    with pytest.raises(InvalidArgument):
        make_with_pages("grouped", 16, max_group_pages=bad)
    with pytest.raises(InvalidArgument):
        make_with_pages("grouped", 16, min_group_pages=bad)
