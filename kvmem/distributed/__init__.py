"""DistAttention-style sharding of one sequence's KV across the ranks of a torch.distributed group.

- :class:`ShardedAllocator` (backend ``"sharded"``): the common allocator
  interface on every rank; a sequence's KV is cut into rBlocks placed by a
  :class:`PlacementDirectory`, borrowing memory from ranks that have it.
- :func:`decode` / :func:`prefill` / :func:`attend`: attention over a
  sharded sequence; each holder computes a partial state with kvmem's
  kernels, the owner merges them.
- :class:`PeerFailure`: another rank died or stopped answering.

Every rank runs the same construction and ``close``; any rank may own
sequences::

    dist.init_process_group("gloo")                 # torchrun sets the rest
    kv = kvmem.create_allocator("sharded", spec, num_tokens=4096)   # this rank's share
    if dist.get_rank() == 0:
        kv.add("req", prompt)
        kv.reserve("req", len(prompt))              # may borrow rBlocks from other ranks
        for i in range(spec.num_layers):
            out, lse = kvmem.distributed.prefill(kv, i, "req", q[i], k[i], v[i])
        kv.commit("req", len(prompt))
    kv.close()                                      # collective: the others serve until then

See ``examples/distributed_decode.py``.
"""

from kvmem.distributed.attention import attend, decode, prefill
from kvmem.distributed.comm import Traffic
from kvmem.distributed.directory import PLACEMENTS, PlacementDirectory
from kvmem.distributed.sharded import ShardedAllocator, StepProfile
from kvmem.distributed.transport import PeerFailure, Transport

__all__ = [
    "PLACEMENTS",
    "PeerFailure",
    "PlacementDirectory",
    "ShardedAllocator",
    "StepProfile",
    "Traffic",
    "Transport",
    "attend",
    "decode",
    "prefill",
]
