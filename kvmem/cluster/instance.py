"""One instance of a :class:`~kvmem.cluster.Cluster`: the process that runs an engine.

Each instance reads the front's messages from its own inbox queue and
sends its own messages (outputs, loads, hand-over reports) through a pipe
of its own, which nothing else writes::

    front ── inbox (queue) ──▶ instance i ── Outbox ─ pipe i ─▶ front (one reader thread each)

The pipe is not shared on purpose. A multiprocessing queue written by several
processes serialises them on one cross-process lock; an instance killed while
its queue feeder held that lock (blocked on a full pipe, or just preempted
while writing) would leave it held forever and silence every other instance.
A dead instance can only cut its own pipe short: the front's reader of that
pipe sees the end of it (the front keeps no copy of the writing end) and
stops.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

from kvmem.cluster.disagg import pair_transports, role_of, start_acceptors
from kvmem.cluster.policy import Load
from kvmem.errors import KVError

_SWITCH_S = 0.0005
_CLOSE = object()


class Outbox:
    """An instance's messages to the front: ``put`` never blocks, one thread writes the pipe."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._feed, name="kvmem-outbox", daemon=True)
        self._thread.start()

    def put(self, msg: Any) -> None:
        """Queue ``msg`` (picklable) for the front."""
        self._queue.put(msg)

    def close(self, timeout: float) -> None:
        """Send what is queued (waiting at most ``timeout`` seconds), then close the pipe."""
        self._queue.put(_CLOSE)
        self._thread.join(timeout)

    def _feed(self) -> None:
        while True:
            msg = self._queue.get()
            if msg is _CLOSE:
                break
            try:
                self._conn.send(msg)
            except OSError:  # the front is gone
                break
        with contextlib.suppress(OSError):
            self._conn.close()


def pump(conn: Connection, into: queue.Queue[Any], stop: threading.Event) -> None:
    """The front's side of an instance's pipe: move its messages into ``into`` until the pipe
    ends (the instance stopped or died, maybe in the middle of a message) or ``stop`` is set
    (the cluster sets it once its instances are gone); then close it."""
    with conn:
        while not stop.is_set():
            try:
                if conn.poll(0.1):
                    into.put(conn.recv())
            except (EOFError, OSError):
                return


