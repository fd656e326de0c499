"""Swap on the vmem backend: bit-identical round trips, all-or-nothing errors, memory given back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmem import InvalidArgument, KVSpec, OutOfKVMemory, UnknownSequence, create_allocator
from kvmem.attention import reference
from kvmem.backends.vmem import VMemAllocator, swapping
from kvmem.errors import OutOfHostMemory
from kvmem.layout import build_layout
from tests.backends.test_vmem import snapshot
from tests.backends.test_vmem import vmem as base_vmem

KIB = 1024
SPECS = {
    "fp16": KVSpec(2, 2, 16, dtype=torch.float16),
    "fp8": KVSpec(2, 2, 16, dtype=torch.float16, kv_format="fp8"),
    "int4": KVSpec(2, 2, 16, dtype=torch.float16, kv_format="int4", group_size=8),
}
SPEC = SPECS["fp16"]


def vmem(spec: KVSpec = SPEC, **opts) -> VMemAllocator:
    """A small vmem allocator: 2048 tokens, 4 sequences; no prefix cache (prompts here repeat)."""
    opts = {"num_tokens": 2048, "max_seqs": 4, "max_seq_len": 2048, "prefix_caching": False, **opts}
    return base_vmem(spec, **opts)


def fill(a: VMemAllocator, sid, n: int, seed: int) -> None:
    """Register ``sid`` with ``n`` tokens and write random KV for all of them."""
    a.add(sid, list(range(n)))
    a.reserve(sid, n)
    g = torch.Generator().manual_seed(seed)
    lay = build_layout(
        a.page_size,
        np.array([[a.slot(sid)]]),
        np.array([n]),
        np.array([n]),
        (sid,),
        a.device,
        a.spec,
    )
    sp = a.spec
    for i in range(sp.num_layers):
        k = torch.randn(n, sp.num_kv_heads, sp.head_dim, generator=g).to(a.device, sp.dtype)
        v = torch.randn(n, sp.num_kv_heads, sp.head_dim, generator=g).to(a.device, sp.dtype)
        reference.write_kv(a.layer(i), lay, k, v)
    a.commit(sid, n)


def stored(a: VMemAllocator, sid) -> list[dict[str, torch.Tensor]]:
    """Copies of every stored field of the sequence's written KV, per layer."""
    slot, n = a.slot(sid), a.seq_info(sid).num_computed
    out = []
    for i in range(a.spec.num_layers):
        lay = a.layer(i)
        f = {name: getattr(lay, name)[slot, :n].clone() for name in ("k", "v")}
        if a.spec.fmt.kind == "int4":
            f.update(
                {
                    n_: getattr(lay, n_)[slot, :n].clone()
                    for n_ in ("k_scale", "v_scale", "k_zero", "v_zero")
                }
            )
        elif a.spec.fmt.kind == "fp8":
            f.update({n_: getattr(lay, n_).clone() for n_ in ("k_scale", "v_scale")})
        out.append(f)
    return out


def assert_same(a, b) -> None:
    for la, lb in zip(a, b, strict=True):
        assert la.keys() == lb.keys()
        for name in la:  # bit-identical: compare the bytes
            assert torch.equal(la[name].view(torch.uint8), lb[name].view(torch.uint8)), name


def round_trip(a: VMemAllocator) -> None:
    """Swap a sequence out, let another overwrite its slot, swap it back: same bytes."""
    fill(a, "a", 300, seed=1)
    a.reserve("a", 20)  # reserved beyond the written KV: restored by swap_in
    before = stored(a, "a")
    if a.spec.fmt.kind == "int4":
        assert before[0]["k_scale"].abs().sum() > 0  # real scales travel, not zeros
    slot = a.slot("a")
    a.swap_out(["a"]).wait(timeout=10)
    info = a.seq_info("a")
    assert info.swapped and info.num_computed == 300 and info.capacity == 320
    assert a.slot("a") == -1
    # another sequence takes the freed slot and overwrites its KV
    fill(a, "b", 400, seed=2)
    assert a.slot("b") == slot
    a.free("b")
    a.swap_in(["a"]).wait(timeout=10)
    info = a.seq_info("a")
    assert not info.swapped and info.capacity == 320
    assert_same(stored(a, "a"), before)
    assert a.stats().extra["swap_out_bytes"] == 300 * a.spec.bytes_per_token
    a.check_integrity()


