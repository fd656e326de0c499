"""Cache tiers under a CUDA pool: pinned host pages, copies on a stream, disk reads into the
device (GPU only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvmem import KVSpec, PagePool, create_allocator
from kvmem.tiers import TierManager
from tests.conformance.kvmodel import write_step
from tests.tiers.util import chain


@pytest.mark.gpu
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_round_trips_through_a_cuda_pool(tmp_path: Path, tier: str) -> None:
    spec = KVSpec(4, 2, 64, dtype=torch.float16, kv_format="int4")
    pool = PagePool(spec, 16, 16, "cuda")
    for b in pool.buffers:
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, device="cuda"))
    want = [torch.cat([b[i].cpu() for b in pool.buffers]) for i in range(8)]
    keys = chain(8)
    opts = (
        {"host_bytes": 8 * pool.page_bytes}
        if tier == "host"
        else {"disk_dir": tmp_path, "disk_bytes": 8 * pool.page_bytes}
    )
    with TierManager(pool, **opts) as m:  # type: ignore[arg-type]
        if m.host is not None:
            assert m.host.pinned
        m.evicted([(k, i) for i, k in enumerate(keys)])
        for b in pool.buffers:
            b.zero_()
        h = m.load(keys, list(range(8, 16)))
        assert h.result() == 8
        for i in range(8):
            assert torch.equal(torch.cat([b[8 + i].cpu() for b in pool.buffers]), want[i])
        m.check_integrity()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["paged", "grouped"])
def test_the_backend_serves_tier_hits_on_cuda(tmp_path: Path, kind: str) -> None:
    spec = KVSpec(2, 2, 64, dtype=torch.float32)
    a = create_allocator(
        kind,
        spec,
        num_tokens=8 * 16,
        page_size=16,
        device="cuda",
        host_cache_tokens=4 * 16,
        disk_cache_dir=tmp_path,
        disk_cache_tokens=16 * 16,
    )
    kv: dict = {}

    def serve(sid: object, toks: list[int]) -> int:
        a.add(sid, toks)
        kv[sid] = toks
        done = a.seq_info(sid).num_computed
        a.reserve(sid, len(toks) - done)
        write_step(a, [(sid, len(toks) - done)], kv)  # checks the KV loaded from the tiers
        a.free(sid)
        return done

    prompt = list(range(6 * 16 + 1))
    assert serve("a", prompt) == 0
    serve("churn", [10_000 + t for t in range(8 * 16 - 1)])
    assert serve("b", prompt) == 6 * 16
    extra = a.stats().extra
    assert extra["tier_host_hit_pages"] + extra["tier_disk_hit_pages"] == 6
    a.check_integrity()
    a.close()
