"""The engine in its own thread, and one asyncio queue per request on the event loop's side.

::

    event loop                              engine thread: Engine.serve_forever
    submit() ── engine.add_request ──► inbox   (the engine's one loop: step while
             (wakes the loop)                    there is work, else sleep until woken)
    RequestStream ◄── loop.call_soon_threadsafe ◄── on_output (per token)
    abort()   ── engine.abort (frees KV now, or when the step in flight ends)

The event loop never waits on model compute: ``add_request`` and
``abort`` only touch the engine's locked inbox (``abort`` frees at once when
no step runs), and engine metrics are read in a worker thread.

Back-pressure: ``max_queue`` bounds the admitted requests that have not yet
produced their first token (queued in the engine, or in prefill); a submit
beyond it raises :class:`QueueFull` (the HTTP layer answers 429).
Preempted requests that already streamed tokens are not counted: their
clients are already being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kvmem.engine import Engine, EngineMetrics, InvalidRequest, RequestOutput, SamplingParams
from kvmem.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is full; ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, queued: int, retry_after: int) -> None:
        super().__init__(f"the server's queue is full ({queued} requests waiting); retry later")
        self.queued = queued
        self.retry_after = retry_after


class EngineDead(Exception):
    """The engine thread is not running (stopped, or failed to start)."""


@dataclass(eq=False)
class RequestStream:
    """The server's side of one request: its outputs, in order, as the engine produces them."""

    request_id: str
    num_prompt_tokens: int
    arrival: float
    queue: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)
    num_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    waiting: bool = True  # counted against max_queue until its first token
    finished: bool = False
    finish_reason: str | None = None
    #: Prompt tokens the prefix cache held at admission (as the engine reports them).
    cached_tokens: int = 0

    async def get(self) -> list[RequestOutput]:
        """Wait for the next output, then take every other one already queued (coalescing)."""
        out = [await self.queue.get()]
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out


