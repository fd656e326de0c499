"""The allocator contract (DESIGN.md section 2), checked on every in-process backend."""

from __future__ import annotations

import pytest
import torch

from kvmem import (
    DuplicateSequence,
    InvalidArgument,
    KVError,
    KVSpec,
    OutOfKVMemory,
    UnknownSequence,
    create_allocator,
)
from tests.conformance.kvmodel import check_kv, fill, snapshot, write_step
from tests.conftest import MIN_CONCURRENT_SEQS, make_allocator


def test_decode_loop_keeps_every_token_where_the_layout_says(backend, spec):
    with make_allocator(backend, spec, 256) as a:
        tokens = {"a": list(range(1, 12)), "b": list(range(50, 53))}
        assert a.add("a", tokens["a"]) == 0
        assert a.add("b", tokens["b"]) == 0
        fill(a, "a", tokens, 11)
        fill(a, "b", tokens, 3)
        for step in range(20):
            batch = []
            for sid in ("a", "b"):
                tokens[sid].append(100 + step)
                a.append(sid, [100 + step])
                a.reserve(sid, 1)
                batch.append((sid, 1))
            write_step(a, batch, tokens)
            a.check_integrity()
        info = a.seq_info("a")
        assert (info.num_tokens, info.num_computed) == (31, 31) and info.capacity >= 31
        st = a.stats()
        assert st.num_seqs == 2 and st.filled_tokens == 31 + 23
        assert st.used_tokens + st.free_tokens == st.capacity_tokens
        a.free("a")
        a.free("b")
        a.check_integrity()
        assert a.stats().used_tokens == 0 and a.seq_ids() == []


