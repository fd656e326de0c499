"""The map-ahead worker: maps, off the decode step, the next pages of growing sequences.

::

    caller thread                         worker thread ("kvmem-vmem-map-ahead")
    reserve(s, 1) -> want(slot)  --+
    layout(batch) -> wake()      --+-->  queue  -->  run(slots):
                                                       per slot, most urgent first:
                                                       lock:   claim pool groups
                                                       (none): driver.map_many(...)
                                                       lock:   publish, notify settle()

Claimed groups are in neither the pool nor any slot until published, so the
caller's thread waits (:meth:`MapAhead.settle`) before it touches a slot the
worker is mapping, or before it counts the pool. The worker maps from the
pool only, and only beyond what sequences reserved; it never unmaps. A driver
failure in the worker is counted and left for the caller's own ``reserve`` to
meet (and report) when it maps the same page itself.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable

from kvmem.backends.vmem.space import VirtualKV
from kvmem.errors import DriverError

__all__ = ["MapAhead"]

_Item = list[int] | threading.Event | None

#: Bytes per layer a claim maps past a slot's pages (up to the slot's share of the pool):
#: on the host, one mmap per layer maps that many bytes of small pages.
CHUNK_BYTES = 256 * 1024


def _worker(ref: weakref.ReferenceType[MapAhead], q: queue.SimpleQueue[_Item]) -> None:
    """Map the next pages of the slots queued; set queued events once done; stop on None."""
    while True:
        items = [q.get()]
        while not q.empty():
            items.append(q.get())
        slots = [slot for item in items if isinstance(item, list) for slot in item]
        if slots:
            mapper = ref()
            if mapper is None:
                return
            mapper.run(slots)
            del mapper
        for item in items:
            if isinstance(item, threading.Event):
                item.set()
        if any(item is None for item in items):
            return


class MapAhead:
    """Requests, the worker thread and the slots it is mapping, for one virtual space.

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
        self._cv = threading.Condition(lock)  # notified when a batch of mappings lands
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._wanted = [False] * space.max_seqs  # slot already asked of the worker
        # per slot: no need to look again while reserved < _quiet_below and covered is unchanged
        self._quiet_below = [0] * space.max_seqs
        self._quiet_covered = [-1] * space.max_seqs
        self._requests: list[int] = []  # slots to hand the worker at the next wake-up
        self._inflight: set[int] = set()  # slots the worker is mapping (lock not held)
        self.thread: threading.Thread | None = None
        self.closed = False
        #: Page groups the worker mapped, driver errors it met, and the last one.
        self.groups = 0
        self.errors = 0
        self.last_error: str | None = None

    @property
    def pending(self) -> bool:
        """Requests are queued that the worker has not been handed yet."""
        return bool(self._requests)

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

    def wake(self) -> None:
        """Hand the queued requests to the worker (started on first use)."""
        if not self._requests or self.closed:
            return
        if self.thread is None:
            self.thread = threading.Thread(
                target=_worker,
                args=(weakref.ref(self), self._queue),
                name="kvmem-vmem-map-ahead",
                daemon=True,
            )
            self.thread.start()
        self._queue.put(self._requests)
        self._requests = []

    def run(self, slots: list[int]) -> None:
        """Worker side: map, from the pool only and without the lock, the slots' next pages.

        Slots go nearest to running out first, one at a time: each is
        claimed, mapped and published before the next, so a caller that
        needs a slot waits for that slot's mapping at most, never a batch's.
        """
        sp = self.space
        with self._lock:
            order = []
            for slot in dict.fromkeys(slots):
                self._wanted[slot] = False
                target = None if self.closed else self._target(slot)
                if target is not None:
                    order.append((sp.covered[slot] - target, slot))
        order.sort()
        for _, slot in order:
            with self._lock:
                target = None if self.closed else self._target(slot)
                if target is None or slot in self._inflight:
                    continue
                groups = sp.claim(slot, self._goal(slot, target))
                if not groups:
                    continue
                self._inflight.add(slot)
            result: tuple[int, int, DriverError | None] = (0, 0, None)
            try:
                result = sp.map_claimed(slot, groups)
            finally:  # whatever happened, the claim lands (unmapped groups back in the pool)
                with self._lock:
                    done, calls, err = result
                    sp.publish(slot, groups, done, calls)
                    self._inflight.discard(slot)
                    self.groups += done
                    if err is not None:
                        self.last_error = str(err)
                        self.errors += 1
                    self._cv.notify_all()

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

    def settle(self, slot: int | None = None) -> None:
        """(Lock held.) Wait until the worker is not mapping ``slot`` (any slot if None)."""
        while self._inflight if slot is None else slot in self._inflight:
            self._cv.wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker has handled everything queued so far; False on timeout."""
        self.wake()
        if self.thread is None or self.closed:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def stop(self) -> None:
        """Stop the worker and wait for it (set ``closed`` under the lock first)."""
        thread = self.thread
        if thread is not None:
            self._queue.put(None)
            if thread is not threading.current_thread():
                thread.join()
