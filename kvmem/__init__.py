"""kvmem: KV-cache memory management for LLM serving.

One allocator interface (:class:`KVAllocator`), several backends chosen by
name through :func:`create_allocator`, and attention kernels that read every
backend's :class:`BatchLayout`.
"""

from kvmem.allocator import (
    Capabilities,
    KVAllocator,
    KVStats,
    SeqInfo,
    SwapHandle,
    available_backends,
    backend_class,
    create_allocator,
    register_backend,
)
from kvmem.errors import (
    DriverError,
    DuplicateSequence,
    IntegrityError,
    InvalidArgument,
    KVError,
    OutOfHostMemory,
    OutOfKVMemory,
    UnknownSequence,
)
from kvmem.formats import KVFormat, resolve_format
from kvmem.layout import BatchLayout
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV, PagePool

__version__ = "0.1.0"

__all__ = [
    "BatchLayout",
    "Capabilities",
    "DriverError",
    "DuplicateSequence",
    "IntegrityError",
    "InvalidArgument",
    "KVAllocator",
    "KVError",
    "KVFormat",
    "KVSpec",
    "KVStats",
    "LayerKV",
    "OutOfHostMemory",
    "OutOfKVMemory",
    "PagePool",
    "SeqInfo",
    "SwapHandle",
    "UnknownSequence",
    "__version__",
    "available_backends",
    "backend_class",
    "create_allocator",
    "register_backend",
    "resolve_format",
]
