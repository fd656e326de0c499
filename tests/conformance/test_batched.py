"""The batched calls (append_many, reserve_many, commit_many) on every in-process backend.

Two allocators of the same backend get the same random history; one makes
each step as a batched call, the other as the loop of single calls, and
everything observable (stats, every sequence's counts, the layout of every
sequence) must stay equal. A batched call that fails must raise the single
call's typed error and change nothing.
"""

from __future__ import annotations

from collections.abc import Hashable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmem import (
    InvalidArgument,
    KVAllocator,
    OutOfKVMemory,
    UnknownSequence,
)
from tests.conformance.kvmodel import snapshot
from tests.conftest import make_allocator, small_spec

CAPACITY = 64  # tokens: 16 pages of 4
TOKENS = st.lists(st.integers(0, 5), min_size=1, max_size=3)


def layouts(alloc: KVAllocator) -> dict[Hashable, list[list[int]]]:
    """The block table and slot of the next entry of every sequence with a free reserved slot."""
    out = {}
    for sid in alloc.seq_ids():
        info = alloc.seq_info(sid)
        if not info.swapped and info.capacity > info.num_computed:
            lay = alloc.layout([(sid, 1)])
            out[sid] = [lay.block_table[0].tolist(), lay.slot_mapping.tolist()]
    return out


def same(a: KVAllocator, b: KVAllocator) -> None:
    """Assert the two allocators are observably equal and intact."""
    a.check_integrity()
    b.check_integrity()
    assert snapshot(a) == snapshot(b)
    assert layouts(a) == layouts(b)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_batched_calls_equal_the_loop_of_single_calls(backend: str, data: st.DataObject) -> None:
    spec = small_spec()
    with (
        make_allocator(backend, spec, CAPACITY) as a,
        make_allocator(backend, spec, CAPACITY) as b,
    ):
        n = data.draw(st.integers(1, 5), label="sequences")
        for sid in range(n):
            prompt = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=10))
            assert a.add(sid, prompt) == b.add(sid, prompt)
        for _ in range(data.draw(st.integers(1, 8), label="steps")):
            kind = data.draw(st.sampled_from(["append", "reserve", "commit"]))
            ids = data.draw(st.lists(st.sampled_from(range(n)), unique=True, max_size=n))
            if kind == "append":
                toks = [data.draw(TOKENS) for _ in ids]
                a.append_many(ids, toks)
                for sid, t in zip(ids, toks, strict=True):
                    b.append(sid, t)
            elif kind == "reserve":
                counts = [data.draw(st.integers(1, 12)) for _ in ids]
                fits = b.can_reserve(dict(zip(ids, counts, strict=True)))
                before = snapshot(a)
                try:
                    a.reserve_many(ids, counts)
                except OutOfKVMemory:
                    assert not fits, "reserve_many refused what can_reserve allows"
                    assert snapshot(a) == before, "a failed reserve_many changed the state"
                    continue
                assert fits or not ids
                for sid, k in zip(ids, counts, strict=True):
                    b.reserve(sid, k)
            else:
                room = {}
                for sid in ids:
                    info = a.seq_info(sid)
                    left = min(info.capacity, info.num_tokens) - info.num_computed
                    if left > 0:
                        room[sid] = left
                counts = [data.draw(st.integers(1, k)) for k in room.values()]
                a.commit_many(list(room), counts)
                for sid, k in zip(room, counts, strict=True):
                    b.commit(sid, k)
            same(a, b)
        ids = [s for s in a.seq_ids() if not a.seq_info(s).swapped]
        if ids and a.can_reserve(dict.fromkeys(ids, 1)):  # a decode step's slots
            a.reserve_many(ids, 1)
            for sid in ids:
                b.reserve(sid, 1)
            same(a, b)


