"""vmem mapping in runs: adjacent pages in one mmap, all-or-nothing unmaps, a worker that
publishes slot by slot."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest

from kvmem import DriverError, native
from kvmem.backends.vmem.host import HostDriver
from tests.backends.test_vmem import KIB, TB, assert_kv, decode_steps, vmem, write_step

PAGE = 4096
WORKER = "kvmem-vmem-map-ahead"  # the map-ahead thread's name


@pytest.fixture(params=[True, False], ids=["native", "python"])
def calls(request, monkeypatch):
    """Force the native or the Python path and record each host map/unmap call.

    Each entry: (kind, number of addresses, bytes per mapping, thread name).
    """
    if request.param and not native.enabled():
        pytest.skip(f"native primitives unavailable: {native.status()}")
    seen: list[tuple[str, int, int, str]] = []
    real_map, real_unmap = native.host_map_pages, native.host_unmap_pages

    def host_map(fd, base, length, addrs, offs, size, **kw):
        seen.append(("map", len(addrs), size, threading.current_thread().name))
        return real_map(fd, base, length, addrs, offs, size, native=request.param, **kw)

    def host_unmap(base, length, addrs, size, **kw):
        seen.append(("unmap", len(addrs), size, threading.current_thread().name))
        return real_unmap(base, length, addrs, size, native=request.param, **kw)

    monkeypatch.setattr(native, "host_map_pages", host_map)
    monkeypatch.setattr(native, "host_unmap_pages", host_unmap)
    return seen


def perms(addr: int) -> str:
    """The permissions of the mapping holding ``addr`` in /proc/self/maps."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return line.split()[1]
    raise AssertionError(f"{addr:#x} is not mapped at all")


def test_map_many_maps_each_run_of_adjacent_pages_with_one_mmap(calls):
    d = HostDriver()
    base = d.reserve(16 * PAGE)
    h = d.create_many(6, PAGE)
    # pages 0-2 from file pages 0-2 (one run), page 5 from file page 5, pages 8-9 from 3-4
    pages = [(base + i * PAGE, h[i]) for i in range(3)]
    pages += [(base + 5 * PAGE, h[5]), (base + 8 * PAGE, h[3]), (base + 9 * PAGE, h[4])]
    assert d.map_many(pages, PAGE) == (6, None)
    assert [(n, size) for _, n, size, _ in calls] == [(1, 3 * PAGE), (1, PAGE), (1, 2 * PAGE)]
    for i, (a, _) in enumerate(pages):
        d.tensor(a, PAGE).fill_(i + 1)
    for i, (a, _) in enumerate(pages):  # every page has its own memory
        assert int(d.tensor(a, PAGE).sum()) == (i + 1) * PAGE
    assert perms(base + 6 * PAGE).startswith("---")  # the gaps stay reserved, unmapped
    d.free_range(base, 16 * PAGE)
    d.close()


def test_runs_of_one_length_go_to_the_driver_in_one_call(calls):
    d = HostDriver()
    base = d.reserve(64 * PAGE)
    h = d.create_many(8, PAGE)
    # two layers' rows 32 pages apart, four adjacent pages each: two runs of four
    pages = [
        (base + row * 32 * PAGE + i * PAGE, h[row * 4 + i]) for row in (0, 1) for i in range(4)
    ]
    assert d.map_many(pages, PAGE) == (8, None)
    assert [(n, size) for _, n, size, _ in calls] == [(2, 4 * PAGE)]
    assert d.unmap_many([a for a, _ in pages], PAGE) == (8, None)
    assert [(n, size) for _, n, size, _ in calls[1:]] == [(2, 4 * PAGE)]
    assert perms(base).startswith("---") and perms(base + 35 * PAGE).startswith("---")
    d.free_range(base, 64 * PAGE)
    d.close()


