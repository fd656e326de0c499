"""The map-ahead worker: maps, off the decode step, the next pages of growing sequences.

::

    caller thread (the allocator's lock held where it says so)        worker thread
    reserve(s, 1) -> want(slot)         slot asked for
    layout(batch) -> wake():  lock: publish finished jobs            (mapworker.MapWorker)
                                    claim pool groups per slot
                                    (most urgent first)
                                    submit (addr, handle) pages  -->  driver mmaps / maps
    any call that touches a mapping slot -> settle(slot): wait  <--  result
                                    for its job, publish it

Claimed groups are in neither the pool nor any slot until published, so the
caller's thread settles a slot before it touches it, and every job before it
counts the pool. The worker maps from the pool only, and only beyond what
sequences reserved; it never unmaps and touches no allocator state. With the
host driver and the native extension the mappings run on a native thread that
never takes the GIL (:mod:`.mapworker`). A driver failure in the worker is
counted and left for the caller's own ``reserve`` to meet (and report) when it
maps the same page itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvmem.backends.vmem.driver import MapWorker
from kvmem.backends.vmem.mapworker import ThreadWorker
from kvmem.backends.vmem.space import VirtualKV
from kvmem.errors import DriverError

__all__ = ["MapAhead"]

#: Bytes per layer a claim maps past a slot's pages (up to the slot's share of the pool):
#: on the host, one mmap per layer maps that many bytes of small pages.
CHUNK_BYTES = 256 * 1024


class MapAhead:
    """Requests, claims, and the jobs the worker is mapping, for one virtual space.

    ``lock`` is the allocator's lock; ``target(slot)`` (called with it held)
    says how many tokens the slot should cover, or None when the slot has no
    sequence any more. ``ahead`` is how far beyond the reserved KV a slot
    should stay mapped before the worker is asked for more. On pages smaller
    than :data:`CHUNK_BYTES` a claim maps a chunk of pages at once, up to
    the slot's :meth:`share` of the pool, and slots under their share are
    asked for ``early`` tokens sooner.
    """

    def __init__(
        self,
        space: VirtualKV,
        lock: threading.Lock,
        ahead: int,
        target: Callable[[int], int | None],
    ) -> None:
        self.space = space
        self.ahead = ahead
        #: Most pages a claim takes beyond ``2 * ahead`` (small pages only: a chunk of bytes).
        self.chunk = (
            max(1, CHUNK_BYTES // space.page_bytes) if space.page_bytes < CHUNK_BYTES else 0
        )
        #: Tokens sooner than ``ahead`` a slot under its share is asked for: half a chunk.
        self.early = space.cover(self.chunk) // 2 if self.chunk else 0
        self._even = space.num_groups // space.max_seqs  # groups per slot, the pool split evenly
        self._target = target
        self._lock = lock
        self._wanted = [False] * space.max_seqs  # slot already asked of the worker
        # per slot: no need to look again while reserved < _quiet_below and covered is unchanged
        self._quiet_below = [0] * space.max_seqs
        self._quiet_covered = [-1] * space.max_seqs
        self._requests: list[int] = []  # slots to claim for at the next wake-up
        self._worker: MapWorker | None = None  # made with the first job
        self._jobs: dict[int, tuple[int, int, list[int]]] = {}  # ticket: slot, start, groups
        self._inflight: dict[int, int] = {}  # slot: ticket of the job mapping it
        self.closed = False
        #: Page groups the worker mapped, driver errors it met, and the last one.
        self.groups = 0
        self.errors = 0
        self.last_error: str | None = None

    def want(self, slot: int, reserved: int) -> None:
        """Ask for the slot's next pages if under ``ahead`` tokens are mapped past ``reserved``.

        ``early`` tokens sooner while the slot is under its share (see
        :meth:`share`), so that the worker is asked well before the caller
        could need the pages. Never while the pool is empty: the worker maps
        from the pool only.
        """
        covered = self.space.covered[slot]
        if reserved < self._quiet_below[slot] and covered == self._quiet_covered[slot]:
            return  # the decode step's usual case: two lookups
        sp = self.space
        if self._wanted[slot] or covered >= sp.max_seq_len or not sp.pool:
            return
        room = covered - reserved
        if room >= self.ahead:
            early = self.early if len(sp.groups[slot]) < self.share(slot) else 0
            if room >= self.ahead + early:
                self._quiet_below[slot] = covered - self.ahead - early + 1
                self._quiet_covered[slot] = covered
                return
        self._wanted[slot] = True
        self._requests.append(slot)
        if len(self._requests) >= 64:
            self.wake()

    def forget(self, slot: int) -> None:
        """The slot changed hands: a request for it may be made again."""
        self._wanted[slot] = False

    def start(self) -> None:
        """Start the worker now rather than with the first job (which a step would wait for)."""
        if self._worker is None and not self.space.driver.bookkeeping_only:
            self._worker = self.space.driver.map_worker() or ThreadWorker(self.space.driver)
            self._worker.start()

    def batch_starts(self) -> None:
        """A batch is laid out: hand the worker its requests, publish what it mapped."""
        if self._requests or self._jobs:
            self.wake()

    def wake(self) -> None:
        """Publish the jobs finished, then claim the asked-for slots' next pages and hand their
        mapping to the worker, most urgent first (takes the lock)."""
        if self.closed or not (self._requests or self._jobs):
            return
        requests, self._requests = self._requests, []
        sp = self.space
        with self._lock:
            self._collect()
            order = []
            for slot in dict.fromkeys(requests):
                if slot in self._inflight:
                    continue  # asked again while mapping: it asks once more if still short
                self._wanted[slot] = False
                target = None if self.closed else self._target(slot)
                if target is not None:
                    order.append((sp.covered[slot] - target, slot, target))
            order.sort()
            for _, slot, target in order:
                groups = sp.claim(slot, self._goal(slot, target))
                if groups:
                    self._submit(slot, groups)

    def _submit(self, slot: int, groups: list[int]) -> None:
        """(Lock held.) Hand the mapping of claimed ``groups`` under ``slot`` to the worker."""
        sp = self.space
        start = len(sp.groups[slot])
        if sp.driver.bookkeeping_only:  # nothing to map: they land now
            sp.publish(slot, groups, len(groups))
            self.groups += len(groups)
            return
        try:
            self.start()
            assert self._worker is not None
            ticket = self._worker.submit(sp.map_request(slot, start, groups), sp.page_bytes)
        except Exception as e:  # nothing was handed over: the groups go back to the pool
            sp.publish(slot, groups, 0)
            self._failed(DriverError(f"map-ahead could not start: {e!r}"))
            return
        self._jobs[ticket] = (slot, start, groups)
        self._inflight[slot] = ticket
        self._wanted[slot] = True  # until published

    def _collect(self) -> None:
        """(Lock held.) Publish every finished job: its mapped groups join the slot."""
        if not self._jobs or self._worker is None:
            return
        sp = self.space
        for ticket, done, err in self._worker.poll():
            slot, start, groups = self._jobs.pop(ticket)
            full, err = sp.map_outcome(slot, start, len(groups), done, err)
            sp.publish(slot, groups, full)
            del self._inflight[slot]
            self._wanted[slot] = False
            self.groups += full
            if err is not None:
                self._failed(err)

    def _failed(self, err: DriverError) -> None:
        self.last_error = str(err)
        self.errors += 1

    def share(self, slot: int) -> int:
        """Groups the slot may have mapped when claims take chunks.

        Its even share of the pool (``num_groups // max_seqs``), or more
        while the pool is large: what it has plus ``1 / max_seqs`` of the
        pool. So early sequences cannot take, ahead of need, the pages that
        later ones will need, and a sparsely used pool still maps in chunks.
        """
        sp = self.space
        return max(self._even, len(sp.groups[slot]) + len(sp.pool) // sp.max_seqs)

    def _goal(self, slot: int, target: int) -> int:
        """(Lock held.) Tokens the slot should cover after this claim.

        ``2 * ahead`` past the reservation, and on small pages a chunk of up
        to :data:`CHUNK_BYTES` per layer past the mapped pages, up to the
        slot's :meth:`share`. A layer's pages of one claim are adjacent in
        memory and (groups popped in order) in the driver: the host driver
        maps them with one ``mmap``.
        """
        sp = self.space
        pages = min(len(sp.groups[slot]) + self.chunk, self.share(slot)) if self.chunk else 0
        return min(sp.max_seq_len, max(target + 2 * self.ahead, sp.cover(pages)))

    def settle(self, slot: int | None = None, timeout: float | None = None) -> bool:
        """(Lock held.) Wait until the worker is not mapping ``slot`` (any slot if None), and
        publish what it finished; False if ``timeout`` seconds passed first."""
        if not self._jobs or self._worker is None:
            return True
        ticket = 0 if slot is None else self._inflight.get(slot)
        if ticket is None:
            return True
        ok = self._worker.wait(ticket, timeout)
        self._collect()
        return ok

    def wait(self, timeout: float | None = None) -> bool:
        """Hand the worker what was asked for and block until it has mapped it (and it is
        published); False on timeout."""
        self.wake()
        with self._lock:
            return self.settle(None, timeout)

    def stop(self) -> None:
        """Let the worker's jobs land, then stop it (set ``closed`` under the lock first)."""
        with self._lock:
            self.settle()
        if self._worker is not None:
            self._worker.close()
