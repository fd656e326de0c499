"""DistAttention-style sharding of one sequence's KV across the ranks of a torch.distributed group.

- :class:`ShardedAllocator` (backend ``"sharded"``): the common allocator
  interface on every rank; a sequence's KV is cut into rBlocks placed by a
  :class:`PlacementDirectory`, borrowing memory from ranks that have it.
- :func:`decode` / :func:`prefill` / :func:`attend`: attention over a
  sharded sequence; each holder computes a partial state with kvmem's
  kernels, the owner merges them.
- :class:`PeerFailure`: another rank died or stopped answering.
"""

from kvmem.distributed.attention import attend, decode, prefill
from kvmem.distributed.comm import PeerFailure, Traffic
from kvmem.distributed.directory import PLACEMENTS, PlacementDirectory
from kvmem.distributed.sharded import ShardedAllocator, StepProfile

__all__ = [
    "PLACEMENTS",
    "PeerFailure",
    "PlacementDirectory",
    "ShardedAllocator",
    "StepProfile",
    "Traffic",
    "attend",
    "decode",
    "prefill",
]
