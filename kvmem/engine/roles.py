"""Disaggregated prefill and decode (DistServe): the engine side of the KV hand-off.

A ``prefill``-role engine computes a request's prompt and samples its first
token; a ``decode``-role engine imports the KV and continues. The KV moves
with the live-migration protocol of :mod:`kvmem.transfer.live`, started as
soon as the request is admitted and gated on its first token, so the pages
of each finished prompt chunk travel while the next chunks compute::

    prefill engine                                           decode engine
    admit r ── BEGIN(prompt) ─────────────────────────────▶ add + reserve prompt+1
    chunk 0..31 computed ── STAGE(pages 0-1) ─────────────▶ write    (chunk 32..63 computes)
    chunk 32..63 computed ── STAGE(pages 2-3) ────────────▶ write
    last chunk, first token t0 sampled and streamed;
    r held (out of the batch, KV kept)
    FINAL(t0, last pages, state) ─────────────────────────▶ parked   ◀── OK
    COMMIT ───────────────────────────────────────────────▶ r decodes t1, t2, ... here
    free r's KV

The prefill side frees only after the decode side has confirmed (OK to
FINAL, then COMMIT). A decode side without room answers BEGIN with
``OutOfKVMemory``: the request is not failed but kept at the prefill side
(prefilling on, then held with its KV) and offered again after
``retry_s``. A decode side that dies (its pair's transport fails) leaves
the request to decode where it is, so it completes exactly once and
nothing is left behind. Transfers to one decode instance over one
transport never interleave: one is in flight per (transport, peer) pair,
held requests first, then in admission order (so give hand-offs a
transport that no live migration uses: the cluster gives each pair a group
of its own).

:class:`Handoffs` is the prefill engine's side (advanced once per step);
:func:`serve_handoffs` is the decode engine's: it accepts hand-offs from
one prefill peer, one after another.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmem.distributed.transport import PeerFailure, Transport
from kvmem.engine.handover import accept, request_state
from kvmem.engine.request import Request
from kvmem.errors import InvalidArgument, KVError, OutOfKVMemory
from kvmem.transfer.live import MigrationFailed, MigrationStats, SourceMigration

#: Engine roles (``EngineConfig.role``).
ROLES = ("colocated", "prefill", "decode")


@dataclass
class Route:
    """Where one request's KV goes: a transport and the decode peer's rank on it."""

    transport: Transport
    peer: int
    retry_at: float = 0.0


class Handoffs:
    """A prefill engine's hand-offs, by request id (see the module docstring).

    ``done`` lists ``(request id, peer, stats)`` of each request handed
    over; ``failed`` lists ``(request id, peer, reason)`` of each attempt
    that failed; ``local`` the requests left to decode here because their
    decode peer failed.
    """

    def __init__(self, retry_s: float = 0.05) -> None:
        self.retry_s = retry_s
        self.routes: dict[str, Route] = {}
        #: (id(transport), peer) -> (request id, its transfer in flight)
        self.active: dict[tuple[int, int], tuple[str, SourceMigration]] = {}
        #: requests whose first token is out, waiting for their hand-over (KV kept)
        self.held: dict[str, Request] = {}
        self.done: list[tuple[str, int, MigrationStats]] = []
        self.failed: list[tuple[str, int, str]] = []
        self.local: list[str] = []

    def route(self, engine: Any, request_id: str, transport: Transport, peer: int) -> None:
        """Hand ``request_id`` (added to ``engine``) to rank ``peer`` of ``transport``."""
        if engine.config.role != "prefill":
            raise InvalidArgument(
                f"hand-offs need a prefill engine, this one is {engine.config.role}"
            )
        with engine._step_lock:
            with engine._inbox_lock:
                if request_id not in engine._ids:
                    raise InvalidArgument(f"no request {request_id!r} in the engine")
            if request_id in self.routes:
                raise InvalidArgument(f"request {request_id!r} already has a decode instance")
            self.routes[request_id] = Route(transport, peer)

    @property
    def busy(self) -> bool:
        """Whether any request waits for or is in its hand-over."""
        return bool(self.routes)

    def advance(self, engine: Any) -> None:
        """One step of every hand-off: hold, advance transfers, start new ones (under the lock)."""
        sched = engine.scheduler
        for rid in list(self.routes):
            r = engine._requests.get(rid)
            if r is None:  # finished at its first token, or aborted
                self._drop(rid)
            elif r.num_output_tokens > 0 and r in sched.running:
                sched.running.remove(r)  # no decode here: it waits for its hand-over
                self.held[rid] = r
        for key, (rid, mig) in list(self.active.items()):
            r = engine._requests[rid]
            transport = self.routes[rid].transport
            if mig.busy and (transport.failure is not None or mig.overdue):
                # the peer is known dead, or a frame to it is stuck: give up now, never
                # interleave another frame with the one in flight
                err = transport.failure or transport.fail(
                    "handing off", f"rank {mig.dst} did not settle a frame in time"
                )
                mig.give_up(err)
                del self.active[key]
                self._failed(engine, r, err)
                continue
            if rid not in self.held and r not in sched.running:  # preempted mid-prefill
                mig.abort()
                del self.active[key]
                continue
            if r.swap_handle is not None:  # its KV is being swapped in: not readable yet
                continue
            try:
                if not mig.advance(functools.partial(request_state, r)):
                    continue
            except (MigrationFailed, KVError) as e:
                mig.abort()
                del self.active[key]
                self._failed(engine, r, mig.error or e)
                continue
            del self.active[key]
            route = self.routes.pop(rid)
            self.held.pop(rid, None)
            sched.remove(r)  # frees its KV: the decode side has it
            engine._requests.pop(rid, None)
            with engine._inbox_lock:
                engine._ids.discard(rid)
            self.done.append((rid, route.peer, mig.stats))
        self._start(engine)

    def _start(self, engine: Any) -> None:
        now = time.monotonic()
        sched = engine.scheduler
        ready = []
        for rid, route in self.routes.items():
            key = (id(route.transport), route.peer)
            r = engine._requests.get(rid)
            if key in self.active or route.retry_at > now or r is None or r.kv is None:
                continue
            if rid in self.held or (r in sched.running and r.swap_handle is None):
                ready.append((rid not in self.held, r.seq_no, key, rid, r))
        for _, _, key, rid, r in sorted(ready):
            if key in self.active:
                continue
            route = self.routes[rid]
            try:
                mig = SourceMigration(
                    route.transport,
                    route.peer,
                    engine.allocator,
                    r.seq_id,
                    functools.partial(_tokens, r),
                    ready=functools.partial(_first_token_out, r),
                )
            except KVError as e:  # a transport that has failed already
                self._failed(engine, r, e)
                continue
            self.active[key] = (rid, mig)

    def peer_failed(self, transport: Transport, why: str) -> None:
        """Mark ``transport`` failed (its decode peer is known dead): every hand-off over it
        ends at the next :meth:`advance` and its request decodes here."""
        transport.fail("handing off", why)

    def _failed(self, engine: Any, r: Request, err: BaseException) -> None:
        rid = r.request_id
        route = self.routes[rid]
        self.failed.append((rid, route.peer, f"{type(err).__name__}: {err}"))
        if isinstance(err, OutOfKVMemory) and route.transport.failure is None:
            route.retry_at = time.monotonic() + self.retry_s  # no room there yet: keep it here
            return
        # the decode peer is gone (or refused for good): the request decodes here
        del self.routes[rid]
        self.local.append(rid)
        if self.held.pop(rid, None) is not None:
            engine.scheduler.running.append(r)

    def _drop(self, rid: str) -> None:
        self.routes.pop(rid, None)
        self.held.pop(rid, None)
        for key, (other, mig) in list(self.active.items()):
            if other == rid:
                mig.abort()
                del self.active[key]


def _tokens(r: Request) -> list[int]:
    return list(r.token_ids)


def _first_token_out(r: Request) -> bool:
    return r.num_output_tokens > 0


def serve_handoffs(
    engine: Any,
    transport: Transport,
    src: int,
    *,
    stop: threading.Event | None = None,
    on_output: Any = None,
    on_accepted: Callable[[str], None] | None = None,
    decide: Callable[[str], bool] | None = None,
    idle_wait: float = 86400.0,
    count: int | None = None,
) -> None:
    """The decode side: accept hand-offs from rank ``src`` of ``transport`` into ``engine``.

    Each is reserved whole at BEGIN (``OutOfKVMemory`` answered, nothing
    kept, when there is no room) and runs here from its COMMIT on, with
    ``on_output`` as its output callback; ``on_accepted`` gets its id once
    it runs here (a transfer that did not complete is not reported). Returns once ``count`` requests
    were taken in, ``stop`` is set (looked at between transfers), or the
    prefill peer fails (nothing of its transfer in flight is kept).
    ``idle_wait`` bounds the wait for the next transfer's first frame.
    """
    if engine.config.role != "decode":
        raise InvalidArgument(f"hand-offs go to a decode engine, this one is {engine.config.role}")
    taken = 0
    while (stop is None or not stop.is_set()) and (count is None or taken < count):
        try:
            rid = accept(engine, transport, src, idle_wait, on_output, decide, reserve_ahead=True)
        except PeerFailure:
            return
        except KVError:
            rid = None
        if rid is not None:
            taken += 1
            if on_accepted is not None:
                on_accepted(rid)


__all__ = ["ROLES", "Handoffs", "Route", "serve_handoffs"]
