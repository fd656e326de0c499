"""Swap on a CUDA device: pinned host pool, copies on the manager's stream (GPU only)."""

from __future__ import annotations

import pytest
import torch

from kvmem import KVSpec, create_allocator
from tests.swap.util import HOST_POOL_BACKENDS, digest, write_random


@pytest.mark.gpu
@pytest.mark.parametrize("kind", HOST_POOL_BACKENDS)
@pytest.mark.parametrize("mode", ["runs", "per_block"])
def test_round_trip_on_cuda_with_pinned_host_pages(kind, mode):
    spec = KVSpec(4, 2, 64, dtype=torch.float16, kv_format="int4")
    a = create_allocator(kind, spec, num_tokens=1024, page_size=16, device="cuda", swap_mode=mode)
    for i, sid in enumerate(("a", "b")):
        a.add(sid, [100 * i + t for t in range(200 + 37 * i)])
        write_random(a, sid, 200 + 37 * i, seed=i)
    want = {sid: digest(a, sid) for sid in ("a", "b")}
    h = a.swap_out(["a", "b"])
    a.add("c", list(range(500, 900)))  # runs on the compute stream while the copy may run
    write_random(a, "c", 400, seed=9)
    h.wait(timeout=30)
    assert a._host is not None and a._host.pool.pinned  # type: ignore[attr-defined]
    assert a._swapper._stream is not None  # type: ignore[attr-defined]
    a.free("c")
    a.swap_in(["b", "a"]).wait(timeout=30)
    assert {sid: digest(a, sid) for sid in ("a", "b")} == want
    a.check_integrity()
    a.close()
