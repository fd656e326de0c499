"""Prefix-cache hashes, layouts from table rows and the block-table batch passes: native
equals Python."""

from __future__ import annotations

import gc
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvmem import KVSpec, create_allocator, native
from kvmem.errors import InvalidArgument
from kvmem.layout import TENSOR_FIELDS
from kvmem.tiers.events import BlockStored
from tests.conformance.kvmodel import snapshot

from .conftest import needs_native, paths


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(0, 2**62), max_size=80),
    st.sampled_from([1, 4, 16]),
    st.integers(-(2**63), 2**63 - 1),
)
def test_chain_hashes_are_pythons_hash_chain(toks, ps, parent):
    want, h = [], parent
    for i in range(len(toks) // ps):
        h = hash((h, tuple(toks[i * ps : (i + 1) * ps])))
        want.append(h)
    for nat in paths():
        assert native.chain_hashes(toks, ps, 0, len(want), parent, native=nat) == want
        if want:  # a later run of pages continues from the hash before it
            got = native.chain_hashes(toks, ps, 1, len(want) - 1, want[0], native=nat)
            assert got == want[1:]


@pytest.mark.parametrize(
    "args",
    [((1, 2, 3, 4), 2, 0, 1), ([1, 2, 3], 2, 0, 2), ([1, 2], 0, 0, 1), ([1, 2], 1, -1, 1)],
)
def test_chain_hashes_refuse_bad_arguments(path, args):
    with pytest.raises(InvalidArgument):
        native.chain_hashes(*args, parent=0, native=path)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31), st.sampled_from([1, 4, 16]), st.booleans())
def test_layout_from_table_rows_equals_the_gathered_table(b, seed, ps, column_major):
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 1000, (20, 9)).astype(np.int32)
    rows = rng.choice(20, b, replace=False)
    seq = rng.integers(1, 9 * ps + 1, b).astype(np.int32)
    q = np.minimum(rng.integers(1, 5, b), seq).astype(np.int32)
    want = native.layout_arrays(table[rows].copy(), seq, q, ps, native=False)
    order = "F" if column_major else "C"  # a table whose rows are strided, or contiguous
    for nat in paths():
        got = native.layout_arrays(table.copy(order), seq, q, ps, rows=rows, native=nat)
        for x, y in zip(got, want, strict=True):
            assert x.dtype == y.dtype and x.tolist() == y.tolist()


def test_layout_rows_out_of_range_are_refused(path):
    table = np.zeros((4, 4), dtype=np.int32)
    one = np.ones(1, dtype=np.int32)
    for rows in ([4], [-1], [0, 1]):
        with pytest.raises(InvalidArgument):
            native.layout_arrays(table, one, one, 4, rows=np.array(rows), native=path)


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["append", "reserve", "commit", "commit", "commit_any", "free", "add", "fork"]
        ),
        st.lists(st.integers(0, 7), unique=True, max_size=8),
        st.integers(1, 12),
    ),
    max_size=25,
)


@needs_native
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(OPS, st.booleans())
def test_native_passes_equal_the_python_version(ops, prefix_caching):
    spec = KVSpec(1, 1, 8)

    def make():
        return create_allocator(
            "paged", spec, num_tokens=160, page_size=4, prefix_caching=prefix_caching
        )

    with make() as a, make() as b:
        b.native_passes = False
        prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]
        for x in (a, b):
            for sid in range(4):
                x.add(sid, prompt[: 3 + 2 * sid])
        live = 4
        for kind, picks, n in ops:
            known = a.seq_ids()
            ids = [p for p in picks if p in known] if kind != "commit_any" else picks
            room = {}
            for sid in ids if kind == "commit" else ():
                info = a.seq_info(sid)
                if min(info.capacity, info.num_tokens) > info.num_computed:
                    room[sid] = min(n, min(info.capacity, info.num_tokens) - info.num_computed)
            outcomes = []
            for x in (a, b):
                try:
                    if kind == "append":
                        x.append_many(ids, [[t % 5] * (1 + t % 2) for t in ids])
                    elif kind == "reserve":
                        x.reserve_many(ids, [n + t for t in ids])
                    elif kind == "commit":
                        x.commit_many(list(room), list(room.values()))
                    elif kind == "commit_any":
                        x.commit_many(ids, n)
                    elif kind == "free" and ids:
                        x.free(ids[0])
                    elif kind == "add":
                        x.add(live, prompt + [n])
                    elif kind == "fork" and ids:
                        x.fork(ids[0], live)
                    outcomes.append(None)
                except Exception as e:  # noqa: BLE001 - both must fail alike
                    outcomes.append(type(e))
            assert outcomes[0] == outcomes[1]
            live += kind == "add" or (kind == "fork" and bool(ids))
            assert snapshot(a) == snapshot(b)
            assert {s: a.block_table(s) for s in a.seq_ids()} == {
                s: b.block_table(s) for s in b.seq_ids()
            }
            assert list(a._free) == list(b._free) and a._key == b._key
            ready = [s for s in a.seq_ids() if a.seq_info(s).capacity > a.seq_info(s).num_computed]
            if ready:
                batch = [(s, 1) for s in ready]
                la, lb = a.layout(batch), b.layout(batch)
                for f in ("kv_indptr", "kv_indices", "block_table", "seq_lens", "slot_mapping"):
                    assert getattr(la, f).tolist() == getattr(lb, f).tolist(), f
            a.check_integrity()
            b.check_integrity()


