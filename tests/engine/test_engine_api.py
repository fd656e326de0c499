"""Requests, sampling, stop conditions, streaming, abort, threads, bad input, policies."""

from __future__ import annotations

import threading
import time

import pytest
from engine_helpers import PROMPTS

from kvmem import InvalidArgument, KVError
from kvmem.engine import Engine, InvalidRequest, SamplingParams, random_model


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=0)


@pytest.fixture
def engine(model):
    return Engine(model, num_kv_tokens=2048, max_num_batched_tokens=64)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    [alone] = engine.generate([PROMPTS[0]], p)
    p3 = SamplingParams(max_tokens=16, temperature=0.9, seed=3)
    batch = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [p3, p, p])
    assert batch[1].output_token_ids == alone.output_token_ids
    other = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=16, temperature=0.9, seed=8))[0]
    assert other.output_token_ids != alone.output_token_ids


def test_top_k_1_is_greedy(engine):
    g = engine.generate([PROMPTS[3]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    hot = SamplingParams(max_tokens=12, temperature=2.0, top_k=1, seed=1, ignore_eos=True)
    k1 = engine.generate([PROMPTS[3]], hot)[0]
    assert k1.output_token_ids == g.output_token_ids


def test_stop_token_and_stop_string(engine):
    base = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    toks = base.output_token_ids
    stop_tok = toks[5]
    first = toks.index(stop_tok)
    r = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=20, stop_token_ids=(stop_tok,)))[0]
    assert r.finish_reason == "stop" and r.output_token_ids == toks[: first + 1]
    text = base.text
    s = next(text[i : i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    r = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=20, stop=(s,)))[0]
    assert r.finish_reason == "stop" and r.text == text[: text.index(s)]


def test_stream_yields_tokens_then_one_final_output(engine):
    outs = list(engine.stream(PROMPTS[4], SamplingParams(max_tokens=9, ignore_eos=True)))
    assert [o.finished for o in outs] == [False] * 8 + [True]
    assert outs[-1].finish_reason == "length"
    toks = [t for o in outs for t in o.new_token_ids]
    assert len(toks) == 9
    full = engine.generate([PROMPTS[4]], SamplingParams(max_tokens=9, ignore_eos=True))[0]
    assert toks == full.output_token_ids and "".join(o.new_text for o in outs) == full.text


def test_request_metrics_timeline(engine):
    [c] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=5, ignore_eos=True))
    m = c.metrics
    assert len(m.token_times) == 5 and m.ttft is not None and m.ttft >= 0
    assert m.arrival_time <= m.first_scheduled_time <= m.token_times[0] <= m.finish_time
    assert len(m.tbt) == 4 and all(t >= 0 for t in m.tbt)
    em = engine.metrics()
    assert em.generation_tokens == 5 and em.num_finished == 1 and em.num_running == 0
    assert em.as_dict()["kv_capacity_tokens"] == 2048


def test_abort_frees_kv_at_once(engine):
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.allocator.stats().used_tokens > 0
    got = []
    engine.request(rid).on_output = got.append
    assert engine.abort(rid)
    assert engine.allocator.stats().used_tokens == 0
    assert got and got[-1].finished and got[-1].finish_reason == "abort"
    assert not engine.abort(rid) and not engine.has_unfinished()


def test_submit_and_abort_from_another_thread_while_stepping(model):
    eng = Engine(model, num_kv_tokens=2048, max_num_batched_tokens=32)
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop():
        try:
            eng.serve_forever(stop)
        except BaseException as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=loop)
    t.start()
    try:
        done = threading.Event()
        finals = {}

        def cb(o):
            if o.finished:
                finals[o.request_id] = o.finish_reason
                if len(finals) == 6:
                    done.set()

        short = SamplingParams(max_tokens=40, ignore_eos=True)
        ids = [eng.add_request(p, short, on_output=cb) for p in PROMPTS]
        endless = SamplingParams(max_tokens=400, ignore_eos=True)
        ids.append(eng.add_request(PROMPTS[0], endless, on_output=cb))
        time.sleep(0.05)
        assert eng.abort(ids[-1])
        assert done.wait(60)
    finally:
        stop.set()
        t.join()
    assert not errors
    assert finals[ids[-1]] == "abort"
    assert sorted(finals.values()) == ["abort"] + ["length"] * 5
    eng.allocator.check_integrity()
    assert eng.allocator.stats().used_tokens == 0


