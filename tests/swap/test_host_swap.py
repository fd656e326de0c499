"""The host-pool swap of the paged and grouped backends: failures, copies in flight,
reuse across turns, keep_on_host and LRU eviction, copy modes."""

from __future__ import annotations

import threading

import pytest
import torch

from kvmem import DuplicateSequence, KVSpec, OutOfKVMemory, UnknownSequence
from kvmem.errors import OutOfHostMemory
from kvmem.swap import CopyPlan
from tests.conftest import make_allocator
from tests.swap.util import HOST_POOL_BACKENDS, digest, snapshot, write_random

SPEC = KVSpec(2, 2, 8, dtype=torch.float32)
PS = 4  # page size of the test allocators (tests/conftest.py)


@pytest.fixture(params=HOST_POOL_BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    """paged and grouped."""
    return str(request.param)


def seq(a, sid, n: int, base: int) -> str:
    """Register ``sid`` with n distinct tokens, write random KV for all; return its digest."""
    a.add(sid, [base + t for t in range(n)])
    write_random(a, sid, n, seed=base)
    return digest(a, sid)


def out_bytes(a) -> float:
    return a.stats().extra["swap_out_bytes"]


def test_full_host_pool_raises_typed_error_and_loses_nothing(kind):
    with make_allocator(kind, SPEC, 64, host_num_tokens=16) as a:
        want = seq(a, "big", 20, 100)  # 5 pages, the host pool has 4
        seq(a, "small", 8, 200)
        before = snapshot(a)
        with pytest.raises(OutOfHostMemory):
            a.swap_out(["big"])
        with pytest.raises(OutOfKVMemory):  # the same error, by its base class
            a.swap_out(["small", "big"])
        assert snapshot(a) == before and digest(a, "big") == want
        a.check_integrity()
        a.swap_out(["small"]).wait(timeout=10)  # 2 pages fit
        assert a.seq_info("small").swapped


def test_failed_copies_leave_sequences_where_they_were(kind, monkeypatch):
    with make_allocator(kind, SPEC, 64) as a:
        want = seq(a, "s", 14, 100)
        pages = a.block_table("s")
        real_run = CopyPlan.run

        def broken(self):
            raise RuntimeError("DMA error")

        monkeypatch.setattr(CopyPlan, "run", broken)
        h = a.swap_out(["s"])
        with pytest.raises(RuntimeError, match="DMA error"):
            h.wait(timeout=10)
        a.check_integrity()
        assert not a.seq_info("s").swapped and a.block_table("s") == pages
        assert digest(a, "s") == want and a.stats().extra["host_used_tokens"] == 0
        monkeypatch.setattr(CopyPlan, "run", real_run)
        a.swap_out(["s"]).wait(timeout=10)
        monkeypatch.setattr(CopyPlan, "run", broken)
        used = a.stats().used_tokens
        h = a.swap_in(["s"])
        with pytest.raises(RuntimeError):
            h.wait(timeout=10)
        a.check_integrity()
        assert a.seq_info("s").swapped and a.stats().used_tokens == used
        monkeypatch.setattr(CopyPlan, "run", real_run)
        a.swap_in(["s"]).wait(timeout=10)
        assert digest(a, "s") == want
        monkeypatch.setattr(CopyPlan, "run", broken)
        a.free("s", keep_on_host=True)  # a finished sequence whose copy fails is freed
        a.check_integrity()
        with pytest.raises(UnknownSequence):
            a.seq_info("s")  # waits for the copy, which fails
        assert a.seq_ids() == [] and a.stats().used_tokens == 0
        a.check_integrity()


def test_copies_in_flight_hold_their_pages_and_calls_wait_for_them(kind, monkeypatch):
    gate = threading.Event()
    real_run = CopyPlan.run

    def slow(self):
        assert gate.wait(10)
        real_run(self)

    with make_allocator(kind, SPEC, 64) as a:
        cap = a.stats().capacity_tokens
        want = seq(a, "s", 30, 100)
        a.add("t", [7] * (cap - 32))
        monkeypatch.setattr(CopyPlan, "run", slow)
        h = a.swap_out(["s"])
        assert not h.done() and a.stats().num_swapped_seqs == 1
        st = a.stats()
        assert st.used_tokens == 32 and st.extra["swaps_in_flight"] == 1  # still held
        a.check_integrity()
        threading.Timer(0.05, gate.set).start()
        a.reserve("t", cap - 28)  # one page more than is free: waits for the copy
        assert h.done() and a.stats().free_tokens == 28
        a.free("t")
        gate.clear()
        h = a.swap_in(["s"])
        assert not h.done()
        threading.Timer(0.05, gate.set).start()
        assert digest(a, "s") == want  # block_table waits for the copy
        assert h.done()
        a.check_integrity()


def test_reuse_copies_only_pages_written_since_the_last_swap(kind):
    for reuse in (True, False):
        with make_allocator(kind, SPEC, 128, swap_reuse=reuse) as a:
            page_bytes = a.stats().bytes_per_token * PS
            seq(a, "s", 42, 100)  # 10 full pages + 2 entries
            a.swap_out(["s"]).wait(timeout=10)
            assert out_bytes(a) == 11 * page_bytes
            a.swap_in(["s"]).wait(timeout=10)
            a.append("s", [1] * 6)
            write_random(a, "s", 6, seed=5)  # 48 entries: pages 10 and 11 changed
            want = digest(a, "s")
            a.swap_out(["s"]).wait(timeout=10)
            moved = out_bytes(a) - 11 * page_bytes
            assert moved == (2 if reuse else 12) * page_bytes
            assert a.stats().extra["host_used_tokens"] == 12 * PS
            a.swap_in(["s"]).wait(timeout=10)
            assert digest(a, "s") == want
            after = out_bytes(a)
            a.swap_out(["s"]).wait(timeout=10)  # nothing written since: nothing to copy
            assert out_bytes(a) - after == (0 if reuse else 12 * page_bytes)
            a.check_integrity()


def test_keep_on_host_and_resume_the_next_turn(kind):
    with make_allocator(kind, SPEC, 128) as a:
        page_bytes = a.stats().bytes_per_token * PS
        turn1 = list(range(100, 122))
        a.add("conv", turn1)
        write_random(a, "conv", 22, seed=1)
        want = digest(a, "conv")
        a.free("conv", keep_on_host=True)
        assert a.seq_info("conv").swapped  # naming it waits for the copy
        st = a.stats()
        assert st.used_tokens == 0 and st.extra["parked_seqs"] == 1 and "conv" in a.seq_ids()
        a.check_integrity()
        turn2 = turn1 + [5, 6, 7]
        assert a.resume("conv", turn2) == 22
        assert a.seq_info("conv").num_tokens == 25 and digest(a, "conv") == want
        write_random(a, "conv", 3, seed=2)
        a.free("conv", keep_on_host=True)  # only the pages written since move
        assert out_bytes(a) == 6 * page_bytes + 2 * page_bytes
        assert a.resume("conv", turn2 + [1]) == 25
        with pytest.raises(DuplicateSequence):
            a.resume("conv", turn2 + [1, 2])  # registered and not parked
        a.free("conv", keep_on_host=True)
        assert a.resume("conv", [1, 2, 3]) == 0  # not a continuation: a fresh sequence
        assert a.seq_info("conv").num_computed == 0
        assert a.stats().extra["host_used_tokens"] == 0
        assert a.resume("other", [4, 5]) == 0  # unknown: add
        a.swap_out(["other"]).wait(timeout=10)
        a.free("other", keep_on_host=True)  # already swapped: parked as is
        assert a.stats().extra["parked_seqs"] == 1
        a.free("other")
        a.free("conv")
        a.check_integrity()
        assert a.stats().extra["host_used_tokens"] == 0 and a.seq_ids() == []


def test_host_pool_evicts_resident_copies_then_parked_sequences_lru(kind):
    with make_allocator(kind, SPEC, 128, host_num_tokens=40) as a:  # 10 host pages
        for i, sid in enumerate(("p1", "p2")):
            seq(a, sid, 12, 100 * i)  # 3 pages each
            a.free(sid, keep_on_host=True)
        seq(a, "r", 8, 300)  # 2 pages: swapped out and in, so its copy is a spare
        a.swap_out(["r"]).wait(timeout=10)
        a.swap_in(["r"]).wait(timeout=10)
        a.check_integrity()
        seq(a, "x", 16, 400)  # 4 pages; 2 free: the resident copy of r goes first
        a.swap_out(["x"]).wait(timeout=10)
        assert {"p1", "p2", "r"} <= set(a.seq_ids()) and a.stats().extra["parked_seqs"] == 2
        seq(a, "y", 12, 500)  # 3 pages, none free: p1, the oldest parked, goes
        a.swap_out(["y"]).wait(timeout=10)
        assert "p1" not in a.seq_ids() and "p2" in a.seq_ids()
        a.check_integrity()
        page_bytes = a.stats().bytes_per_token * PS
        a.swap_in(["x"]).wait(timeout=10)  # x's copy becomes a spare (4 pages)
        before = out_bytes(a)
        a.swap_out(["r"]).wait(timeout=10)  # 2 pages, none free: x's spare goes, not p2
        assert out_bytes(a) - before == 2 * page_bytes  # r's own spare was evicted before
        assert "p2" in a.seq_ids() and a.stats().extra["parked_seqs"] == 1
        a.swap_out(["x"]).wait(timeout=10)  # its spare is gone: all 4 pages; p2 goes
        assert out_bytes(a) - before == 6 * page_bytes and "p2" not in a.seq_ids()
        seq(a, "z", 8, 600)
        before = snapshot(a)
        with pytest.raises(OutOfHostMemory):  # 1 page free, every copy is the only one
            a.swap_out(["z"])
        assert snapshot(a) == before
        a.check_integrity()


def test_per_block_mode_moves_the_same_bytes_with_more_copies(kind):
    results = {}
    for mode in ("runs", "per_block"):
        with make_allocator(kind, SPEC, 128, swap_mode=mode) as a:
            want = seq(a, "s", 40, 100)
            a.swap_out(["s"]).wait(timeout=10)
            a.swap_in(["s"]).wait(timeout=10)
            assert digest(a, "s") == want
            results[mode] = a.stats().extra["swap_copies"]
    assert results["per_block"] == 2 * 10 * SPEC.num_layers
    assert results["runs"] < results["per_block"]
    if kind == "grouped":
        assert results["runs"] == 2  # one run each way, one buffer (block layout)


def test_swapped_in_pages_are_found_by_the_prefix_cache_again(kind):
    with make_allocator(kind, SPEC, 64) as a:
        cap = a.stats().capacity_tokens
        prompt = list(range(100, 113))  # 3 full pages + 1 entry
        a.add("s", prompt)
        write_random(a, "s", 13, seed=1)
        a.swap_out(["s"]).wait(timeout=10)
        a.add("hog", [9] * cap)  # takes every page: the cached copies are evicted
        a.reserve("hog", cap)
        a.free("hog")
        a.add("probe", prompt)
        assert a.seq_info("probe").num_computed == 0  # gone from the device
        a.free("probe")
        a.swap_in(["s"]).wait(timeout=10)
        assert a.add("again", prompt) == 12  # the swapped-in pages are published
        assert a.block_table("again") == a.block_table("s")[:3]
        a.check_integrity()