def instance_main(
    rank: int,
    size: int,
    port: int,
    options: Mapping[str, Any],
    inbox: Any,
    conn: Connection,
    timeout: float,
    report_s: float,
    prefill: int = 0,
) -> None:
    """One instance process: an engine stepping, answering the dispatcher's messages.

    ``inbox`` (a queue) brings the front's messages; ``conn`` (the writing
    end of a pipe of this instance alone) takes this instance's messages to
    the front.
    """
    import torch
    import torch.distributed as dist

    from kvmem.distributed.transport import Transport
    from kvmem.engine import Engine, RequestOutput
    from kvmem.transfer.live import abort_remote

    # ``Cluster.dump_state`` sends SIGUSR1: every thread's stack goes to this process's stderr
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    outbox = Outbox(conn)
    torch.set_num_threads(1)
    if prefill:
        # a hand-off's frames go out from worker threads between the engine loop's steps:
        # at the default 5 ms GIL switch interval each frame waits for a slice
        sys.setswitchinterval(_SWITCH_S)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=timeout),
    )
    transport = Transport(dist.distributed_c10d._get_default_group(), timeout)
    pairs = pair_transports(rank, size, prefill, timeout)
    eng = Engine(**{**options, "role": role_of(rank, prefill)})

    sent: dict[str, int] = {}  # output tokens forwarded so far, per request

    def forward(out: Any) -> None:
        # where this output's tokens start in the request's output: the front orders by it,
        # since a migrated request's outputs come from two processes
        rid = out.request_id
        start = sent.get(rid)
        if start is None:  # its first output here (a migrated request has some already)
            r = eng.request(rid)
            start = r.num_output_tokens - len(out.new_token_ids) if r is not None else 0
        sent[rid] = start + len(out.new_token_ids)
        if out.finished:
            sent.pop(rid, None)
        outbox.put(("out", rid, out, start, rank))

    decisions: dict[str, queue.Queue[bool]] = {}

    def decide(src: int, rid: str) -> bool:
        # the source fell silent between our OK and its COMMIT: the front knows whether it
        # died (run the copy) or kept the request (drop it)
        box = decisions[rid] = queue.Queue(1)
        outbox.put(("undecided", rank, rid, src))
        try:
            return box.get(timeout=3 * timeout)
        except queue.Empty:
            return False  # never run twice
        finally:
            decisions.pop(rid, None)

    def accept(src: int) -> None:
        rid = None
        with contextlib.suppress(KVError):
            rid = eng.accept_migration(
                transport,
                src,
                timeout=timeout,
                on_output=forward,
                decide=functools.partial(decide, src),
            )
        outbox.put(("accepted", rank, rid))

    aborts: dict[str, None] = {}  # decode role: aborts that may come before their request

    def accepted(rid: str) -> None:
        if rid in aborts:  # aborted while on its way here
            aborts.pop(rid, None)
            eng.abort(rid)
        outbox.put(("accepted", rank, rid))

    if eng.config.role == "decode":
        start_acceptors(eng, pairs, forward, accepted, decide)
    routed: dict[str, int] = {}  # request id -> its decode instance (prefill role)
    seen_done = seen_failed = seen_handed = seen_local = 0
    last = last_metrics = 0.0
    metrics_s = max(report_s, 0.25)
    while True:
        stop = False
        while True:
            try:
                msg = inbox.get_nowait()
            except queue.Empty:
                break
            kind = msg[0]
            if kind == "add":
                _, rid, prompt, params, d = msg
                try:
                    eng.add_request(prompt, params, request_id=rid, on_output=forward)
                except KVError as e:
                    outbox.put(
                        ("out", rid, RequestOutput(rid, [], "", True, "error", str(e)), 0, rank)
                    )
                    continue
                if d is not None:
                    eng.handoffs.route(eng, rid, pairs[d], 1)
                    routed[rid] = d
            elif kind == "abort":
                eng.abort(msg[1])
                if eng.config.role == "decode":
                    aborts[msg[1]] = None
                    if len(aborts) > 4096:
                        aborts.pop(next(iter(aborts)))
            elif kind == "migrate":
                try:
                    eng.migrate(msg[1], transport, msg[2])
                except KVError as e:
                    with contextlib.suppress(KVError):
                        abort_remote(transport, msg[2])
                    outbox.put(("migrated", rank, msg[1], None, str(e)))
            elif kind == "accept":
                threading.Thread(target=accept, args=(msg[1],), daemon=True).start()
            elif kind == "dead":  # prefill role: a decode instance the front found dead
                if msg[1] in pairs:
                    eng.handoffs.peer_failed(pairs[msg[1]], f"instance {msg[1]} died")
            elif kind == "decided":
                box = decisions.get(msg[1])
                if box is not None:
                    box.put(msg[2])
            elif kind == "stop":
                stop = True
        if stop:
            break
        if eng.has_unfinished():
            eng.step()
        else:
            time.sleep(0.002)
        migs = eng.migrations
        for rid, _stats in migs.done[seen_done:]:
            outbox.put(("migrated", rank, rid, True, None))
        for rid, why in migs.failed[seen_failed:]:
            outbox.put(("migrated", rank, rid, None, why))
        seen_done, seen_failed = len(migs.done), len(migs.failed)
        h = eng.handoffs
        for rid, _peer, stats in h.done[seen_handed:]:
            outbox.put(("handed", rank, rid, routed.pop(rid, None), stats))
        for rid in h.local[seen_local:]:
            outbox.put(("migrated", rank, rid, False, "its decode instance failed"))
            routed.pop(rid, None)
        seen_handed, seen_local = len(h.done), len(h.local)
        now = time.monotonic()
        if now - last >= report_s:
            last = now
            # a decode instance's acceptor threads change the allocator and the running set
            # under the step lock
            with eng._step_lock:
                st = eng.allocator.stats()
                sched = eng.scheduler
                demand = sum(r.num_tokens + eng.allocator.granularity for r in sched.waiting)
                running = [r.request_id for r in sched.running if r.request_id not in migs.active]
            load = Load(st.capacity_tokens, st.used_tokens, demand, len(running))
            outbox.put(("load", rank, load, running))
            if now - last_metrics >= metrics_s:
                last_metrics = now
                outbox.put(("metrics", rank, eng.metrics()))
    outbox.put(("stopped", rank))
    outbox.close(timeout)
    os._exit(0)


__all__ = ["Outbox", "instance_main", "pump"]
