"""Sessions: a finished turn's KV parked on the host, resumed by the session's next turn."""

from __future__ import annotations

import time
from typing import Any

import pytest

from kvmem.engine import Engine, InvalidRequest, SamplingParams, random_model
from kvmem.engine.request import Request
from kvmem.engine.sessions import SessionBusy
from kvmem.errors import InvalidArgument

PAGE = 16
GREEDY = SamplingParams(max_tokens=9, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    """The tiny random model (one copy, read-only)."""
    return random_model("tiny", seed=0)


def engine(model, **kw: Any) -> Engine:
    """A paged engine (16-token pages, host pool as large as the device pool) by default."""
    opts: dict[str, Any] = {
        "num_kv_tokens": 1024,
        "backend": "paged",
        "backend_options": {"page_size": PAGE},
        "detokenize": False,
        **kw,
    }
    return Engine(model, **opts)


def prompt(seed: int, n: int) -> list[int]:
    """``n`` token ids, different for each seed."""
    return [(seed * 131 + 7 * i) % 250 + 1 for i in range(n)]


def turn(eng: Engine, toks: list[int], params: SamplingParams = GREEDY, **kw: Any) -> Request:
    """Run one request to its end (checking integrity every step); the finished Request."""
    rid = eng.add_request(toks, params, **kw)
    while eng.has_unfinished():
        eng.step()
        eng.allocator.check_integrity()
    r = eng.request(rid)
    assert r is not None and r.finished
    return r


def reference(model, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    """Greedy tokens of ``prompts`` on an engine without prefix caching or sessions."""
    ref = engine(model, backend_options={"page_size": PAGE, "prefix_caching": False})
    return [c.output_token_ids for c in ref.generate(prompts, params)]


def assert_empty(eng: Engine) -> None:
    """Nothing held: no sequence, no device KV in use, nothing on the host."""
    eng.allocator.check_integrity()
    s = eng.allocator.stats()
    assert (s.num_seqs, s.used_tokens, s.extra["host_used_tokens"]) == (0, 0, 0)


@pytest.mark.parametrize("backend", ["paged", "grouped"])
def test_three_turns_compute_only_the_new_tokens_and_match_fresh_requests(
    model, backend: str
) -> None:
    eng = engine(model, backend=backend)
    assert eng.allocator.capabilities.keep_on_host
    p1 = prompt(1, 37)
    r1 = turn(eng, p1, session_id="chat")
    assert r1.metrics.prompt_cached_tokens == 0
    assert eng.parked_sessions() == ["chat"] and not eng.has_unfinished()
    m = eng.metrics()
    assert m.num_parked_sessions == 1 and m.kv_used_tokens == 0
    p2 = p1 + r1.output_token_ids + prompt(2, 11)
    r2 = turn(eng, p2, session_id="chat")
    p3 = p2 + r2.output_token_ids + prompt(3, 5)
    r3 = turn(eng, p3, session_id="chat")
    # the parked KV is every token of the last turn but its last sampled one (never appended)
    for prev, r in ((r1, r2), (r2, r3)):
        kept = prev.num_tokens - 1
        assert r.metrics.prompt_cached_tokens == kept
        assert r.metrics.num_computed_tokens == r.num_tokens - 1 - kept
        assert r.seq_id == ("session", "chat") != r.request_id
    assert [r1.output_token_ids, r2.output_token_ids, r3.output_token_ids] == reference(
        model, [p1, p2, p3]
    )
    # without a session the prefix cache holds full pages only
    plain = engine(model)
    q1 = turn(plain, p1)
    q2 = turn(plain, p1 + q1.output_token_ids + prompt(2, 11))
    assert q2.metrics.prompt_cached_tokens == (r1.num_tokens - 1) // PAGE * PAGE
    assert q2.metrics.prompt_cached_tokens < r2.metrics.prompt_cached_tokens
    assert eng.end_session("chat") is True
    assert eng.parked_sessions() == [] and eng.metrics().num_parked_sessions == 0
    assert_empty(eng)
    assert eng.end_session("chat") is False


@pytest.mark.parametrize("bad", ["", 7, b"s", ["s"]])
def test_a_session_id_must_be_a_non_empty_string(model, bad: object) -> None:
    eng = engine(model)
    with pytest.raises(InvalidRequest, match="session_id"):
        eng.add_request(prompt(1, 8), GREEDY, session_id=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="session_id"):
        eng.end_session(bad)  # type: ignore[arg-type]
    assert not eng.has_unfinished() and eng.sessions.in_flight == {}


def test_one_request_of_a_session_at_a_time(model) -> None:
    eng = engine(model)
    first = eng.add_request(prompt(1, 20), GREEDY, session_id="s")
    with pytest.raises(SessionBusy, match=first):
        eng.add_request(prompt(1, 30), GREEDY, session_id="s", request_id="second")
    assert eng.request("second") is None and eng.sessions.in_flight == {"s": first}
    other = eng.add_request(prompt(2, 20), GREEDY, session_id="t")  # other sessions go on
    eng.run()
    assert eng.request(first).finish_reason == eng.request(other).finish_reason == "length"
    assert sorted(eng.parked_sessions()) == ["s", "t"]
    eng.add_request(prompt(1, 30), GREEDY, session_id="s")  # free again once it finished
    eng.run()


def test_fork_from_cannot_carry_a_session_but_its_parent_can(model) -> None:
    eng = engine(model)
    sp = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    parent = eng.add_request(prompt(1, 40), sp, session_id="s")
    with pytest.raises(InvalidRequest, match="fork_from"):
        eng.add_request(prompt(1, 40), sp, fork_from=parent, session_id="u")
    child = eng.add_request(prompt(1, 40), sp, fork_from=parent)
    eng.run()
    p, c = eng.request(parent), eng.request(child)
    assert p.output_token_ids == c.output_token_ids  # same seed, same logits
    assert c.metrics.num_cached_tokens == 40  # forked from the parent's prompt
    assert eng.parked_sessions() == ["s"]
    # the next turn's parent takes its KV back; its sample forks from it
    p2 = p.token_ids + prompt(2, 4)
    parent2 = eng.add_request(p2, sp, session_id="s")
    child2 = eng.add_request(p2, sp, fork_from=parent2)
    eng.run()
    p, c = eng.request(parent2), eng.request(child2)
    assert p.metrics.prompt_cached_tokens == len(p2) - 4 - 1
    assert c.metrics.num_cached_tokens == len(p2)  # forked from the resumed parent
    assert p.output_token_ids == c.output_token_ids
    assert eng.parked_sessions() == ["s"]
    eng.end_session("s")
    assert_empty(eng)


def test_a_turn_that_does_not_extend_the_parked_one_runs_fresh(model) -> None:
    eng = engine(model)
    p1 = prompt(1, 40)
    r1 = turn(eng, p1, session_id="s")
    edited = p1[:20] + prompt(9, 30)  # the user rewrote the conversation
    r2 = turn(eng, edited, session_id="s")
    assert r2.metrics.prompt_cached_tokens == 16  # the prefix cache's one shared full page
    assert r2.output_token_ids == reference(model, [edited])[0]
    r3 = turn(eng, edited + r2.output_token_ids + [5], session_id="s")
    assert r3.metrics.prompt_cached_tokens == r2.num_tokens - 1
    salted = turn(eng, r3.token_ids + [6], session_id="s", cache_salt="other")
    assert salted.metrics.prompt_cached_tokens == 0  # another salt: no KV shared
    assert r1.finish_reason == "length" and eng.parked_sessions() == ["s"]
    eng.end_session("s")
    assert_empty(eng)


def test_an_aborted_turn_parks_nothing_and_the_next_recomputes(model) -> None:
    eng = engine(model)
    p1 = prompt(1, 40)
    r1 = turn(eng, p1, session_id="s")
    p2 = p1 + r1.output_token_ids + prompt(2, 8)
    rid = eng.add_request(p2, SamplingParams(max_tokens=50, ignore_eos=True), session_id="s")
    eng.step()
    eng.step()
    assert eng.request(rid).kv is not None  # resumed, decoding
    assert eng.abort(rid)
    assert eng.parked_sessions() == [] and eng.sessions.in_flight == {}
    assert_empty(eng)
    r3 = turn(eng, p2, session_id="s")
    assert r3.metrics.prompt_cached_tokens == (len(p2) - 1) // PAGE * PAGE  # prefix cache only
    assert r3.output_token_ids == reference(model, [p2])[0]


def test_ending_a_session_in_flight_keeps_nothing(model) -> None:
    eng = engine(model)
    r1 = turn(eng, prompt(1, 30), session_id="s")
    rid = eng.add_request(r1.token_ids + [3], GREEDY, session_id="s")
    assert eng.end_session("s") is True  # parked KV freed now, before the turn is admitted
    assert eng.allocator.stats().num_seqs == 0
    eng.run()
    assert eng.request(rid).metrics.prompt_cached_tokens == (r1.num_tokens - 1) // PAGE * PAGE
    assert eng.parked_sessions() == []
    assert_empty(eng)


def test_evicted_parked_sessions_recompute_and_are_forgotten(model) -> None:
    # a host pool of 4 pages holds one 3-page conversation at a time
    eng = engine(model, backend_options={"page_size": PAGE, "host_num_tokens": 4 * PAGE})
    a = turn(eng, prompt(1, 37), session_id="a")
    assert eng.parked_sessions() == ["a"]
    b = turn(eng, prompt(2, 37), session_id="b")
    assert eng.parked_sessions() == ["b"]  # a's copy was evicted to park b's
    a2 = turn(eng, a.token_ids + [4], session_id="a")
    assert a2.metrics.prompt_cached_tokens < a.num_tokens - 1
    assert a2.output_token_ids == reference(model, [a.token_ids + [4]])[0]
    assert eng.parked_sessions() == ["a"]  # a's second turn took the pool from b
    b2 = turn(eng, b.token_ids + [4], session_id="b")
    assert b2.metrics.prompt_cached_tokens < b.num_tokens - 1
    assert b2.output_token_ids == reference(model, [b.token_ids + [4]])[0]
    for s in ("a", "b"):
        eng.end_session(s)
    assert_empty(eng)


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_sessions_under_preemption_match_fresh_requests(model, preemption: str) -> None:
    eng = engine(
        model,
        num_kv_tokens=10 * PAGE,
        max_num_seqs=4,
        preemption=preemption,
        watermark=0.0,
        backend_options={"page_size": PAGE, "host_num_tokens": 64 * PAGE},
    )
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [prompt(i, 30 + 5 * i) for i in range(4)]
    kept = [0] * 4
    for _ in range(2):
        ids = [eng.add_request(p, sp, session_id=f"s{i}") for i, p in enumerate(prompts)]
        deadline = time.monotonic() + 120
        while eng.has_unfinished() and time.monotonic() < deadline:
            if not eng.step():
                time.sleep(0.001)  # let swap copies land
            eng.allocator.check_integrity()
        reqs = [eng.request(i) for i in ids]
        assert all(r.finish_reason == "length" for r in reqs)
        assert [r.output_token_ids for r in reqs] == reference(model, prompts, sp)
        assert [r.metrics.prompt_cached_tokens for r in reqs] == kept
        prompts = [r.token_ids + prompt(9, 3) for r in reqs]
        kept = [r.num_tokens - 1 for r in reqs]
    assert eng.metrics().num_preemptions > 0
    for i in range(4):
        eng.end_session(f"s{i}")
    assert_empty(eng)


def test_backends_without_keep_on_host_run_sessions_as_plain_requests(model) -> None:
    vmem = {"page_bytes": 4096, "max_seqs": 16, "max_seq_len": 1024, "map_ahead": False}
    eng = engine(model, backend="vmem", backend_options=vmem)
    assert not eng.allocator.capabilities.keep_on_host
    p1 = prompt(1, 30)
    r1 = turn(eng, p1, session_id="s")
    p2 = r1.token_ids + [7, 8]
    r2 = turn(eng, p2, session_id="s")
    assert eng.parked_sessions() == []
    assert [r1.output_token_ids, r2.output_token_ids] == reference(model, [p1, p2])
    s = eng.allocator.stats()
    assert s.num_seqs == 0 and s.used_tokens == 0


def test_a_session_request_does_not_migrate(model) -> None:
    eng = engine(model)
    rid = eng.add_request(prompt(1, 20), GREEDY, session_id="s")
    eng.step()
    with pytest.raises(InvalidArgument, match="session"):
        eng.migrate(rid, object(), 1)
    eng.run()


def test_a_resumed_turn_that_cannot_be_admitted_parks_again(model) -> None:
    eng = engine(
        model,
        num_kv_tokens=8 * PAGE,
        watermark=0.0,
        backend_options={"page_size": PAGE, "host_num_tokens": 16 * PAGE},
    )
    s1 = turn(eng, prompt(1, 37), session_id="s")
    kept = s1.num_tokens - 1  # 45 tokens: 3 pages
    big = eng.add_request(prompt(2, 60), SamplingParams(max_tokens=40, ignore_eos=True))
    p2 = s1.token_ids + prompt(3, 40)
    rid = eng.add_request(p2, GREEDY, session_id="s")
    deadline = time.monotonic() + 60
    while eng.has_unfinished() and time.monotonic() < deadline:
        if not eng.step():
            time.sleep(0.001)
        eng.allocator.check_integrity()
    r = eng.request(rid)
    assert eng.request(big).finish_reason == r.finish_reason == "length"
    # admitted twice (the first time its KV came back, then did not fit beside ``big``),
    # both times from the parked copy: only the new tokens were ever computed
    assert r.metrics.num_cached_tokens == 2 * kept
    assert r.metrics.num_computed_tokens == r.num_tokens - 1 - kept
    assert r.output_token_ids == reference(model, [p2])[0]
