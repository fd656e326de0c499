"""Policies and predictors on the simulated executor; the demo entry point."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from rich.console import Console

from kvmem import InvalidArgument, KVSpec
from kvmem.engine import (
    Engine,
    LearnedPredictor,
    NoisyOraclePredictor,
    SimClock,
    SimulatedExecutor,
)
from kvmem.engine.demo import run as demo_run
from kvmem.engine.policies import ISRTF, Fair
from kvmem.engine.predictors import r2_score
from kvmem.engine.request import Request, SamplingParams
from kvmem.engine.simulate import CostModel, TraceRequest, replay

SPEC = KVSpec(2, 2, 16, torch.float16)


def sim(trace, **kw):
    clock = SimClock()
    eng = Engine(
        executor=SimulatedExecutor(SPEC, clock, CostModel(0.01, 1e-4, 1e-3)),
        clock=clock,
        backend_options={"device": "meta"},
        detokenize=False,
        **{"num_kv_tokens": 4096, "max_num_batched_tokens": 128, **kw},
    )
    return replay(eng, clock, trace), eng


def test_replay_runs_every_request_to_its_length_in_simulated_time():
    rng = np.random.default_rng(0)
    trace = [
        TraceRequest(float(t), int(p), int(o))
        for t, p, o in zip(
            np.cumsum(rng.exponential(0.05, 60)),
            rng.integers(1, 400, 60),
            rng.integers(1, 80, 60),
            strict=True,
        )
    ]
    reqs, eng = sim(trace)
    assert [r.num_output_tokens for r in reqs] == [t.output_len for t in trace]
    assert all(r.metrics.ttft > 0 and r.metrics.jct >= r.metrics.ttft for r in reqs)
    steps = eng.num_steps
    busy = eng.executor.busy_time
    assert busy >= steps * 0.01  # every step paid the fixed cost in simulated seconds
    assert eng.allocator.stats().used_tokens == 0


def test_isrtf_oracle_lowers_mean_jct_when_requests_queue():
    rng = np.random.default_rng(1)
    trace = [TraceRequest(0.0, 50, int(o)) for o in rng.lognormal(4, 1, 40).clip(1, 400)]
    fcfs, _ = sim(trace, max_num_seqs=4)
    isrtf, _ = sim(trace, max_num_seqs=4, policy="isrtf", policy_options={"predictor": "oracle"})
    jct = lambda rs: np.mean([r.metrics.jct for r in rs])  # noqa: E731
    assert jct(isrtf) < 0.8 * jct(fcfs)


def _arrive(pol: ISRTF, rid: str, t: float, out: int) -> Request:
    r = Request(rid, [1, 2], SamplingParams(), arrival_time=t, output_len_hint=out)
    pol.on_arrival(r, [])
    return r


def test_guard_lets_a_request_be_overtaken_only_by_arrivals_within_its_window():
    pol = ISRTF(slack=10.0)
    long = _arrive(pol, "long", 0.0, 100)  # window: 10 * sqrt(100) = 100 steps
    pol.observe_step(0.5)  # a step is 0.5 s: the window is 50 s
    soon = _arrive(pol, "soon", 40.0, 1)  # step 80 + 10 < step 0 + 100
    late = _arrive(pol, "late", 55.0, 1)  # step 110 + 10 > 100
    order = [r.request_id for r in sorted([late, long, soon], key=pol.key)]
    assert order == ["soon", "long", "late"]
    plain = ISRTF(slack=None)
    reqs = [_arrive(plain, r.request_id, r.arrival_time, r.output_len_hint) for r in (long, late)]
    assert [r.request_id for r in sorted(reqs, key=plain.key)] == ["late", "long"]


def test_guard_measures_the_step_time_and_ignores_preemption_gaps():
    pol = ISRTF()
    assert pol.step_time is None
    a, b = _arrive(pol, "a", 0.0, 50), _arrive(pol, "b", 0.0, 5)
    assert sorted([a, b], key=pol.key) == [b, a]  # no step time yet: shortest first
    for gap in (0.02, 0.04, 5.0, 0.0):  # 5 s is a preemption, 0 is no gap
        pol.observe_step(gap)
    assert 0.02 < pol.step_time < 0.04
    with pytest.raises(InvalidArgument):
        ISRTF(slack=0)
    with pytest.raises(InvalidArgument):
        ISRTF(slack=True)


def test_guard_finishes_a_long_job_that_plain_isrtf_starves():
    # one seat, taken; a long job, then short ones arriving twice as fast as they are served
    trace = [TraceRequest(0.0, 20, 8), TraceRequest(0.001, 20, 400)]
    trace += [TraceRequest(0.002 + 0.05 * i, 20, 8) for i in range(300)]
    kw = {"max_num_seqs": 1, "policy": "isrtf"}
    plain, _ = sim(trace, **kw, policy_options={"predictor": "oracle", "slack": None})
    guarded, _ = sim(trace, **kw, policy_options={"predictor": "oracle", "slack": 2.0})
    fcfs, _ = sim(trace, max_num_seqs=1)
    last_short = max(r.metrics.finish_time for r in plain[2:])
    assert plain[1].metrics.finish_time >= last_short  # starved until the stream ended
    assert guarded[1].metrics.jct < 0.5 * plain[1].metrics.jct
    mean = lambda rs: np.mean([r.metrics.jct for r in rs])  # noqa: E731
    assert mean(guarded) < mean(fcfs)  # still shortest-first among close arrivals


def test_fair_serves_a_light_tenant_before_a_heavy_backlog():
    trace = [TraceRequest(0.0, 100, 40, "heavy") for _ in range(30)]
    trace.append(TraceRequest(0.5, 100, 40, "light"))
    fcfs, _ = sim(trace, max_num_seqs=4)
    fair, _ = sim(trace, max_num_seqs=4, policy="fair")
    ttft = {name: rs[-1].metrics.ttft for name, rs in (("fcfs", fcfs), ("fair", fair))}
    assert ttft["fair"] < 0.25 * ttft["fcfs"]


def test_vtc_lifts_a_returning_tenant_to_the_active_minimum():
    pol = Fair()
    mk = lambda rid, tenant: Request(rid, [1, 2], SamplingParams(), tenant=tenant)  # noqa: E731
    a, b = mk("a", "A"), mk("b", "B")
    pol.on_arrival(a, [])
    pol.on_served(a, 100, 10)
    assert pol.counters["A"] == 100 + 2 * 10
    pol.on_arrival(b, [a])
    assert pol.counters["B"] == pol.counters["A"]  # no credit banked while idle
    assert pol.key(a)[1] == pol.key(b)[1]


def test_noisy_oracle_is_calibrated_to_r2():
    lengths = np.random.default_rng(2).lognormal(5, 1, 2000).astype(int) + 1
    p = NoisyOraclePredictor.calibrated(lengths, r2=0.85)
    assert abs(p.r2(lengths) - 0.85) < 1e-3 and p.sigma > 0
    with pytest.raises(InvalidArgument):
        NoisyOraclePredictor.calibrated(lengths, r2=1.5)


def test_learned_predictor_learns_length_from_prompt_bins():
    rng = np.random.default_rng(3)
    prompts = rng.integers(10, 1000, 4000)
    outputs = (prompts // 4 + rng.integers(0, 20, 4000)).astype(int)  # output grows with prompt
    lp = LearnedPredictor.fit(prompts, outputs)
    test_p = rng.integers(10, 1000, 500)
    test_o = test_p // 4 + 10
    assert r2_score(test_o, np.array([lp.predict_total(x) for x in test_p])) > 0.9
    r = Request("x", [0] * 800, SamplingParams(max_tokens=5))
    full = lp.predict_remaining(r)
    r.token_ids.extend([0] * 50)
    assert full > lp.predict_remaining(r) > 0  # re-prediction uses what was generated


def test_demo_entry_point_serves_everything_and_frees_kv():
    figs = demo_run(num_requests=6, num_tokens=1024, console=Console(file=io.StringIO()))
    assert figs["requests"] == 6 and figs["used_after"] == 0 and figs["tokens"] > 0
    assert 0 < figs["prefix_hit_rate"] < 1  # shared system prompts hit the cache
