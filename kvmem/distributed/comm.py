"""Request/reply messages between the ranks of a gloo process group, every wait bounded.

Each rank runs a server thread that answers the other ranks' requests; the
thread that calls the allocator sends requests and collects the replies::

    rank 0 (caller)                          rank 1 (server thread)
    exchange({1: req}) ── header, payload ──▶ recv_anysource, recv
         ... own work ...                      handler(0, req) -> rep
    collect            ◀── header, payload ── post reply (a completer thread waits on it)

A message is two gloo sends on one tag: an int64 header ``(kind, payload
bytes)`` and, when there is a payload, one uint8 tensor holding the pickled
meta followed by the raw bytes of each tensor (16-byte aligned).

Gloo sends are rendezvous: one completes only once the receiver posts the
matching recv. So that no chain of waiting ranks can close a cycle, a server
never waits on its own replies (a completer thread does), and a caller posts
all its sends and its reply receives before waiting on any of them.

Failure. Gloo closes every connection of a group as soon as any wait on it
times out, so a timed-out wait is fatal: the first failure (a peer that
closed its connection because it died, or one that did not answer within
``timeout`` seconds) is kept and every later call raises it again as
:class:`PeerFailure`. A heartbeat thread sends each peer a small message
every ``heartbeat`` seconds, which detects a dead or stopped rank even while
the caller is idle, and keeps idle servers from ever reaching their own wait
limit.
"""

from __future__ import annotations

import pickle
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from kvmem.errors import (
    DriverError,
    DuplicateSequence,
    IntegrityError,
    InvalidArgument,
    KVError,
    OutOfKVMemory,
    UnknownSequence,
)

TAG_REQUEST = 0x6B76  # "kv"
TAG_REPLY = 0x6B77
_ALIGN = 16

# message kinds
REQUEST, REPLY, ERROR, NOP, STOP = 1, 2, 3, 4, 5

Payload = tuple[Any, list[torch.Tensor]]
Handler = Callable[[int, Any, list[torch.Tensor]], Payload]


class PeerFailure(KVError):
    """Another rank died or did not answer within the timeout; the group is unusable.

    Raised by every later call of the allocator that saw it. The message
    names the rank and what was being waited for.
    """


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


