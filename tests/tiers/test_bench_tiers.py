"""The tier benchmark's pieces on a small synthetic workload (the benchmark is bench/tiers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import tiers as bt
from kvmem.traces import synthetic_trace


@pytest.fixture(scope="module")
def turns() -> list[bt.Turn]:
    return bt.conversations(synthetic_trace("azure_conv", 300, seed=3), seed=3)


def test_turns_extend_the_previous_prompt_and_answer(turns: list[bt.Turn]) -> None:
    by_conv: dict[int, list[bt.Turn]] = {}
    for t in turns:
        by_conv.setdefault(t.conv, []).append(t)
    assert any(len(v) > 1 for v in by_conv.values())
    for conv in by_conv.values():
        for a, b in zip(conv, conv[1:], strict=False):
            assert b.time >= a.time
            n, m = len(a.prompt), len(a.answer)
            assert (b.prompt[:n] == a.prompt).all() and (b.prompt[n : n + m] == a.answer).all()
            assert len(b.prompt) > n + m


@pytest.mark.parametrize("host,disk", [(0, 0), (8, 0), (8, 32), (2, 3)])
def test_the_paged_backend_with_tiers_replays_as_an_exact_lru(
    turns: list[bt.Turn], host: int, disk: int, tmp_path: Path
) -> None:
    n = 64 * bt.PAGE
    got = bt.run_config(turns, n, host * n, disk * n, "test")
    want = bt.replay(turns, bt.ExactLRU(64, host * 64, disk * 64), "sim")
    for k in ("hit_rate", "hit_rate_device", "hit_rate_host", "hit_rate_disk"):
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert 0 < got["hit_rate_device"] < got["hit_rate"] or not host
    if host:
        assert got["bytes_device_to_host"] > 0


def test_tiers_only_add_hits_up_to_the_unlimited_bound(turns: list[bt.Turn]) -> None:
    n = 64 * bt.PAGE
    dev = bt.run_config(turns, n, 0, 0, "device")["hit_rate"]
    tiered = bt.run_config(turns, n, 8 * n, 32 * n, "tiered")["hit_rate"]
    unlimited = bt.replay(turns, bt.ExactLRU(bt.UNLIMITED, 0, 0), "unlimited")["hit_rate"]
    assert 0 < dev < tiered <= unlimited + 1e-12
