"""bench/tiers.py's conversations keep to the trace: every row is one turn, as long as the row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import tiers as bt
from kvmem.errors import InvalidArgument
from kvmem.traces import synthetic_trace

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "tiers.json"
Rows = list[tuple[float, int, int]]


@pytest.fixture(scope="module")
def rows() -> Rows:
    return synthetic_trace("azure_conv", 2000, seed=5)


@pytest.fixture(scope="module", params=[bt.SEARCH_ROWS, 4])
def search(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture(scope="module")
def turns(rows: Rows, search: int) -> list[bt.Turn]:
    return bt.conversations(rows, seed=5, search=search)


def by_conv(turns: list[bt.Turn]) -> list[list[bt.Turn]]:
    out: dict[int, list[bt.Turn]] = {}
    for t in sorted(turns, key=lambda t: (t.conv, t.time)):
        out.setdefault(t.conv, []).append(t)
    return [out[c] for c in sorted(out)]


def arrival_order(rows: Rows) -> np.ndarray:
    return np.argsort(np.array([r[0] for r in rows]), kind="stable")


def unused_at(rows: Rows, turns: list[bt.Turn], when: float) -> np.ndarray:
    """The rows, in arrival order, that no turn before ``when`` had taken."""
    taken_at = np.empty(len(rows))
    for t in turns:
        taken_at[t.row] = t.time
    order = arrival_order(rows)
    return order[taken_at[order] >= when]


def test_every_row_is_one_turn_as_long_as_the_row(rows: Rows, turns: list[bt.Turn]) -> None:
    assert sorted(t.row for t in turns) == list(range(len(rows)))
    assert all(len(t.prompt) == rows[t.row][1] for t in turns)
    assert all(len(t.answer) == max(1, rows[t.row][2]) for t in turns)
    assert [t.time for t in turns] == sorted(t.time for t in turns)


def test_a_conversation_starts_with_the_earliest_unused_row_at_its_arrival(
    rows: Rows, turns: list[bt.Turn]
) -> None:
    taken_at = np.empty(len(rows))
    for t in turns:
        taken_at[t.row] = t.time
    order = arrival_order(rows)
    pos = np.empty(len(rows), dtype=np.int64)
    pos[order] = np.arange(len(rows))
    before = np.maximum.accumulate(taken_at[order])  # latest taking among rows up to each
    firsts = [c[0] for c in by_conv(turns)]
    for t in firsts:
        assert t.history == 0 and t.time == rows[t.row][0]
        assert 1 <= t.drawn <= bt.MAX_TURNS
        i = pos[t.row]
        assert i == 0 or before[i - 1] <= t.time  # every earlier row was taken by then
    assert sum(t.history == 0 for t in turns) == len(firsts)


def test_a_follow_up_takes_the_earliest_unused_row_longer_than_its_history(
    rows: Rows, turns: list[bt.Turn], search: int
) -> None:
    followups = 0
    for conv in by_conv(turns):
        for a, b in zip(conv, conv[1:], strict=False):
            followups += 1
            n, m = len(a.prompt), len(a.answer)
            assert b.history == n + m < len(b.prompt)
            assert (b.prompt[:n] == a.prompt).all() and (b.prompt[n : n + m] == a.answer).all()
            assert b.time > a.time and b.system == 0 and b.drawn == 0 and a.cut_at is None
            free = unused_at(rows, turns, b.time)
            assert all(rows[r][0] > b.time for r in free)
            fits = [r for r in free[:search] if rows[r][1] > b.history]
            assert fits and fits[0] == b.row
    assert followups > 0


def test_a_conversation_ends_early_only_when_no_row_fits(
    rows: Rows, turns: list[bt.Turn], search: int
) -> None:
    cuts = 0
    for conv in by_conv(turns):
        last = conv[-1]
        assert all(t.cut_at is None for t in conv[:-1])
        if len(conv) == conv[0].drawn:
            assert last.cut_at is None
            continue
        assert len(conv) < conv[0].drawn and last.cut_at is not None and last.cut_at > last.time
        cuts += 1
        h = len(last.prompt) + len(last.answer)
        free = unused_at(rows, turns, last.cut_at)
        assert not any(rows[r][1] > h for r in free[:search])
    assert cuts > 0


def test_a_smaller_search_finds_fewer_rows(rows: Rows) -> None:
    wide = bt.workload_figures(bt.conversations(rows, seed=5), rows)
    narrow = bt.workload_figures(bt.conversations(rows, seed=5, search=1), rows, search=1)
    assert narrow["cut_share_of_followup_draws"] > wide["cut_share_of_followup_draws"]
    assert narrow["followup_search_rows"] == 1 and wide["followup_search_rows"] == bt.SEARCH_ROWS


def test_fitting_row_counts_only_unused_rows() -> None:
    used = np.array([False, True, True, False, False])
    prompts = np.array([1, 9, 9, 1, 9])
    assert bt.fitting_row(used, prompts, 0, 5, 2) == -1
    assert bt.fitting_row(used, prompts, 0, 5, 3) == 4
    assert bt.fitting_row(used, prompts, 0, 9, 3) == -1


def test_system_prompts_are_the_first_512_tokens_of_longer_first_prompts(
    turns: list[bt.Turn],
) -> None:
    firsts = [c[0] for c in by_conv(turns)]
    with_system = [t for t in firsts if t.system]
    assert with_system and all(t.system == bt.SYSTEM_LEN < len(t.prompt) for t in with_system)
    heads = {t.prompt[: bt.SYSTEM_LEN].tobytes() for t in with_system}
    assert len(heads) <= bt.SYSTEM_PROMPTS < len(with_system)
    own = {t.prompt[: bt.SYSTEM_LEN].tobytes() for t in firsts if not t.system}
    assert not heads & own
    short = [t for t in firsts if len(t.prompt) <= bt.SYSTEM_LEN]
    assert short and not any(t.system for t in short)


def test_rows_that_always_grow_keep_every_drawn_turn() -> None:
    rows = [(1e5 * i, 1000 * (i + 1), 10) for i in range(400)]
    turns = bt.conversations(rows, seed=1)
    figs = bt.workload_figures(turns, rows)
    assert figs["conversations_cut_by_short_prompt"] == figs["cuts_near_trace_end"] <= 1
    assert 1.5 < figs["mean_turns_per_conversation"] < 2.5
    drawn = figs["mean_drawn_turns_per_conversation"]
    assert figs["mean_turns_per_conversation"] == pytest.approx(drawn, abs=bt.MAX_TURNS / 100)
    assert figs["mean_prompt_tokens"] == figs["trace_mean_prompt_tokens"]


def test_rows_that_never_grow_make_one_turn_conversations() -> None:
    rows = [(float(i), 5000 - i, 10) for i in range(400)]
    turns = bt.conversations(rows, seed=1)
    figs = bt.workload_figures(turns, rows)
    assert figs["mean_turns_per_conversation"] == 1.0 < figs["mean_drawn_turns_per_conversation"]
    assert figs["history_share_of_prompt_tokens"] == 0.0
    assert figs["followup_turns"] == 0 and figs["conversations_cut_by_short_prompt"] > 0
    assert figs["cut_share_of_followup_draws"] == 1.0


def test_workload_figures_count_what_the_turns_hold(rows: Rows, turns: list[bt.Turn]) -> None:
    figs = bt.workload_figures(turns, rows)
    prompt = sum(len(t.prompt) for t in turns)
    assert figs["mean_prompt_tokens"] == pytest.approx(np.mean([p for _, p, _ in rows]))
    assert figs["trace_mean_prompt_tokens"] == pytest.approx(figs["mean_prompt_tokens"])
    assert figs["history_share_of_prompt_tokens"] == sum(t.history for t in turns) / prompt
    assert figs["system_share_of_prompt_tokens"] == sum(t.system for t in turns) / prompt
    convs = len({t.conv for t in turns})
    assert figs["mean_turns_per_conversation"] == len(turns) / convs
    assert figs["mean_drawn_turns_per_conversation"] == sum(t.drawn for t in turns) / convs
    assert figs["followup_turns"] == len(turns) - convs
    cuts = sum(t.cut_at is not None for t in turns)
    assert figs["conversations_cut_by_short_prompt"] == cuts
    assert 0 <= figs["cuts_near_trace_end"] <= cuts
    lead = [rows[t.row][0] - t.time for t in turns if t.history]
    assert figs["mean_followup_row_lead_s"] == pytest.approx(np.mean(lead)) and min(lead) > 0


@pytest.mark.parametrize(
    "rows,search",
    [([(0.0, 100, 5), (1.0, 0, 5)], 10), ([(0.0, 100, 5)], 0), ([(0.0, 100, 5)], True)],
)
def test_a_row_without_prompt_tokens_or_a_bad_search_is_refused(rows: Rows, search: int) -> None:
    with pytest.raises(InvalidArgument):
        bt.conversations(rows, seed=0, search=search)


def test_the_committed_results_report_the_workload_and_the_sweep() -> None:
    figs = json.loads(RESULTS.read_text())
    assert figs["mean_prompt_tokens"] == pytest.approx(figs["trace_mean_prompt_tokens"])
    assert figs["mean_prompt_tokens"] * figs["requests"] == figs["prompt_tokens"]
    assert figs["mean_turns_per_conversation"] == figs["requests"] / figs["conversations"]
    assert figs["followup_turns"] == figs["requests"] - figs["conversations"]
    assert figs["followup_search_rows"] == bt.SEARCH_ROWS
    assert 0 <= figs["cuts_near_trace_end"] <= figs["conversations_cut_by_short_prompt"]
    assert figs["mean_turns_per_conversation"] <= figs["mean_drawn_turns_per_conversation"]
    assert 0 < figs["history_share_of_prompt_tokens"] < 1
    assert figs["target_sim_within_1pct_met"] and figs["sim_max_rel_diff"] <= 0.01
    n = figs["device_tokens"]
    for m in (n // 4, n // 2, 2 * n):
        ratio = figs[f"sweep_{m}_hit_rate_tiered"] / figs[f"sweep_{m}_hit_rate_device_only"]
        assert figs[f"sweep_{m}_hit_ratio"] == pytest.approx(ratio)
    ratio = figs["hit_rate_tiered"] / figs["hit_rate_device_only"]
    assert figs["tiered_vs_device_only_hit_ratio"] == pytest.approx(ratio)
    assert figs["target_hit_ratio_3x_met"] == (ratio >= 3)
    assert figs["hit_rate_device_only"] <= figs["hit_rate_tiered"] <= figs["hit_rate_unlimited"]
