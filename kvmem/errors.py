"""Typed, recoverable errors shared by every kvmem module.

Every error a caller can cause derives from :class:`KVError`. A call that
raises one leaves the allocator exactly as it was before the call.
"""

from __future__ import annotations


class KVError(Exception):
    """Base class of every kvmem error."""


class OutOfKVMemory(KVError):
    """The request does not fit in the free KV capacity; nothing was changed."""


class UnknownSequence(KVError, KeyError):
    """The sequence id is not registered with this allocator."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown sequence"


class DuplicateSequence(KVError):
    """The sequence id is already registered with this allocator."""


class InvalidArgument(KVError, ValueError):
    """An argument is out of range or inconsistent with the allocator's state."""


class IntegrityError(KVError):
    """An internal invariant is broken (raised by ``check_integrity``)."""


class DriverError(KVError):
    """A memory driver call failed; the message carries the driver's own text."""


class OutOfHostMemory(OutOfKVMemory):
    """The host (swap) pool cannot take the KV, even after evicting what may be evicted.

    Nothing was changed: the sequences stay where they were.
    """
