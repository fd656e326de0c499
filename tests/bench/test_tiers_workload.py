"""bench/tiers.py's conversations keep to the trace: every prompt is as long as its row's."""

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


@pytest.fixture(scope="module")
def turns(rows: Rows) -> list[bt.Turn]:
    return bt.conversations(rows, seed=5)


def in_row_order(turns: list[bt.Turn]) -> list[bt.Turn]:
    """Conversations take rows in order, and a conversation's turns grow in history."""
    return sorted(turns, key=lambda t: (t.conv, t.history))


def by_conv(turns: list[bt.Turn]) -> list[list[bt.Turn]]:
    out: dict[int, list[bt.Turn]] = {}
    for t in in_row_order(turns):
        out.setdefault(t.conv, []).append(t)
    return [out[c] for c in sorted(out)]


def test_every_prompt_and_answer_is_as_long_as_its_row(rows: Rows, turns: list[bt.Turn]) -> None:
    ordered = in_row_order(turns)
    assert [len(t.prompt) for t in ordered] == [p for _, p, _ in rows]
    assert [len(t.answer) for t in ordered] == [max(1, o) for _, _, o in rows]
    assert [t.time for t in turns] == sorted(t.time for t in turns)


def test_a_follow_up_extends_the_history_and_a_short_row_starts_a_new_conversation(
    turns: list[bt.Turn],
) -> None:
    convs = by_conv(turns)
    followups = cuts = 0
    for prev, conv in zip([None, *convs], convs, strict=False):
        first = conv[0]
        assert first.history == 0
        if first.cut:
            cuts += 1
            assert prev is not None
            last = prev[-1]
            assert len(first.prompt) <= len(last.prompt) + len(last.answer)
            assert len(prev) < bt.MAX_TURNS
        for a, b in zip(conv, conv[1:], strict=False):
            followups += 1
            n, m = len(a.prompt), len(a.answer)
            assert b.history == n + m < len(b.prompt)
            assert (b.prompt[:n] == a.prompt).all() and (b.prompt[n : n + m] == a.answer).all()
            assert b.time > a.time and b.system == 0 and not b.cut
    assert followups > 0 and cuts > 0


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
    rows = [(float(i), 1000 * (i + 1), 10) for i in range(400)]
    turns = bt.conversations(rows, seed=1)
    figs = bt.workload_figures(turns, rows)
    assert figs["conversations_cut_by_short_prompt"] == 0
    assert 1.5 < figs["mean_turns_per_conversation"] < 2.5
    assert figs["mean_prompt_tokens"] == figs["trace_mean_prompt_tokens"]


def test_rows_that_never_grow_make_one_turn_conversations() -> None:
    rows = [(float(i), 5000 - i, 10) for i in range(400)]
    turns = bt.conversations(rows, seed=1)
    figs = bt.workload_figures(turns, rows)
    assert figs["mean_turns_per_conversation"] == 1.0
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
    assert figs["followup_turns"] == len(turns) - convs


def test_a_row_without_prompt_tokens_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        bt.conversations([(0.0, 100, 5), (1.0, 0, 5)], seed=0)


def test_the_committed_results_report_the_workload_and_the_sweep() -> None:
    figs = json.loads(RESULTS.read_text())
    assert figs["mean_prompt_tokens"] == pytest.approx(figs["trace_mean_prompt_tokens"])
    assert figs["mean_prompt_tokens"] * figs["requests"] == figs["prompt_tokens"]
    assert figs["mean_turns_per_conversation"] == figs["requests"] / figs["conversations"]
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
