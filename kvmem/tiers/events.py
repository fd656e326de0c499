"""KV events: what entered and left each memory of the prefix cache, in vLLM's schema.

A consumer (a cache-aware router, a second index) rebuilds which prefix
pages live where from three events, the ones vLLM's KV events use
(``vllm/distributed/kv_events.py``)::

    BlockStored(block_hashes, parent_block_hash, token_ids, block_size, medium)
    BlockRemoved(block_hashes, medium)
    AllBlocksCleared()

batched as ``EventBatch(ts, events)``. A block hash is ``hash(key)`` of the
chained page key ``key = (parent hash, page tokens)`` (the paged backend's
prefix-cache keys); a first page's parent is the chain seed, the hash of its
``cache_salt``. The medium names the memory: :data:`MEDIUMS` maps the tiers
``device``, ``host``, ``disk`` to vLLM's strings ``GPU``, ``CPU``, ``DISK``.

:class:`EventHub` collects events and hands each subscriber one batch per
flush; :class:`KVEventIndex` is the consumer side (apply batches, read the
index). :func:`to_wire` / :func:`from_wire` give the plain mapping form that
msgspec encodes exactly as vLLM's tagged structs (``{"type": "BlockStored",
...}``); :mod:`kvmem.tiers.publisher` sends it over ZeroMQ.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kvmem.errors import InvalidArgument

BlockKey = tuple[int, tuple[int, ...]]

_log = logging.getLogger(__name__)

#: Tier name -> the medium string of the events.
MEDIUMS: dict[str, str] = {"device": "GPU", "host": "CPU", "disk": "DISK"}


def block_hash(key: BlockKey) -> int:
    """The hash a page key is published under (its parent's hash is ``key[0]``)."""
    return hash(key)


@dataclass(frozen=True)
class BlockStored:
    """Pages became available in ``medium``: one hash per page, their tokens in order."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: str | None
    lora_id: int | None = None
    lora_name: str | None = None


@dataclass(frozen=True)
class BlockRemoved:
    """Pages left ``medium``."""

    block_hashes: tuple[int, ...]
    medium: str | None


@dataclass(frozen=True)
class AllBlocksCleared:
    """Every page of every medium is gone."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True)
class EventBatch:
    """Events in the order they happened; ``ts`` is the wall-clock time of the flush."""

    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = None


Subscriber = Callable[[EventBatch], None]


def stored(keys: Iterable[BlockKey], tier: str) -> BlockStored:
    """A BlockStored of consecutive pages of one chain (``keys[i + 1]`` extends ``keys[i]``)."""
    keys = list(keys)
    if not keys:
        raise InvalidArgument("a BlockStored event needs at least one page")
    tokens = tuple(t for _, toks in keys for t in toks)
    return BlockStored(
        tuple(block_hash(k) for k in keys), keys[0][0], tokens, len(keys[0][1]), MEDIUMS[tier]
    )


def removed(keys: Iterable[BlockKey], tier: str) -> BlockRemoved:
    """A BlockRemoved of pages of one medium."""
    return BlockRemoved(tuple(block_hash(k) for k in keys), MEDIUMS[tier])


class EventHub:
    """Collects events; :meth:`flush` sends them as one batch to every subscriber.

    Subscribers run on the thread that flushes (the allocator's), in
    subscription order. A subscriber that raises is logged and counted in
    :attr:`errors`; the others still run and the allocator call that flushed
    is not failed by it (its own change is already complete).
    """

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._pending: list[KVEvent] = []
        self.num_batches = 0
        self.num_events = 0
        self.errors = 0

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        if not callable(callback):
            raise InvalidArgument(f"a subscriber must be callable, got {callback!r}")
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    @property
    def active(self) -> bool:
        """Whether anyone listens (events are not even built otherwise)."""
        return bool(self._subscribers)

    def emit(self, event: KVEvent) -> None:
        """Queue one event for the next flush (dropped when nobody subscribes)."""
        if self._subscribers:
            self._pending.append(event)

    def flush(self) -> None:
        """Send the queued events, if any, as one :class:`EventBatch`."""
        if not self._pending:
            return
        batch = EventBatch(time.time(), tuple(self._pending))
        self._pending = []
        self.num_batches += 1
        self.num_events += len(batch.events)
        for cb in list(self._subscribers):
            try:
                cb(batch)
            except Exception:  # noqa: BLE001 - every subscriber gets the batch
                self.errors += 1
                _log.exception("KV event subscriber %r failed", cb)


class KVEventIndex:
    """The consumer side: which block hashes each medium holds, rebuilt from batches."""

    def __init__(self) -> None:
        self.blocks: dict[str, set[int]] = {}
        self.tokens: dict[int, tuple[int, ...]] = {}
        self.parents: dict[int, int | None] = {}

    def apply(self, batch: EventBatch) -> None:
        """Apply every event of ``batch`` in order."""
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                held = self.blocks.setdefault(ev.medium or "", set())
                parent = ev.parent_block_hash
                for i, h in enumerate(ev.block_hashes):
                    held.add(h)
                    self.tokens[h] = ev.token_ids[i * ev.block_size : (i + 1) * ev.block_size]
                    self.parents[h] = parent
                    parent = h
            elif isinstance(ev, BlockRemoved):
                self.blocks.setdefault(ev.medium or "", set()).difference_update(ev.block_hashes)
            else:
                self.blocks.clear()

    def snapshot(self) -> dict[str, set[int]]:
        """Medium -> block hashes, media holding nothing left out."""
        return {m: set(h) for m, h in self.blocks.items() if h}


def to_wire(batch: EventBatch) -> dict[str, Any]:
    """The mapping msgspec/msgpack encodes as vLLM's ``KVEventBatch`` (tagged structs)."""
    events: list[dict[str, Any]] = []
    for ev in batch.events:
        if isinstance(ev, BlockStored):
            events.append(
                {
                    "type": "BlockStored",
                    "block_hashes": list(ev.block_hashes),
                    "parent_block_hash": ev.parent_block_hash,
                    "token_ids": list(ev.token_ids),
                    "block_size": ev.block_size,
                    "lora_id": ev.lora_id,
                    "medium": ev.medium,
                    "lora_name": ev.lora_name,
                }
            )
        elif isinstance(ev, BlockRemoved):
            events.append(
                {"type": "BlockRemoved", "block_hashes": list(ev.block_hashes), "medium": ev.medium}
            )
        else:
            events.append({"type": "AllBlocksCleared"})
    out: dict[str, Any] = {"ts": batch.ts, "events": events}
    if batch.data_parallel_rank is not None:
        out["data_parallel_rank"] = batch.data_parallel_rank
    return out


def from_wire(data: Mapping[str, Any]) -> EventBatch:
    """The :class:`EventBatch` of a decoded wire mapping (InvalidArgument if malformed)."""
    try:
        events: list[KVEvent] = []
        for ev in data["events"]:
            kind = ev["type"]
            if kind == "BlockStored":
                events.append(
                    BlockStored(
                        tuple(ev["block_hashes"]),
                        ev["parent_block_hash"],
                        tuple(ev["token_ids"]),
                        int(ev["block_size"]),
                        ev.get("medium"),
                        ev.get("lora_id"),
                        ev.get("lora_name"),
                    )
                )
            elif kind == "BlockRemoved":
                events.append(BlockRemoved(tuple(ev["block_hashes"]), ev.get("medium")))
            elif kind == "AllBlocksCleared":
                events.append(AllBlocksCleared())
            else:
                raise InvalidArgument(f"unknown KV event type {kind!r}")
        return EventBatch(float(data["ts"]), tuple(events), data.get("data_parallel_rank"))
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidArgument(f"malformed KV event batch: {e!r}") from e


__all__ = [
    "MEDIUMS",
    "AllBlocksCleared",
    "BlockKey",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "EventHub",
    "KVEvent",
    "KVEventIndex",
    "Subscriber",
    "block_hash",
    "from_wire",
    "removed",
    "stored",
    "to_wire",
]