def test_layout_fields_agree(backend, spec):
    with make_allocator(backend, spec, 256) as a:
        a.add("x", [1] * 9)
        a.add("y", [2] * 3)
        a.reserve("x", 9)
        a.reserve("y", 3)
        lay = a.layout([("x", 9), ("y", 3)])
        assert lay.seq_ids == ("x", "y")
        assert lay.seq_lens.tolist() == [9, 3] and lay.query_start_loc.tolist() == [0, 9, 12]
        assert lay.slot_mapping.dtype == torch.int64 and lay.kv_indices.dtype == torch.int32
        assert len(set(lay.slot_mapping.tolist())) == 12  # distinct slots
        ps = lay.page_size
        for b in range(2):
            pages = lay.kv_indices[lay.kv_indptr[b] : lay.kv_indptr[b + 1]].tolist()
            assert pages == lay.block_table[b, : len(pages)].tolist()
            n = int(lay.seq_lens[b])
            assert (
                len(pages) == -(-n // ps)
                and int(lay.kv_last_page_len[b]) == n - (len(pages) - 1) * ps
            )
            slots = lay.slot_mapping[lay.query_start_loc[b] : lay.query_start_loc[b + 1]].tolist()
            assert slots == [pages[i // ps] * ps + i % ps for i in range(n)]
        assert lay.max_seq_len == 9 and lay.max_query_len == 9


def test_reserve_is_idempotent_and_can_reserve_agrees(backend, spec):
    with make_allocator(backend, spec, 64) as a:
        a.add("s", [1, 2, 3])
        a.reserve("s", 3)
        before = snapshot(a)
        a.reserve("s", 2)  # fewer than held: nothing changes
        assert snapshot(a) == before
        free = a.stats().free_tokens
        assert a.can_reserve({"s": free})
        assert not a.can_reserve({"s": 10 * free})


def test_out_of_memory_changes_nothing(backend, spec):
    with make_allocator(backend, spec, 64) as a:
        a.add("s", [1, 2, 3])
        a.add("t", [4])
        a.reserve("s", 3)
        before = snapshot(a)
        with pytest.raises(OutOfKVMemory):
            a.reserve("t", 10_000)
        assert snapshot(a) == before
        a.check_integrity()
        assert not a.can_reserve({"s": 40, "t": 40})


def test_fork_shares_kv_and_copies_on_write(backend, spec):
    with make_allocator(backend, spec, 256) as a:
        tokens = {"p": [5, 6, 7, 8, 9, 10]}
        a.add("p", tokens["p"])
        fill(a, "p", tokens, 6)
        a.fork("p", "c")
        tokens["c"] = list(tokens["p"])
        assert a.seq_info("c").num_computed == 6
        for sid, t in (("p", 1), ("c", 2)):  # diverge in the shared partial page
            tokens[sid].append(t)
            a.append(sid, [t])
            fill(a, sid, tokens, 1)
        for sid in ("p", "c"):
            tokens[sid].append(3)
            a.append(sid, [3])
            a.reserve(sid, 1)
            lay = a.layout([(sid, 1)])
            check_kv(a, lay, 0, tokens[sid][:7])
        a.check_integrity()
        a.free("p")
        a.free("c")
        assert a.stats().used_tokens == 0


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_bad_sizes_are_rejected(backend, spec, n):
    with make_allocator(backend, spec, 64) as a:
        a.add("s", [1, 2])
        a.reserve("s", 2)
        before = snapshot(a)
        for call in (
            lambda: a.reserve("s", n),
            lambda: a.commit("s", n),
            lambda: a.layout([("s", n)]),
        ):
            with pytest.raises(InvalidArgument):
                call()
        assert snapshot(a) == before


def test_misuse_raises_typed_errors_and_changes_nothing(backend, spec):
    with make_allocator(backend, spec, 64) as a:
        a.add("s", [1, 2, 3])
        a.reserve("s", 2)
        before = snapshot(a)
        cases = [
            (UnknownSequence, lambda: a.reserve("nope", 1)),
            (UnknownSequence, lambda: a.append("nope", [1])),
            (UnknownSequence, lambda: a.commit("nope", 1)),
            (UnknownSequence, lambda: a.layout([("nope", 1)])),
            (UnknownSequence, lambda: a.free("nope")),
            (UnknownSequence, lambda: a.fork("nope", "kid")),
            (UnknownSequence, lambda: a.seq_info("nope")),
            (UnknownSequence, lambda: a.can_reserve({"nope": 1})),
            (DuplicateSequence, lambda: a.add("s", [1])),
            (InvalidArgument, lambda: a.add("e", [])),
            (InvalidArgument, lambda: a.add("e", [-1])),
            (InvalidArgument, lambda: a.append("s", [])),
            (InvalidArgument, lambda: a.commit("s", 3)),  # beyond the 2 reserved
            (InvalidArgument, lambda: a.layout([("s", 3)])),  # beyond the 2 reserved
            (InvalidArgument, lambda: a.layout([("s", 1), ("s", 1)])),
            (InvalidArgument, lambda: a.layout([])),
            (InvalidArgument, lambda: a.layer(99)),
        ]
        for err, call in cases:
            with pytest.raises(err):
                call()
            assert snapshot(a) == before
        a.fork("s", "kid")
        with pytest.raises(DuplicateSequence):
            a.fork("s", "kid")
        a.free("kid")
        with pytest.raises(UnknownSequence):
            a.free("kid")  # free twice
        a.reserve("s", 4)
        with pytest.raises(InvalidArgument):
            a.commit("s", 4)  # fine for the reservation, but token 4 is not known yet
        assert isinstance(UnknownSequence("x"), KVError)
        a.check_integrity()


def test_capacity_options(backend):
    spec = KVSpec(2, 2, 8, dtype=torch.float32)
    with pytest.raises(InvalidArgument):
        make_allocator(backend, spec, 0)
    with pytest.raises(InvalidArgument):
        create_allocator(backend, spec, num_tokens=64, num_bytes=1 << 20, device="cpu")
    with make_allocator(backend, spec, 64) as a:
        assert 0 < a.stats().capacity_tokens <= 64 * 2
    with pytest.raises(InvalidArgument):
        create_allocator("no-such-backend", spec, num_tokens=64)


@pytest.mark.parametrize("fmt", ["fp16", "fp8_e4m3", "int4"])
def test_every_format_round_trips_through_storage(backend, fmt):
    spec = KVSpec(1, 2, 8, dtype=torch.float32, kv_format=fmt)
    with make_allocator(backend, spec, 64) as a:
        a.add("s", [1, 2, 3, 4, 5])
        a.reserve("s", 5)
        lay = a.layout([("s", 5)])
        g = torch.Generator().manual_seed(0)
        k, v = torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 8, generator=g)
        from kvmem.attention import reference

        reference.write_kv(a.layer(0), lay, k, v)
        kk, vv = reference.gather_kv(a.layer(0), lay.kv_indices, 5, torch.float32)
        tol = {"fp16": 1e-3, "fp8_e4m3": 0.07, "int4": 0.35}[fmt]
        assert (kk - k).abs().max() < tol * k.abs().max()
        assert (vv - v).abs().max() < tol * v.abs().max()


def test_closed_allocator_refuses_work(backend, spec):
    a = make_allocator(backend, spec, 64)
    a.add("s", [1])
    a.close()
    with pytest.raises(KVError):
        a.add("t", [1])


def test_fork_after_reserving_ahead_copies_the_right_page(backend, spec):
    """The parent holds slots beyond its KV when forked; both then write on."""
    with make_allocator(backend, spec, 256) as a:
        tokens = {"p": list(range(1, 10))}
        a.add("p", tokens["p"])
        fill(a, "p", tokens, 9)
        a.reserve("p", 20)  # reserved ahead, past the shared page
        a.fork("p", "c")
        tokens["c"] = list(tokens["p"])
        a.reserve("p", 40)  # grows past the reservation: copies the shared page, keeps the rest
        for sid, t in (("p", 7), ("c", 8), ("p", 9)):
            tokens[sid].append(t)
            a.append(sid, [t])
            fill(a, sid, tokens, 1)
        for sid in ("p", "c"):
            tokens[sid].append(1)
            a.append(sid, [1])
            a.reserve(sid, 1)
            check_kv(a, a.layout([(sid, 1)]), 0, tokens[sid][:-1])
        a.check_integrity()


def test_block_table_pads_with_page_zero_past_each_sequence(backend, spec):
    """Pages reserved ahead are not part of the layout: padding is page 0."""
    with make_allocator(backend, spec, 256) as a:
        a.add("short", [1])
        a.add("long", list(range(9)))
        a.reserve("short", 30)  # holds pages well past its one new token
        a.reserve("long", 9)
        lay = a.layout([("short", 1), ("long", 9)])
        n = -(-1 // lay.page_size)
        assert lay.block_table.shape[1] == -(-9 // lay.page_size)
        assert (lay.block_table[0, n:] == 0).all()


@pytest.mark.parametrize("pool", ["contract", "stateful"])
def test_small_pools_hold_several_sequences_at_once(backend, spec, pool):
    """The suite's pools are small, but never so coarse that only one sequence fits."""
    from tests.conformance.test_stateful import CAPACITY

    with make_allocator(backend, spec, 64 if pool == "contract" else CAPACITY) as a:
        ids = list(range(MIN_CONCURRENT_SEQS))
        for sid in ids:
            a.add(sid, [sid + 1, sid + 2])
        assert a.can_reserve({sid: 2 for sid in ids})
        for sid in ids:
            a.reserve(sid, 2)
        assert a.stats().num_seqs == MIN_CONCURRENT_SEQS
        a.check_integrity()


def test_undeclared_calls_raise_invalid_argument_and_change_nothing(backend, spec):
    with make_allocator(backend, spec, 64) as a:
        caps = a.capabilities
        assert caps.names() == [k for k, v in vars(caps).items() if v]
        a.add("s", [1, 2, 3])
        a.reserve("s", 3)
        before = snapshot(a)
        calls = {
            "swap": [lambda: a.swap_out(["s"]), lambda: a.swap_in(["s"]), lambda: a.swap_out([])],
            "keep_on_host": [lambda: a.free("s", keep_on_host=True)],
            "fork": [lambda: a.fork("s", "child")],
        }
        for cap, refused in calls.items():
            if getattr(caps, cap):
                continue
            for call in refused:
                with pytest.raises(InvalidArgument):
                    call()
                assert snapshot(a) == before
        assert "s" in a and "child" not in a and ["unhashable"] not in a
        a.check_integrity()
