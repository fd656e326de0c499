"""An instance's pipe to the front: a writer killed mid-message silences only itself."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time

import pytest

from kvmem.cluster.instance import Outbox, pump

pytestmark = pytest.mark.timeout(120)
BIG = 1 << 20  # larger than a pipe holds: with nobody reading, the writer stops mid-message


def _flood(conn, size: int, tag: str) -> None:
    out = Outbox(conn)
    for i in range(10**9):
        out.put((tag, i, bytes(size)))
        time.sleep(0.002)


def _start_pump(conn, into: queue.Queue, stop: threading.Event) -> threading.Thread:
    t = threading.Thread(target=pump, args=(conn, into, stop), daemon=True)
    t.start()
    return t


def _drain(into: queue.Queue) -> list:
    got = []
    while True:
        try:
            got.append(into.get_nowait())
        except queue.Empty:
            return got


def test_an_instance_killed_mid_message_ends_its_own_pipe_and_the_others_go_on():
    ctx = multiprocessing.get_context("spawn")  # as the cluster: a child holds only its own pipe
    (ra, wa), (rb, wb) = ctx.Pipe(duplex=False), ctx.Pipe(duplex=False)
    a = ctx.Process(target=_flood, args=(wa, BIG, "a"), daemon=True)
    b = ctx.Process(target=_flood, args=(wb, 100, "b"), daemon=True)
    stop = threading.Event()
    try:
        for p in (a, b):
            p.start()
        wa.close()  # as the front does: the instance holds the only writing end
        wb.close()
        into: queue.Queue = queue.Queue()
        pump_b = _start_pump(rb, into, stop)
        assert into.get(timeout=60)[0] == "b"
        assert ra.poll(60)  # a has started its first message, which cannot fit: it is stuck
        time.sleep(0.2)
        a.kill()
        a.join(10)
        pump_a = _start_pump(ra, into, stop)
        pump_a.join(20)
        assert not pump_a.is_alive()  # the cut message ended a's pipe instead of blocking
        before = _drain(into)
        time.sleep(0.5)
        after = _drain(into)
        assert {m[0] for m in before + after} == {"b"}  # nothing of a's cut message came out
        assert after, "b's messages stopped after a died"
        assert [m[1] for m in before + after] == list(
            range(before[0][1], before[0][1] + len(before) + len(after))
        )  # in order, none lost
        assert pump_b.is_alive()
    finally:
        stop.set()
        for p in (a, b):
            if p.is_alive():
                p.kill()
            p.join(10)


def test_an_outbox_sends_what_was_put_before_it_closes():
    ctx = multiprocessing.get_context("fork")
    r, w = ctx.Pipe(duplex=False)
    out = Outbox(w)
    for i in range(200):
        out.put(("m", i))
    out.close(10)
    got = []
    while True:
        try:
            got.append(r.recv())
        except EOFError:
            break
    assert got == [("m", i) for i in range(200)]
