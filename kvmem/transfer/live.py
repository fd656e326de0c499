"""Live migration of a running sequence to another instance (Llumnix's multi-stage pre-copy).

The source keeps decoding while full pages are copied; once the pages not
yet copied are few (or after ``max_stages`` stages) it stops the request,
copies the rest with the request's state, and hands over. Frames go over a
:class:`~kvmem.distributed.transport.Transport` used by this migration
alone; each frame the source sends is answered before the next::

    source (decoding)                                destination
    BEGIN(meta)          ────────────────────────▶  Importer.begin     ◀── OK(prefix hit) / error
    STAGE(new tokens, chunk of full pages) ──────▶  write + commit     ◀── OK / error
      ... decode steps meanwhile; repeated while the delta is large ...
    FINAL(tokens, last chunk, request state) ────▶  write, finish,     ◀── OK: prepared
                                                      request parked (not running)
    COMMIT ──────────────────────────────────────▶  request runs here
    source frees its copy
    (or ABORT ───────────────────────────────────▶  free everything)

The hand-over is a two-phase commit decided by the source. The source
keeps the request and its KV until it has the destination's OK to FINAL
(the destination holds a complete, parked copy) and has sent COMMIT: a
destination error (``OutOfKVMemory``, ...), an ABORT, a dead peer or a
wait that runs out before that leaves the request running at the source,
and the destination frees what it took. The destination runs the request
only on COMMIT, so the request never runs on both instances. If the
source falls silent between OK and COMMIT, the destination cannot tell a
source that kept the request (its wait for OK ran out) from one that died
before committing: it asks ``decide`` (e.g. a cluster front that knows
whether the source is alive and what it reported); without one it drops
its copy, which never runs a request twice. The copies of stages run on a
worker thread (the KV is read on the caller's thread, under the caller's
lock), so decode steps go on meanwhile; only FINAL stops the request.

Disaggregated prefill uses the same protocol with a gate: a
:class:`SourceMigration` given ``ready`` stages each new full page while
``ready()`` is false (the prompt's later chunks compute meanwhile) and
goes to FINAL only once it is true (the first token is sampled); with
``reserve_ahead`` the destination reserves every known token plus one at
BEGIN, so no transfer starts without room for the whole prompt. A
destination whose prefix cache already holds the first positions (the
previous turn of a conversation) says how many in its answer to BEGIN, and
they are not sent.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from kvmem.allocator import KVAllocator
from kvmem.distributed.transport import PeerFailure, Transport
from kvmem.errors import InvalidArgument, KVError, OutOfKVMemory
from kvmem.transfer.kv import Chunk, Importer, SeqMeta, export_meta, read_kv

BEGIN, STAGE, FINAL, ABORT, OK, FAIL, COMMIT = 21, 22, 23, 24, 25, 26, 27

_ERRORS: dict[str, type[KVError]] = {
    c.__name__: c for c in (KVError, OutOfKVMemory, InvalidArgument, PeerFailure)
}


class MigrationFailed(KVError):
    """A migration did not complete; the request is still running at the source."""


@dataclass
class MigrationStats:
    """What a migration did: stages, bytes, total time and the request's downtime (seconds)."""

    stages: int = 0
    tokens_copied: int = 0
    bytes_copied: int = 0
    #: bytes of the stages sent while ``ready()`` was false (overlapped with the prefill)
    bytes_early: int = 0
    #: leading positions the destination already held (its prefix cache): not sent
    tokens_cached: int = 0
    downtime_s: float = 0.0
    total_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)


def _chunk_bytes(c: Chunk | None) -> int:
    return 0 if c is None else sum(t.numel() * t.element_size() for t in c.parts)