def test_a_run_reaching_past_the_reserved_range_maps_the_pages_inside(calls):
    d = HostDriver()
    base = d.reserve(3 * PAGE)
    h = d.create_many(5, PAGE)
    pages = [(base + i * PAGE, h[i]) for i in range(5)]
    done, err = d.map_many(pages, PAGE)
    assert done == 3 and isinstance(err, DriverError) and "reserved range" in str(err)
    assert perms(base + 2 * PAGE).startswith("rw")
    done, err = d.unmap_many([a for a, _ in pages], PAGE)
    assert done == 3 and isinstance(err, DriverError) and "reserved range" in str(err)
    assert perms(base + 2 * PAGE).startswith("---")
    d.free_range(base, 3 * PAGE)
    d.close()


def test_an_unaligned_handle_is_a_driver_error(calls):
    d = HostDriver()
    base = d.reserve(2 * PAGE)
    (h,) = d.create_many(1, PAGE)
    done, err = d.map_many([(base, h + 8)], PAGE)
    assert done == 0 and isinstance(err, DriverError)
    d.free_range(base, 2 * PAGE)
    d.close()


def test_a_sequence_growing_by_many_pages_is_mapped_with_one_mmap_per_layer(calls):
    tpp = 4 * KIB // TB
    a = vmem()
    tokens = {"s": [1] * (5 * tpp)}
    a.add("s", tokens["s"])
    a.reserve("s", 5 * tpp)
    maps = [c for c in calls if c[0] == "map"]
    assert [(n, size) for _, n, size, _ in maps] == [(a.spec.num_layers, 5 * PAGE)]
    write_step(a, [("s", 5 * tpp)], tokens)
    a.check_integrity()
    assert_kv(a, "s", tokens["s"])
    a.close()


class FailingUnmaps(HostDriver):
    """A host driver whose next ``unmap_many`` unmaps ``fail_after`` pages, then fails."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_after: int | None = None

    def unmap_many(self, addrs, size):
        if self.fail_after is None:
            return super().unmap_many(addrs, size)
        n, self.fail_after = self.fail_after, None
        done, _ = super().unmap_many(addrs[:n], size)
        return done, DriverError("injected unmap failure")


@pytest.mark.parametrize("fail_after", [0, 1, 3, 5])
def test_a_failed_unmap_maps_back_what_it_unmapped_and_changes_nothing(fail_after):
    tpp = 4 * KIB // TB
    drv = FailingUnmaps()
    a = vmem(driver=drv, num_tokens=8 * tpp, max_seqs=2)
    tokens = {"s": [7] * (3 * tpp)}
    a.add("s", tokens["s"])
    a.reserve("s", 3 * tpp)
    write_step(a, [("s", 3 * tpp)], tokens)
    sp, slot = a.space, a.slot("s")
    before = (list(sp.groups[slot]), list(sp.pool), sp.covered[slot])
    drv.fail_after = fail_after  # 2 layers x 3 pages: fail part way through a layer or two
    with pytest.raises(DriverError, match="injected"):
        sp.shrink(slot, 0, 3)
    assert (list(sp.groups[slot]), list(sp.pool), sp.covered[slot]) == before
    a.check_integrity()
    assert_kv(a, "s", tokens["s"])  # the same physical pages are back, bytes and all
    decode_steps(a, tokens, ["s"], 2)
    assert_kv(a, "s", tokens["s"])
    a.close()


@pytest.fixture(params=["native", "thread"])
def worker(request, monkeypatch):
    """The map-ahead worker kind: the extension's thread, or a Python thread."""
    if request.param == "native" and not native.enabled():
        pytest.skip(f"native primitives unavailable: {native.status()}")
    if request.param == "thread":
        monkeypatch.setattr(HostDriver, "map_worker", lambda self: None)
    return request.param


