"""Publishing KV events over ZeroMQ, on the wire vLLM's KV events use.

Each :class:`~kvmem.tiers.events.EventBatch` goes out as one multipart
message of three frames::

    [ topic (utf-8) | sequence number (8 bytes, big-endian, from 0) | msgpack payload ]

The payload is the batch as vLLM's msgspec structs encode it (a map
``{"ts", "events"}``, each event a map tagged ``"type"``), so vLLM's
``KVEventBatch`` decoder reads it and :func:`decode_batch` reads vLLM's. A
gap in sequence numbers tells a subscriber it missed batches (ZeroMQ drops
messages for slow or late subscribers).

Needs ``pyzmq`` and ``msgspec`` (the ``server`` extra); importing this
module does not. A server wires it as::

    pub = ZmqEventPublisher("tcp://0.0.0.0:5557", topic="kv-events")
    tiers.events.subscribe(pub)      # every batch the allocator flushes
    ...
    pub.close()
"""

from __future__ import annotations

import contextlib
import importlib
import queue
import threading
import time
from types import ModuleType
from typing import Any

from kvmem.errors import InvalidArgument, KVError
from kvmem.tiers.events import EventBatch, from_wire, to_wire


def _need(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise KVError(f"KV event publishing needs {name!r}: pip install 'kvmem[server]'") from e


def encode_batch(batch: EventBatch) -> bytes:
    """The msgpack payload of a batch (vLLM's ``KVEventBatch`` encoding)."""
    msgspec: Any = _need("msgspec")
    return bytes(msgspec.msgpack.encode(to_wire(batch)))


def decode_batch(payload: bytes) -> EventBatch:
    """The batch of a msgpack payload (InvalidArgument if it is not one)."""
    msgspec: Any = _need("msgspec")
    try:
        data = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as e:
        raise InvalidArgument(f"not a KV event payload: {e}") from e
    if not isinstance(data, dict):
        raise InvalidArgument("not a KV event payload: not a map")
    return from_wire(data)


class ZmqEventPublisher:
    """Sends event batches on a ZeroMQ publisher socket from a worker thread.

    ``endpoint`` is bound (``bind=True``, the default: subscribers connect
    to the server) or connected to; ``tcp://HOST:*`` binds a free port, read
    back from :attr:`endpoint`. Call the publisher with a batch (it is a
    subscriber callback) or use :meth:`publish`; batches queue up to
    ``max_queue`` and past that are dropped and counted in :attr:`dropped`,
    so the allocator never blocks on the network. InvalidArgument at
    construction for an endpoint that cannot be bound or connected.
    """

    def __init__(
        self,
        endpoint: str,
        topic: str = "",
        *,
        bind: bool = True,
        hwm: int = 100_000,
        max_queue: int = 100_000,
    ) -> None:
        zmq: Any = _need("zmq")
        _need("msgspec")
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise InvalidArgument(f"a ZeroMQ endpoint looks like tcp://HOST:PORT, got {endpoint!r}")
        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        sock = self._ctx.socket(zmq.XPUB)  # a PUB that also sees subscriptions
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, not only a topic's first
        try:
            if bind:
                sock.bind(endpoint)
            else:
                sock.connect(endpoint)
        except zmq.ZMQError as e:
            sock.close(0)
            raise InvalidArgument(f"cannot {'bind' if bind else 'connect'} {endpoint}: {e}") from e
        self.endpoint: str = sock.getsockopt(zmq.LAST_ENDPOINT).decode() if bind else endpoint
        self.topic = topic.encode()
        self.dropped = 0
        self.sent = 0
        self._sock = sock
        self._queue: queue.Queue[EventBatch | None] = queue.Queue(max_queue)
        self._subs = 0
        self._subs_changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvmem-kv-events", daemon=True)
        self._thread.start()

    def __call__(self, batch: EventBatch) -> None:
        """Publish ``batch`` (the subscriber-callback form)."""
        self.publish(batch)

    def publish(self, batch: EventBatch) -> None:
        """Queue ``batch`` for sending (dropped, and counted, once closed or when full)."""
        if self._closed:
            self.dropped += 1
            return
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.dropped += 1

    def wait_for_subscribers(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Whether ``count`` subscriptions arrived within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._subs_changed:
            while self._subs < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._subs_changed.wait(left)
        return True

    def _run(self) -> None:
        zmq = self._zmq
        seq = 0
        while True:
            while self._sock.poll(0, zmq.POLLIN):
                msg = self._sock.recv()
                if msg[:1] in (b"\x00", b"\x01"):
                    with self._subs_changed:
                        self._subs += 1 if msg[:1] == b"\x01" else -1
                        self._subs_changed.notify_all()
            try:
                batch = self._queue.get(timeout=0.01)
            except queue.Empty:
                continue
            if batch is None:
                return
            payload = encode_batch(batch)
            self._sock.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
            seq += 1
            self.sent += 1

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds), then close the socket."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._sock.close(0)

    def __enter__(self) -> ZmqEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ZmqEventPublisher", "decode_batch", "encode_batch"]