class SourceMigration:
    """The source side of one live migration; advance it once per engine step.

    ``tokens`` returns the sequence's current tokens; ``final_pages`` is the
    largest delta (in allocation units of ``alloc``, its ``granularity``)
    copied with the request stopped;
    ``max_stages`` bounds the pre-copy stages. With ``ready``, every new
    full page is staged while ``ready()`` is false, and the hand-over waits
    until it is true (a prompt still being prefilled).
    """

    def __init__(
        self,
        transport: Transport,
        dst: int,
        alloc: KVAllocator,
        seq_id: Hashable,
        tokens: Callable[[], list[int]],
        *,
        final_pages: int = 2,
        max_stages: int = 8,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.transport, self.dst, self.alloc, self.seq_id = transport, dst, alloc, seq_id
        self.tokens = tokens
        self.unit = alloc.granularity  # a "page": the allocation unit (vmem's layout page is a row)
        self.final_tokens = max(1, final_pages) * self.unit
        self.max_stages = max_stages
        self.ready = ready
        self.stats = MigrationStats()
        self.error: KVError | None = None
        self.done = False  # handed over
        self._sent_tokens = 0
        self._copied = 0
        self._thread: threading.Thread | None = None
        self._posted_at = 0.0
        meta = export_meta(alloc, seq_id, tokens())
        meta.num_computed = 0  # the stages carry the KV
        self._sent_tokens = len(meta.tokens)
        self._post(BEGIN, (seq_id, meta), None)

    @property
    def failed(self) -> bool:
        """True once the migration has failed (the request stays here)."""
        return self.error is not None

    def wait_frame(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for the frame in flight (if any) to be answered."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def busy(self) -> bool:
        """True while a stage's copy is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def _exchange(self, kind: int, meta: Any, chunk: Chunk | None, early: bool = False) -> Any:
        tensors = [] if chunk is None else chunk.parts
        start = None if chunk is None else chunk.start
        sent = self.transport.send(self.dst, kind, (meta, start), tensors)
        reply = self.transport.recv(self.dst, "waiting for the migration's answer")
        self.transport.wait_sent(sent)
        if reply.kind == FAIL:
            name, text = reply.meta
            raise _ERRORS.get(name, KVError)(f"rank {self.dst}: {text}")
        self.stats.bytes_copied += _chunk_bytes(chunk)
        if early:
            self.stats.bytes_early += _chunk_bytes(chunk)
        self.stats.tokens_copied += 0 if chunk is None else chunk.num_tokens
        return reply.meta

    def _post(self, kind: int, meta: Any, chunk: Chunk | None, early: bool = False) -> None:
        def run() -> None:
            try:
                held = self._exchange(kind, meta, chunk, early)
                if kind == BEGIN and isinstance(held, int):  # the destination's prefix hit
                    self.stats.tokens_cached = held
                    self._copied = max(self._copied, held)
            except KVError as e:
                self.error = e

        self._posted_at = time.monotonic()
        self._thread = threading.Thread(target=run, name="kvmem-migration", daemon=True)
        self._thread.start()

    @property
    def overdue(self) -> bool:
        """True while a stage's exchange has run past what its bounded waits allow.

        One exchange waits at most ``timeout`` for the answer and ``timeout``
        for the frame to be taken; past three timeouts it is stuck.
        """
        return self.busy and time.monotonic() - self._posted_at > 3 * self.transport.timeout

    def give_up(self, err: KVError) -> None:
        """Fail now without waiting for the stage in flight (the request stays here).

        The stage's thread is left to end on its own: nothing sends COMMIT
        from it, so the destination never runs the request; mark the
        transport failed first (``Transport.fail``) so that no other frame
        goes out behind it.
        """
        if self.done:
            return
        self.error = self.error or err
        self._thread = None

    def _new_tokens(self) -> list[int]:
        toks = self.tokens()
        new = toks[self._sent_tokens :]
        self._sent_tokens = len(toks)
        return new

    def advance(self, state: Callable[[], Any]) -> bool:
        """One step of the migration; call it between decode steps (holding the allocator).

        Starts the next pre-copy stage when the last one is done, or, once
        the delta is at most ``final_pages`` pages or ``max_stages`` were
        run, stops here to copy the rest with ``state()`` (the request's
        state) and hand over. Returns True once handed over; raises
        :class:`MigrationFailed` (nothing lost: the request stays here).
        """
        if self.done:
            return True
        if self.busy:
            return False
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            raise MigrationFailed(f"migration of {self.seq_id!r} failed: {self.error}")
        computed = self.alloc.seq_info(self.seq_id).num_computed
        delta = computed - self._copied
        gated = self.ready is not None and not self.ready()
        if gated or (delta > self.final_tokens and self.stats.stages < self.max_stages):
            full = computed // self.unit * self.unit
            if full > self._copied:
                chunk = read_kv(self.alloc, self.seq_id, self._copied, full)
                self._copied = full
                self.stats.stages += 1
                self._post(STAGE, self._new_tokens(), chunk, gated)
                return False
            if gated:
                return False
        return self._final(computed, state)

    def _final(self, computed: int, state: Callable[[], Any]) -> bool:
        t0 = time.perf_counter()
        chunk = read_kv(self.alloc, self.seq_id, min(self._copied, computed), computed)
        try:
            self._exchange(FINAL, (self._new_tokens(), computed, state()), chunk)
            # the decision: from here on the destination runs the request
            self.transport.wait_sent(self.transport.send(self.dst, COMMIT, (None, None)))
        except KVError as e:
            # no ABORT: a destination that answered FAIL is gone, and one whose OK did not
            # come in time drops its copy when no COMMIT comes (its ``decide``)
            self.error = e
            raise MigrationFailed(f"migration of {self.seq_id!r} failed: {e}") from None
        self.stats.downtime_s = time.perf_counter() - t0
        self.stats.total_s = time.perf_counter() - self.stats.started
        self.stats.stages += 1
        self.done = True
        return True

    def abort(self) -> None:
        """Give up (the request stays here); the destination frees what it took."""
        if self.done or self.error is not None:
            return
        if self._thread is not None:
            self._thread.join(self.transport.timeout * 2)
            self._thread = None
        if self.error is None:
            with contextlib.suppress(KVError):
                self._exchange(ABORT, None, None)
        self.error = self.error or MigrationFailed("aborted")


def abort_remote(transport: Transport, dst: int) -> None:
    """Tell a destination waiting in :func:`receive_migration` that no migration comes."""
    sent = transport.send(dst, ABORT, (None, None))
    transport.recv(dst, "waiting for the migration's answer")
    transport.wait_sent(sent)


def receive_migration(
    transport: Transport,
    src: int,
    alloc: KVAllocator,
    lock: Any = None,
    first_wait: float | None = None,
    on_final: Callable[[Hashable, Any], None] | None = None,
    on_begin: Callable[[SeqMeta], None] | None = None,
    on_prepare: Callable[[Hashable, Any], None] | None = None,
    decide: Callable[[Hashable], bool] | None = None,
    reserve_ahead: bool = False,
) -> tuple[Hashable, Any] | None:
    """The destination side: build the migrating sequence in ``alloc`` frame by frame.

    ``lock`` (a context manager, e.g. the engine's step lock) is held while
    the allocator is touched. ``on_begin(meta)`` runs under it before
    anything is imported (e.g. to adopt the source's FP8 scales where none
    are set yet); ``on_prepare(seq_id, state)`` once the sequence is
    complete, before the source is told it may commit (a KVError from it
    fails the migration); ``on_final(seq_id, state)`` on COMMIT (the request
    may run now). If the source falls silent after being told, ``decide(seq_id)``
    says whether to keep and run the copy (True: the source is known to have
    died or committed) or drop it; without ``decide`` it is dropped.
    Returns ``(seq_id, state)`` once committed (the caller owns the request),
    or None if the source aborted, the import failed or the copy was dropped
    (nothing kept). A dead source before FINAL raises PeerFailure with nothing kept.
    """
    guard = lock if lock is not None else threading.RLock()
    imp: Importer | None = None
    seq_id: Hashable = None
    try:
        while True:
            frame = transport.recv(src, "receiving a migration", first_wait=first_wait)
            first_wait = None
            (meta, start), kind = frame.meta, frame.kind
            try:
                with guard:
                    if kind == BEGIN:
                        seq_id, smeta = meta
                        if on_begin is not None:
                            on_begin(smeta)
                        imp = Importer(alloc, seq_id, smeta)
                        imp.begin(smeta.tokens)
                        if reserve_ahead:
                            imp.reserve(len(smeta.tokens) + 1)
                    elif kind == ABORT or imp is None:
                        if imp is not None:
                            imp.abort()
                        transport.wait_sent(transport.send(src, OK, None))
                        return None
                    elif kind == STAGE:
                        imp.extend(meta)
                        imp.write(Chunk(start, frame.tensors))
                    else:
                        new, computed, state = meta
                        imp.extend(new)
                        if frame.tensors:
                            imp.write(Chunk(start, frame.tensors))
                        imp.finish(computed)
                        if on_prepare is not None:
                            on_prepare(seq_id, state)
                        transport.wait_sent(transport.send(src, OK, None))
                        break
            except KVError as e:
                if imp is not None:
                    imp.abort()
                transport.wait_sent(transport.send(src, FAIL, (type(e).__name__, str(e))))
                return None
            # BEGIN's answer: the positions this side already holds (a prefix-cache hit)
            answer = imp.written if kind == BEGIN and imp is not None else None
            transport.wait_sent(transport.send(src, OK, answer))
        try:
            commit = transport.recv(src, "waiting for the hand-over decision").kind == COMMIT
        except PeerFailure:
            commit = decide is not None and decide(seq_id)
        with guard:
            if not commit:
                imp.abort()
                return None
            imp.keep()
            if on_final is not None:
                on_final(seq_id, state)
        return seq_id, state
    except BaseException:
        if imp is not None:
            with guard:
                imp.abort()
        raise


__all__ = [
    "abort_remote",
    "MigrationFailed",
    "MigrationStats",
    "SourceMigration",
    "receive_migration",
]
