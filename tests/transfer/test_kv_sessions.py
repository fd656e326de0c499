"""Sessions across disaggregated prefill and decode: the decode side keeps a turn's KV parked,
and the next turn's hand-off sends only what it does not hold."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from kvmem import create_allocator
from kvmem.distributed.transport import Transport
from kvmem.engine import SamplingParams
from kvmem.engine.roles import serve_handoffs
from kvmem.engine.sessions import session_seq_id
from kvmem.spec import KVSpec
from kvmem.transfer.kv import Importer, copy_sequence, export_chunks, export_meta
from tests.distributed.dist_harness import run_world
from tests.transfer.disagg_workers import Collector, make_engine

pytestmark = pytest.mark.timeout(150)

P1 = [(7 * j) % 250 + 1 for j in range(45)]
MORE = [5, 6, 7, 8] * 4
MAX_TOKENS = 10


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def two_turns(rank: int, world: int, session: bool) -> dict[str, Any]:
    """Rank 0 prefills two turns of one conversation, rank 1 decodes them."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=10))
    sync = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    t = Transport(group, 10.0)
    got = Collector()
    kw = {"session_id": "conv"} if session else {}
    if rank == 0:
        with make_engine("colocated") as ref:
            [a] = ref.generate([P1], _params())
            [b] = ref.generate([P1 + a.output_token_ids + MORE], _params())
        eng = make_engine("prefill")
        eng.add_request(P1, _params(), request_id="t1", on_output=got, **kw)
        eng.handoffs.route(eng, "t1", t, 1)
        eng.run()
        dist.barrier(group=sync)  # turn 1 has finished on the decode side
        turn2 = P1 + a.output_token_ids + MORE
        eng.add_request(turn2, _params(), request_id="t2", on_output=got, **kw)
        eng.handoffs.route(eng, "t2", t, 1)
        eng.run()
        h = eng.handoffs
        eng.allocator.check_integrity()
        return {
            "reference": {"t1": a.output_token_ids, "t2": b.output_token_ids},
            "tokens": got.tokens,
            "handed": [rid for rid, _, _ in h.done],
            "held": {rid: s.tokens_cached for rid, _, s in h.done},
            "sent": {rid: s.tokens_copied for rid, _, s in h.done},
            "local": list(h.local),
            "used_after": eng.allocator.stats().num_seqs,
        }
    eng = make_engine("decode")
    parked: list[list[str]] = []

    def accepted(rid: str) -> None:
        got.tokens.setdefault(rid, [])

    acceptor = threading.Thread(
        target=serve_handoffs,
        args=(eng, t, 0),
        kwargs={"count": 2, "on_output": got, "on_accepted": accepted},
        daemon=True,
    )
    acceptor.start()
    seen = 0
    while acceptor.is_alive() or eng.has_unfinished():
        if eng.has_unfinished():
            eng.step()
            eng.allocator.check_integrity()
        else:
            acceptor.join(0.002)
        done = sum(got.finished.values())
        if done > seen:
            seen = done
            parked.append(eng.parked_sessions())
            if done == 1:
                dist.barrier(group=sync)
    out = {"tokens": got.tokens, "parked": parked, "ended": eng.end_session("conv")}
    s = eng.allocator.stats()
    out["left"] = (s.num_seqs, s.used_tokens, s.extra["host_used_tokens"])
    return out


@pytest.mark.parametrize("session", [True, False])
def test_the_decode_side_keeps_the_session_and_the_next_hand_off_sends_only_the_rest(
    session: bool,
) -> None:
    r0, r1 = run_world(two_turns, 2, session, deadline=120)
    assert r0["handed"] == ["t1", "t2"] and not r0["local"]
    for rid in ("t1", "t2"):
        # the first token comes from the prefill side, the others from the decode side
        assert r0["tokens"][rid] + r1["tokens"][rid] == r0["reference"][rid], rid
    kept = len(P1) + MAX_TOKENS - 1  # turn 1's tokens but its last (never computed)
    n2 = kept + 1 + len(MORE)  # turn 2's prompt
    if session:
        assert r1["parked"] == [["conv"], ["conv"]]
        assert r0["held"]["t2"] == kept  # the decode side held every position it parked
        assert r1["ended"] is True
    else:
        assert r1["parked"] == [[], []]
        assert r0["held"]["t2"] == kept // 16 * 16  # its prefix cache's full pages only
        assert r1["ended"] is False
    assert r0["sent"]["t2"] == n2 - r0["held"]["t2"]  # the prompt past what it held
    assert r0["used_after"] == 0 and r1["left"] == (0, 0, 0)


def _spec() -> KVSpec:
    return KVSpec(num_layers=2, num_kv_heads=2, head_dim=8)


def test_an_import_resumes_a_parked_copy_and_an_abort_parks_it_again() -> None:
    spec = _spec()
    src = create_allocator("paged", spec, num_tokens=256, page_size=4)
    dst = create_allocator("paged", spec, num_tokens=256, page_size=4)
    seq = session_seq_id("s")
    toks = list(range(1, 11))
    src.add(seq, toks)
    src.reserve(seq, 10)
    for i in range(spec.num_layers):
        lay = src.layer(i)
        lay.k.copy_(torch.randn_like(lay.k.float()).to(lay.k.dtype))
        lay.v.copy_(torch.randn_like(lay.v.float()).to(lay.v.dtype))
    src.commit(seq, 10)
    copy_sequence(src, seq, toks, dst)
    dst.free(seq, keep_on_host=True)  # the first turn ended on the destination: parked
    more = toks + [11, 12, 13]
    src.append(seq, [11, 12, 13])
    src.reserve(seq, 3)
    src.commit(seq, 3)
    imp = Importer(dst, seq, export_meta(src, seq, more))
    imp.begin(more)
    assert imp.written == 10 and imp.resumed  # nothing before position 10 needs sending
    imp.abort()
    info = dst.seq_info(seq)
    assert info.swapped and info.num_computed == 10  # parked again, not lost
    imp = Importer(dst, seq, export_meta(src, seq, more))
    imp.begin(more)
    assert imp.written == 10
    for c in export_chunks(src, seq, start=imp.written):
        imp.write(c)
    imp.finish(13)
    imp.keep()
    dst.check_integrity()
    a, b = (list(export_chunks(x, seq))[0].parts for x in (src, dst))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
