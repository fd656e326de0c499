"""The host VMM driver maps batches through kvmem.native, with and without the extension."""

from __future__ import annotations

import os
import re
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmem import native
from kvmem.backends.vmem.host import HostDriver

PAGE = 4096


@pytest.fixture(params=[True, False], ids=["native", "python"])
def driver(request, monkeypatch):
    if request.param and not native.enabled():
        pytest.skip(f"native primitives unavailable: {native.status()}")
    real = native.host_map_pages

    def forced(*args, **kw):
        return real(*args, native=request.param, **kw)

    monkeypatch.setattr(native, "host_map_pages", forced)
    d = HostDriver()
    yield d
    d.close()


def test_map_many_maps_every_page_with_its_own_memory(driver):
    base = driver.reserve(8 * PAGE)
    handles = driver.create_many(4, PAGE)
    addrs = [base + i * PAGE for i in (0, 2, 3, 7)]
    done, err = driver.map_many(list(zip(addrs, handles, strict=True)), PAGE)
    assert (done, err) == (4, None)
    for i, a in enumerate(addrs):
        driver.tensor(a, PAGE).fill_(i + 1)
    for i, a in enumerate(addrs):
        assert int(driver.tensor(a, PAGE).sum()) == (i + 1) * PAGE
    driver.free_range(base, 8 * PAGE)


def test_map_many_stops_at_a_page_outside_the_reservation(driver):
    base = driver.reserve(2 * PAGE)
    handles = driver.create_many(3, PAGE)
    pages = [(base, handles[0]), (base + PAGE, handles[1]), (base + 2 * PAGE, handles[2])]
    done, err = driver.map_many(pages, PAGE)
    assert done == 2 and err is not None and "reserved range" in str(err)
    assert int(driver.tensor(base + PAGE, PAGE).sum()) == 0  # the two inside are mapped
    driver.free_range(base, 2 * PAGE)


def test_map_many_refuses_an_unknown_page_handle(driver):
    base = driver.reserve(2 * PAGE)
    (h,) = driver.create_many(1, PAGE)
    done, err = driver.map_many([(base, h), (base + PAGE, h + 10 * PAGE)], PAGE)
    assert done == 0 and err is not None and "no page" in str(err)
    driver.free_range(base, 2 * PAGE)


# ------------------------------------------------- the native mapping thread
needs_native = pytest.mark.skipif(
    "not __import__('kvmem.native').native.enabled()", reason="native extension not in use"
)

# (page index in an 8-page range, or past it; handle index, or an unknown one)
JOBS = st.lists(
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 7)), max_size=8), min_size=1, max_size=4
)


def _pages(d: HostDriver, base: int, handles: list[int], job, unknown: int) -> list:
    return [(base + i * PAGE, handles[h] if h < 6 else unknown + h * PAGE) for i, h in job]


@needs_native
@settings(max_examples=40, deadline=None)
@given(JOBS)
def test_the_native_worker_maps_as_map_many_does(jobs):
    """Jobs on the native thread end as map_many ends: pages mapped, the error, the memory."""
    from kvmem.backends.vmem.mapworker import NativeHostWorker

    ref, d = HostDriver(), HostDriver()
    try:
        bases = [x.reserve(8 * PAGE) for x in (ref, d)]
        handles = [x.create_many(6, PAGE) for x in (ref, d)]  # 6 of the 8 handle indices exist
        worker = d.map_worker()
        assert isinstance(worker, NativeHostWorker)
        tickets = [
            worker.submit(np.array(_pages(d, bases[1], handles[1], j, 1 << 30)), PAGE) for j in jobs
        ]
        assert worker.wait(0, 10)
        got = {t: (done, err) for t, done, err in worker.poll()}
        assert sorted(got) == tickets
        for j, t in zip(jobs, tickets, strict=True):
            want = ref.map_many(_pages(ref, bases[0], handles[0], j, 1 << 30), PAGE)
            done, err = got[t]
            assert done == want[0] and _msg(err) == _msg(want[1])
        for i in range(8):  # the same page (or none) under every address
            a = [_read(x, b + i * PAGE) for x, b in zip((ref, d), bases, strict=True)]
            assert a[0] == a[1]
        worker.close()
        assert not worker.running
        with pytest.raises(ValueError, match="closed"):
            worker.submit(np.array(_pages(d, bases[1], handles[1], [(0, 0)], 0)), PAGE)
    finally:
        ref.close()
        d.close()