@needs_native
@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 9), min_size=0, max_size=60),
    st.sampled_from([1, 2, 4]),
    st.integers(-(2**63), 2**63 - 1),
    st.data(),
)
def test_publish_pages_native_equals_python(toks, ps, parent, data):
    from kvmem.native import python as py

    n = len(toks) // ps
    first = data.draw(st.integers(0, n))
    blocks = data.draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    keyed = data.draw(st.sets(st.integers(0, 9)))
    run = py.chain_hashes(toks, ps, first, n - first, parent)
    taken = data.draw(st.sets(st.sampled_from(run))) if run else set()  # held by other pages
    results = []
    for fn in (native.batch_passes().publish_pages, py.publish_pages):
        keys = [("old", b) if b in keyed else None for b in range(10)]
        index = {hash(("taken", 1)): 3, **{h: 10 + i for i, h in enumerate(sorted(taken))}}
        page_hashes = [0] * 10
        out = fn(toks, ps, first, n - first, parent, blocks, keys, index, page_hashes)
        results.append((out, keys, index, page_hashes))
    assert results[0] == results[1]
    hashes, published = results[1][0]
    assert len(hashes) == n - first
    for key, b in published:  # every page keyed here is findable under its hash
        assert results[1][2][hash(key)] == b and results[1][1][b] == key
        assert results[1][3][b] == hash(key)


PAGES = st.lists(st.integers(-2, 12), max_size=10)


@settings(max_examples=150, deadline=None)
@given(PAGES, st.lists(st.integers(0, 3), min_size=10, max_size=10), st.sets(st.integers(0, 9)))
def test_release_pages_native_equals_python(pages, ref, keyed):
    from collections import OrderedDict

    results = []
    for nat in paths():
        r = list(ref)
        keys = [("k", b) if b in keyed else None for b in range(10)]
        q = OrderedDict.fromkeys(b for b in range(10) if not ref[b])
        before = (list(r), list(q))
        try:
            out = native.release_pages(pages, r, keys, q, native=nat)
        except InvalidArgument as e:
            assert (list(r), list(q)) == before  # a refused call changes nothing
            out = str(e)
        results.append((out, r, list(q)))
    assert all(x == results[0] for x in results)
    out, r, q = results[0]
    if not isinstance(out, str):  # the Python loop it stands for
        want = list(ref)
        wq = OrderedDict.fromkeys(b for b in range(10) if not ref[b])
        for b in reversed(pages):
            want[b] -= 1
            if not want[b]:
                wq[b] = None
                if b not in keyed:
                    wq.move_to_end(b, last=False)
        assert (r, q) == (want, list(wq))
        assert out == sum(1 for b in pages if b in keyed and not r[b])


