"""The sharded backend in one process: messages, directory, holder, world-of-one attention."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from kvmem import InvalidArgument, KVSpec, UnknownSequence, create_allocator
from kvmem.attention import reference
from kvmem.distributed import PlacementDirectory, attend, decode, prefill
from kvmem.distributed.comm import decode as decode_message
from kvmem.distributed.comm import encode
from tests.distributed import dist_workers as w


def test_messages_round_trip_every_dtype_and_shape():
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3, 4, generator=g),
        torch.randn(5, generator=g).to(torch.bfloat16),
        torch.arange(7, dtype=torch.int64).reshape(7, 1),
        torch.zeros(3, 0),
        torch.tensor(2.5, dtype=torch.float64),
        torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g),
        torch.randn(4, 6, generator=g)[:, ::2],  # not contiguous
    ]
    meta = ("attend", 1, None, [(7, 0, 3)])
    buf = encode(meta, tensors)
    assert buf.dtype == torch.uint8 and buf.numel() % 16 == 0
    got_meta, got = decode_message(buf)
    assert got_meta == meta and len(got) == len(tensors)
    for a, b in zip(tensors, got, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _directory(caps: list[int]) -> PlacementDirectory:
    store = dist.HashStore()
    d = PlacementDirectory(store, len(caps))
    for r, c in enumerate(caps):
        store.set(f"free/{r}", str(c))
        store.set(f"cap/{r}", str(c))
    store.wait([f"cap/{r}" for r in range(len(caps))], timedelta(seconds=1))
    return d


def test_directory_takes_atomically_and_plans_lenders():
    d = _directory([2, 3, 5])
    assert d.capacities == [2, 3, 5] and d.free() == [2, 3, 5]
    assert not d.take(0, 3) and d.free() == [2, 3, 5]  # refused, nothing taken
    assert d.take(0, 2) and d.free() == [0, 3, 5]
    # owner 0 is full: the rank with the most free lends, then keeps lending (fewer holders)
    assert d.plan(0, 2, 3, [0, 0], "local_first") == [2, 2, 2]
    assert d.free() == [0, 3, 2]
    assert d.plan(0, 5, 4, [0, 0, 2, 2, 2], "local_first") == [2, 2, 1, 1]
    assert d.plan(0, 9, 2, [], "local_first") is None and d.free() == [0, 1, 0]
    d.give(0, 2)
    d.give(2, 3)
    # round-robin from owner 1; rank 1 is then full, so the rank with the most free
    assert d.plan(1, 0, 4, [], "spread") == [1, 2, 0, 2]
    d.record(77, [1, 2, 0, 1])
    assert d.lookup(77) == [1, 2, 0, 1]
    d.record(77, [])
    assert d.lookup(77) == []
    with pytest.raises(InvalidArgument):
        d.plan(0, 0, 1, [], "everywhere")  # type: ignore[arg-type]


def test_world_of_one_attention_matches_the_reference():
    alloc = w.make_sharded(256)
    m = w.Mirror(alloc, seed=3)
    m.add("a", list(range(50)))
    for n in (17, 20, 13):
        m.run("a", n)
    m.fork("a", "b")
    for t in range(5):
        m.run("a", 1, token=t)
        m.run("b", 1, token=10 + t)
    alloc.check_integrity()
    assert m.max_err <= 1e-5
    assert alloc.profile.calls > 0 and alloc.profile.messages == 0
    assert alloc.profile.bytes_sent == 0 and alloc.profile.local_s > 0
    m.free("a")
    m.free("b")
    assert alloc.stats().used_tokens == 0
    alloc.close()


def test_attention_wrappers_agree_and_check_their_inputs():
    spec = KVSpec(1, 2, 8, dtype=torch.float64)
    a = create_allocator("sharded", spec, num_tokens=64, page_size=4, rblock_size=8)
    ref = create_allocator("paged", spec, num_tokens=64, page_size=4)
    g = torch.Generator().manual_seed(5)
    for x in (a, ref):
        x.add("s", list(range(9)))
        x.reserve("s", 8)
    q, k, v = (torch.randn(8, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    out, lse = prefill(a, 0, "s", q, k, v)
    lay = ref.layout([("s", 8)])
    reference.write_kv(ref.layer(0), lay, k, v)
    r_out, r_lse = reference.prefill(q, ref.layer(0), lay)
    assert (out - r_out).abs().max() < 1e-12 and (lse - r_lse).abs().max() < 1e-12
    for x in (a, ref):
        x.commit("s", 8)
        x.reserve("s", 1)
    q1, k1, v1 = (torch.randn(1, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    out1, _ = decode(a, 0, ["s"], q1, k1, v1)
    lay = ref.layout([("s", 1)])
    reference.write_kv(ref.layer(0), lay, k1, v1)
    assert (out1 - reference.decode(q1, ref.layer(0), lay)[0]).abs().max() < 1e-12
    with pytest.raises(InvalidArgument):
        attend(a, 0, [("s", 1)], q1[:, :3], k1, v1)  # heads not a multiple of KV heads
    with pytest.raises(InvalidArgument):
        attend(a, 0, [("s", 1)], q, k, v)  # 8 rows for 1 new token
    with pytest.raises(InvalidArgument):
        attend(a, 0, [("s", 2)], q[:2], k[:2], v[:2])  # only 1 slot reserved
    with pytest.raises(InvalidArgument):
        attend(a, 3, [("s", 1)], q1, k1, v1)  # no layer 3
    with pytest.raises(UnknownSequence):
        attend(a, 0, [("nope", 1)], q1, k1, v1)
    a.close()
    ref.close()


def test_copy_on_write_copies_int4_codes_and_scales():
    spec = KVSpec(2, 2, 8, dtype=torch.float32, kv_format="int4")
    a = create_allocator("sharded", spec, num_tokens=64, page_size=4, rblock_size=8)
    a.add("p", list(range(10)))
    a.reserve("p", 10)
    lay = a.layout([("p", 10)])
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        k, v = torch.randn(10, 2, 8, generator=g), torch.randn(10, 2, 8, generator=g)
        reference.write_kv(a.layer(i), lay, k, v)
    a.commit("p", 10)
    a.fork("p", "c")
    a.append("c", [1])
    a.reserve("c", 1)  # rBlock 1 (2 tokens of KV) is shared: copied
    a.append("p", [1])
    a.reserve("p", 1)
    lp, lc = a.layout([("p", 1)]), a.layout([("c", 1)])
    assert lp.kv_indices[:2].tolist() == lc.kv_indices[:2].tolist()  # rBlock 0 still shared
    assert lp.kv_indices[2].item() != lc.kv_indices[2].item()
    for i in range(2):
        layer = a.layer(i)
        for name in ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero"):
            t = getattr(layer, name)
            assert torch.equal(t[lp.kv_indices[2], :2], t[lc.kv_indices[2], :2]), name
    a.check_integrity()
    assert a.stats().used_tokens == 3 * 8
    a.close()


@pytest.mark.parametrize(
    "options",
    [
        {"placement": "everywhere"},
        {"local_backend": "sharded"},
        {"timeout": 0},
        {"rblock_size": 6},  # not a multiple of the page size 4
        {"num_tokens": 4, "rblock_size": 8},  # no room for one rBlock
        {"rblock_size": 0},
    ],
)
def test_bad_options_are_refused(options):
    spec = KVSpec(1, 1, 8, dtype=torch.float32)
    kw = {"num_tokens": 64, "page_size": 4, **options}
    with pytest.raises(InvalidArgument):
        create_allocator("sharded", spec, **kw)
