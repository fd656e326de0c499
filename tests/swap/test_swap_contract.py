"""swap_out / swap_in through the common interface, on every backend that swaps."""

from __future__ import annotations

import pytest
import torch

from kvmem import InvalidArgument, KVSpec, OutOfKVMemory, UnknownSequence
from tests.conftest import make_allocator
from tests.swap.util import digest_any, fill, snapshot, swap_backends, write_random


@pytest.fixture(params=swap_backends())
def swap_backend(request: pytest.FixtureRequest) -> str:
    """Each in-process backend that swaps."""
    return str(request.param)


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp8_e4m3", "int4"])
def test_round_trip_restores_every_byte_and_scale(swap_backend, fmt):
    spec = KVSpec(2, 2, 8, dtype=torch.float32, kv_format=fmt)
    # the bytes of 64 fp32 tokens: room for both sequences with large pages (vmem) too
    fp32 = KVSpec(2, 2, 8, dtype=torch.float32).bytes_per_token
    with make_allocator(swap_backend, spec, 64 * fp32 // spec.bytes_per_token) as a:
        for i, (sid, n) in enumerate((("a", 13), ("b", 6))):
            a.add(sid, [10 * i + t for t in range(n)])  # no shared prefix
            write_random(a, sid, n, seed=i)
            a.reserve(sid, 1)
        before = {sid: digest_any(a, sid) for sid in ("a", "b")}
        info = {sid: a.seq_info(sid) for sid in ("a", "b")}
        a.swap_out(["a", "b"]).wait(timeout=10)
        a.check_integrity()
        assert a.stats().num_swapped_seqs == 2 and a.stats().swapped_tokens == 19
        assert a.stats().used_tokens == 0, "swapped sequences hold no device slots"
        a.add("junk", [500 + t for t in range(40)])  # reuse their device pages with other KV
        write_random(a, "junk", 40, seed=7)
        a.free("junk")
        a.swap_in(["b", "a"]).wait(timeout=10)
        a.check_integrity()
        for sid in ("a", "b"):
            assert a.seq_info(sid) == info[sid]
            assert digest_any(a, sid) == before[sid]


def test_misuse_raises_typed_errors_and_changes_nothing(swap_backend, spec):
    with make_allocator(swap_backend, spec, 64) as a:
        tokens = {"s": [1, 2, 3, 4, 5], "r": [9, 9]}
        a.add("s", tokens["s"])
        a.add("r", tokens["r"])
        fill(a, "s", tokens, 5)
        a.swap_out(["s"]).wait(timeout=10)
        before = snapshot(a)
        cases = [
            (UnknownSequence, lambda: a.swap_out(["nope"])),
            (UnknownSequence, lambda: a.swap_in(["nope"])),
            (UnknownSequence, lambda: a.swap_out(["r", "nope"])),  # r must not move either
            (InvalidArgument, lambda: a.swap_out(["s"])),  # already swapped out
            (InvalidArgument, lambda: a.swap_in(["r"])),  # not swapped out
            (InvalidArgument, lambda: a.swap_in(["s", "r"])),  # one of them is not
            (InvalidArgument, lambda: a.swap_out(["r", "r"])),  # named twice
            (InvalidArgument, lambda: a.swap_in(["s", "s"])),
            (InvalidArgument, lambda: a.reserve("s", 1)),
            (InvalidArgument, lambda: a.commit("s", 1)),
            (InvalidArgument, lambda: a.layout([("s", 1)])),
            (InvalidArgument, lambda: a.fork("s", "kid")),
            (InvalidArgument, lambda: a.can_reserve({"s": 1})),
        ]
        for err, call in cases:
            with pytest.raises(err):
                call()
            assert snapshot(a) == before
        a.check_integrity()
        a.swap_in(["s"]).wait(timeout=10)
        a.free("s")
        a.free("r")
        assert a.stats().used_tokens == 0 and a.stats().swapped_tokens == 0


def test_swap_in_without_room_raises_and_keeps_the_sequence_on_host(swap_backend, spec):
    with make_allocator(swap_backend, spec, 64) as a:
        cap = a.stats().capacity_tokens
        a.add("s", list(range(1, 21)))
        write_random(a, "s", 20, seed=3)
        a.reserve("s", 1)
        want = digest_any(a, "s")
        a.swap_out(["s"]).wait(timeout=10)
        a.add("hog", [99] * cap)
        a.reserve("hog", cap - 8)  # leaves less than the 21 slots s needs
        before = snapshot(a)
        with pytest.raises(OutOfKVMemory):
            a.swap_in(["s"])
        assert snapshot(a) == before and a.seq_info("s").swapped
        a.check_integrity()
        a.free("hog")
        a.swap_in(["s"]).wait(timeout=10)
        assert digest_any(a, "s") == want


def test_swap_in_of_several_is_all_or_nothing(swap_backend, spec):
    with make_allocator(swap_backend, spec, 64) as a:
        cap = a.stats().capacity_tokens
        for i, sid in enumerate(("x", "y")):
            a.add(sid, [i] * 16)
            write_random(a, sid, 16, seed=i)
        a.swap_out(["x", "y"]).wait(timeout=10)
        a.add("hog", [99] * cap)
        a.add("probe", [0] * 16)
        hog = next(r for r in range(cap, 0, -1) if a.can_reserve({"hog": r, "probe": 16}))
        a.free("probe")
        a.reserve("hog", hog)  # room for one of them (the most it leaves), not both
        before = snapshot(a)
        with pytest.raises(OutOfKVMemory):
            a.swap_in(["x", "y"])
        assert snapshot(a) == before
        a.swap_in(["x"]).wait(timeout=10)
        assert not a.seq_info("x").swapped and a.seq_info("y").swapped
        a.check_integrity()
