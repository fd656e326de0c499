"""Llumnix-style fleet policies: dispatch by virtual usage, migrate from loaded to free.

Each instance reports a :class:`Load`. Its *virtual usage* counts the KV a
request will need before that request is admitted: the tokens its
sequences hold plus the prompts (and one allocation unit each) of the
requests queued there, plus, for an instance being drained, its whole
capacity, so nothing new goes there and everything leaves::

    instance     used   queued demand   virtual usage / capacity   freeness
    0           6000        2500             8500 / 8192               -308
    1           2000           0             2000 / 8192               6192   <- dispatch here

:func:`pick_instance` sends a new request to the instance with the most
virtual free tokens. :func:`plan_migrations` pairs the most loaded instance
(a negative freeness: a blocked queue, or draining) with the freest one, at
most one migration per source in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvmem.errors import InvalidArgument


@dataclass(frozen=True)
class Load:
    """What one instance reports to the dispatcher (tokens)."""

    capacity: int
    used: int
    queued_demand: int = 0
    running: int = 0
    draining: bool = False
    migrating: bool = False

    @property
    def virtual_usage(self) -> int:
        """Held KV plus the demand of queued requests (all of it while draining)."""
        return self.used + self.queued_demand + (self.capacity if self.draining else 0)

    @property
    def freeness(self) -> int:
        """Capacity left under the virtual usage (negative: more demand than room)."""
        return self.capacity - self.virtual_usage


def pick_instance(loads: Sequence[Load]) -> int:
    """The instance a new request goes to: the most virtual free tokens (ties: lowest index);
    never a draining one while another is not."""
    if not loads:
        raise InvalidArgument("no instances to dispatch to")
    return max(range(len(loads)), key=lambda i: (not loads[i].draining, loads[i].freeness, -i))


def plan_migrations(loads: Sequence[Load], min_gap: int = 0) -> list[tuple[int, int]]:
    """``(source, destination)`` pairs to migrate one running request each.

    A source is an instance with negative freeness (queued demand it cannot
    hold, or draining) that runs something and has no migration in flight;
    the destination is the freest other instance not migrating, if its freeness exceeds
    the source's by more than ``min_gap`` and is positive. Freest-first
    pairing, each instance in at most one pair.
    """
    order = sorted(range(len(loads)), key=lambda i: loads[i].freeness)
    sources = [
        i for i in order if loads[i].freeness < 0 and loads[i].running and not loads[i].migrating
    ]
    dests = [
        i
        for i in reversed(order)
        if not loads[i].draining and not loads[i].migrating and loads[i].freeness > 0
    ]
    pairs: list[tuple[int, int]] = []
    used: set[int] = set()
    for s in sources:
        for d in dests:
            if d in used or d == s:
                continue
            if loads[d].freeness - loads[s].freeness > min_gap:
                pairs.append((s, d))
                used.update((s, d))
            break
    return pairs


__all__ = ["Load", "pick_instance", "plan_migrations"]
