"""KVBackend: what a backend written on the base class gets, and what it must provide."""

from __future__ import annotations

import inspect

import pytest
import torch

from kvmem import InvalidArgument, KVError, KVSpec, backend_class, create_allocator
from kvmem.allocator import Capabilities
from kvmem.backends.base import KVBackend
from tests.backends import minimal
from tests.backends.minimal import MinimalAllocator

SPEC = KVSpec(2, 2, 8, dtype=torch.float32)


class CountingAllocator(MinimalAllocator):
    """The minimal backend, counting the memory hooks the base calls."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    def _grow(self, seq_id, s, target):
        self.calls.append(f"grow {target}")
        super()._grow(seq_id, s, target)

    def _drop(self, seq_id, s):
        self.calls.append("drop")
        super()._drop(seq_id, s)


def test_the_minimal_backend_is_short_and_registered_in_one_line():
    source = inspect.getsource(minimal)
    assert len(source.splitlines()) < 150
    assert source.count("register_backend(") == 1
    assert backend_class("minimal") is MinimalAllocator
    assert issubclass(MinimalAllocator, KVBackend)


def test_the_base_calls_grow_only_beyond_the_reservation():
    a = CountingAllocator(SPEC, num_tokens=64)
    a.add("s", [1, 2, 3])
    a.reserve("s", 3)
    a.reserve("s", 2)  # already held
    a.commit("s", 3)
    a.reserve("s", 1)  # slot 3 of the 4 reserved: beyond, so grow
    assert a.calls == ["grow 3", "grow 4"]
    with pytest.raises(InvalidArgument):
        a.reserve("s", 0)
    assert a.calls == ["grow 3", "grow 4"]
    a.free("s")
    assert a.calls[-1] == "drop" and "s" not in a


def test_refused_calls_never_reach_the_hooks():
    a = CountingAllocator(SPEC, num_tokens=64)
    a.add("s", [1])
    with pytest.raises(InvalidArgument):
        a.free("s", keep_on_host=True)  # not declared
    with pytest.raises(InvalidArgument):
        a.swap_out(["s"])
    assert a.calls == [] and "s" in a
    a.close()
    with pytest.raises(KVError, match="closed"):
        a.reserve("s", 1)
    assert a.seq_ids() == [] and a.calls == []


def test_max_seq_len_bounds_add_and_append():
    a = create_allocator("minimal", SPEC, num_tokens=64)
    a.max_seq_len = 4
    with pytest.raises(InvalidArgument, match="max_seq_len"):
        a.add("long", [1] * 5)
    a.add("s", [1, 2, 3])
    a.append("s", [4])
    with pytest.raises(InvalidArgument, match="max_seq_len"):
        a.append("s", [5])
    with pytest.raises(InvalidArgument, match="max_seq_len"):
        a.append("s", [5, 6])
    assert a.seq_info("s").num_tokens == 4 and "long" not in a


@pytest.mark.parametrize(
    ("caps", "missing"),
    [
        (Capabilities(swap=True, fork=True), "_start_swap_out"),
        (Capabilities(keep_on_host=True, fork=True), "_park"),
    ],
)
def test_declaring_a_capability_without_its_hooks_is_refused(caps, missing):
    with pytest.raises(TypeError, match=missing):
        type("Claims", (MinimalAllocator,), {"capabilities": caps})
    without_fork = {"capabilities": Capabilities(fork=True), "_fork": KVBackend._fork}
    with pytest.raises(TypeError, match="_fork"):
        type("NoFork", (MinimalAllocator,), without_fork)
