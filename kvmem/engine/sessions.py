"""Sessions: a conversation's KV kept on the host between its turns (SGLang's sessions).

A request added with ``session_id`` is a turn of that conversation. It runs
under the session's allocator sequence, :func:`session_seq_id`, which on a
backend declaring ``keep_on_host`` outlives the request::

    turn 1   add_request(p1, session_id="s")      resume(seq, p1) = add: p1 computed
             finishes (stop or length)            free(seq, keep_on_host=True): parked
    turn 2   add_request(p1 + a1 + p2, session_id="s")
             resume(seq, p1 + a1 + p2)            the parked KV swaps back in; only the
                                                  tokens after it are computed (a1's last
                                                  token, never appended, then p2)
    end_session("s")                              the parked KV is freed

The rules:

- At most one request of a session is in the engine at a time: adding
  another raises :class:`SessionBusy` (an ``InvalidRequest``) before
  anything is queued. The session is free again once that request has
  finished, been aborted or failed.
- A turn whose tokens do not extend the parked ones (or that has another
  ``cache_salt``, or asks for prompt logprobs) runs as a fresh request: the
  parked copy is dropped, the prefix cache serves what it can.
- Only a request that finishes (``stop`` or ``length``) parks its KV; an
  aborted or failed one frees it, and the next turn recomputes.
- Parked KV lives in the backend's host pool, bounded by its capacity: the
  pool may evict it (LRU) at any time, and the next turn then recomputes.
  :meth:`Sessions.parked` lists the sessions whose KV is parked now
  (``EngineMetrics.num_parked_sessions`` counts them); forgotten sessions
  cost nothing once evicted.
- On a backend without ``keep_on_host`` (and on a ``prefill``-role engine,
  whose KV leaves for a decode instance) a finished request's KV is freed as
  usual: nothing is parked, so ``resume`` adds; the one-in-flight rule holds.
- Disaggregation: a ``prefill``-role engine hands a session's request over
  under the session's sequence id; the ``decode``-role engine imports it
  with ``resume`` (:class:`~kvmem.transfer.kv.Importer`), so the next turn
  brings back the KV the decode side parked and only the positions past it
  travel; there the request parks its KV when it finishes. A turn handed
  over while the previous one still decodes there is refused by the decode
  side (its sequence is in use) and decodes at the prefill side.
- A request forked from another (``fork_from``) has no session of its own
  (the conversation continues from one sample: the parent's); a session's
  request does not live-migrate (its sequence is the session's).
"""

from __future__ import annotations

from collections.abc import Container
from typing import TYPE_CHECKING

from kvmem.engine.errors import InvalidRequest

if TYPE_CHECKING:
    from kvmem.engine.request import Request
    from kvmem.engine.scheduler import Scheduler

#: Finish reasons after which a session's KV is parked.
KEEP_REASONS = ("stop", "length")


class SessionBusy(InvalidRequest):
    """A request of the session is already in the engine (one at a time)."""


def session_seq_id(session_id: str) -> tuple[str, str]:
    """The allocator sequence id of a session (a tuple: no request id is one)."""
    return ("session", session_id)


def check_session_id(session_id: object) -> str:
    """``session_id`` if it is a non-empty string, else :class:`InvalidRequest`."""
    if not isinstance(session_id, str) or not session_id:
        raise InvalidRequest(f"session_id must be a non-empty string, got {session_id!r}")
    return session_id


class Sessions:
    """An engine's sessions: the request each has in flight, and those whose KV is parked.

    ``keeps``: whether finished turns park their KV (the backend declares
    ``keep_on_host`` and the engine keeps its requests' KV). ``in_flight``
    changes under the engine's inbox lock, everything else under its step
    lock.
    """

    def __init__(self, scheduler: Scheduler, keeps: bool) -> None:
        self.scheduler = scheduler
        self.keeps = keeps
        #: session id -> the id of its request in the engine
        self.in_flight: dict[str, str] = {}
        self._parked: dict[str, None] = {}  # sessions that parked KV, oldest first
        self._prune_at = 16

    def claim(self, session_id: str, request_id: str, live: Container[str]) -> None:
        """Mark ``session_id`` busy with ``request_id``; SessionBusy if it already is busy
        with a request still in ``live`` (the engine's request ids: one that left without
        finishing here, handed to another instance, frees its session too)."""
        other = self.in_flight.get(session_id)
        if other is not None and other in live:
            raise SessionBusy(
                f"session_id {session_id!r} already has a request in the engine ({other!r}); "
                "a session runs one request at a time"
            )
        self.in_flight[session_id] = request_id

    def release(self, r: Request) -> None:
        """``r`` has left the engine: its session is free for its next turn."""
        sid = r.session_id
        if sid is not None and self.in_flight.get(sid) == r.request_id:
            del self.in_flight[sid]

    def finished(self, r: Request, reason: str) -> None:
        """Record that ``r`` finished (its KV already released, parked if ``r.keep_kv``)."""
        sid = r.session_id
        if sid is None or not r.keep_kv or reason not in KEEP_REASONS:
            return
        self._parked.pop(sid, None)
        if self.scheduler.is_parked(r.seq_id):  # parking is best effort: the pool may be full
            self._parked[sid] = None
            if len(self._parked) >= self._prune_at:
                self.parked([])
                self._prune_at = 2 * len(self._parked) + 16

    def is_known(self, session_id: str) -> bool:
        """Whether the session has a request in the engine or may have KV parked."""
        return session_id in self.in_flight or session_id in self._parked

    def end(self, session_id: str, request: Request | None) -> bool:
        """End the session: free its parked KV now; ``request`` (its request in the engine,
        if any) no longer parks when it finishes. Returns whether KV was freed."""
        self._parked.pop(session_id, None)
        if request is not None:
            request.keep_kv = False
            if request.kv is not None:  # its sequence is the request's now
                return False
        return self.scheduler.free_parked(session_seq_id(session_id))

    def parked(self, busy: list[Request]) -> list[str]:
        """The sessions whose KV is parked now, oldest first; evicted ones are forgotten.

        ``busy``: the requests in the engine (a session whose request took
        its KV back holds it on the device, not parked).
        """
        holding = {r.session_id for r in busy if r.session_id is not None and r.kv is not None}
        out = []
        for sid in list(self._parked):
            if sid in holding:
                continue
            if self.scheduler.is_parked(session_seq_id(sid)):
                out.append(sid)
            else:
                del self._parked[sid]
        return out


__all__ = ["KEEP_REASONS", "SessionBusy", "Sessions", "check_session_id", "session_seq_id"]
