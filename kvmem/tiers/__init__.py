"""Tiers below the device prefix cache, and KV events.

* :class:`TierManager`: a host tier and a disk tier (each an LRU with a
  capacity in bytes) under an allocator's device page pool; evicted or filled
  prefix pages go down, ``add`` hits come back up asynchronously
  (:class:`LoadHandle`); a page that fails its checksum is a miss.
* :mod:`kvmem.tiers.events`: BlockStored, BlockRemoved and AllBlocksCleared
  in vLLM's KV-event schema, an :class:`EventHub` that batches them for
  subscribers, and :class:`KVEventIndex` that rebuilds the index from them.
* :class:`ZmqEventPublisher` (needs the ``server`` extra: pyzmq, msgspec):
  publishes event batches on a ZeroMQ PUB socket as vLLM does.
"""

from kvmem.tiers.events import (
    MEDIUMS,
    AllBlocksCleared,
    BlockKey,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventHub,
    KVEventIndex,
    block_hash,
    from_wire,
    to_wire,
)
from kvmem.tiers.manager import WRITE_POLICIES, LoadHandle, TierManager, WritePolicy
from kvmem.tiers.publisher import ZmqEventPublisher, decode_batch, encode_batch
from kvmem.tiers.store import DiskTier, HostTier, PageAccess, TierStore

__all__ = [
    "MEDIUMS",
    "WRITE_POLICIES",
    "AllBlocksCleared",
    "BlockKey",
    "BlockRemoved",
    "BlockStored",
    "DiskTier",
    "EventBatch",
    "EventHub",
    "HostTier",
    "KVEventIndex",
    "LoadHandle",
    "PageAccess",
    "TierManager",
    "TierStore",
    "WritePolicy",
    "ZmqEventPublisher",
    "block_hash",
    "decode_batch",
    "encode_batch",
    "from_wire",
    "to_wire",
]