def test_the_worker_maps_a_chunk_of_pages_with_one_mmap_per_layer(worker, monkeypatch):
    plans = []  # (thread, [(mmap calls, bytes per call), ...]) of every map job
    real, real_submit = HostDriver.plan_map, HostDriver.submit_map

    def plan_map(self, pages, size):
        plan = real(self, pages, size)
        runs = [(len(r[2]), r[4]) for r in plan.runs]
        plans.append((threading.current_thread().name, runs))
        return plan

    class Recorder:  # the native mapper, its jobs seen as their mmap calls
        def __init__(self, mapper):
            self.mapper = mapper

        def submit(self, fd, ranges, pages, size):
            follows = (np.diff(pages, axis=0) == size).all(axis=1)
            cuts = [0, *(np.flatnonzero(~follows) + 1).tolist(), len(pages)]
            runs = [(1, (b - a) * size) for a, b in itertools.pairwise(cuts) if b > a]
            plans.append((threading.current_thread().name, runs))
            return self.mapper.submit(fd, ranges, pages, size)

        def __getattr__(self, name):
            return getattr(self.mapper, name)

    def submit_map(self, mapper, pages, size):
        return real_submit(self, Recorder(mapper), pages, size)

    monkeypatch.setattr(HostDriver, "submit_map", submit_map)
    monkeypatch.setattr(HostDriver, "plan_map", plan_map)
    a = vmem(map_ahead=True, num_tokens=8 * 4096, max_seqs=4)
    tokens = {s: [1] * 10 for s in "ab"}
    for sid in tokens:
        a.add(sid, tokens[sid])
        a.reserve(sid, 10)
    write_step(a, [(sid, 10) for sid in tokens], tokens)
    assert a.wait_map_ahead(10)
    assert a.stats().extra["map_ahead_groups"] > 0, "the worker mapped nothing"
    # the worker's jobs: planned on its thread (Python) or on the caller's (native)
    jobs = [runs for who, runs in plans if (who == WORKER) == (worker == "thread")]
    chunks = [runs for runs in jobs if max(size for _, size in runs) >= 4 * PAGE]
    assert chunks, "no job mapped a chunk of pages"
    assert all(sum(n for n, _ in runs) == a.spec.num_layers for runs in chunks)  # one per layer
    decode_steps(a, tokens, list(tokens), 3 * (4 * KIB // TB))
    a.check_integrity()
    for sid in tokens:
        assert_kv(a, sid, tokens[sid])
    a.close()


class GatedDriver(HostDriver):
    """A host driver that holds the worker's ``block_at``-th map call until ``gate`` opens."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.block_at = 0
        self.gate = threading.Event()

    def map_many(self, pages, size):
        if threading.current_thread().name == WORKER:
            self.calls += 1
            if self.calls == self.block_at:
                assert self.gate.wait(20), "the gate was never opened"
        return super().map_many(pages, size)


def wait_for(cond, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_a_step_never_waits_for_the_worker_mapping_another_slot():
    tpp = 4 * KIB // TB
    drv = GatedDriver()
    drv.block_at = 1
    a = vmem(driver=drv, map_ahead=True, num_tokens=64 * tpp, max_seqs=4)
    a.add("w", [1] * 10)
    a.reserve("w", 10)  # the worker's first call (w's pages) blocks
    wait_for(lambda: drv.calls == 1)
    a.add("y", [2] * (tpp - 2))
    a.reserve("y", tpp - 2)  # 2 tokens of room left: the most urgent
    a.add("z", [3])
    a.reserve("z", 1)
    first_gate = drv.gate
    drv.gate, drv.block_at = threading.Event(), 3  # y's call (2) goes through, z's (3) blocks
    first_gate.set()
    wait_for(lambda: drv.calls == 3)
    target = a.space.covered[a.slot("y")] + 2 * tpp  # past what the worker mapped for y
    done = threading.Event()

    def step() -> None:
        a.reserve("y", target)  # maps here, under the allocator's lock
        done.set()

    t = threading.Thread(target=step, name="step")
    t.start()
    try:
        assert done.wait(10), "reserve waited for the worker mapping another slot"
    finally:
        drv.gate.set()
        t.join()
    assert a.wait_map_ahead(10)
    a.check_integrity()
    assert a.seq_info("y").capacity >= target
    a.close()