class AsyncEngine:
    """Runs an :class:`Engine` in a background thread and feeds per-request asyncio queues."""

    def __init__(
        self, engine: Engine, max_queue: int = 256, metrics: ServerMetrics | None = None
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self._streams: dict[str, RequestStream] = {}
        self._num_waiting = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._recent_ttft = 0.5  # EWMA of time to first token, for Retry-After
        self.step_errors = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kvmem-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """End every request (its stream gets an ``abort``), stop the thread and wait for it."""
        for rid, s in list(self._streams.items()):
            s.queue.put_nowait(
                RequestOutput(rid, [], "", True, "abort", "the server is shutting down")
            )
            self._abort(rid, disconnected=False)
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            self._thread = None

    @property
    def alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def sessions(self) -> bool:
        """Whether the engine serves sessions (it can end one)."""
        return callable(getattr(self.engine, "end_session", None))

    @property
    def num_in_flight(self) -> int:
        """Admitted requests not yet finished."""
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Admitted requests without a first token yet (bounded by ``max_queue``)."""
        return self._num_waiting

    # --------------------------------------------------------------- engine
    def _run(self) -> None:
        self.engine.serve_forever(self._stop, on_error=self._step_failed)

    def _step_failed(self, e: Exception) -> None:
        """A bug in a step must not hang every client: each gets the error, the loop goes on."""
        log.error("engine step failed", exc_info=e)
        self.step_errors += 1
        self.last_error = f"{type(e).__name__}: {e}"
        self._fail_all(self.last_error)

    def _fail_all(self, error: str) -> None:
        loop = self._loop
        if loop is None:
            return
        for rid in list(self._streams):
            # Posted before the abort, whose own output would otherwise close the stream first.
            out = RequestOutput(rid, [], "", True, "error", f"engine step failed: {error}")
            self._post(rid, out, time.perf_counter())
            self.engine.abort(rid)

    def _post(self, rid: str, out: RequestOutput, t: float) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
            loop.call_soon_threadsafe(self._deliver, rid, out, t)

    def _deliver(self, rid: str, out: RequestOutput, t: float) -> None:
        """On the event loop: account the output, then hand it to the request's queue."""
        s = self._streams.get(rid)
        if s is None or s.finished:
            return
        if out.num_cached_tokens is not None:
            s.cached_tokens = out.num_cached_tokens
        m = self.metrics
        n = len(out.new_token_ids)
        if n:
            if s.first_token_time is None:
                s.first_token_time = t
                ttft = t - s.arrival
                self._recent_ttft = 0.8 * self._recent_ttft + 0.2 * ttft
                if m:
                    m.ttft.observe(ttft)
            elif m and s.last_token_time is not None:
                m.itl.observe(t - s.last_token_time)
            s.last_token_time = t
            s.num_tokens += n
            self._unwait(s)
        if out.finished:
            self._close(s, out.finish_reason or "stop", t)
        s.queue.put_nowait(out)

    def _unwait(self, s: RequestStream) -> None:
        if s.waiting:
            s.waiting = False
            self._num_waiting -= 1
            if self.metrics:
                self.metrics.queued.set(self._num_waiting)

    def _close(self, s: RequestStream, reason: str, t: float) -> None:
        s.finished = True
        s.finish_reason = reason
        self._unwait(s)
        self._streams.pop(s.request_id, None)
        m = self.metrics
        if m is None:
            return
        m.in_flight.set(len(self._streams))
        m.success.labels(m.model_name, reason).inc()
        if reason in ("stop", "length") and s.first_token_time is not None:
            m.e2e.observe(t - s.arrival)
            if s.num_tokens > 1 and s.last_token_time is not None:
                m.tpot.observe((s.last_token_time - s.first_token_time) / (s.num_tokens - 1))

    # ------------------------------------------------------------ requests
    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        tenant: str = "default",
        fork_from: str | None = None,
        session_id: str | None = None,
    ) -> RequestStream:
        """Admit a request (call on the event loop); raises QueueFull or the engine's errors.

        ``fork_from`` is the id of an earlier stream of the same prompt: this
        one is another sample of it; ``session_id`` makes it a turn of that
        session (see :meth:`Engine.add_request`).
        """
        if not self.alive:
            raise EngineDead("the engine is not running")
        if self._num_waiting >= self.max_queue:
            retry = max(1, min(60, round(self._recent_ttft + 0.5)))
            raise QueueFull(self._num_waiting, retry)
        session: dict[str, Any] = {} if session_id is None else {"session_id": session_id}
        if session and not self.sessions:
            raise InvalidRequest("session_id: sessions are not served by this engine")
        rid = f"kvmem-{next(self._ids)}"
        s = RequestStream(rid, len(prompt_token_ids), time.perf_counter())
        self._streams[rid] = s

        def on_output(out: RequestOutput) -> None:
            self._post(rid, out, time.perf_counter())

        try:
            self.engine.add_request(
                prompt_token_ids,
                params,
                request_id=rid,
                tenant=tenant,
                priority=priority,
                on_output=on_output,
                fork_from=fork_from,
                **session,
            )
        except Exception:
            del self._streams[rid]
            raise
        self._num_waiting += 1
        if self.metrics:
            self.metrics.queued.set(self._num_waiting)
            self.metrics.in_flight.set(len(self._streams))
        return s

    def abort(self, request_id: str) -> None:
        """Abort a request whose client went away: its KV is freed now or after the current step.

        A no-op for a request that has finished.
        """
        self._abort(request_id, disconnected=True)

    def _abort(self, request_id: str, disconnected: bool) -> None:
        s = self._streams.get(request_id)
        if s is None:
            return
        if self.metrics and disconnected:
            self.metrics.disconnected.inc()
        self._close(s, "abort", time.perf_counter())
        self.engine.abort(request_id)

    async def end_session(self, session_id: str) -> bool:
        """End a session (its parked KV is freed); whether it was known. In a worker thread."""
        if not self.sessions:
            raise InvalidRequest("session_id: sessions are not served by this engine")
        return await asyncio.to_thread(self.engine.end_session, session_id)

    async def engine_metrics(self) -> EngineMetrics:
        """The engine's metrics, read in a worker thread (it waits for the step in flight)."""
        return await asyncio.to_thread(self.engine.metrics)


__all__ = ["AsyncEngine", "EngineDead", "QueueFull", "RequestStream"]
