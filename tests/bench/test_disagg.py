"""The disaggregation simulation: step times from the cost model, SLO attainment, goodput,
and the quick benchmark's results file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.disagg_sim import (
    SLO,
    Deployment,
    RooflineCost,
    at_rate,
    max_rate,
    simulate_colocated,
    simulate_disagg,
)
from kvmem import InvalidArgument
from kvmem.engine.simulate import CostModel
from kvmem.traces import synthetic_trace

COST = CostModel(fixed=6e-3, prefill=32e-6, decode=32e-6, decode_kv=4e-8)
DEP = Deployment(kv_capacity_tokens=100_000, kv_bytes_per_token=1000)
SLO_ = SLO(ttft_s=0.5, tpot_s=0.02)


def trace(n: int = 150, seed: int = 0) -> list[tuple[float, int, int]]:
    return synthetic_trace("azure_code", n, seed=seed)


def test_one_request_colocated_pays_chunks_then_decode_steps():
    res = simulate_colocated([(0.0, 1000, 5)], 1, 512, COST, DEP)
    chunk1 = COST.step_time(512, 0, 0)
    chunk2 = COST.step_time(488, 0, 512)  # the second chunk reads the first one's KV
    assert res.ttft_s[0] == pytest.approx(chunk1 + chunk2)
    decode = sum(COST.step_time(0, 1, 1000 + g) for g in range(1, 5))
    assert res.tpot_s[0] == pytest.approx(decode / 4)


def test_one_request_disaggregated_pays_the_transfer_in_its_tpot():
    bw = 2e6
    res = simulate_disagg([(0.0, 1000, 5)], 1, 1, bw, COST, DEP)
    assert res.ttft_s[0] == pytest.approx(COST.step_time(1000, 0, 0))
    decode = sum(COST.step_time(0, 1, 1000 + g) for g in range(1, 5))
    assert res.tpot_s[0] == pytest.approx((1000 * 1000 / bw + decode) / 4)


def test_every_request_finishes_and_one_token_requests_meet_any_tpot():
    tr = [*trace(60), (100.0, 300, 1)]
    for res in (
        simulate_colocated(tr, 2, 256, COST, DEP),
        simulate_disagg(tr, 1, 1, 25e9, COST, DEP),
    ):
        assert not np.isnan(res.ttft_s).any() and not np.isnan(res.tpot_s).any()
        assert (res.ttft_s > 0).all() and res.tpot_s[-1] == 0.0


def test_kv_capacity_makes_requests_wait_on_both_sides():
    tr = [(0.0, 500, 100), (0.0, 500, 100)]
    dep = Deployment(kv_capacity_tokens=700, kv_bytes_per_token=1000)
    roomy = simulate_colocated(tr, 1, 4096, COST)
    tight = simulate_colocated(tr, 1, 4096, COST, dep)
    assert tight.ttft_s[1] > roomy.ttft_s[1] + 99 * COST.fixed  # waits for the first to end
    d_roomy = simulate_disagg(tr, 1, 1, 1e9, COST)
    d_tight = simulate_disagg(tr, 1, 1, 1e9, COST, dep)
    assert d_tight.tpot_s[1] > d_roomy.tpot_s[1] * 1.5  # held at the prefill side


def test_attainment_falls_as_the_rate_rises():
    tr = trace()
    rates = [0.5, 4, 32, 256]
    for run in (
        lambda t: simulate_colocated(t, 2, 256, COST, DEP),
        lambda t: simulate_disagg(t, 1, 1, 25e9, COST, DEP),
    ):
        att = [run(at_rate(tr, r)).attainment(SLO_) for r in rates]
        assert all(a >= b for a, b in zip(att, att[1:], strict=False)), att
        assert att[0] > 0.9 > att[-1]


def test_early_stop_agrees_with_the_full_replay():
    tr = at_rate(trace(), 64)
    full = simulate_colocated(tr, 2, 256, COST, DEP)
    early = simulate_colocated(tr, 2, 256, COST, DEP, stop=SLO_)
    assert early.stopped_early and full.attainment(SLO_) < 0.9
    assert early.attainment(SLO_) < 0.9


def test_max_rate_sits_at_the_90_percent_edge():
    tr = trace()

    def replay(t, stop):
        return simulate_colocated(t, 2, 256, COST, DEP, stop)

    rate = max_rate(replay, tr, SLO_, start=1.0, rel_tol=0.01)
    assert rate > 0
    assert replay(at_rate(tr, rate), None).attainment(SLO_) >= 0.9
    assert replay(at_rate(tr, rate * 1.05), None).attainment(SLO_) < 0.9


def test_disagg_with_a_link_that_never_delivers_does_not_win():
    tr = trace()

    def colo(t, stop):
        return simulate_colocated(t, 2, 256, COST, DEP, stop)

    def never(t, stop):
        return simulate_disagg(t, 1, 1, 0.0, COST, DEP, stop)

    def fast(t, stop):
        return simulate_disagg(t, 1, 1, 25e9, COST, DEP, stop)

    base = max_rate(colo, tr, SLO_)
    assert max_rate(never, tr, SLO_) == 0.0 < base
    assert max_rate(fast, tr, SLO_) > 0


def test_roofline_cost_overlaps_memory_and_compute():
    cost = RooflineCost(fixed=6e-3, prefill=32e-6, decode=32e-6, decode_kv=4e-8)
    assert cost.step_time(0, 10, 1000) == pytest.approx(6e-3 + 4e-5)
    assert cost.step_time(1000, 0, 0) == pytest.approx(32e-3)
    assert cost.step_time(1000, 0, 0) < COST.step_time(1000, 0, 0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: simulate_colocated([], 1, 256, COST),
        lambda: simulate_colocated(trace(5), 0, 256, COST),
        lambda: simulate_disagg(trace(5), 1, 0, 1e9, COST),
        lambda: simulate_disagg(trace(5), 1, 1, -1.0, COST),
        lambda: simulate_colocated([(0.0, 900, 200)], 1, 256, COST, Deployment(1000)),
        lambda: at_rate([(0.0, 1, 1)], 1.0),
        lambda: at_rate(trace(5), 0.0),
        lambda: Deployment(max_seqs=0),
    ],
)
def test_bad_inputs_raise_invalid_argument(call):
    with pytest.raises(InvalidArgument):
        call()


def test_quick_benchmark_writes_its_figures(tmp_path, monkeypatch):
    from bench import disagg

    monkeypatch.setenv("KVMEM_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("KVMEM_NO_SHARED_TRACES", "1")
    monkeypatch.delenv("KVMEM_TRACES", raising=False)
    disagg.main(["--quick", "--requests", "80"])
    figs = json.loads((tmp_path / "disagg.json").read_text())
    assert (tmp_path / "disagg.png").stat().st_size > 0
    assert figs["quick"] is True and figs["code_trace"] == "synthetic:azure_code"
    n = figs["instances"]
    for t in ("code", "conv"):
        for s in ("tight", "loose"):
            assert figs[f"{t}_{s}_colocated_goodput"] > 0
            for bw in ("fast", "slow"):
                splits = [figs[f"{t}_{s}_{bw}_p{p}d{n - p}_goodput"] for p in range(1, n)]
                assert figs[f"{t}_{s}_{bw}_disagg_goodput"] == max(splits)
                ratio = figs[f"{t}_{s}_{bw}_disagg_vs_colocated"]
                assert ratio == pytest.approx(max(splits) / figs[f"{t}_{s}_colocated_goodput"])
            # a slower link never helps
            for p in range(1, n):
                slow = figs[f"{t}_{s}_slow_p{p}d{n - p}_goodput"]
                assert slow <= figs[f"{t}_{s}_fast_p{p}d{n - p}_goodput"] * 1.02
        # a looser TPOT never lowers the colocated goodput
        assert figs[f"{t}_loose_colocated_goodput"] >= figs[f"{t}_tight_colocated_goodput"] * 0.98
    # the end-to-end part: real processes, the KV handed from the prefill to the decode side
    assert figs["e2e_token_identical"] is True and figs["e2e_handoffs"] == figs["e2e_requests"]
    assert 0.0 <= figs["transfer_overlap_frac"] <= 1.0
    head = figs["goodput_disagg_vs_colocated"]
    assert head == figs["code_tight_fast_disagg_vs_colocated"] and head > 0
    assert figs["goodput_disagg_vs_colocated_conv"] > 0
    assert figs["slo_tpot_tight_s"] < figs["slo_tpot_loose_s"]
    att = list(figs["curve_attainment"].values())
    for ys in att:
        assert ys[0] >= ys[-1] and all(0 <= y <= 1 for y in ys)
    assert all(isinstance(x, str) for x in figs["does_not_pay"])
    assert figs["bandwidth_sweep_gbps"] == [1.25, 25.0]
    slow, fast = figs["bandwidth_sweep_disagg_vs_colocated"]
    assert fast == pytest.approx(head) and slow <= fast
    if figs["bandwidth_breakeven_gbps"] is not None:
        assert head >= 1.0
    assert not math.isnan(figs["simulation_wall_s"])
