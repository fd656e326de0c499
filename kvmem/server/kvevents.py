"""``--kv-events``: publish the allocator's KV events (vLLM's schema) on a ZeroMQ socket."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvmem.allocator import KVAllocator
from kvmem.errors import InvalidArgument
from kvmem.tiers.publisher import ZmqEventPublisher


@dataclass
class KVEventsPublishing:
    """A publisher subscribed to an allocator's events; :meth:`close` undoes both."""

    publisher: ZmqEventPublisher
    unsubscribe: Callable[[], None]

    @property
    def endpoint(self) -> str:
        """The bound endpoint (the real port when the option asked for ``*``)."""
        return self.publisher.endpoint

    def close(self) -> None:
        """Stop listening to the allocator, send what is queued, close the socket."""
        self.unsubscribe()
        self.publisher.close()


def publish_kv_events(
    allocator: KVAllocator, endpoint: str, topic: str = "kv-events"
) -> KVEventsPublishing:
    """Bind ``endpoint`` and publish every batch of KV events ``allocator`` flushes.

    InvalidArgument when the backend emits no KV events, or the endpoint
    cannot be bound; KVError when pyzmq or msgspec is missing.
    """
    hub = getattr(allocator, "kv_events", None)
    if hub is None:
        raise InvalidArgument(
            f"--kv-events: the {type(allocator).__name__} backend emits no KV events "
            "(use a prefix-caching backend such as paged or grouped)"
        )
    pub = ZmqEventPublisher(endpoint, topic=topic)
    return KVEventsPublishing(pub, hub.subscribe(pub))


__all__ = ["KVEventsPublishing", "publish_kv_events"]
