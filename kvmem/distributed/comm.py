"""Request/reply messages between the ranks of a group, on the :mod:`~kvmem.distributed.transport`.

Every rank reads each peer's frames, in issue order, on a thread of its own
(one per peer: receives always name their source); requests go to a server
thread, replies to the caller waiting for them::

    rank 0 (caller)                           rank 1
    post({1: req}) ── REQUEST(id, meta) ────▶ reader(0) ─▶ server: handler(0, req)
         ... own work ...                                        │
    collect ◀── reader(1) ◀── REPLY(id, meta) ─── post reply ◀───┘ (a completer waits on it)

Frames of one direction between two ranks (a caller's requests, a server's
replies, heartbeats) share the pair's issue order; the reader tells them
apart by their kind, never by a tag. Gloo sends are rendezvous (one
completes once the receiver posts the matching recv), so that no chain of
waiting ranks can close a cycle the readers only receive, the server never
waits on its own replies, and a caller posts all its sends before waiting.

Failure: a peer whose connection closes is reported by its reader at once;
a reply not in within ``timeout`` seconds, or a send not taken, is a
:class:`PeerFailure` naming the rank. A heartbeat thread sends every peer a
small frame every ``heartbeat`` seconds, which detects a stopped rank even
while the caller is idle.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kvmem.distributed.transport import PeerFailure, Sent, Transport, decode, encode
from kvmem.errors import (
    DriverError,
    DuplicateSequence,
    IntegrityError,
    InvalidArgument,
    KVError,
    OutOfKVMemory,
    UnknownSequence,
)

# frame kinds
REQUEST, REPLY, ERROR, NOP, STOP = 1, 2, 3, 4, 5

Payload = tuple[Any, list[torch.Tensor]]
Handler = Callable[[int, Any, list[torch.Tensor]], Payload]

_ERRORS: dict[str, type[KVError]] = {
    c.__name__: c
    for c in (
        KVError,
        OutOfKVMemory,
        UnknownSequence,
        DuplicateSequence,
        InvalidArgument,
        IntegrityError,
        DriverError,
        PeerFailure,
    )
}


@dataclass
class Traffic:
    """Bytes and messages a rank's calls put on the wire (requests sent, replies received)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0

    @property
    def bytes_total(self) -> int:
        """Bytes both ways."""
        return self.bytes_sent + self.bytes_received


@dataclass
class Pending:
    """Requests in flight from :meth:`Channel.post`, finished by :meth:`Channel.collect`."""

    sends: list[Sent] = field(default_factory=list)
    ids: dict[int, int] = field(default_factory=dict)


