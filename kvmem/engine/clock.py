"""Clocks: wall time for serving, simulated time for scheduling benchmarks."""

from __future__ import annotations

import time
from typing import Protocol

from kvmem.errors import InvalidArgument


class Clock(Protocol):
    """A source of the engine's timestamps, in seconds."""

    def now(self) -> float:
        """The current time."""
        ...


class WallClock:
    """``time.monotonic``."""

    def now(self) -> float:
        """Seconds on the monotonic clock."""
        return time.monotonic()


class SimClock:
    """Time that moves only when told to (by a simulated executor, or to the next arrival)."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = float(start)

    def now(self) -> float:
        """The simulated time."""
        return self.t

    def advance(self, dt: float) -> None:
        """Move forward by ``dt >= 0`` seconds."""
        if dt < 0:
            raise InvalidArgument(f"cannot move a clock back by {dt}")
        self.t += dt

    def advance_to(self, t: float) -> None:
        """Move forward to ``t`` (no-op if already later)."""
        self.t = max(self.t, float(t))


__all__ = ["Clock", "SimClock", "WallClock"]