@pytest.mark.parametrize(
    ("pages", "match"),
    [
        ([10], "not a page"),
        ([-1], "not a page"),
        (["1"], "not a page"),
        ([0], "not held"),
        ([1, 1], "twice"),
    ],
)
def test_release_pages_refuses_bad_pages(path, pages, match):
    from collections import OrderedDict

    ref = [0] + [2] * 9
    q = OrderedDict.fromkeys([0])
    with pytest.raises(InvalidArgument, match=match):
        native.release_pages(pages, ref, [None] * 10, q, native=path)
    assert ref == [0] + [2] * 9 and list(q) == [0]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(-3, 2**70), st.booleans(), st.floats(0, 5), st.just("7")),
        max_size=6,
    )
)
def test_check_tokens_takes_the_same_inputs_on_both_paths(toks):
    from kvmem.allocator import check_tokens

    def run():
        try:
            got = check_tokens(toks)
            assert got is not toks
            return got
        except InvalidArgument as e:
            return str(e)

    with native.python_only():
        want = run()
    assert run() == want
    fast = native.token_list(toks)
    if native.enabled() and toks and all(type(t) is int and t >= 0 for t in toks):
        assert fast == toks and fast is not toks
        assert not gc.is_tracked(fast)  # ints only: the cycle collector never walks it
    else:
        assert fast is None


def _counted(fn, calls: Counter, name: str):
    def wrapped(*args):
        calls[name] += 1
        return fn(*args)

    return wrapped


@needs_native
def test_a_decode_step_grows_and_publishes_in_the_passes_unless_someone_listens():
    """Steady decode: pages taken and published inside the native passes; with a KV event
    subscriber the backend does both itself (the subscriber hears every page); same tables."""
    spec = KVSpec(1, 1, 8)
    seen = []
    allocs = []
    for listen in (False, True):
        a = create_allocator("paged", spec, num_tokens=4096, page_size=4)
        if listen:
            a.kv_events.subscribe(seen.append)
        calls = Counter()
        a._grow_into = _counted(a._grow_into, calls, "grow")
        a._on_commit = _counted(a._on_commit, calls, "publish")
        ids = list(range(8))
        for sid in ids:
            a.add(sid, list(range(sid, sid + 5)))
            a.reserve(sid, 5)
            a.commit(sid, 5)
        calls.clear()
        for step in range(12):
            a.append_many(ids, [[step]] * len(ids))
            a.reserve_many(ids, 1)
            a.layout([(s, 1) for s in ids])
            a.commit_many(ids, 1)
        a.check_integrity()
        allocs.append((a, dict(calls)))
    (quiet, qc), (loud, lc) = allocs
    assert qc == {}
    assert lc["grow"] > 0 and lc["publish"] > 0
    assert [quiet.block_table(s) for s in range(8)] == [loud.block_table(s) for s in range(8)]
    assert quiet._key == loud._key and quiet._index == loud._index
    stored = sum(
        len(e.block_hashes) for batch in seen for e in batch.events if isinstance(e, BlockStored)
    )
    assert stored == sum(k is not None for k in loud._key)


@needs_native
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(-1, 3)), max_size=7),
    st.integers(0, 2**31),
)
@example(batch=[(0, 1), (3, 1), (1, 1)], seed=1)  # laid out (a commit of 1 always fits)
def test_vmem_native_layout_equals_the_python_version(batch, seed):
    """vmem lays a batch out natively from its slots; the Python path gives the same, and
    refuses alike what is wrong (unknown, swapped, past the reservation, named twice)."""
    from kvmem.backends.vmem import VMemAllocator

    rng = np.random.default_rng(seed)
    spec = KVSpec(2, 1, 8)
    a, b = (
        VMemAllocator(spec, num_tokens=1024, max_seqs=6, max_seq_len=128, page_bytes=4096)
        for _ in range(2)
    )
    done = [int(rng.integers(0, 4 + 7 * sid)) for sid in range(5)]
    with a, b:
        b.native_passes = False
        for x in (a, b):
            for sid in range(5):
                n = 3 + 7 * sid
                x.add(sid, list(range(n)))
                x.reserve(sid, n + 1)
                if done[sid]:
                    x.commit(sid, done[sid])
            x.swap_out([4])
        outcomes = []
        for x in (a, b):
            try:
                lay = x.layout(list(batch))
                outcomes.append(
                    {f: getattr(lay, f).tolist() for f in TENSOR_FIELDS} | {"ids": lay.seq_ids}
                )
            except Exception as e:  # noqa: BLE001 - both must fail alike
                outcomes.append(type(e))
        assert outcomes[0] == outcomes[1]