class Channel:
    """Framed request/reply messaging over a :class:`Transport` (see the module docstring).

    ``heartbeat`` is the period of the liveness frames (default timeout / 3,
    at most 5 s). Call :meth:`start` with the request handler once every
    rank has built its channel.
    """

    def __init__(self, transport: Transport, heartbeat: float | None = None) -> None:
        self.transport = transport
        self.rank = transport.rank
        self.size = transport.size
        self.timeout = transport.timeout
        self.heartbeat = float(heartbeat) if heartbeat else max(0.05, min(5.0, self.timeout / 3))
        # an idle reader's wait: never reached while peers send heartbeats
        self._idle_wait = max(3600.0, 20 * self.timeout)
        self.traffic = Traffic()
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._replies: dict[tuple[int, int], Payload | KVError] = {}
        self._requests: queue.Queue[tuple[int, int, Any, list[torch.Tensor]] | None] = queue.Queue()
        self._sent: queue.Queue[Sent | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._handler: Handler | None = None

    # ------------------------------------------------------------ failures
    @property
    def failure(self) -> PeerFailure | None:
        """The first failure seen, or None."""
        return self.transport.failure

    def check(self) -> None:
        """Raise the recorded failure, if any."""
        self.transport.check()

    def record_failure(self, err: PeerFailure) -> PeerFailure:
        """Keep ``err`` unless a failure was recorded before; return the one kept."""
        kept = self.transport.record_failure(err)
        with self._cv:
            self._cv.notify_all()
        return kept

    # -------------------------------------------------------------- caller
    def post(self, requests: Mapping[int, Payload]) -> Pending:
        """Send each ``{dst: (meta, tensors)}`` request; no waiting."""
        self.check()
        pending = Pending()
        for dst in requests:
            if dst == self.rank or not 0 <= dst < self.size:
                raise InvalidArgument(f"rank {self.rank} cannot send a request to rank {dst}")
        for dst, (meta, tensors) in requests.items():
            rid = next(self._ids)
            sent = self._send(dst, REQUEST, (rid, meta), tensors)
            pending.sends.append(sent)
            pending.ids[dst] = rid
            self.traffic.bytes_sent += sent.nbytes
            self.traffic.messages += 1
        return pending

    def _send(self, dst: int, kind: int, meta: Any, tensors: list[torch.Tensor]) -> Sent:
        try:
            return self.transport.send(dst, kind, meta, tensors)
        except PeerFailure as e:
            raise self.record_failure(e) from None

    def finish_sends(self, pending: Pending) -> None:
        """Wait until every request of ``pending`` was taken by its receiver."""
        for sent in pending.sends:
            try:
                self.transport.wait_sent(sent, "sending a request")
            except PeerFailure as e:
                raise self.record_failure(e) from None
        pending.sends.clear()

    def collect(self, pending: Pending, raise_errors: bool = True) -> dict[int, Any]:
        """Wait for every reply of ``pending``.

        A rank whose handler raised a KVError answers with that error: it is
        re-raised (as its own type, naming the rank) once all replies are in,
        or with ``raise_errors=False`` returned in place of that rank's reply.
        """
        self.finish_sends(pending)
        out: dict[int, Any] = {}
        error: KVError | None = None
        deadline = time.monotonic() + self.timeout
        with self._cv:
            for src, rid in pending.ids.items():
                while (src, rid) not in self._replies:
                    self.check()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        why = f"rank {src} did not answer within {self.timeout:g} s"
                        raise self.transport.fail("waiting for a reply", why)
                    self._cv.wait(min(left, 0.5))
                res = self._replies.pop((src, rid))
                out[src] = res
                if isinstance(res, KVError):
                    error = error or res
        if error is not None and raise_errors:
            raise error
        return out

    def exchange(self, requests: Mapping[int, Payload]) -> dict[int, Payload]:
        """:meth:`post` then :meth:`collect`."""
        if not requests:
            return {}
        return self.collect(self.post(requests))

    # -------------------------------------------------------------- server
    def start(self, handler: Handler) -> None:
        """Start the reader (one per peer), server, reply-completer and heartbeat threads."""
        self._handler = handler
        if self.size == 1:
            return
        targets: list[tuple[Callable[..., None], tuple, str]] = [
            (self._read, (src,), f"reader{src}") for src in range(self.size) if src != self.rank
        ]
        targets += [(self._serve, (), "server"), (self._complete, (), "completer")]
        targets.append((self._beat, (), "heartbeat"))
        for target, args, name in targets:
            t = threading.Thread(
                target=target, args=args, name=f"kvmem-{name}-{self.rank}", daemon=True
            )
            t.start()
            self._threads[name] = t

    def _read(self, src: int) -> None:
        try:
            while True:
                frame = self.transport.recv(src, "receiving", first_wait=self._idle_wait)
                if frame.kind == STOP:
                    return
                if frame.kind == NOP:
                    continue
                rid, meta = frame.meta
                if frame.kind == REQUEST:
                    self._requests.put((src, rid, meta, frame.tensors))
                    continue
                res: Payload | KVError
                if frame.kind == ERROR:
                    name, text = meta
                    res = _ERRORS.get(name, KVError)(f"rank {src}: {text}")
                else:
                    res = (meta, frame.tensors)
                with self._cv:
                    self.traffic.bytes_received += frame.nbytes
                    self.traffic.messages += 1
                    self._replies[(src, rid)] = res
                    self._cv.notify_all()
        except PeerFailure as e:
            self.record_failure(e)

    def _serve(self) -> None:
        assert self._handler is not None
        while True:
            item = self._requests.get()
            if item is None:
                break
            src, rid, meta, tensors = item
            try:
                rmeta, rtensors = self._handler(src, meta, tensors)
                kind = REPLY
            except KVError as e:
                kind, rmeta, rtensors = ERROR, (type(e).__name__, str(e)), []
            except Exception as e:  # a bug on this rank: report it, keep serving
                kind, rmeta, rtensors = ERROR, ("KVError", f"{type(e).__name__}: {e}"), []
            try:
                self._sent.put(self._send(src, kind, (rid, rmeta), rtensors))
            except PeerFailure:
                continue
        self._sent.put(None)

    def _complete(self) -> None:
        while True:
            sent = self._sent.get()
            if sent is None:
                return
            try:
                self.transport.wait_sent(sent, "sending a reply")
            except PeerFailure as e:
                self.record_failure(e)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            for dst in range(self.size):
                if dst == self.rank or self._stop.is_set():
                    continue
                try:
                    self.transport.wait_sent(self._send(dst, NOP, None, []), "heartbeat")
                except PeerFailure as e:
                    self.record_failure(e)
                    return

    def barrier(self, what: str) -> None:
        """A barrier over the control group (its own slots: safe beside the readers)."""
        try:
            self.transport.barrier(what)
        except PeerFailure as e:
            raise self.record_failure(e) from None

    # ------------------------------------------------------------ shutdown
    def stop(self) -> None:
        """Collective: stop this rank's heartbeat, meet every rank at a barrier (after it no
        rank sends another request), then tell every peer's reader to stop."""
        if self.size == 1 or not self._threads:
            return
        self._stop.set()
        self._threads["heartbeat"].join(self.timeout + self.heartbeat)
        self.check()
        self.barrier("closing")
        for dst in range(self.size):
            if dst != self.rank:
                self.transport.wait_sent(self._send(dst, STOP, None, []), "stopping")
        for src in range(self.size):
            if src != self.rank:
                self._threads[f"reader{src}"].join(self.timeout)
        self._requests.put(None)
        self._threads["server"].join(self.timeout)
        self._threads["completer"].join(self.timeout)
        self._threads.clear()


__all__ = ["Channel", "Pending", "PeerFailure", "Traffic", "decode", "encode"]
