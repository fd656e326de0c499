"""The swap benchmark's scenario pieces, on small sizes (the benchmark itself is bench/swap.py)."""

from __future__ import annotations

from bench.swap import churned_table, squeezed_runs
from kvmem.swap import block_runs


def test_churn_scatters_paged_and_keeps_grouped_in_few_runs():
    tables = {k: churned_table(k, 1024, seed=1, warm=20) for k in ("paged", "grouped")}
    pages = len(tables["paged"])
    assert pages == len(tables["grouped"]) == (1024 + 64 + 15) // 16
    paged, grouped = (len(block_runs(t)) for t in tables.values())
    assert grouped * 4 <= paged, (paged, grouped)


def test_squeezed_runs_keep_run_count_lengths_and_order():
    table = [40, 41, 42, 7, 8, 90, 3]
    r = squeezed_runs(table)
    assert r[:, 2].tolist() == [3, 2, 1, 1]  # same runs
    assert r[:, 1].tolist() == [0, 3, 5, 6]  # host pages in sequence order
    assert r[:, 0].tolist() == [3, 1, 6, 0]  # device pages ranked, order kept
