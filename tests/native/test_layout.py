"""Layout arrays: native and Python agree on random batches; bad batches raise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmem import native
from kvmem.errors import InvalidArgument
from kvmem.layout import build_layout

from .conftest import paths


@st.composite
def batches(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(table with junk past each row's pages, seq_lens, query_lens, page_size)."""
    ps = draw(st.sampled_from([1, 3, 4, 16]))
    b = draw(st.integers(0, 12))
    seq = np.array(draw(st.lists(st.integers(0, 70), min_size=b, max_size=b)), dtype=np.int32)
    q = np.array([draw(st.integers(0, int(s))) for s in seq], dtype=np.int32)
    width = int(((seq + ps - 1) // ps).max()) if b else 0
    width += draw(st.integers(0, 3))
    seed = draw(st.integers(0, 10**6))
    table = np.random.default_rng(seed).integers(0, 1000, (b, width)).astype(np.int32)
    return table, seq, q, ps


@settings(max_examples=80, deadline=None)
@given(batches())
def test_native_layout_equals_python(batch):
    table, seq, q, ps = batch
    ref = native.layout_arrays(table.copy(), seq, q, ps, native=False)
    num_pages = (seq + ps - 1) // ps
    assert ref.kv_indptr.tolist() == [0, *np.cumsum(num_pages).tolist()]
    expect_indices = [p for row, n in zip(table, num_pages, strict=True) for p in row[:n]]
    assert ref.kv_indices.tolist() == expect_indices
    slots = [
        int(table[i, pos // ps]) * ps + pos % ps
        for i in range(len(seq))
        for pos in range(int(seq[i] - q[i]), int(seq[i]))
    ]
    assert ref.slot_mapping.tolist() == slots
    for nat in paths():
        got = native.layout_arrays(table.copy(), seq, q, ps, native=nat)
        for name, a, b in zip(ref._fields, got, ref, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), name


def test_build_layout_is_the_same_on_both_paths():
    table = np.array([[7, 2, 9], [5, 8, 8]], dtype=np.int32)
    seq, q = np.array([6, 3]), np.array([2, 1])
    lays = [build_layout(4, table.copy(), seq, q, ("a", "b"), torch.device("cpu")) for _ in paths()]
    lay = lays[-1]
    assert lay.block_table.tolist() == [[7, 2], [5, 0]]
    assert lay.slot_mapping.tolist() == [8, 9, 22]
    assert lay.kv_last_page_len.tolist() == [2, 3] and lay.max_seq_len == 6


BAD = {
    "query longer than sequence": ([[1, 2]], [4], [5], 4),
    "negative length": ([[1, 2]], [-1], [0], 4),
    "too few table columns": ([[1]], [5], [1], 4),
    "batch sizes differ": ([[1], [2]], [3], [1], 4),
    "fractional table": ([[1.5]], [3], [1], 4),
    "fractional length": ([[1]], [2.5], [1], 4),
    "zero page size": ([[1]], [3], [1], 0),
    "1-d table": ([1, 2], [3], [1], 4),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_batches_raise(case, path):
    table, seq, q, ps = BAD[case]
    with pytest.raises(InvalidArgument):
        native.layout_arrays(np.array(table), np.array(seq), np.array(q), ps, native=path)


def test_reversed_table_view_gives_the_same_layout():
    table = np.arange(12, dtype=np.int32).reshape(3, 4)[::-1, ::-1]
    seq, q = np.array([5, 8, 2]), np.array([1, 2, 2])
    for nat in paths():
        lay = native.layout_arrays(table, seq, q, 2, native=nat)
        assert lay.kv_indices.tolist() == [11, 10, 9, 7, 6, 5, 4, 3]