@pytest.mark.parametrize("fmt", sorted(SPECS))
def test_round_trip_is_bit_identical_scales_included(fmt):
    with vmem(SPECS[fmt]) as a:
        round_trip(a)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", sorted(SPECS))
def test_round_trip_on_cuda_is_bit_identical(fmt):
    pytest.importorskip("cuda")
    spec = SPECS[fmt]
    a = create_allocator("vmem", spec, device="cuda", num_bytes=16 << 20, max_seqs=4)
    assert isinstance(a, VMemAllocator) and a.layer(0).k.device.type == "cuda"
    with a:
        round_trip(a)


def test_swap_without_waiting_and_calls_that_wait_for_the_copy():
    with vmem() as a:
        fill(a, "a", 200, seed=3)
        before = stored(a, "a")
        a.swap_out(["a"])
        assert a.seq_info("a").swapped  # names the sequence: waits for the copy first
        h = a.swap_in(["a"])
        a.reserve("a", 1)  # waits for the copy in
        assert h.done()
        assert_same(stored(a, "a"), before)
        a.swap_out(["a"])
        a.free("a")  # in flight: waits, then drops the host copy
        st = a.stats()
        assert st.num_seqs == 0 and st.swapped_tokens == 0 and st.extra["host_used_tokens"] == 0
        a.check_integrity()


def test_swap_in_without_room_changes_nothing_and_keeps_the_host_copy():
    with vmem(num_tokens=1024) as a:
        fill(a, "a", 500, seed=4)
        before = stored(a, "a")
        a.swap_out(["a"]).wait(timeout=10)
        fill(a, "b", 1000, seed=5)  # takes (nearly) the whole pool
        snap = snapshot(a)
        with pytest.raises(OutOfKVMemory):
            a.swap_in(["a"])
        assert snapshot(a) == snap and a.seq_info("a").swapped
        assert not a.can_reserve({"b": 1000})
        a.free("b")
        a.swap_in(["a"]).wait(timeout=10)
        assert_same(stored(a, "a"), before)
        a.check_integrity()


def test_swap_in_without_a_free_slot_is_out_of_memory():
    with vmem(max_seqs=1) as a:
        fill(a, "a", 50, seed=6)
        a.swap_out(["a"]).wait(timeout=10)
        fill(a, "b", 10, seed=7)
        snap = snapshot(a)
        with pytest.raises(OutOfKVMemory, match="slots"):
            a.swap_in(["a"])
        assert snapshot(a) == snap


def test_bad_swaps_are_typed_errors_and_change_nothing():
    with vmem(host_num_tokens=100) as a:
        fill(a, "a", 60, seed=8)
        fill(a, "b", 60, seed=9)
        snap = snapshot(a)
        with pytest.raises(UnknownSequence):
            a.swap_out(["a", "nope"])
        with pytest.raises(InvalidArgument):
            a.swap_out(["a", "a"])
        with pytest.raises(InvalidArgument):
            a.swap_out("a")
        with pytest.raises(InvalidArgument):
            a.swap_in(["a"])  # not swapped out
        with pytest.raises(OutOfHostMemory):
            a.swap_out(["a", "b"])  # 120 entries, the host takes 100: nothing moves
        assert snapshot(a) == snap
        a.swap_out(["a"]).wait(timeout=10)
        snap = snapshot(a)
        with pytest.raises(InvalidArgument, match="already swapped"):
            a.swap_out(["a"])
        with pytest.raises(OutOfHostMemory):
            a.swap_out(["b"])
        for call in (
            lambda: a.reserve("a", 1),
            lambda: a.commit("a", 1),
            lambda: a.layout([("a", 1)]),
            lambda: a.fork("a", "c"),
            lambda: a.kv_view("a", 0),
        ):
            with pytest.raises(InvalidArgument, match="swapped out"):
                call()
        assert snapshot(a) == snap
        a.append("a", [7, 8])  # allowed while swapped
        assert a.seq_info("a").num_tokens == 62
        a.check_integrity()