def _msg(err: Exception | None) -> str:
    """The error's text without addresses (the two drivers' ranges differ)."""
    return re.sub(r"0x[0-9a-f]+", "ADDR", str(err))


def _read(d: HostDriver, addr: int) -> int | None:
    """Which file page is mapped at ``addr`` (marked by writing through it), None if none."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                if "rw" not in line.split()[1]:
                    return None
                off = int(line.split()[2], 16) + (addr - lo)
                return off // PAGE
    return None


@needs_native
def test_a_failed_mmap_on_the_native_thread_is_reported_with_its_errno():
    d = HostDriver()
    base = d.reserve(4 * PAGE)
    h = d.create_many(3, PAGE)
    worker = d.map_worker()
    real_fd = d.fd
    d.fd = 1_000_000  # no such descriptor: the thread's mmap fails with EBADF
    try:
        t = worker.submit(np.array([(base, h[0]), (base + PAGE, h[1])]), PAGE)
    finally:
        d.fd = real_fd
    assert worker.wait(t, 10)
    ((ticket, done, err),) = worker.poll()
    assert (ticket, done) == (t, 0) and "Bad file descriptor" in str(err)
    t = worker.submit(np.array([(base + 2 * PAGE, h[2]), (base + 3 * PAGE, h[0])]), PAGE)
    assert worker.wait(t, 10)
    assert worker.poll() == [(t, 2, None)]
    worker.close()
    d.close()


def _idle_threads() -> set[int]:
    """Thread ids of this process at the SCHED_IDLE policy."""
    out = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            if os.sched_getscheduler(int(tid)) == os.SCHED_IDLE:
                out.add(int(tid))
        except OSError:  # the thread ended meanwhile
            pass
    return out


@needs_native
def test_the_native_thread_idles_at_low_priority_and_runs_at_the_default_one_when_waited_for():
    """Idle priority keeps the thread off the step's core; while someone waits for a job it
    runs at the default priority, so that busy CPUs cannot starve it (priority inversion)."""
    before = _idle_threads()
    d = HostDriver()
    n = 8000
    base = d.reserve(n * PAGE)
    (h,) = d.create_many(1, PAGE)
    worker = d.map_worker()
    (tid,) = _idle_threads() - before  # the mapping thread
    seen: set[int] = set()
    waiting = threading.Event()

    def watch() -> None:
        while waiting.is_set():
            seen.add(os.sched_getscheduler(tid))
            time.sleep(1e-4)

    # one page mapped at n addresses: n mmaps (the offsets do not follow on), tens of ms
    t = worker.submit(np.array([(base + i * PAGE, h) for i in range(n)]), PAGE)
    waiting.set()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert worker.wait(t, 30)
    finally:
        waiting.clear()
        watcher.join()
    assert worker.poll() == [(t, n, None)]
    assert os.SCHED_OTHER in seen, seen
    assert os.sched_getscheduler(tid) == os.SCHED_IDLE
    worker.close()
    assert tid not in _idle_threads()
    d.close()


@needs_native
def test_the_native_worker_maps_across_reserved_ranges_and_refuses_bad_buffers():
    d = HostDriver()
    r1, r2 = d.reserve(4 * PAGE), d.reserve(4 * PAGE)
    h = d.create_many(4, PAGE)
    worker = d.map_worker()
    # two pages in each of two ranges, adjacent in the file
    pages = [(r1 + 2 * PAGE, h[0]), (r1 + 3 * PAGE, h[1]), (r2, h[2]), (r2 + PAGE, h[3])]
    t = worker.submit(np.array(pages), PAGE)
    assert worker.wait(t, 10)
    assert worker.poll() == [(t, 4, None)]
    assert [_read(d, a) for a, _ in pages] == [o // PAGE for _, o in pages]
    mapper = worker._mapper
    ranges = list(d._ranges.items())
    for bad in (
        np.zeros((2, 2), dtype=np.float64),  # not int64
        np.zeros((2, 3), dtype=np.int64),  # not (addr, offset) rows
        np.zeros((4, 2), dtype=np.int64)[::2],  # not contiguous
    ):
        with pytest.raises(ValueError):
            mapper.submit(d.fd, ranges, bad, PAGE)
    with pytest.raises(ValueError, match="page size"):
        mapper.submit(d.fd, ranges, np.array(pages), PAGE + 1)
    with pytest.raises(ValueError, match="descriptor"):
        mapper.submit(-1, ranges, np.array(pages), PAGE)
    assert mapper.submitted == 1  # nothing refused was queued
    worker.close()
    d.close()
