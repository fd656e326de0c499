"""Prefill and decode instances behind the dispatcher: colocated tokens, faults finish once."""

from __future__ import annotations

import functools
import tempfile
import time

import pytest

from kvmem.cluster import Cluster
from kvmem.engine import Engine, SamplingParams
from kvmem.errors import InvalidArgument
from tests.cluster.helpers import OPTS, Collect, wait

pytestmark = pytest.mark.timeout(240)
BASE = [(5 * j) % 200 + 1 for j in range(70)]
#: different lengths; the last two share the first's prompt (prefix hits at the prefill side)
PROMPTS = [BASE, [3, 1, 4, 1, 5] * 3, [(11 * j) % 230 + 2 for j in range(120)], BASE + [9] * 20]
PROMPTS.append(BASE + [8] * 40)


@functools.cache
def _reference(params: SamplingParams) -> list[list[int]]:
    with Engine(**OPTS) as eng:
        return [c.output_token_ids for c in eng.generate(PROMPTS, params)]


def _finish(c: Cluster, cond, deadline: float) -> bool:
    """``wait``; on a timeout, dump the front's state and every process's threads first."""
    if wait(cond, deadline):
        return True
    c.dump_state()
    time.sleep(2)  # the instances write their stacks to stderr (the test's captured output)
    return False


def _idle(c: Cluster, ranks: range) -> bool:
    ms = [c.metrics[i] for i in ranks]
    return all(m is not None and m.kv_used_tokens == 0 and m.num_running == 0 for m in ms)


def test_prefill_and_decode_instances_give_the_colocated_tokens():
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ref = _reference(params)
    col = Collect()
    with Cluster(2, OPTS, prefill=1) as c:
        for i, p in enumerate(PROMPTS[:3]):
            c.add_request(p, params, request_id=f"r{i}", on_output=col)
        assert wait(lambda: len(col.finished) == 3, 150), col.got
        for i, p in enumerate(PROMPTS[3:], 3):  # after the first: its prompt is cached
            c.add_request(p, params, request_id=f"r{i}", on_output=col)
        assert wait(lambda: len(col.finished) == len(PROMPTS), 150), col.got
        # each prefill report may trail its request's last token through the outputs queue
        assert wait(lambda: len(c.handoffs) == len(PROMPTS), 10), c.handoffs
        assert sorted(rid for rid, *_ in c.handoffs) == sorted(col.finished)
        assert all(p == 0 and d == 1 for _, p, d, _ in c.handoffs)
        assert sum(s.bytes_copied for *_, s in c.handoffs) > 0
        hits = 2 * (len(BASE) // 16 * 16)
        # nothing held on either side; metrics come every 0.25 s, so an early report is idle
        # too: wait for one taken after the cache hits
        assert wait(
            lambda: _idle(c, range(2)) and c.metrics[0].prefix_cache_hit_tokens >= hits, 10
        ), c.metrics
        with tempfile.TemporaryFile("w+") as f:
            c.dump_state(f)
            f.seek(0)
            dump = f.read()
    assert all(f"('r{i}', 0, 1)" in dump for i in range(len(PROMPTS)))  # the hand-offs
    assert "in _read" in dump  # the front reader's stack
    assert col.finished == {f"r{i}": 1 for i in range(len(PROMPTS))}
    assert [col.got[f"r{i}"] for i in range(len(PROMPTS))] == ref


def test_a_decode_instance_killed_while_serving_leaves_every_request_finished_once():
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    ref = _reference(params)
    col = Collect()
    with Cluster(3, OPTS, prefill=1, timeout=5.0) as c:
        for i, p in enumerate(PROMPTS):
            c.add_request(p, params, request_id=f"r{i}", on_output=col)
        # kill decode instance 1 once it runs a request that has streamed a few tokens
        assert wait(lambda: any(c.owner.get(r) == 1 for r in col.got), 120), c.handoffs
        c._procs[1].kill()
        assert _finish(c, lambda: len(col.finished) == len(PROMPTS), 150), (col.got, c.resent)
        assert c.dead == {1}
        # re-sent from its delivered tokens, or (mid-transfer) decoded at the prefill side
        assert c.resent or c.failed_migrations
        assert wait(lambda: _idle(c, range(0, 3, 2)), 10), c.metrics
    assert col.finished == {f"r{i}": 1 for i in range(len(PROMPTS))}
    assert [col.got[f"r{i}"] for i in range(len(PROMPTS))] == ref


def _kill_decode_1(c: Cluster, col: Collect, moment: str) -> None:
    if moment == "as requests arrive":  # before BEGIN, or in the first transfers
        c._procs[1].kill()
    elif moment == "at its first hand-off":  # right after a COMMIT to it
        assert wait(lambda: any(d == 1 for _, _, d, _ in c.handoffs), 120), c.handoffs
        c._procs[1].kill()
    else:  # "with the front stalled": the front reads nothing for a while, then 1 dies
        assert wait(lambda: any(c.owner.get(r) == 1 for r in col.got), 120), c.handoffs
        with c._lock:  # the reader thread waits for it: the instances' messages pile up
            time.sleep(2)
            c._procs[1].kill()
            c._procs[1].join(10)


@pytest.mark.parametrize(
    "moment", ["as requests arrive", "at its first hand-off", "with the front stalled"]
)
def test_a_decode_instance_killed_at_any_moment_leaves_every_request_finished_once(moment):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = _reference(params)
    col = Collect()
    with Cluster(3, OPTS, prefill=1, timeout=5.0) as c:
        # every instance up (its pair groups made) before anything is sent
        assert wait(lambda: all(m is not None for m in c.metrics), 120), c.metrics
        for i, p in enumerate(PROMPTS):
            c.add_request(p, params, request_id=f"r{i}", on_output=col)
        _kill_decode_1(c, col, moment)
        assert _finish(c, lambda: len(col.finished) == len(PROMPTS), 150), (col.got, c.resent)
        assert c.dead == {1}
        assert wait(lambda: _idle(c, range(0, 3, 2)), 10), c.metrics
    assert col.finished == {f"r{i}": 1 for i in range(len(PROMPTS))}
    assert [col.got[f"r{i}"] for i in range(len(PROMPTS))] == ref


def test_a_fleet_needs_a_decode_instance():
    with pytest.raises(InvalidArgument, match="prefill"):
        Cluster(2, OPTS, prefill=2)


def test_an_abort_reaches_a_request_wherever_it_is_and_nothing_stays_held():
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    col = Collect()
    reasons: dict[str, str | None] = {}

    def collect(out) -> None:
        col(out)
        if out.finished:
            reasons[out.request_id] = out.finish_reason

    with Cluster(2, OPTS, prefill=1) as c:
        for i, p in enumerate(PROMPTS[:3]):
            c.add_request(p, params, request_id=f"r{i}", on_output=collect)
        assert wait(lambda: all(f"r{i}" in col.got for i in range(3)), 120), col.got
        for i in range(3):  # on the decode instance, or still on its way there
            assert c.abort(f"r{i}")
        assert wait(lambda: len(reasons) == 3, 60), reasons
        assert wait(lambda: _idle(c, range(2)), 10), [
            (m.num_running, m.num_waiting, m.kv_used_tokens) for m in c.metrics
        ]
    assert reasons == {f"r{i}": "abort" for i in range(3)}
    assert col.finished == {f"r{i}": 1 for i in range(3)}
