"""KV events: the schema, the hub, and an index rebuilt from a ZeroMQ stream."""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path

import pytest

from kvmem import InvalidArgument
from kvmem.tiers import (
    MEDIUMS,
    AllBlocksCleared,
    BlockKey,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventHub,
    KVEventIndex,
    TierManager,
    block_hash,
    from_wire,
    to_wire,
)
from tests.tiers.util import chain, make_pool

zmq = pytest.importorskip("zmq")
msgspec = pytest.importorskip("msgspec")


# The schema of vllm/distributed/kv_events.py, written out to check the wire format against.
class VEventBatch(msgspec.Struct, omit_defaults=True):
    ts: float
    events: list
    data_parallel_rank: int | None = None


class VKVCacheEvent(msgspec.Struct, omit_defaults=True, tag=True):
    pass


class VBlockStored(VKVCacheEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list | None = None


class VBlockRemoved(VKVCacheEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


class VAllBlocksCleared(VKVCacheEvent, tag="AllBlocksCleared"):
    pass


class VKVEventBatch(VEventBatch):
    events: list[VBlockStored | VBlockRemoved | VAllBlocksCleared]


def sample_batch() -> EventBatch:
    keys = chain(2)
    return EventBatch(
        12.5,
        (
            BlockStored(
                tuple(block_hash(k) for k in keys),
                keys[0][0],
                keys[0][1] + keys[1][1],
                4,
                "CPU",
            ),
            BlockRemoved((block_hash(keys[0]),), "GPU"),
            AllBlocksCleared(),
        ),
    )


def test_the_wire_format_is_vllms() -> None:
    from kvmem.tiers import decode_batch, encode_batch

    batch = sample_batch()
    payload = encode_batch(batch)
    v = msgspec.msgpack.decode(payload, type=VKVEventBatch)
    assert v.ts == batch.ts
    first = v.events[0]
    assert isinstance(first, VBlockStored)
    assert first.block_hashes == list(batch.events[0].block_hashes)  # type: ignore[union-attr]
    assert first.medium == "CPU" and first.block_size == 4
    assert isinstance(v.events[1], VBlockRemoved) and v.events[1].medium == "GPU"
    assert isinstance(v.events[2], VAllBlocksCleared)
    # and what vLLM encodes, kvmem decodes
    assert decode_batch(msgspec.msgpack.encode(v)) == batch
    assert from_wire(to_wire(batch)) == batch


def test_malformed_payloads_are_errors() -> None:
    from kvmem.tiers import decode_batch

    with pytest.raises(InvalidArgument):
        decode_batch(b"\xc1")
    with pytest.raises(InvalidArgument):
        from_wire({"ts": 1.0, "events": [{"type": "Nope"}]})
    with pytest.raises(InvalidArgument):
        from_wire({"events": []})


def test_the_hub_batches_per_flush_and_every_subscriber_runs() -> None:
    hub = EventHub()
    hub.emit(AllBlocksCleared())  # nobody listens: dropped
    got: list[EventBatch] = []

    def bad(batch: EventBatch) -> None:
        raise RuntimeError("subscriber bug")

    hub.subscribe(bad)
    unsubscribe = hub.subscribe(got.append)
    hub.flush()
    assert got == []
    hub.emit(AllBlocksCleared())
    hub.emit(AllBlocksCleared())
    hub.flush()  # the failing subscriber does not stop the others, nor the caller
    assert len(got) == 1 and len(got[0].events) == 2 and hub.errors == 1
    unsubscribe()
    hub.emit(AllBlocksCleared())
    hub.flush()
    assert len(got) == 1 and hub.errors == 2 and hub.num_batches == 2
    with pytest.raises(InvalidArgument):
        hub.subscribe(3)  # type: ignore[arg-type]


class SimDevice:
    """A device prefix cache of ``n`` pages (LRU), calling the manager's hooks."""

    def __init__(self, m: TierManager, n: int) -> None:
        self.m, self.n = m, n
        self.lru: OrderedDict[BlockKey, int] = OrderedDict()
        self.free = list(range(n))

    def take(self) -> int:
        if not self.free:
            key, p = self.lru.popitem(last=False)
            self.m.device_removed([key])
            self.m.evicted([(key, p)])
            self.free.append(p)
        return self.free.pop()

    def request(self, keys: list[BlockKey]) -> None:
        i = 0
        while i < len(keys) and keys[i] in self.lru:
            self.lru.move_to_end(keys[i])
            i += 1
        rest = keys[i:]
        for key in rest:  # pages after a device miss are computed again
            if key in self.lru:
                self.free.append(self.lru.pop(key))
                self.m.device_removed([key])
        pages = [self.take() for _ in rest]  # may evict: match the tiers only after
        found = self.m.match(rest)
        loaded = self.m.load(rest[: len(found)], pages[: len(found)]).result()
        for key, p in zip(rest, pages, strict=True):
            self.lru[key] = p
        self.m.device_stored(rest[:loaded])  # the loaded pages are findable again
        self.m.filled(list(zip(rest[loaded:], pages[loaded:], strict=True)))
        self.m.device_stored(rest[loaded:])


@pytest.mark.parametrize("policy", ["write_back", "write_through"])
def test_a_zeromq_subscriber_rebuilds_the_index(tmp_path: Path, policy: str) -> None:
    from kvmem.tiers import ZmqEventPublisher, decode_batch

    pool = make_pool(6)
    ctx = zmq.Context.instance()
    with ZmqEventPublisher("tcp://127.0.0.1:*", topic="kv") as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:")
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        sub.connect(pub.endpoint)
        assert pub.wait_for_subscribers(1, timeout=10)
        local = KVEventIndex()
        with TierManager(
            pool,
            host_bytes=3 * pool.page_bytes,
            disk_dir=tmp_path,
            disk_bytes=5 * pool.page_bytes,
            write_policy=policy,  # type: ignore[arg-type]
        ) as m:
            m.events.subscribe(pub)
            m.events.subscribe(local.apply)
            dev = SimDevice(m, 6)
            rng = random.Random(4)
            convs = [chain(rng.randint(1, 5), root=r, tag=r) for r in range(8)]
            for _ in range(60):
                dev.request(convs[rng.randrange(8)][: rng.randint(1, 5)])
            m.check_integrity()
            want = m.block_hashes()
            want[MEDIUMS["device"]] = {block_hash(k) for k in dev.lru}
            sent = m.events.num_batches
            assert sent > 10
            pub.close()
            remote = KVEventIndex()
            seqs = []
            while sub.poll(2000):
                topic, seq, payload = sub.recv_multipart()
                assert topic == b"kv"
                seqs.append(int.from_bytes(seq, "big"))
                remote.apply(decode_batch(payload))
            sub.close()
            assert seqs == list(range(sent)), "every batch arrives, numbered in order"
            assert remote.snapshot() == local.snapshot() == want
            assert set(want) == {"GPU", "CPU", "DISK"}
            # the tokens and parents of the stream rebuild the chains
            for key in dev.lru:
                assert remote.tokens[block_hash(key)] == key[1]
                assert remote.parents[block_hash(key)] == key[0]
            m.clear()  # published after close: dropped, counted, not an error
        assert pub.dropped == 1 and m.events.errors == 0


def test_a_publisher_on_a_bad_endpoint_is_an_error() -> None:
    from kvmem.tiers import ZmqEventPublisher

    with pytest.raises(InvalidArgument):
        ZmqEventPublisher("not an endpoint")
    with pytest.raises(InvalidArgument):
        ZmqEventPublisher("tcp://127.0.0.1:notaport")
