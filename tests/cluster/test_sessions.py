"""Sessions across a cluster: a session's turns go where its KV is parked, colocated or
disaggregated, with the tokens of fresh requests."""

from __future__ import annotations

import pytest

from kvmem.cluster import Cluster
from kvmem.engine import Engine, InvalidRequest, SamplingParams
from kvmem.engine.sessions import SessionBusy
from tests.cluster.helpers import OPTS, Collect, wait

pytestmark = pytest.mark.timeout(240)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
P1 = [(7 * j) % 200 + 1 for j in range(45)]
NEW = [(13 * j) % 190 + 3 for j in range(9)]


class _Turns(Collect):
    """:class:`Collect`, and a request run to its end."""

    def run(self, c: Cluster, rid: str, prompt: list[int], **kw) -> list[int]:
        c.add_request(prompt, GREEDY, request_id=rid, on_output=self, **kw)
        assert wait(lambda: rid in self.finished, 150), self.got
        return self.got[rid]


def _fresh(prompts: list[list[int]]) -> list[list[int]]:
    with Engine(**OPTS) as eng:
        return [c.output_token_ids for c in eng.generate(prompts, GREEDY)]


def _parked(c: Cluster, i: int) -> int:
    m = c.metrics[i]
    return -1 if m is None else m.num_parked_sessions


def test_colocated_turns_go_to_the_instance_that_parked_the_session():
    col = _Turns()
    with Cluster(2, OPTS, migrate=False) as c:
        out1 = col.run(c, "t1", P1, session_id="chat")
        assert wait(lambda: sorted(_parked(c, i) for i in range(2)) == [0, 1], 30), c.metrics
        home = [_parked(c, i) for i in range(2)].index(1)
        # the other instance has less load now: only the session sends the turn back home
        p2 = P1 + out1 + NEW
        c.add_request(p2, GREEDY, request_id="t2", on_output=col, session_id="chat")
        assert c.owner["t2"] == home
        assert wait(lambda: "t2" in col.finished, 150), col.got
        assert col.cached["t2"] >= len(P1) + len(out1) - 1  # the parked KV, not recomputed
        other = col.run(c, "o1", NEW * 3)  # no session: goes by load
        assert c.end_session("chat") is True and c.end_session("chat") is False
        assert wait(lambda: _parked(c, home) == 0, 30), c.metrics
    assert col.finished == {"t1": 1, "t2": 1, "o1": 1}
    assert [out1, col.got["t2"], other] == _fresh([P1, p2, NEW * 3])


def test_disaggregated_turns_hand_over_only_what_the_decode_side_does_not_hold():
    col = _Turns()
    with Cluster(3, OPTS, prefill=1) as c:  # rank 0 prefills, ranks 1 and 2 decode
        out1 = col.run(c, "t1", P1, session_id="chat")
        (first,) = [h for h in c.handoffs if h[0] == "t1"]
        p2 = P1 + out1 + NEW
        out2 = col.run(c, "t2", p2, session_id="chat")
        (second,) = [h for h in c.handoffs if h[0] == "t2"]
        assert second[2] == first[2]  # the same decode instance: it parked turn 1
        assert first[3].tokens_cached == 0
        assert second[3].tokens_cached >= len(P1) + len(out1) - 1
        assert second[3].tokens_copied <= len(p2) - second[3].tokens_cached + 16
        assert c.end_session("chat") is True
        assert wait(lambda: all(_parked(c, i) == 0 for i in range(3)), 30), c.metrics
    assert col.finished == {"t1": 1, "t2": 1}
    assert [out1, out2] == _fresh([P1, p2])


def test_one_request_of_a_session_at_a_time_in_the_cluster():
    col = _Turns()
    slow = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    with Cluster(2, OPTS, migrate=False) as c:
        c.add_request(P1, slow, request_id="a", on_output=col, session_id="s")
        with pytest.raises(SessionBusy):
            c.add_request(P1, GREEDY, request_id="b", on_output=col, session_id="s")
        assert "b" not in c.owner
        with pytest.raises(InvalidRequest, match="non-empty"):
            c.add_request(P1, GREEDY, request_id="c", session_id="")
        assert "c" not in c.owner
        c.abort("a")
        assert wait(lambda: "a" in col.finished, 60), col.got
        col.run(c, "d", P1, session_id="s")  # free again once the request ended
    assert col.finished == {"a": 1, "d": 1}
