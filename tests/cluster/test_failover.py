"""An instance of any role found dead: its requests are re-sent to live ones and finish once,
with the tokens they would have had; with no prefill instance left they finish with an error."""

from __future__ import annotations

import pytest

from kvmem.cluster import Cluster
from kvmem.engine import SamplingParams
from tests.cluster.helpers import OPTS, Collect, wait
from tests.cluster.test_disagg import PROMPTS, _finish, _idle, _reference

pytestmark = pytest.mark.timeout(240)


class _Reasons(Collect):
    def __init__(self) -> None:
        super().__init__()
        self.reasons: dict[str, str | None] = {}
        self.errors: dict[str, str | None] = {}

    def __call__(self, out) -> None:
        super().__call__(out)
        if out.finished:
            self.reasons[out.request_id] = out.finish_reason
            self.errors[out.request_id] = out.error


def test_a_colocated_instance_killed_while_serving_has_its_requests_finished_elsewhere():
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    ref = _reference(params)
    col = Collect()
    with Cluster(2, OPTS, migrate=False, timeout=5.0) as c:
        assert wait(lambda: all(m is not None for m in c.metrics), 120), c.metrics
        for i, p in enumerate(PROMPTS):
            c.add_request(p, params, request_id=f"r{i}", on_output=col)
        assert {c.owner[f"r{i}"] for i in range(len(PROMPTS))} == {0, 1}
        assert wait(lambda: any(c.owner.get(r) == 0 for r in col.got), 120), col.got
        c._procs[0].kill()
        assert _finish(c, lambda: len(col.finished) == len(PROMPTS), 150), (col.got, c.resent)
        assert c.dead == {0} and c.resent
        late = Collect()  # new requests go to the live instance only
        c.add_request(PROMPTS[1], params, request_id="late", on_output=late)
        assert c.owner["late"] == 1
        assert wait(lambda: "late" in late.finished, 120), late.got
        assert wait(lambda: _idle(c, range(1, 2)), 10), c.metrics
    assert col.finished == {f"r{i}": 1 for i in range(len(PROMPTS))}
    assert [col.got[f"r{i}"] for i in range(len(PROMPTS))] == ref
    assert late.got["late"] == ref[1]


def test_a_prefill_instance_killed_while_serving_has_its_requests_prefilled_by_another():
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = _reference(params)
    col = Collect()
    with Cluster(3, OPTS, prefill=2, timeout=5.0) as c:  # ranks 0, 1 prefill; 2 decodes
        assert wait(lambda: all(m is not None for m in c.metrics), 120), c.metrics
        for i, p in enumerate(PROMPTS):
            c.add_request(p, params, request_id=f"r{i}", on_output=col)
        assert 0 in {c.owner[f"r{i}"] for i in range(len(PROMPTS))}
        c._procs[0].kill()  # with its prompts still prefilling or on their way to rank 2
        assert _finish(c, lambda: len(col.finished) == len(PROMPTS), 150), (col.got, c.resent)
        assert c.dead == {0}
        assert wait(lambda: _idle(c, range(1, 3)), 10), c.metrics
    assert col.finished == {f"r{i}": 1 for i in range(len(PROMPTS))}
    assert [col.got[f"r{i}"] for i in range(len(PROMPTS))] == ref


def test_with_no_prefill_instance_left_requests_finish_with_an_error():
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    col = _Reasons()
    with Cluster(2, OPTS, prefill=1, timeout=5.0) as c:
        assert wait(lambda: all(m is not None for m in c.metrics), 120), c.metrics
        c.add_request(PROMPTS[0], params, request_id="handed", on_output=col)
        assert wait(lambda: c.owner.get("handed") == 1, 120), c.handoffs  # decoding at 1
        c._procs[0].kill()
        assert wait(lambda: c.dead == {0}, 30)
        c.add_request(PROMPTS[1], params, request_id="new", on_output=col)
        assert wait(lambda: "new" in col.finished, 30), col.got
        assert c.abort("handed")
        assert wait(lambda: "handed" in col.finished, 60), col.got
        assert wait(lambda: _idle(c, range(1, 2)), 10), c.metrics
    assert col.reasons == {"new": "error", "handed": "abort"}
    assert "no prefill instance" in (col.errors["new"] or "")
    assert col.finished == {"new": 1, "handed": 1}


def test_positions_produced_twice_are_delivered_once_in_order():
    """Two instances producing the same positions (a decode instance that died right after
    taking a request over, then its prefill instance decoding it): each position once, the
    finish once, in token order."""
    from types import SimpleNamespace

    from kvmem.engine import RequestOutput

    front = SimpleNamespace(_early={}, _delivered={})

    def feed(start: int, toks: list[int], finished: bool = False) -> list[list[int]]:
        out = RequestOutput("r", toks, "", finished, "length" if finished else None)
        got = Cluster._in_order(front, "r", out, start)
        return [(o.new_token_ids, o.finished) for o in got]

    assert feed(0, [7]) == [([7], False)]
    assert feed(1, [8]) == [([8], False)]  # from the decode instance, which then dies
    assert feed(1, [8]) == []  # the prefill instance produces position 1 again
    assert feed(3, [10]) == []  # early: waits for position 2
    assert feed(2, [9]) == [([9], False), ([10], False)]
    assert feed(3, [10], finished=True) == [([], True)]  # a repeated last token still finishes
    assert front._delivered["r"] == 4 and "r" not in front._early
