"""The swap manager: runs copies off the caller's path and hands back handles.

On a CPU device the copies run on one worker thread; on a CUDA device they
are issued on one dedicated stream (which first waits for the work already
queued on the caller's current stream) and a CUDA event marks their end.
Either way:

* **Order.** Transfers run and complete in submission order: when a
  transfer is done, every transfer submitted before it is done too.
* **Errors.** A copy that raises marks its own transfer done with that
  error, which :meth:`Transfer.wait` re-raises; later transfers still run.
* **Bookkeeping on the caller's thread.** ``submit`` takes an ``on_done``
  callback that the manager calls with the transfer's error (or None) from
  :meth:`SwapManager.reap` or :meth:`SwapManager.settle`, on the thread
  that calls those, in submission order. The worker thread only copies
  bytes; allocator state is never touched from it.

The CUDA path is written for GPUs and has not been run yet.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from kvmem.errors import KVError

DoneCallback = Callable[[BaseException | None], None]


class Transfer:
    """A submitted swap; satisfies :class:`kvmem.allocator.SwapHandle`.

    ``nbytes`` and ``num_copies`` describe the work; ``seconds`` is the time
    the copies took on the worker thread (None on CUDA or until done).
    """

    def __init__(self, nbytes: int = 0, num_copies: int = 0) -> None:
        self.nbytes = nbytes
        self.num_copies = num_copies
        self.seconds: float | None = None
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._event: Any = None

    @classmethod
    def completed(cls) -> Transfer:
        """A transfer that moved nothing and is already done."""
        t = cls()
        t.seconds = 0.0
        t._finished.set()
        return t

    def done(self) -> bool:
        """True once the copies have finished, successfully or not."""
        if not self._finished.is_set() and self._event is not None and self._event.query():
            self._finished.set()
        return self._finished.is_set()

    def _wait(self, timeout: float | None) -> bool:
        if self._event is not None and not self._finished.is_set():
            if timeout is None:
                self._event.synchronize()
                self._finished.set()
            else:
                deadline = time.monotonic() + timeout
                while not self.done() and time.monotonic() < deadline:
                    time.sleep(50e-6)
        return self._finished.wait(timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Block until done; re-raise the copy's error. TimeoutError if ``timeout`` passes first."""
        if not self._wait(timeout):
            raise TimeoutError(f"swap not done after {timeout} s")
        if self._error is not None:
            raise self._error

    @property
    def error(self) -> BaseException | None:
        """The copy's error, once done (None while running or on success)."""
        return self._error if self._finished.is_set() else None


class SwapManager:
    """Runs copy work for one device, in submission order, off the caller's path."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._stream: Any = None
        self._queue: queue.SimpleQueue[tuple[Transfer, Callable[[], None]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._pending: deque[tuple[Transfer, DoneCallback | None]] = deque()
        self._closed = False

    @property
    def pending(self) -> int:
        """Transfers whose ``on_done`` has not run yet."""
        return len(self._pending)

    def oldest(self) -> Transfer | None:
        """The earliest transfer whose ``on_done`` has not run yet."""
        return self._pending[0][0] if self._pending else None

    def submit(
        self,
        work: Callable[[], None],
        on_done: DoneCallback | None = None,
        nbytes: int = 0,
        num_copies: int = 0,
    ) -> Transfer:
        """Queue ``work`` (issues the copies); return its transfer."""
        if self._closed:
            raise KVError("swap manager is closed")
        t = Transfer(nbytes, num_copies)
        self._pending.append((t, on_done))
        if self._cuda:
            self._issue_cuda(t, work)
        else:
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name="kvmem-swap", daemon=True)
                self._thread.start()
            self._queue.put((t, work))
        return t

    def _issue_cuda(self, t: Transfer, work: Callable[[], None]) -> None:
        try:
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                work()
            ev = torch.cuda.Event()
            ev.record(self._stream)
            t._event = ev
        except BaseException as e:  # noqa: BLE001 - any failure belongs to the transfer
            t._error = e
            t._finished.set()

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            t, work = item
            t0 = time.perf_counter()
            try:
                work()
            except BaseException as e:  # noqa: BLE001 - delivered through the handle
                t._error = e
            t.seconds = time.perf_counter() - t0
            t._finished.set()

    def reap(self) -> int:
        """Run ``on_done`` of every finished transfer at the front of the queue; return how many."""
        n = 0
        while self._pending and self._pending[0][0].done():
            t, cb = self._pending.popleft()
            n += 1
            if cb is not None:
                cb(t.error)
        return n

    def settle(self, t: Transfer) -> None:
        """Wait for ``t`` (not raising its error); run ``on_done`` of it, all before it, and
        any later transfer already done."""
        t._wait(None)
        self.reap()

    def drain(self) -> None:
        """Wait for every transfer and run every pending ``on_done``."""
        while self._pending:
            self.settle(self._pending[-1][0])

    def close(self) -> None:
        """Drain, then stop the worker thread. The manager cannot be used afterwards."""
        if self._closed:
            return
        self.drain()
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


__all__ = ["DoneCallback", "SwapManager", "Transfer"]
