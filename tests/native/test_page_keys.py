"""Chained page keys: native equals Python; prefixes share keys; extension equals recompute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmem import native
from kvmem.errors import InvalidArgument

from .conftest import paths

tokens_st = st.lists(st.integers(0, 2**31), max_size=200)


@settings(max_examples=80, deadline=None)
@given(tokens_st, st.sampled_from([1, 4, 16]), st.integers(-(2**70), 2**70))
def test_keys_agree_across_paths_and_input_kinds(toks, ps, root):
    ref = native.page_keys(toks, ps, root, native=False)
    assert ref.dtype == np.uint64 and len(ref) == len(toks) // ps
    for nat in paths():
        for arg in (toks, tuple(toks), np.array(toks, dtype=np.int64), torch.tensor(toks)):
            got = native.page_keys(arg, ps, root, native=nat)
            assert np.array_equal(got, ref)


@settings(max_examples=50, deadline=None)
@given(tokens_st, st.integers(0, 12), st.sampled_from([1, 4, 16]))
def test_keys_chain(toks, first, ps):
    full = native.page_keys(toks, ps, 7)
    for nat in paths():
        # a prefix has the same keys, and keys extend from the previous one
        assert np.array_equal(native.page_keys(toks[: first * ps], ps, 7, native=nat),
                              full[:first])  # fmt: skip
        if 0 < first <= len(full):
            rest = native.page_keys(toks[first * ps :], ps, first=first, prev=int(full[first - 1]))
            assert np.array_equal(rest, full[first:])


def test_keys_depend_on_every_earlier_token_and_the_root():
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 50_000, 4 * 16).tolist()
    base = native.page_keys(toks, 16)
    assert len(set(base.tolist())) == 4
    for pos in (0, 17, 63):
        changed = list(toks)
        changed[pos] += 1
        k = native.page_keys(changed, 16)
        page = pos // 16
        assert np.array_equal(k[:page], base[:page]) and (k[page:] != base[page:]).all()
    swapped = toks[16:32] + toks[:16] + toks[32:]
    assert (native.page_keys(swapped, 16)[:2] != base[:2]).all()
    assert (native.page_keys(toks, 16, root=1) != base).all()


def test_bad_tokens_raise(path):
    for bad in ([1, 2.5, 3, 4], [1, 2**64, 3, 4], [[1, 2], [3, 4]], ["a", "b"]):
        with pytest.raises(InvalidArgument):
            native.page_keys(bad, 2, native=path)
    for ps in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgument):
            native.page_keys([1, 2], ps, native=path)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        native.page_keys([1, 2], 1, first=1)  # no previous key
    with pytest.raises(InvalidArgument):
        native.page_keys([1, 2], 1, first=1, prev=-1)