def _pad(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def encode(meta: Any, tensors: list[torch.Tensor]) -> torch.Tensor:
    """One uint8 tensor holding ``meta`` (pickled) and the bytes of ``tensors``."""
    cpu = [t.detach().to("cpu").contiguous().reshape(-1) for t in tensors]
    specs = [(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in tensors]
    head = pickle.dumps((meta, specs), protocol=pickle.HIGHEST_PROTOCOL)
    parts = [len(head).to_bytes(8, "little"), head, bytes(_pad(8 + len(head)) - 8 - len(head))]
    for t in cpu:
        raw = t.view(torch.uint8).numpy().tobytes()
        parts += [raw, bytes(_pad(len(raw)) - len(raw))]
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def decode(buf: torch.Tensor) -> Payload:
    """Inverse of :func:`encode`; the tensors are views into ``buf``."""
    n = int.from_bytes(buf[:8].numpy().tobytes(), "little")
    meta, specs = pickle.loads(buf[8 : 8 + n].numpy().tobytes())
    off = _pad(8 + n)
    out: list[torch.Tensor] = []
    for dtype_name, shape in specs:
        dtype = getattr(torch, dtype_name)
        count = 1
        for d in shape:
            count *= d
        size = count * dtype.itemsize
        out.append(buf[off : off + size].view(dtype).reshape(shape))
        off += _pad(size)
    return meta, out


def _header(kind: int, n: int) -> torch.Tensor:
    return torch.tensor([kind, n], dtype=torch.int64)


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

    sends: list[tuple[int, Any, torch.Tensor]]
    headers: dict[int, tuple[Any, torch.Tensor]]


class Channel:
    """Framed request/reply messaging over the gloo group ``pg`` (see the module docstring).

    ``timeout`` bounds every wait on another rank (seconds); ``heartbeat``
    is the period of the liveness messages. Call :meth:`start` with the
    request handler once every rank has built its channel.
    """

    def __init__(self, pg: Any, timeout: float, heartbeat: float | None = None) -> None:
        self.pg = pg
        self.rank: int = pg.rank()
        self.size: int = pg.size()
        self.timeout = float(timeout)
        self.heartbeat = float(heartbeat) if heartbeat else max(0.05, min(5.0, self.timeout / 3))
        # an idle server's wait: never reached while peers send heartbeats
        self._idle_wait = max(3600.0, 20 * self.timeout)
        self.traffic = Traffic()
        self._send_locks = {r: threading.Lock() for r in range(self.size)}
        self._failure: PeerFailure | None = None
        self._stop = threading.Event()
        self._replies: queue.Queue[tuple[int, Any, torch.Tensor] | None] = queue.Queue()
        self._threads: dict[str, threading.Thread] = {}
        self._handler: Handler | None = None

    # ------------------------------------------------------------ failures
    @property
    def failure(self) -> PeerFailure | None:
        """The first failure seen, or None."""
        return self._failure

    def check(self) -> None:
        """Raise the recorded failure, if any."""
        if self._failure is not None:
            raise self._failure

    def record_failure(self, err: PeerFailure) -> PeerFailure:
        """Keep ``err`` unless a failure was recorded before; return the one kept."""
        if self._failure is None:
            self._failure = err
        return self._failure

    def _peer_failure(
        self, e: BaseException, what: str, peer: int | None, timeout: float
    ) -> PeerFailure:
        """Record (first one wins) and return the PeerFailure for a gloo error."""
        text = str(e)
        who = f"rank {peer}" if peer is not None else "a peer"
        if "Timed out" in text or "Application timeout" in text:
            why = f"{who} did not answer within {timeout:g} s"
        elif "closed by peer" in text or "reset by peer" in text or "Broken pipe" in text:
            why = f"{who} closed its connection (did the process die?)"
        else:
            why = f"{who}: {text.splitlines()[0] if text else type(e).__name__}"
        return self.record_failure(PeerFailure(f"rank {self.rank}: {what}: {why}"))

    def _wait(self, work: Any, timeout: float, what: str, peer: int | None) -> None:
        try:
            work.wait(timedelta(seconds=timeout))
        except RuntimeError as e:
            raise self._peer_failure(e, what, peer, timeout) from None

    def _start(self, op: Callable[..., Any], args: tuple, what: str, peer: int | None) -> Any:
        """Post a gloo send or recv, ``op(*args)``; a closed connection is a PeerFailure."""
        try:
            return op(*args)
        except RuntimeError as e:
            raise self._peer_failure(e, what, peer, self.timeout) from None

    # --------------------------------------------------------------- sends
    def _post(self, dst: int, tag: int, kind: int, payload: torch.Tensor | None) -> list[Any]:
        """Post header (and payload) sends to ``dst``; returns the works to wait on."""
        n = 0 if payload is None else int(payload.numel())
        hdr = _header(kind, n)
        what = "sending"
        with self._send_locks[dst]:
            works = [(self._start(self.pg.send, ([hdr], dst, tag), what, dst), hdr)]
            if payload is not None:
                w = self._start(self.pg.send, ([payload], dst, tag), what, dst)
                works.append((w, payload))
        return works

    def _recv_payload(self, src: int, tag: int, hdr: torch.Tensor, what: str) -> Payload:
        kind, n = (int(x) for x in hdr.tolist())
        if n == 0:
            return None, []
        buf = torch.empty(n, dtype=torch.uint8)
        w = self._start(self.pg.recv, ([buf], src, tag), what, src)
        self._wait(w, self.timeout, what, src)
        return decode(buf)

    # -------------------------------------------------------------- caller
    def post(self, requests: Mapping[int, Payload]) -> Pending:
        """Send each ``{dst: (meta, tensors)}`` request and post the reply receives; no waiting."""
        self.check()
        sends: list[tuple[int, Any, torch.Tensor]] = []
        headers: dict[int, tuple[Any, torch.Tensor]] = {}
        for dst, (meta, tensors) in requests.items():
            if dst == self.rank or not 0 <= dst < self.size:
                raise InvalidArgument(f"rank {self.rank} cannot send a request to rank {dst}")
            buf = encode(meta, tensors)
            for w, t in self._post(dst, TAG_REQUEST, REQUEST, buf):
                sends.append((dst, w, t))
            self.traffic.bytes_sent += 16 + int(buf.numel())
            self.traffic.messages += 1
        for src in requests:
            hdr = torch.empty(2, dtype=torch.int64)
            w = self._start(self.pg.recv, ([hdr], src, TAG_REPLY), "receiving", src)
            headers[src] = (w, hdr)
        return Pending(sends, headers)

    def finish_sends(self, pending: Pending) -> None:
        """Wait until every request of ``pending`` was taken by its server."""
        for dst, w, _ in pending.sends:
            self._wait(w, self.timeout, "sending a request", dst)
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
        for src, (w, hdr) in pending.headers.items():
            self._wait(w, self.timeout, "waiting for a reply", src)
            kind = int(hdr[0])
            payload = self._recv_payload(src, TAG_REPLY, hdr, "receiving a reply")
            self.traffic.bytes_received += 16 + int(hdr[1])
            self.traffic.messages += 1
            if kind == ERROR:
                name, text = payload[0]
                out[src] = _ERRORS.get(name, KVError)(f"rank {src}: {text}")
                error = error or out[src]
            else:
                out[src] = payload
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
        """Start the server, reply-completer and heartbeat threads."""
        self._handler = handler
        if self.size == 1:
            return
        for target, name in (
            (self._serve, "server"),
            (self._complete, "completer"),
            (self._beat, "heartbeat"),
        ):
            t = threading.Thread(target=target, name=f"kvmem-{name}-{self.rank}", daemon=True)
            t.start()
            self._threads[name] = t

    def _serve(self) -> None:
        assert self._handler is not None
        try:
            while True:
                hdr = torch.empty(2, dtype=torch.int64)
                w = self._start(self.pg.recv_anysource, ([hdr], TAG_REQUEST), "serving", None)
                self._wait(w, self._idle_wait, "serving", None)
                src = int(w._source_rank())
                kind = int(hdr[0])
                if kind == STOP:
                    break
                if kind == NOP:
                    continue
                meta, tensors = self._recv_payload(src, TAG_REQUEST, hdr, "receiving a request")
                try:
                    rmeta, rtensors = self._handler(src, meta, tensors)
                    rkind = REPLY
                except KVError as e:
                    rkind, rmeta, rtensors = ERROR, (type(e).__name__, str(e)), []
                except Exception as e:  # a bug on this rank: report it, keep serving
                    rkind, rmeta, rtensors = ERROR, ("KVError", f"{type(e).__name__}: {e}"), []
                buf = encode(rmeta, rtensors)
                for w2, t in self._post(src, TAG_REPLY, rkind, buf):
                    self._replies.put((src, w2, t))
        except PeerFailure:
            pass
        finally:
            self._replies.put(None)

    def _complete(self) -> None:
        while True:
            item = self._replies.get()
            if item is None:
                return
            dst, w, _ = item
            try:
                self._wait(w, self.timeout, "sending a reply", dst)
            except PeerFailure:
                return

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            for dst in range(self.size):
                if dst == self.rank or self._stop.is_set():
                    continue
                try:
                    for w, _ in self._post(dst, TAG_REQUEST, NOP, None):
                        self._wait(w, self.timeout, "heartbeat", dst)
                except PeerFailure:
                    return

    def barrier(self, what: str) -> None:
        """A gloo barrier over the group (its own slots: safe beside the server's receive)."""
        work = self._start(self.pg.barrier, (), what, None)
        self._wait(work, self.timeout, what, None)

    # ------------------------------------------------------------ shutdown
    def stop(self) -> None:
        """Collective: stop this rank's heartbeat, meet every rank at a gloo barrier (after it
        no rank sends another request), then stop the servers, each rank its successor's."""
        if self.size == 1 or not self._threads:
            return
        self._stop.set()
        self._threads["heartbeat"].join(self.timeout + self.heartbeat)
        self.check()
        self.barrier("closing")
        nxt = (self.rank + 1) % self.size
        for w, _ in self._post(nxt, TAG_REQUEST, STOP, None):
            self._wait(w, self.timeout, "stopping", nxt)
        self._threads["server"].join(self.timeout)
        self._threads["completer"].join(self.timeout)
        self._threads.clear()


__all__ = ["Channel", "Pending", "PeerFailure", "Traffic", "decode", "encode"]
