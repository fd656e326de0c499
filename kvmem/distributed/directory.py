"""The placement directory: free rBlocks per rank and where each sequence's rBlocks lie.

It lives in a key-value store every rank reaches (the process group's
store; a ``HashStore`` in a world of one process)::

    cap/<rank>        rBlocks rank <rank> can hold                 set once
    free/<rank>       rBlocks rank <rank> has free                 atomic add
    place/<handle>    "0,0,0,1,1,3": the rank of each rBlock       set on change

Space is taken before anything moves: :meth:`take` lowers a rank's free
count atomically and refuses (changing nothing) if it would go negative;
whoever frees rBlocks gives them back with :meth:`give`. The store's
atomic ``add`` is the only synchronisation, so two ranks racing for the last
rBlocks of a third can both be refused where one would have fit; the caller
sees ``OutOfKVMemory`` and may retry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal

from kvmem.distributed.comm import PeerFailure
from kvmem.errors import InvalidArgument

Placement = Literal["local_first", "spread"]
PLACEMENTS: tuple[Placement, ...] = ("local_first", "spread")


class GuardedStore:
    """A store whose failures (its host, rank 0 of the default group, is gone) are PeerFailure.

    ``on_failure`` may replace the error (to keep the first failure seen).
    """

    _OPS = ("set", "get", "add", "multi_get", "check", "delete_key", "wait")

    def __init__(
        self, store: Any, rank: int, on_failure: Callable[[PeerFailure], PeerFailure] | None = None
    ) -> None:
        self._store = store
        self._rank = rank
        self._on_failure = on_failure

    def __getattr__(self, name: str) -> Any:
        if name not in self._OPS:
            raise AttributeError(name)
        op = getattr(self._store, name)

        def call(*args: Any) -> Any:
            try:
                return op(*args)
            except RuntimeError as e:
                text = str(e).splitlines()[0] if str(e) else type(e).__name__
                err = PeerFailure(
                    f"rank {self._rank}: the directory store failed (did rank 0, its host, die?): "
                    f"{text}"
                )
                raise (self._on_failure(err) if self._on_failure else err) from None

        return call


class PlacementDirectory:
    """Free capacity and rBlock placement of every rank, kept in ``store``."""

    def __init__(self, store: Any, world_size: int) -> None:
        self.store = store
        self.world_size = world_size
        self._caps: list[int] | None = None

    # ------------------------------------------------------------ capacity
    def register(self, rank: int, capacity_blocks: int, timeout: float) -> None:
        """Publish this rank's capacity, then wait (at most ``timeout`` s) for every rank's."""
        self.store.set(f"free/{rank}", str(capacity_blocks))
        self.store.set(f"cap/{rank}", str(capacity_blocks))
        keys = [f"cap/{r}" for r in range(self.world_size)]
        self.store.wait(keys, timedelta(seconds=timeout))

    @property
    def capacities(self) -> list[int]:
        """rBlocks each rank can hold."""
        if self._caps is None:
            vals = self.store.multi_get([f"cap/{r}" for r in range(self.world_size)])
            self._caps = [int(v) for v in vals]
        return list(self._caps)

    def free(self) -> list[int]:
        """Free rBlocks of every rank (a snapshot)."""
        vals = self.store.multi_get([f"free/{r}" for r in range(self.world_size)])
        return [int(v) for v in vals]

    def take(self, rank: int, n: int) -> bool:
        """Reserve ``n`` rBlocks on ``rank``; False (and nothing taken) if it has fewer free."""
        if n <= 0:
            return True
        key = f"free/{rank}"
        if int(self.store.add(key, 0)) < n:
            return False
        if int(self.store.add(key, -n)) < 0:
            self.store.add(key, n)
            return False
        return True

    def give(self, rank: int, n: int) -> None:
        """Return ``n`` rBlocks to ``rank``'s free count."""
        if n:
            self.store.add(f"free/{rank}", n)

    def plan(
        self,
        owner: int,
        first_index: int,
        count: int,
        holders: Sequence[int],
        policy: Placement,
        prefer: int | None = None,
    ) -> list[int] | None:
        """Choose and take ranks for ``count`` new rBlocks of a sequence, or None if short.

        ``first_index`` is the position of the first new rBlock in the
        sequence, ``holders`` the ranks of its current rBlocks (newest last)
        and ``prefer`` a rank to try first for the first rBlock. With
        ``"local_first"`` the owner's own memory is used first, then ranks
        already holding the sequence (fewer ranks per decode step), then the
        rank with the most free; ``"spread"`` deals rBlocks round-robin from
        the owner (balanced attention work), skipping full ranks. On None
        nothing is taken anywhere.
        """
        if policy not in PLACEMENTS:
            raise InvalidArgument(f"placement must be one of {PLACEMENTS}, got {policy!r}")
        for _ in range(4):  # retry if another rank took space between snapshot and take
            free = self.free()
            if sum(free) < count:
                return None
            left = list(free)
            chosen: list[int] = []
            for i in range(count):
                order = self._order(owner, first_index + i, [*holders, *chosen], policy, left)
                if i == 0 and prefer is not None:
                    order = [prefer] + [r for r in order if r != prefer]
                r = next(r for r in order if left[r] > 0)
                left[r] -= 1
                chosen.append(r)
            taken: list[tuple[int, int]] = []
            ok = True
            for r in sorted(set(chosen)):
                n = chosen.count(r)
                if not self.take(r, n):
                    ok = False
                    break
                taken.append((r, n))
            if ok:
                return chosen
            for r, n in taken:
                self.give(r, n)
        return None

    def _order(
        self, owner: int, index: int, holders: Sequence[int], policy: Placement, left: list[int]
    ) -> list[int]:
        w = self.world_size
        by_free = sorted(range(w), key=lambda r: (-left[r], (r - owner) % w))
        if policy == "spread":
            first = [(owner + index) % w]
        else:
            first = [owner] + [r for r in reversed(holders) if r != owner]
        return list(dict.fromkeys(first + by_free))

    # ----------------------------------------------------------- placement
    def record(self, handle: int, ranks: Sequence[int]) -> None:
        """Store the rank of each rBlock of sequence ``handle`` (empty: forget it)."""
        key = f"place/{handle}"
        if ranks:
            self.store.set(key, ",".join(str(r) for r in ranks))
        else:
            self.store.delete_key(key)

    def lookup(self, handle: int) -> list[int]:
        """The rank of each rBlock of ``handle`` ([] if it has none)."""
        key = f"place/{handle}"
        if not self.store.check([key]):
            return []
        return [int(x) for x in self.store.get(key).decode().split(",")]


__all__ = ["PLACEMENTS", "GuardedStore", "Placement", "PlacementDirectory"]
