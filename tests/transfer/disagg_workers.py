"""Rank functions for the disaggregated prefill/decode tests (run by dist_harness.run_world).

Rank 0 runs a ``prefill`` engine, rank 1 a ``decode`` engine, both over the
same tiny random model; one gloo transport joins them. Rank 0 also runs
the colocated reference.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from kvmem.distributed.transport import Transport
from kvmem.engine import Engine, RequestOutput, SamplingParams
from kvmem.engine.roles import serve_handoffs

#: different lengths (several pages of 16 each, one under a page); chunks of 32 tokens
PROMPTS = [[(7 * i + 3 * j) % 250 + 1 for j in range(n)] for i, n in enumerate((90, 23, 130, 47))]
#: a second turn: the first prompt plus more (a prefix hit on both sides)
NEXT_TURN = PROMPTS[0] + [5, 6, 7, 8] * 5
MAX_TOKENS = 12
#: seconds each prefill step takes at least (a model bigger than tiny): the transfer's frames
#: take milliseconds of Python, so with the tiny model's 1 ms steps the prompt would be done first
STEP_S = 0.03


def make_engine(role: str, num_kv_tokens: int = 1024) -> Engine:
    """A small engine with the reference kernels and prefill chunks of 32 tokens."""
    return Engine(
        num_kv_tokens=num_kv_tokens,
        attention_impl="reference",
        max_num_batched_tokens=32,
        seed=0,
        role=role,
    )


def params() -> SamplingParams:
    """Greedy, a fixed length."""
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def reference() -> dict[str, list[int]]:
    """Every request's output on one colocated engine."""
    with make_engine("colocated") as eng:
        done = eng.generate(PROMPTS, params())
        [turn] = eng.generate([NEXT_TURN], params())
    out = {f"r{i}": list(c.output_token_ids) for i, c in enumerate(done)}
    out["turn"] = list(turn.output_token_ids)
    return out


class Collector:
    """Each request's streamed tokens, how many finishing outputs it had, its cache hit."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finished: dict[str, int] = {}
        self.cached: dict[str, int | None] = {}
        self.lock = threading.Lock()

    def __call__(self, out: RequestOutput) -> None:
        with self.lock:
            self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            self.cached.setdefault(out.request_id, out.num_cached_tokens)
            if out.finished:
                self.finished[out.request_id] = self.finished.get(out.request_id, 0) + 1


def prefill_decode(
    rank: int, world: int, fault: str = "", timeout: float = 10.0, decode_kv: int = 1024
) -> dict[str, Any]:
    """Rank 0 prefills every prompt and hands each to rank 1, which decodes it.

    ``fault``: ``"decode_dies"`` (rank 1 exits after taking two frames, in
    the middle of the first transfer); ``"abort"`` (rank 0 aborts ``r2``
    once its transfer has begun, before its prompt is computed).
    ``decode_kv``: rank 1's KV capacity.
    """
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    t = Transport(group, timeout)
    got = Collector()
    if rank == 0:
        out: dict[str, Any] = {"reference": reference()}
        eng = make_engine("prefill")
        execute = eng.executor.execute

        def slow_execute(*a: Any, **k: Any) -> Any:
            # every frame in flight lands before the next chunk computes, however loaded the
            # machine: the pages of one chunk move while the next one computes
            for _, mig in list(eng.handoffs.active.values()):
                mig.wait_frame(3 * timeout)
            time.sleep(STEP_S)
            return execute(*a, **k)

        eng.executor.execute = slow_execute  # type: ignore[method-assign]
        for i, p in enumerate(PROMPTS):
            eng.add_request(p, params(), request_id=f"r{i}", on_output=got)
            eng.handoffs.route(eng, f"r{i}", t, 1)
        if fault == "abort":
            out["aborted_mid_transfer"] = False
            while "r2" not in got.tokens and eng.has_unfinished():
                eng.step()
                if any(rid == "r2" for rid, _ in eng.handoffs.active.values()):
                    out["aborted_mid_transfer"] = eng.abort("r2")
                    break
        eng.run()
        eng.add_request(NEXT_TURN, params(), request_id="turn", on_output=got)
        eng.handoffs.route(eng, "turn", t, 1)
        eng.run()
        h = eng.handoffs
        out["handed"] = [rid for rid, _, _ in h.done]
        out["bytes"] = sum(s.bytes_copied for _, _, s in h.done)
        out["bytes_early"] = sum(s.bytes_early for _, _, s in h.done)
        out["turn_cached"] = sum(s.tokens_cached for rid, _, s in h.done if rid == "turn")
        out["failed"] = list(h.failed)
        out["local"] = list(h.local)
        out["tokens"], out["finished"], out["cached"] = got.tokens, got.finished, got.cached
        out["used_after"] = eng.allocator.stats().used_tokens
        out["left"] = (len(h.routes), len(h.active), len(h.held))
        eng.allocator.check_integrity()
        return out
    eng = make_engine("decode", decode_kv)
    if fault == "decode_dies":
        recv = t.recv
        seen = [0]

        def dying_recv(*a: Any, **k: Any) -> Any:
            seen[0] += 1
            if seen[0] == 3:  # BEGIN and one stage taken
                os._exit(3)
            return recv(*a, **k)

        t.recv = dying_recv  # type: ignore[method-assign]
    taken: list[str] = []
    peak = [0]
    acceptor = threading.Thread(
        target=serve_handoffs,
        args=(eng, t, 0),
        kwargs={
            "count": len(PROMPTS) + (fault != "abort"),
            "on_output": got,
            "on_accepted": taken.append,
        },
        daemon=True,
    )
    acceptor.start()
    while acceptor.is_alive() or eng.has_unfinished():
        if eng.has_unfinished():
            eng.step()
            peak[0] = max(peak[0], eng.metrics().kv_used_tokens)
        else:
            acceptor.join(0.002)
    eng.allocator.check_integrity()
    return {
        "taken": taken,
        "tokens": got.tokens,
        "finished": got.finished,
        "peak": peak[0],
        "used_after": eng.allocator.stats().used_tokens,
    }
