"""check_integrity of the vmem backend while a swap-in copy is still running."""

from __future__ import annotations

import threading

import pytest

from kvmem.backends.vmem import swapping
from tests.conformance.kvmodel import fill
from tests.conftest import make_allocator, small_spec


def test_integrity_holds_while_a_swap_in_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    copy_in = swapping.copy_in

    def slow_copy_in(*args: object) -> None:
        gate.wait(10)
        copy_in(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(swapping, "copy_in", slow_copy_in)
    with make_allocator("vmem", small_spec(), 96) as a:
        kv = {"s": list(range(9))}
        a.add("s", kv["s"])
        fill(a, "s", kv, 9)
        a.swap_out(["s"]).wait(10)
        h = a.swap_in(["s"])
        assert not h.done()
        a.check_integrity()  # resident, its host copy kept until the copy lands
        gate.set()
        h.wait(10)
        a.check_integrity()
        assert a.stats().extra["host_used_tokens"] == 0