def test_swap_out_gives_the_slot_and_pages_back():
    with vmem(num_tokens=1024) as a:
        fill(a, "a", 700, seed=10)
        st = a.stats()
        assert st.used_tokens >= 700 and st.extra["physical_bytes_held"] > 0
        a.swap_out(["a"]).wait(timeout=10)
        st = a.stats()
        assert st.used_tokens == 0 and st.free_tokens == st.capacity_tokens
        assert st.extra["physical_bytes_held"] == 0
        assert st.swapped_tokens == 700 and st.num_swapped_seqs == 1
        assert st.extra["host_used_tokens"] == 700
        assert st.extra["free_slots"] == a.max_seqs
        # the pages mapped under the old slot are reclaimable: another sequence gets them all
        a.add("b", [1])
        a.reserve("b", st.capacity_tokens)
        assert a.stats().extra["pages_mapped"] == a.stats().extra["pages_pooled"]
        a.check_integrity()
        a.free("a")  # a swapped sequence: its host copy goes
        st = a.stats()
        assert st.swapped_tokens == 0 and st.extra["host_used_tokens"] == 0


def test_a_failed_copy_leaves_the_sequence_where_it_was(monkeypatch):
    with vmem() as a:
        fill(a, "a", 100, seed=11)
        before = stored(a, "a")
        snap = snapshot(a)

        def broken(*args):
            raise RuntimeError("copy failed")

        monkeypatch.setattr(swapping, "copy_out", broken)
        with pytest.raises(RuntimeError, match="copy failed"):
            a.swap_out(["a"]).wait(timeout=10)
        assert not a.seq_info("a").swapped
        assert_same(stored(a, "a"), before)
        monkeypatch.undo()
        a.swap_out(["a"]).wait(timeout=10)
        monkeypatch.setattr(swapping, "copy_in", broken)
        with pytest.raises(RuntimeError, match="copy failed"):
            a.swap_in(["a"]).wait(timeout=10)
        assert a.seq_info("a").swapped and a.stats().used_tokens == 0
        monkeypatch.undo()
        a.swap_in(["a"]).wait(timeout=10)
        assert_same(stored(a, "a"), before)
        st, infos = snapshot(a)
        assert infos == snap[1] and st.used_tokens == snap[0].used_tokens
        a.check_integrity()


def test_many_swaps_in_flight_while_others_work():
    with vmem(num_tokens=4096, max_seqs=8, map_ahead=True) as a:
        for i in range(4):
            fill(a, i, 100 + 50 * i, seed=20 + i)
        want = {i: stored(a, i) for i in range(4)}
        for r in range(20):
            out = [i for i in range(4) if (i + r) % 2]
            a.swap_out(out)
            fill(a, ("tmp", r), 30, seed=100 + r)  # other work while the copies run
            a.free(("tmp", r))
            a.swap_in(out)
        for i in range(4):
            assert_same(stored(a, i), want[i])
        a.check_integrity()


def test_meta_device_swaps_bookkeeping_only():
    with create_allocator(
        "vmem", SPEC, device="meta", num_tokens=4096, max_seqs=4, max_seq_len=4096
    ) as a:
        a.add("a", list(range(100)))
        a.reserve("a", 100)
        a.commit("a", 100)
        a.swap_out(["a"]).wait(timeout=10)
        assert a.stats().used_tokens == 0 and a.stats().swapped_tokens == 100
        a.swap_in(["a"]).wait(timeout=10)
        assert a.seq_info("a").capacity == 100
        a.check_integrity()


def test_filled_counts_kv_shared_by_forks_once():
    with vmem(max_seqs=8) as a:
        fill(a, "a", 40, seed=30)
        for i in range(5):
            a.fork("a", ("kid", i))
        st = a.stats()
        assert st.filled_tokens == 40 <= st.used_tokens
        a.swap_out([("kid", 0)]).wait(timeout=10)  # a swapped fork's KV is on the host
        assert a.stats().filled_tokens == 40 and a.stats().swapped_tokens == 40
        a.swap_in([("kid", 0)]).wait(timeout=10)
        a.check_integrity()