def test_one_count_stands_for_every_sequence(backend: str) -> None:
    spec = small_spec()
    with make_allocator(backend, spec, CAPACITY) as a:
        for sid in "xyz":
            a.add(sid, [1, 2, 3])
        a.reserve_many(["x", "y", "z"], 3)
        a.commit_many(["x", "y", "z"], 2)
        a.append_many(["x", "y", "z"], [[4], [5, 6], [7]])
        for sid, known in zip("xyz", (4, 5, 4), strict=True):
            info = a.seq_info(sid)
            assert (info.num_tokens, info.num_computed) == (known, 2) and info.capacity >= 3
        a.commit_many([], 1)  # an empty batch changes nothing
        a.reserve_many([], [])
        a.append_many([], [])
        a.check_integrity()


def _bad_calls() -> list[tuple[str, tuple[object, ...], type[Exception]]]:
    return [
        ("append_many", (["x", "nope"], [[1], [2]]), UnknownSequence),
        ("append_many", (["x", "x"], [[1], [2]]), InvalidArgument),
        ("append_many", (["x", "y"], [[1]]), InvalidArgument),
        ("append_many", (["x", "y"], [[1], [-2]]), InvalidArgument),
        ("append_many", (["x", "y"], [[1], []]), InvalidArgument),
        ("append_many", ("xy", [[1], [2]]), InvalidArgument),
        ("reserve_many", (["x", "nope"], 1), UnknownSequence),
        ("reserve_many", (["x", "y"], [1]), InvalidArgument),
        ("reserve_many", (["x", "y"], [1, 0]), InvalidArgument),
        ("reserve_many", (["x", "y"], 0), InvalidArgument),
        ("reserve_many", (["x", "y"], [1, 1.5]), InvalidArgument),
        ("reserve_many", (["y", "y"], 1), InvalidArgument),
        ("reserve_many", (["x", "y"], [1, 10_000]), OutOfKVMemory),
        ("commit_many", (["x", "nope"], 1), UnknownSequence),
        ("commit_many", (["x", "y"], [1, 4]), InvalidArgument),  # y has 3 known tokens
        ("commit_many", (["x", "y"], [1, 2, 3]), InvalidArgument),
        ("commit_many", (["x", "y"], -1), InvalidArgument),
        ("commit_many", (["x", "x"], 1), InvalidArgument),
        ("commit_many", ((["x"], ["y"]), 1), InvalidArgument),  # unhashable ids
    ]


@pytest.mark.parametrize(("call", "args", "error"), _bad_calls(), ids=lambda x: str(x)[:40])
def test_a_bad_batch_raises_and_changes_nothing(
    backend: str, call: str, args: tuple[object, ...], error: type[Exception]
) -> None:
    spec = small_spec()
    with make_allocator(backend, spec, CAPACITY) as a:
        a.add("x", [1, 2, 3, 4, 5])
        a.add("y", [1, 2, 3])
        a.reserve_many(["x", "y"], [5, 4])  # y: one slot beyond its known tokens
        a.commit_many(["x"], 2)
        before = snapshot(a)
        with pytest.raises(error):
            getattr(a, call)(*args)
        assert snapshot(a) == before
        a.check_integrity()


def test_a_swapped_sequence_is_refused_by_the_batched_calls(backend: str) -> None:
    spec = small_spec()
    with make_allocator(backend, spec, CAPACITY) as a:
        if not a.capabilities.swap:
            pytest.skip(f"{backend} does not swap")
        a.add("x", [1, 2, 3])
        a.add("y", [4, 5, 6])
        a.reserve_many(["x", "y"], 3)
        a.commit_many(["x", "y"], 2)
        a.swap_out(["y"]).wait(10)
        before = snapshot(a)
        for call in (a.reserve_many, a.commit_many):
            with pytest.raises(InvalidArgument, match="swapped out"):
                call(["x", "y"], 1)
            assert snapshot(a) == before
        a.append_many(["x", "y"], [[7], [8]])  # append is allowed while swapped, as append is
        assert a.seq_info("y").num_tokens == 4
        a.check_integrity()
