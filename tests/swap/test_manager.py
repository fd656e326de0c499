"""The swap manager: order, error propagation, callbacks on the caller's thread, timeouts."""

from __future__ import annotations

import threading
import time

import pytest

from kvmem.swap import SwapManager, Transfer


def test_transfers_complete_in_order_and_callbacks_run_on_the_caller_thread():
    m = SwapManager("cpu")
    log: list[tuple[str, int]] = []
    gate = threading.Event()
    callers: list[threading.Thread] = []

    def work(i: int):
        def run():
            if i == 0:
                assert gate.wait(5)
            log.append(("ran", i))

        return run

    def done(i: int):
        def cb(err):
            callers.append(threading.current_thread())
            log.append(("done", i))
            assert err is None

        return cb

    ts = [m.submit(work(i), done(i), nbytes=i) for i in range(5)]
    time.sleep(0.02)
    assert not any(t.done() for t in ts), "the first transfer blocks the rest"
    assert m.reap() == 0 and m.pending == 5
    gate.set()
    m.settle(ts[2])  # waits for 2; runs the callbacks of 0..2 (and of any later one done)
    assert [i for k, i in log if k == "done"][:3] == [0, 1, 2]
    m.drain()
    assert [i for k, i in log if k == "ran"] == [0, 1, 2, 3, 4]
    assert [i for k, i in log if k == "done"] == [0, 1, 2, 3, 4]
    assert all(c is threading.current_thread() for c in callers)
    assert all(t.seconds is not None and t.seconds >= 0 for t in ts)
    m.close()


def test_a_failing_copy_fails_its_own_handle_only():
    m = SwapManager("cpu")
    errors = []

    def boom():
        raise RuntimeError("copy failed")

    t1 = m.submit(boom, errors.append)
    t2 = m.submit(lambda: None, errors.append)
    with pytest.raises(RuntimeError, match="copy failed"):
        t1.wait(timeout=5)
    t2.wait(timeout=5)  # later transfers still run
    assert isinstance(t1.error, RuntimeError) and t2.error is None
    m.drain()
    assert [type(e) for e in errors] == [RuntimeError, type(None)]
    with pytest.raises(RuntimeError):
        t1.wait()  # re-raised every time it is waited on
    m.close()


def test_wait_times_out_and_close_drains():
    m = SwapManager("cpu")
    gate = threading.Event()
    t = m.submit(lambda: gate.wait(5))
    with pytest.raises(TimeoutError):
        t.wait(timeout=0.01)
    assert not t.done() and t.error is None
    gate.set()
    m.close()  # waits for it
    assert t.done() and m.pending == 0
    with pytest.raises(Exception, match="closed"):
        m.submit(lambda: None)
    done = Transfer.completed()
    assert done.done() and done.nbytes == 0
    done.wait(timeout=0)
