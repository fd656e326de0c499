"""N engine instances in spawned processes behind one dispatcher (Llumnix).

::

    Cluster (this process)                         instance i (a process, gloo rank i)
    add_request ── pick_instance(virtual usage) ──▶ inbox ─▶ Engine.add_request
    outputs     ◀──────────── ("out", rid, RequestOutput) ◀── on_output
    loads       ◀──────────── ("load", i, Load, running ids)   every ``report_s``
    policy thread: plan_migrations(loads) ─▶ ("accept", s) to d, ("migrate", rid, d) to s
                                              s ── live migration over the transport ──▶ d

Each instance's messages come to the front through a pipe of its own, so
an instance that dies (even in the middle of a message) silences nothing
but itself (:mod:`kvmem.cluster.instance`); :meth:`Cluster.dump_state`
writes what the front knows and every thread's stack, for a fleet that
seems stuck.

The instances form one gloo group; a migration from ``s`` to ``d`` uses
the frames of that pair, and the policy keeps every instance in at most one
migration at a time, so frames of two migrations never interleave. A
request's outputs come from whichever instance runs it; the dispatcher
learns of a hand-over from the destination (``("accepted", d, rid)``).
It also arbitrates the one case the hand-over protocol cannot settle alone:
a destination holding a complete copy whose source fell silent before
COMMIT asks (``"undecided"``), and is told to run it only once the source
reported the hand-over or is dead (:func:`settle_hand_over`).

:meth:`Cluster.drain` marks an instance as draining: it gets no new
requests and its running ones move out one by one.

Disaggregated (``prefill=P``, DistServe; :mod:`kvmem.cluster.disagg`): the
first P instances prefill and the others decode. A new request goes to the
prefill instance with the most virtual free KV, which is told the decode
instance (the same measure, among live ones) to hand it to; the migration
policy is off. One that was still on its way to a decode instance found
dead decodes at its prefill instance instead (:mod:`kvmem.engine.roles`).

An instance found dead (any role) has its requests re-sent to live ones
with the tokens already delivered appended to the prompt, under a fresh id
at the instances, so late outputs of the dead one are dropped (and a copy
still on its way to a decode instance is aborted there): each request still
finishes exactly once, with greedy outputs unchanged. A request that no
live instance can take (no prefill instance left) finishes with an error.

Sessions (:mod:`kvmem.engine.sessions`): a session's turn goes to the
instances its last finished turn ran on, while they live and take requests
(the instance that parked its KV; disaggregated, also the prefill instance
whose prefix cache holds its prompt), so that only the new tokens are
computed and handed over; one request per session is in the cluster at a
time. A session's request does not live-migrate.
"""

from __future__ import annotations

import contextlib
import faulthandler
import itertools
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TextIO

from kvmem.cluster.instance import instance_main, pump
from kvmem.cluster.policy import Load, pick_instance, plan_migrations
from kvmem.engine.request import RequestOutput
from kvmem.engine.sessions import KEEP_REASONS, SessionBusy, check_session_id
from kvmem.errors import InvalidArgument


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settle_hand_over(reported: bool | None, source_alive: bool) -> bool | None:
    """Whether a destination runs a complete copy whose source fell silent before COMMIT.

    ``reported``: what the source said of the migration (True: handed over,
    False: it kept the request, None: nothing yet). A source that kept the
    request runs it, so the copy is dropped; one that handed over, or died
    without a word (its copy of the request died with it), leaves the copy
    to run. None: not known yet (a live source always reports).
    """
    if reported is not None:
        return reported
    return None if source_alive else True


