"""Rank functions for the live-migration tests (run by tests.distributed.dist_harness).

Rank 0 runs a source engine, rank 1 a destination engine, both over the
same tiny random model; a transport on a gloo group joins them.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from kvmem.distributed.transport import Transport
from kvmem.engine import Engine, SamplingParams, handover
from kvmem.errors import KVError
from kvmem.transfer import live

PROMPT = list(range(1, 61))  # 60 tokens: several pages of 16
MAX_TOKENS = 48
BACKEND_OPTIONS = {"vmem": {"max_seq_len": 256, "max_seqs": 4}, "grouped": {}, "paged": {}}


def make_engine(backend: str, kv_format: str, num_kv_tokens: int = 1024) -> Engine:
    """A small engine with the reference kernels (fast on CPU)."""
    return Engine(
        backend=backend,
        kv_format=kv_format,
        num_kv_tokens=num_kv_tokens,
        backend_options=BACKEND_OPTIONS[backend],
        attention_impl="reference",
        max_num_batched_tokens=32,
        seed=0,
    )


def params() -> SamplingParams:
    """Greedy, a fixed length."""
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def reference_tokens(backend: str, kv_format: str) -> list[int]:
    """The request's output with no migration."""
    with make_engine(backend, kv_format) as eng:
        [c] = eng.generate([PROMPT], params())
        return list(c.output_token_ids)


def migrate_once(
    rank: int,
    world: int,
    src_backend: str,
    dst_backend: str,
    kv_format: str,
    at_step: int,
    fault: str = "",
    timeout: float = 10.0,
    run_undecided: bool | None = None,
) -> dict[str, Any]:
    """Rank 0 starts the request and migrates it after ``at_step`` steps; rank 1 accepts.

    ``fault``: ``"dst_dies"`` (rank 1 exits after the first stage),
    ``"src_dies"`` (rank 0 exits right after the hand-over), ``"no_room"``
    (rank 1's KV cannot hold the request), ``"slow_prepare"`` (rank 1 takes
    longer than rank 0's timeout to check the complete copy), ``"src_dies_uncommitted"``
    (rank 0 exits after the destination's OK to FINAL, before COMMIT).
    ``run_undecided``: rank 1's answer when asked whether to run a copy whose
    source fell silent (None: no ``decide``, the default drop).
    """
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    t = Transport(group, timeout)
    out: dict[str, Any] = {}
    if rank == 0:
        out["reference"] = reference_tokens(src_backend, kv_format)
        eng = make_engine(src_backend, kv_format)
        eng.add_request(PROMPT, params(), request_id="r")
        for _ in range(at_step):
            eng.step()
        if fault == "src_dies_uncommitted":
            send = t.send

            def dying_send(dst: int, kind: int, *a: Any, **k: Any) -> Any:
                if kind == live.COMMIT:
                    os._exit(3)
                return send(dst, kind, *a, **k)

            t.send = dying_send  # type: ignore[method-assign]
        mig = eng.migrate("r", t, 1, final_pages=1, max_stages=4)
        while eng.migrations.active:
            eng.step()  # decodes while a stage's copy is in flight
            # one step per stage, however slow the machine: the request must not finish
            mig.wait_frame(3 * timeout)  # before the hand-over
        out["stages"] = mig.stats.stages
        out["handed_over"] = bool(eng.migrations.done)
        out["failed"] = [why for _, why in eng.migrations.failed]
        if fault == "src_dies" and out["handed_over"]:
            os._exit(3)
        eng.run()
        done = [r for r in eng.finished if r.request_id == "r"]
        out["tokens"] = done[0].output_token_ids if done else None
        out["used_after"] = eng.allocator.stats().used_tokens
        eng.allocator.check_integrity()
        return out
    cap = 32 if fault == "no_room" else 1024
    eng = make_engine(dst_backend, kv_format, num_kv_tokens=cap)
    if fault == "dst_dies":
        recv = t.recv
        seen = [0]

        def dying_recv(*a: Any, **k: Any) -> Any:
            seen[0] += 1
            if seen[0] == 3:  # BEGIN and one stage taken: die before the hand-over
                os._exit(3)
            return recv(*a, **k)

        t.recv = dying_recv  # type: ignore[method-assign]
    if fault == "slow_prepare":
        restore = handover.restore_request

        def slow_restore(*a: Any, **k: Any) -> Any:
            time.sleep(timeout + 1.0)
            return restore(*a, **k)

        handover.restore_request = slow_restore  # type: ignore[assignment]
    asked: list[str] = []

    def decide(request_id: str) -> bool:
        asked.append(request_id)
        return bool(run_undecided)

    try:
        rid = eng.accept_migration(
            t, 0, timeout=60, decide=None if run_undecided is None else decide
        )
    except KVError:  # the source gave up on it: nothing may stay here
        rid = None
    out["accepted"] = rid
    out["asked"] = asked
    out["used_before_run"] = eng.allocator.stats().used_tokens
    eng.run()
    done = [r for r in eng.finished if r.request_id == "r"]
    out["tokens"] = done[0].output_token_ids if done else None
    out["used_after"] = eng.allocator.stats().used_tokens
    eng.allocator.check_integrity()
    return out
