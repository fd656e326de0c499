"""The swap benchmark's scenario pieces, on small sizes (the benchmark is ``bench.swap``)."""

from __future__ import annotations

import numpy as np

from bench.swap import churned_table, single_pages, squeezed_runs
from kvmem.swap import block_runs

#: A fixed churn of short requests, (prompt, output) tokens, that cycles a small pool
#: several times: the pool is scattered without any trace file.
CHURN = [(40, 8), (200, 30), (17, 3), (90, 60), (300, 5), (33, 120)]


def test_churn_scatters_paged_and_keeps_grouped_in_few_runs():
    tables = {
        k: churned_table(k, 1024, seed=1, warm=20, lengths=CHURN, pool_tokens=4096)
        for k in ("paged", "grouped")
    }
    pages = len(tables["paged"])
    assert pages == len(tables["grouped"]) == (1024 + 64 + 15) // 16
    assert all(len(set(t)) == pages for t in tables.values())
    paged, grouped = (len(block_runs(t)) for t in tables.values())
    assert grouped * 4 <= paged, (paged, grouped)


def test_single_pages_never_merges_and_keeps_the_pages():
    runs = np.array([[3, 0, 3], [1, 3, 2]])
    one = single_pages(runs)
    assert one[:, 2].tolist() == [1] * 5
    assert one[:, 0].tolist() == [3, 4, 5, 1, 2]
    assert one[:, 1].tolist() == [0, 1, 2, 3, 4]


def test_squeezed_runs_keep_run_count_lengths_and_order():
    table = [40, 41, 42, 7, 8, 90, 3]
    r = squeezed_runs(table)
    assert r[:, 2].tolist() == [3, 2, 1, 1]  # same runs
    assert r[:, 1].tolist() == [0, 3, 5, 6]  # host pages in sequence order
    assert r[:, 0].tolist() == [3, 1, 6, 0]  # device pages ranked, order kept