class Cluster:
    """``n`` engine instances (spawned processes) behind a virtual-usage dispatcher.

    ``engine_options`` are :class:`~kvmem.engine.Engine` keyword options
    (every instance gets the same; give a fixed ``seed`` so that they run
    the same random model). ``migrate`` turns the migration policy on;
    ``timeout`` bounds every wait between instances.
    """

    def __init__(
        self,
        n: int,
        engine_options: Mapping[str, Any] | None = None,
        *,
        migrate: bool = True,
        timeout: float = 30.0,
        report_s: float = 0.02,
        policy_s: float = 0.05,
        prefill: int = 0,
    ) -> None:
        if type(n) is not int or n < 1:
            raise InvalidArgument(f"a cluster needs at least one instance, got {n!r}")
        if type(prefill) is not int or not 0 <= prefill < n:
            raise InvalidArgument(
                f"prefill instances must be 0 (colocated) or 1..{n - 1}, leaving one to decode; "
                f"got {prefill!r}"
            )
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.n = n
        self.prefill = prefill
        self.migrate = migrate and not prefill
        self.policy_s = policy_s
        self._inboxes = [ctx.Queue() for _ in range(n)]
        # each instance writes to a pipe of its own (see kvmem.cluster.instance)
        pipes = [ctx.Pipe(duplex=False) for _ in range(n)]
        port = _free_port()
        self._procs = [
            ctx.Process(
                target=instance_main,
                args=(
                    r,
                    n,
                    port,
                    dict(engine_options or {}),
                    self._inboxes[r],
                    pipes[r][1],
                    timeout,
                    report_s,
                    prefill,
                ),
                daemon=True,
            )
            for r in range(n)
        ]
        #: every instance's messages, in the order they came in
        self._messages: queue.Queue[Any] = queue.Queue()
        self.loads: list[Load] = [Load(1, 0) for _ in range(n)]
        self.running: list[list[str]] = [[] for _ in range(n)]
        self.owner: dict[str, int] = {}
        self.draining: set[int] = set()
        self.busy: set[int] = set()
        #: (request id, source, destination) of each completed migration
        self.migrations: list[tuple[str, int, int]] = []
        self.failed_migrations: list[tuple[str, str]] = []
        #: each instance's latest EngineMetrics (None until it reports, every 0.25 s at most)
        self.metrics: list[Any] = [None] * n
        self._sent_demand = [0] * n
        self._callbacks: dict[str, Callable[[Any], None]] = {}
        self._early: dict[str, list[tuple[int, bool, Any]]] = {}  # outputs ahead of a gap
        self._delivered: dict[str, int] = {}  # output tokens delivered, per request
        self._pending_dst: dict[int, int] = {}
        self._outcome: dict[str, bool] = {}  # request id -> handed over, per migration reported
        self._undecided: dict[str, tuple[int, int]] = {}  # request id -> (destination, source)
        #: (request id, prefill instance, decode instance, MigrationStats) of each hand-off
        self.handoffs: list[tuple[str, int, int | None, Any]] = []
        #: instances found dead; requests re-sent after one died
        self.dead: set[int] = set()
        self.resent: list[str] = []
        self._requests: dict[str, tuple[list[int], Any]] = {}  # prompt and params, to re-send
        self._tokens: dict[str, list[int]] = {}  # output tokens delivered, per request
        self._alias: dict[str, str] = {}  # a re-sent request's id at the instances -> its id
        self._current: dict[str, str] = {}  # request id -> its latest id at the instances
        self._stale: set[str] = set()  # ids at the instances whose outputs are dropped
        self._session_of: dict[str, str] = {}  # request id -> its session
        self._session_busy: dict[str, str] = {}  # session -> its request in flight
        self._ran_at: dict[str, tuple[int, ...]] = {}  # session request -> (prefill, decode)
        self._homes: dict[str, tuple[int, ...]] = {}  # session -> where its last turn ran
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._unplug = threading.Event()  # set once the instances are gone
        self._ids = itertools.count()
        for p in self._procs:
            p.start()
        for _, w in pipes:
            w.close()  # the instance holds the only writing end: its death ends the pipe
        self._pumps = [
            threading.Thread(
                target=pump,
                args=(c, self._messages, self._unplug),
                name=f"kvmem-pipe-{r}",
                daemon=True,
            )
            for r, (c, _) in enumerate(pipes)
        ]
        for t in self._pumps:
            t.start()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._policy = threading.Thread(target=self._police, daemon=True)
        self._policy.start()

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        prompt: list[int],
        params: Any,
        *,
        request_id: str | None = None,
        on_output: Callable[[Any], None] | None = None,
        session_id: str | None = None,
    ) -> str:
        """Send a request to the instance with the most virtual free KV; its id.

        Disaggregated: to the prefill instance with the most, naming the
        decode instance with the most (a live one) to hand it to.

        ``session_id`` makes it a turn of that session (see
        :mod:`kvmem.engine.sessions`): it goes to the instances that ran the
        session's last turn while they live and take requests (the one that
        parked its KV, and with disaggregation the prefill instance whose
        prefix cache holds its prompt). One request of a session at a time:
        :class:`~kvmem.engine.sessions.SessionBusy` otherwise.
        """
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        with self._lock:
            if rid in self.owner:
                raise InvalidArgument(f"request id {rid!r} is already in the cluster")
            if session_id is not None:
                check_session_id(session_id)
                if session_id in self._session_busy:
                    raise SessionBusy(
                        f"session {session_id!r} has request "
                        f"{self._session_busy[session_id]!r} in flight"
                    )
                self._session_busy[session_id] = rid
                self._session_of[rid] = session_id
            if on_output is not None:
                self._callbacks[rid] = on_output
            self._requests[rid] = (list(prompt), params)  # to re-send, should its instance die
            self._dispatch(rid, rid, list(prompt), params)
        return rid

    def end_session(self, session_id: str) -> bool:
        """Free the session's parked KV wherever it is; whether the cluster knew the session.

        A request of the session in flight runs on but parks nothing."""
        check_session_id(session_id)
        with self._lock:
            known = session_id in self._homes or session_id in self._session_busy
            self._homes.pop(session_id, None)
            live = [i for i in range(self.n) if i not in self.dead]
        for i in live:
            self._inboxes[i].put(("end_session", session_id))
        return known

    def _home(self, session: str | None, pick: int, first: int, end: int, loads: list[Load]) -> int:
        """The instance among ``first .. end - 1`` that ran ``session``'s last turn while it
        lives and takes requests, else ``pick``."""
        if session is None or session not in self._homes:
            return pick
        for i in self._homes[session]:
            if first <= i < end and i not in self.dead and not loads[i].draining:
                return i if self._procs[i].is_alive() else pick
        return pick

    def _dispatch(self, rid: str, iid: str, prompt: list[int], params: Any) -> None:
        """Send ``rid`` as ``iid`` to a live instance (under the lock); with none left, it
        finishes with an error."""
        loads = self._virtual_loads()
        session = self._session_of.get(rid)
        d = None
        if all(i in self.dead for i in range(self.prefill or self.n)):
            why = "no prefill instance is alive" if self.prefill else "no instance is alive"
            out = RequestOutput(iid, [], "", True, "error", why)
            self._messages.put(("out", iid, out, 0, -1))  # delivered by the reader, in order
            return
        if self.prefill:
            i = self._home(session, pick_instance(loads[: self.prefill]), 0, self.prefill, loads)
            dec = [
                replace(ld, draining=True) if self.prefill + j in self.dead else ld
                for j, ld in enumerate(loads[self.prefill :])
            ]
            if any(j not in self.dead for j in range(self.prefill, self.n)):
                # else (every decode instance dead) the prefill instance decodes it too
                d = self.prefill + pick_instance(dec)
                d = self._home(session, d, self.prefill, self.n, loads)
                self._sent_demand[d] += len(prompt) + params.max_tokens
        else:
            i = self._home(session, pick_instance(loads), 0, self.n, loads)
        self.owner[rid] = i
        self._sent_demand[i] += len(prompt) + params.max_tokens
        self._inboxes[i].put(("add", iid, prompt, params, d, session))
        if session is not None:
            self._ran_at[rid] = (i,) if d is None else (i, d)

    def _resend(self, rid: str) -> None:
        """Run ``rid`` again from the tokens delivered so far (its instance died), under a new
        id at the instances: the old one's outputs are dropped, and a copy of it still on its
        way to a decode instance is aborted there."""
        prompt, params = self._requests[rid]
        toks = self._tokens.get(rid, [])
        old = self._current.get(rid, rid)
        self._stale.add(old)
        for j in range(self.prefill, self.n if self.prefill else 0):
            if j not in self.dead:
                self._inboxes[j].put(("abort", old))
        self._early.pop(old, None)
        self._delivered.pop(old, None)
        iid = f"{rid}~{next(self._ids)}"
        self._alias[iid] = rid
        self._current[rid] = iid
        self.resent.append(rid)
        self._dispatch(
            rid, iid, prompt + toks, replace(params, max_tokens=params.max_tokens - len(toks))
        )

    def abort(self, request_id: str) -> bool:
        """Abort a request wherever it runs."""
        with self._lock:
            i = self.owner.get(request_id)
            iid = self._current.get(request_id, request_id)
            dead = set(self.dead)
        if i is None:
            return False
        # disaggregated: it may be on its way to a decode instance; unknown ids are ignored
        for j in {i, *range(self.prefill, self.n if self.prefill else 0)} - dead:
            self._inboxes[j].put(("abort", iid))
        return True

    def drain(self, instance: int) -> None:
        """No new requests for ``instance``; its running ones migrate elsewhere."""
        with self._lock:
            self.draining.add(instance)

    def _virtual_loads(self) -> list[Load]:
        return [
            replace(
                ld,
                queued_demand=ld.queued_demand + self._sent_demand[i],
                draining=i in self.draining or i in self.dead,
                migrating=i in self.busy,
            )
            for i, ld in enumerate(self.loads)
        ]

    # ------------------------------------------------------------------ threads
    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self._settle()
                self._recover()
                try:
                    msg = self._messages.get(timeout=0.1)
                except queue.Empty:
                    continue
                self._handle(msg)
            except Exception:  # e.g. a user's output callback: the other requests go on
                traceback.print_exc()

    def _handle(self, msg: tuple[Any, ...]) -> None:
        """Act on one instance message (on the reader thread)."""
        kind = msg[0]
        if kind == "out":
            _, iid, out, start, _src = msg
            if iid in self._stale:
                return
            rid = self._alias.get(iid, iid)
            for o in self._in_order(iid, out, start):
                self._deliver(rid, o if iid == rid else replace(o, request_id=rid), iid)
        elif kind == "load":
            _, i, load, running = msg
            with self._lock:
                self.loads[i] = load
                self.running[i] = running
                self._sent_demand[i] = 0
        elif kind == "accepted":
            _, d, iid = msg
            rid = self._alias.get(iid, iid)
            with self._lock:
                src = self._pending_dst.pop(d, None)
                self.busy.discard(d)
                if rid in self.owner and iid not in self._stale:
                    self.owner[rid] = d
                    if src is not None:
                        self.migrations.append((rid, src, d))
        elif kind == "handed":
            _, p, iid, d, stats = msg
            rid = self._alias.get(iid, iid)
            with self._lock:
                self.handoffs.append((rid, p, d, stats))
                self._outcome[iid] = True
                if rid in self.owner and iid not in self._stale:
                    self.owner[rid] = d
                    if d in self.dead:
                        self._resend(rid)
        elif kind == "migrated":
            _, s, rid, ok, why = msg
            with self._lock:
                self.busy.discard(s)
                self._outcome[rid] = bool(ok)
                if not ok:
                    self.failed_migrations.append((rid, str(why)))
        elif kind == "metrics":
            self.metrics[msg[1]] = msg[2]
        elif kind == "undecided":
            _, d, rid, s = msg
            with self._lock:
                self._undecided[rid] = (d, s)

    def _settle(self) -> None:
        """Answer destinations whose source fell silent before committing a hand-over.

        A copy whose request was re-sent (its source was found dead first) never
        runs; one told to run belongs to its destination from then on, so the
        source's death does not re-send it."""
        with self._lock:
            for rid, (d, s) in list(self._undecided.items()):
                alive = self._procs[s].is_alive()
                run = (
                    False if rid in self._stale else settle_hand_over(self._outcome.get(rid), alive)
                )
                if run is not None:
                    del self._undecided[rid]
                    self._outcome.pop(rid, None)
                    front = self._alias.get(rid, rid)
                    if run and front in self.owner:
                        self.owner[front] = d
                    self._inboxes[d].put(("decided", rid, run))

    def _recover(self) -> None:
        """Re-send the requests of an instance found dead to live ones (see :meth:`_resend`)."""
        for i in range(self.n):
            if i in self.dead or self._procs[i].is_alive() or self._stop.is_set():
                continue
            with self._lock:
                self.dead.add(i)
                if self.prefill and i >= self.prefill:
                    for p in range(self.prefill):  # its hand-offs in flight end now
                        self._inboxes[p].put(("dead", i))
                for rid in [r for r, o in self.owner.items() if o == i]:
                    self._resend(rid)

    def _in_order(self, rid: str, out: Any, start: int) -> list[Any]:
        """The outputs of ``rid`` now deliverable in token order (``out`` buffered if early).

        Tokens already delivered are not delivered again: two instances may both
        produce a position (a decode instance that died right after taking the
        request over, and the prefill instance that then decoded it itself)."""
        pending = self._early.setdefault(rid, [])
        pending.append((start, bool(out.finished), out))
        pending.sort(key=lambda p: (p[0], p[1]))  # at one position, the finishing output last
        ready = []
        at = self._delivered.get(rid, 0)
        while pending and pending[0][0] <= at:
            start, _, o = pending.pop(0)
            if o.new_token_ids and start + len(o.new_token_ids) <= at:  # delivered already
                if not o.finished:
                    continue
                o = replace(o, new_token_ids=[], new_text="", logprobs=None)
            ready.append(o)
            at = max(at, start + len(o.new_token_ids))
        self._delivered[rid] = at
        if not pending:
            del self._early[rid]
        return ready

    def _deliver(self, rid: str, out: Any, iid: str) -> None:
        cb = self._callbacks.get(rid)
        if rid in self._requests:
            self._tokens.setdefault(rid, []).extend(out.new_token_ids)
        if out.finished:
            with self._lock:
                session = self._session_of.pop(rid, None)
                if session is not None:
                    self._session_busy.pop(session, None)
                    ran_at = self._ran_at.pop(rid, ())
                    if out.finish_reason in KEEP_REASONS:
                        self._homes[session] = ran_at
                self.owner.pop(rid, None)
                self._callbacks.pop(rid, None)
                self._requests.pop(rid, None)
                self._tokens.pop(rid, None)
                self._current.pop(rid, None)
                self._alias.pop(iid, None)
            self._delivered.pop(iid, None)
            self._outcome.pop(iid, None)
        if cb is not None:
            cb(out)

    def _police(self) -> None:
        while not self._stop.wait(self.policy_s):
            if not self.migrate and not self.draining:
                continue
            with self._lock:
                loads = self._virtual_loads()
                pairs = plan_migrations(loads)
                orders = []
                for s, d in pairs:
                    if not self.running[s]:
                        continue
                    rid = self.running[s][0]
                    self.running[s] = self.running[s][1:]
                    self.busy.update((s, d))
                    self._pending_dst[d] = s
                    orders.append((s, d, rid))
            for s, d, rid in orders:
                self._inboxes[d].put(("accept", s))
                self._inboxes[s].put(("migrate", rid, d))

    # ------------------------------------------------------------- diagnostics
    def dump_state(self, file: TextIO | None = None) -> None:
        """Write what the front knows and every thread's stack, for a fleet that seems stuck.

        To ``file`` (a file with a descriptor; default ``sys.stderr``): the
        front's bookkeeping (owners, hand-offs, re-sent requests, dead
        instances, per-request delivery) and the stacks of this process's
        threads; then each live instance in turn
        writes its own threads' stacks to its stderr (it is sent SIGUSR1), after
        a line naming it on this process's stderr.
        """
        out = file if file is not None else sys.stderr
        with self._lock:
            state = {
                "alive": [p.is_alive() for p in self._procs],
                "dead": sorted(self.dead),
                "owner": dict(self.owner),
                "current": dict(self._current),
                "resent": list(self.resent),
                "handoffs": [(rid, p, d) for rid, p, d, _ in self.handoffs],
                "failed_migrations": list(self.failed_migrations),
                "tokens": {rid: len(t) for rid, t in self._tokens.items()},
                "delivered": dict(self._delivered),
                "early": {rid: [s for s, _, _ in e] for rid, e in self._early.items()},
                "undecided": dict(self._undecided),
                "outcome": dict(self._outcome),
                "stale": sorted(self._stale),
                "loads": list(self.loads),
                "reader_alive": self._reader.is_alive(),
                "pumps_alive": [t.is_alive() for t in self._pumps],
                "messages_queued": self._messages.qsize(),
            }
        for key, value in state.items():
            print(f"cluster {key}: {value}", file=out)
        out.flush()
        faulthandler.dump_traceback(out, all_threads=True)
        for i, p in enumerate(self._procs):
            if p.is_alive() and p.pid is not None:
                print(f"instance {i} (pid {p.pid}):", file=sys.stderr, flush=True)
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGUSR1)
                time.sleep(0.2)  # one instance's stacks at a time on the shared stderr

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop every instance."""
        self._stop.set()
        for q in self._inboxes:
            q.put(("stop",))
        for p in self._procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(10)
        self._unplug.set()  # the pipes have ended (or will not: nothing is read from them now)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Cluster", "settle_hand_over"]