@pytest.mark.parametrize(
    "prompt,params,match",
    [
        ("", SamplingParams(), "empty"),
        ([], SamplingParams(), "empty"),
        ("x" * 300, SamplingParams(), "context"),
        ([1, 2, 9999], SamplingParams(), "0..258"),
    ],
)
def test_bad_requests_fail_alone(model, prompt, params, match):
    eng = Engine(model, num_kv_tokens=2048, max_model_len=256)
    good = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequest, match=match):
        eng.add_request(prompt, params)
    [c] = eng.generate([PROMPTS[2]], SamplingParams(max_tokens=4))
    assert c.finish_reason == "length" and not eng.has_unfinished()
    assert eng.request(good).finished


def test_prompt_larger_than_kv_capacity_fails_alone(model):
    eng = Engine(model, num_kv_tokens=64)
    with pytest.raises(InvalidRequest, match="KV capacity"):
        eng.add_request("y" * 100)
    assert eng.generate(["ok"], SamplingParams(max_tokens=3))[0].finish_reason == "length"


def test_request_outgrowing_kv_capacity_ends_with_length(model):
    eng = Engine(model, num_kv_tokens=64, max_num_batched_tokens=64)
    [c] = eng.generate(["z" * 40], SamplingParams(max_tokens=200, ignore_eos=True))
    assert c.finish_reason == "length"
    assert 60 <= len(c.prompt_token_ids) + len(c.output_token_ids) <= 65
    assert eng.allocator.stats().used_tokens == 0


@pytest.mark.parametrize("mt", [0, -3])
def test_max_tokens_must_be_positive(mt):
    with pytest.raises(InvalidRequest, match="max_tokens"):
        SamplingParams(max_tokens=mt)


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"policy": "lifo"}, "unknown scheduling policy"),
        ({"backend": "nope"}, "unknown backend"),
        ({"preemption": "drop"}, "unknown preemption"),
        ({"kv_format": "fp3"}, "unknown kv format"),
        ({"colour": "red"}, "unknown engine option"),
    ],
)
def test_bad_engine_options_are_clear_errors(model, opts, match):
    with pytest.raises(InvalidArgument, match=match):
        Engine(model, **opts)


def test_duplicate_request_id_is_refused(engine):
    engine.add_request("a", request_id="same")
    with pytest.raises(InvalidRequest, match="already"):
        engine.add_request("b", request_id="same")
    engine.run()
    assert engine.request("same").finished


def test_priority_raised_at_run_time_preempts_lower_priority(model):
    eng = Engine(model, policy="fair", max_num_seqs=2, num_kv_tokens=2048)
    p = SamplingParams(max_tokens=30, ignore_eos=True)
    a = eng.add_request(PROMPTS[0], p)
    b = eng.add_request(PROMPTS[1], p)
    c = eng.add_request(PROMPTS[2], p)
    for _ in range(3):
        eng.step()
    assert eng.request(c).metrics.first_scheduled_time is None  # no free seat
    eng.set_priority(c, 5)
    eng.step()
    assert eng.request(c).metrics.first_scheduled_time is not None
    assert eng.metrics().num_preemptions == 1
    eng.run()
    [victim] = [i for i in (a, b) if eng.request(i).metrics.num_preemptions == 1]
    assert eng.request(c).metrics.finish_time < eng.request(victim).metrics.finish_time


def test_isrtf_oracle_runs_shortest_first(model):
    eng = Engine(model, policy="isrtf", policy_options={"predictor": "oracle"}, max_num_seqs=1)
    lens = [30, 5, 15]
    ids = [
        eng.add_request(
            PROMPTS[i], SamplingParams(max_tokens=n, ignore_eos=True), output_len_hint=n
        )
        for i, n in enumerate(lens)
    ]
    eng.run()
    order = sorted(ids, key=lambda i: eng.request(i).metrics.finish_time)
    assert order == [ids[1], ids[2], ids[0]]


def test_chunked_prefill_never_stalls_decodes(model):
    eng = Engine(model, max_num_batched_tokens=8, num_kv_tokens=2048)
    d = eng.add_request("ab", SamplingParams(max_tokens=40, ignore_eos=True))
    eng.step()
    eng.step()
    long = eng.add_request("L" * 120, SamplingParams(max_tokens=2, ignore_eos=True))
    for _ in range(16):  # 120 prompt tokens at <= 7 per step
        outs = eng.step()
        assert any(o.request_id == d and o.new_token_ids for o in outs)
    assert eng.request(long).num_computed == 16 * 7  # the budget left after the decode
    eng.run()
    assert eng.metrics().num_preemptions == 0


def test_errors_are_kv_errors():
    assert issubclass(InvalidRequest, KVError)
