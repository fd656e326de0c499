"""Errors of the engine layer (all :class:`~kvmem.errors.KVError` subclasses)."""

from __future__ import annotations

from kvmem.errors import InvalidArgument, KVError


class InvalidRequest(InvalidArgument):
    """A request the engine refuses (empty prompt, too long, bad sampling parameters).

    Raised by ``Engine.add_request`` before the request enters the engine;
    nothing else is affected.
    """


class SwapUnavailable(KVError):
    """Preemption by swap was asked for, but the allocator's backend cannot swap."""


__all__ = ["InvalidRequest", "SwapUnavailable"]
