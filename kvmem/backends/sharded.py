"""Registers the ``"sharded"`` backend, which lives in :mod:`kvmem.distributed`.

The registry imports every module of ``kvmem.backends``; this one imports
:mod:`kvmem.distributed.sharded`, whose class registers itself. Importing it
needs only ``torch.distributed`` (present in CPU builds of torch), not an
initialised process group.
"""

from kvmem.distributed.sharded import ShardedAllocator

__all__ = ["ShardedAllocator"]
