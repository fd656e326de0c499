"""Live migration of an engine's running requests: the engine side of :mod:`kvmem.transfer.live`.

:class:`Migrations` holds an engine's outgoing migrations and advances them
once per step, after the step's KV update (the request keeps decoding
between stages; the FINAL stage runs inside the step, so the request misses
no token, it only waits). On hand-over the request leaves the source engine
without a finish output (it continues at the destination) and its KV is
freed; a failed migration leaves it running untouched.

:func:`accept` runs on the destination (any thread): it builds the sequence
in the engine's allocator frame by frame under the engine's step lock;
before confirming FINAL it restores and checks the request and reserves its
id (parked: not running), and on the source's COMMIT adds it to the
scheduler as running, so the request is never run by both engines.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any

import torch

from kvmem.distributed.transport import Transport
from kvmem.engine.request import Request, RequestStatus
from kvmem.engine.tokenizer import IncrementalDecoder, Tokenizer
from kvmem.errors import InvalidArgument, KVError
from kvmem.transfer.kv import SeqMeta
from kvmem.transfer.live import (
    MigrationFailed,
    MigrationStats,
    SourceMigration,
    receive_migration,
)

_LOCAL = ("kv", "on_output", "swap_handle", "fork_of", "generator", "decoder")


def request_state(r: Request) -> dict[str, Any]:
    """The picklable state of a running request (no KV, callbacks or allocator)."""
    state = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name not in _LOCAL}
    state["generator"] = None if r.generator is None else r.generator.get_state()
    state["decoder"] = None if r.decoder is None else (list(r.decoder.ids), r.decoder.text)
    return state


def restore_request(state: dict[str, Any], tokenizer: Tokenizer) -> Request:
    """A Request from :func:`request_state` (running, without KV yet)."""
    fields = {k: v for k, v in state.items() if k not in ("generator", "decoder")}
    r = Request(**fields)
    if state["generator"] is not None:
        r.generator = torch.Generator()
        r.generator.set_state(state["generator"])
    if state["decoder"] is not None:
        r.decoder = IncrementalDecoder(tokenizer)
        r.decoder.ids, r.decoder.text = state["decoder"]
    r.status = RequestStatus.RUNNING
    return r


class Migrations:
    """An engine's outgoing live migrations, by request id."""

    def __init__(self) -> None:
        self.active: dict[str, SourceMigration] = {}
        #: (request id, stats) of each request handed over, in order
        self.done: list[tuple[str, MigrationStats]] = []
        #: (request id, error text) of each migration that failed (the request stayed)
        self.failed: list[tuple[str, str]] = []

    def start(
        self, engine: Any, request_id: str, transport: Transport, dst: int, **options: Any
    ) -> SourceMigration:
        """Begin migrating a running request of ``engine`` to rank ``dst``."""
        r = engine._requests.get(request_id)
        sched = engine.scheduler
        if r is None or r not in sched.running:
            raise InvalidArgument(f"request {request_id!r} is not running here")
        if request_id in self.active:
            raise InvalidArgument(f"request {request_id!r} is already migrating")
        if request_id in sched._forks:
            raise InvalidArgument(f"requests wait to fork from {request_id!r}; migrate later")
        mig = SourceMigration(
            transport, dst, engine.allocator, request_id, lambda: list(r.token_ids), **options
        )
        self.active[request_id] = mig
        return mig

    def advance(self, engine: Any) -> None:
        """Advance every migration by one step; hand over those that are done."""
        for rid, mig in list(self.active.items()):
            r = engine._requests.get(rid)
            if r is None or r not in engine.scheduler.running:  # finished or preempted here
                mig.abort()
                self._fail(rid, "the request left the running set")
                continue
            try:
                if not mig.advance(functools.partial(request_state, r)):
                    continue
            except (MigrationFailed, KVError) as e:
                mig.abort()
                self._fail(rid, str(e))
                continue
            del self.active[rid]
            engine.scheduler.remove(r)
            engine._requests.pop(rid, None)
            with engine._inbox_lock:
                engine._ids.discard(rid)
            self.done.append((rid, mig.stats))

    def _fail(self, rid: str, why: str) -> None:
        self.active.pop(rid, None)
        self.failed.append((rid, why))


def accept(
    engine: Any,
    transport: Transport,
    src: int,
    timeout: float | None = None,
    on_output: Any = None,
    decide: Callable[[str], bool] | None = None,
    reserve_ahead: bool = False,
) -> str | None:
    """Receive one request migrating from rank ``src`` into ``engine``; its id once it runs
    here, or None if the migration failed, was aborted or its copy was dropped (nothing kept).

    ``reserve_ahead``: reserve room for the whole request at BEGIN (a
    prefill instance's hand-off, see :mod:`kvmem.engine.roles`).
    ``on_output`` becomes the request's output callback here (callbacks do
    not travel). ``decide(request_id)`` is asked whether to run the complete
    copy when the source falls silent before committing (see
    :func:`~kvmem.transfer.live.receive_migration`); without it the copy is dropped.
    """
    parked: dict[Hashable, Request] = {}

    def prepare(seq_id: Hashable, state: dict[str, Any]) -> None:
        r = restore_request(state, engine.tokenizer)
        if r.seq_id != seq_id or engine.allocator.seq_info(seq_id).num_tokens != len(r.token_ids):
            raise InvalidArgument(f"migrated request {seq_id!r} does not match its KV")
        with engine._inbox_lock:
            if r.request_id in engine._ids:
                raise InvalidArgument(f"request id {r.request_id!r} is already in the engine")
            engine._ids.add(r.request_id)
        parked[seq_id] = r

    def commit(seq_id: Hashable, state: dict[str, Any]) -> None:
        r = parked.pop(seq_id)
        r.kv = engine.allocator
        r.on_output = on_output
        engine._requests[r.request_id] = r
        engine.scheduler.adopt(r)

    def adopt_scales(meta: SeqMeta) -> None:
        attn = getattr(engine.executor, "attention", None)
        if attn is None:
            return
        got = {(i, name): t for i, name, t in meta.scales}
        for i in range(engine.allocator.spec.num_layers):
            k, v = got.get((i, "k_scale")), got.get((i, "v_scale"))
            if k is not None and v is not None:
                attn.adopt_fp8_scales(engine.allocator.layer(i), k, v)

    try:
        res = receive_migration(
            transport,
            src,
            engine.allocator,
            engine._step_lock,
            timeout,
            on_final=commit,
            on_begin=adopt_scales,
            on_prepare=prepare,
            decide=None if decide is None else (lambda seq_id: decide(str(seq_id))),
            reserve_ahead=reserve_ahead,
        )
    finally:
        for r in parked.values():  # prepared, then dropped: its id is free again
            with engine._inbox_lock:
                engine._ids.discard(r.request_id)
    if res is None:
        return None
    engine._wake.set()
    return str(res[0])


__all__ = ["Migrations", "accept", "request_state", "restore_request"]
