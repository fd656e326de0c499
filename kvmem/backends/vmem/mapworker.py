"""Where the map-ahead worker's mappings run: a native thread, or a Python one.

A :class:`~kvmem.backends.vmem.driver.MapWorker` takes ``map_many`` jobs from
the allocator's thread and runs them in order on a thread of its own; the
results come back through its ``poll`` on the allocator's thread, which
publishes them. The worker touches no allocator state.

- :class:`NativeHostWorker` (the host driver with the native extension): a
  C++ thread runs the ``mmap`` calls and never takes the GIL, so a decode
  step running Python meanwhile is never held up by it. It runs at idle
  priority (waking it never takes the step's core), and at the default one
  while someone waits for one of its jobs.
- :class:`ThreadWorker` (any driver): a Python thread calls the driver's
  ``map_many``. It needs the GIL to start a job and between the driver's
  calls, and a busy caller thread hands the GIL over only every switch
  interval (5 ms): its mappings may land late, and take the GIL from the
  caller's steps when they do.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Any, Protocol

from kvmem.backends.vmem.driver import MapResult, Pages, VMemDriver
from kvmem.errors import DriverError

__all__ = ["NativeHostWorker", "PlanningDriver", "ThreadWorker", "map_safely"]


def map_safely(driver: VMemDriver, pages: Pages, size: int) -> tuple[int, DriverError | None]:
    """``driver.map_many``; an exception it raises becomes a DriverError after every page
    (so that the caller unmaps them all)."""
    try:
        return driver.map_many(pages, size)
    except Exception as e:  # not the driver's contract: all of it is undone, and reported
        return len(pages), DriverError(f"map_many failed unexpectedly: {e!r}")


def _serve(driver: VMemDriver, jobs: Any, done: ThreadWorker) -> None:
    """The Python worker thread: run the jobs until ``None``."""
    while (job := jobs.get()) is not None:
        ticket, pages, size = job
        mapped, err = map_safely(driver, pages, size)
        done.finished(ticket, mapped, err)


class ThreadWorker:
    """A MapWorker on a Python thread (started by :meth:`start` or the first job)."""

    def __init__(self, driver: VMemDriver) -> None:
        self._driver = driver
        self._jobs: queue.SimpleQueue[tuple[int, Pages, int] | None] = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._results: deque[MapResult] = deque()
        self._submitted = self._finished = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=_serve,
                args=(self._driver, self._jobs, self),
                name="kvmem-vmem-map-ahead",
                daemon=True,
            )
            self._thread.start()

    def submit(self, pages: Pages, size: int) -> int:
        """Queue a job for the thread (started first if need be); returns its ticket."""
        self.start()
        with self._cv:
            self._submitted += 1
            ticket = self._submitted
        self._jobs.put((ticket, pages, size))
        return ticket

    def finished(self, ticket: int, mapped: int, err: DriverError | None) -> None:
        """(Worker thread.) Record a job's result."""
        with self._cv:
            self._results.append((ticket, mapped, err))
            self._finished = ticket
            self._cv.notify_all()

    def poll(self) -> list[MapResult]:
        """MapResults finished since the last poll."""
        with self._cv:
            out = list(self._results)
            self._results.clear()
        return out

    def wait(self, ticket: int = 0, timeout: float | None = None) -> bool:
        """Block until job ``ticket`` (all, for 0) is finished; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._finished >= (ticket or self._submitted), timeout)

    def close(self) -> None:
        """Finish the queued jobs, stop the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            if self._thread is not threading.current_thread():
                self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        """Its thread runs (it starts with the first job)."""
        return self._thread is not None and self._thread.is_alive()


class PlanningDriver(Protocol):
    """What :class:`NativeHostWorker` needs of the host driver."""

    def submit_map(self, mapper: Any, pages: Pages, size: int) -> tuple[int, Any]:
        """Queue ``map_many(pages, size)`` on ``mapper``: the ticket, and the ``MapPlan``
        (:mod:`kvmem.backends.vmem.host`) that reads its result."""
        ...


class NativeHostWorker:
    """A MapWorker on the native extension's mapping thread (host driver only).

    A job is checked on the caller's thread (handles looked up and
    backed, runs of adjacent pages merged: ``HostDriver.submit_map``); the
    thread only makes the ``mmap`` calls.
    """

    def __init__(self, driver: PlanningDriver, mapper: Any) -> None:
        self._driver = driver
        self._mapper = mapper  # kvmem_native.HostMapper
        self._plans: dict[int, Any] = {}  # ticket: its MapPlan

    def start(self) -> None:
        """Nothing to do: the native thread runs from the start."""

    def submit(self, pages: Pages, size: int) -> int:
        """Check the job and queue its ``mmap`` calls; returns its ticket."""
        ticket, plan = self._driver.submit_map(self._mapper, pages, size)
        self._plans[ticket] = plan
        return ticket

    def poll(self) -> list[MapResult]:
        """MapResults finished since the last poll, as ``map_many`` would have returned them."""
        out: list[MapResult] = []
        for ticket, mapped, errno in self._mapper.poll():
            done, err = self._plans.pop(ticket).outcome(mapped, errno)
            out.append((ticket, done, err))
        return out

    def wait(self, ticket: int = 0, timeout: float | None = None) -> bool:
        """Block (the GIL released) until job ``ticket`` (all, for 0) is finished."""
        return bool(self._mapper.wait(ticket, -1.0 if timeout is None else timeout))

    def close(self) -> None:
        """Finish the queued jobs, stop the native thread."""
        self._mapper.close()

    @property
    def running(self) -> bool:
        """The native thread runs (until :meth:`close`)."""
        return bool(self._mapper.running)
