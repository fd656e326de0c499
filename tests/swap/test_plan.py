"""Copy plans: runs, copy counts, and the two copy modes giving identical bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmem import InvalidArgument, KVSpec, PagePool
from kvmem.swap import CopyPlan, HostPagePool, block_runs, page_runs


def test_page_runs_fold_pairs_consecutive_on_both_sides():
    r = page_runs([12, 13, 14, 15, 40, 41, 7, 8], [0, 1, 2, 3, 4, 5, 9, 10])
    assert r.tolist() == [[12, 0, 4], [40, 4, 2], [7, 9, 2]]
    assert page_runs([3, 4, 5], [9, 8, 7]).tolist() == [[3, 9, 1], [4, 8, 1], [5, 7, 1]]
    assert page_runs([], []).shape == (0, 3)
    assert block_runs([5, 6, 7, 2, 3, 9]) == [(5, 3), (2, 2), (9, 1)]
    with pytest.raises(InvalidArgument):
        page_runs([1, 2], [1])


@pytest.mark.parametrize("layout", ["block", "layer"])
@pytest.mark.parametrize("fmt", ["fp16", "int4"])
def test_runs_and_per_block_copy_the_same_bytes(layout, fmt):
    spec = KVSpec(3, 2, 8, kv_format=fmt)
    pool = PagePool(spec, 16, 4, layout=layout)
    for b in pool.buffers:
        b.random_(0, 256, generator=torch.Generator().manual_seed(1))
    src = [3, 4, 5, 9, 0, 1]
    dst = [0, 1, 2, 3, 7, 8]
    copies = {}
    for mode in ("runs", "per_block"):
        host = HostPagePool(pool, 10)
        for b in host.buffers:
            b.zero_()
        plan = CopyPlan(pool.buffers, host.buffers, page_runs(src, dst), pool.layer_bytes, mode)
        plan.run()
        for s, d in zip(src, dst, strict=True):
            for pb, hb in zip(pool.buffers, host.buffers, strict=True):
                assert torch.equal(pb[s], hb[d])
        untouched = sorted(set(range(10)) - set(dst))
        assert all(int(hb[untouched].sum()) == 0 for hb in host.buffers)
        copies[mode] = plan.num_copies
        assert plan.nbytes == len(src) * pool.page_bytes
        assert plan.num_pages == len(src)
    # 3 runs: one copy each per buffer; per block: one per page per layer
    assert copies["runs"] == 3 * len(pool.buffers)
    assert copies["per_block"] == len(src) * spec.num_layers


def test_plan_rejects_mismatched_buffers_and_modes():
    spec = KVSpec(2, 1, 4)
    a = PagePool(spec, 4, 4, layout="block")
    b = PagePool(spec, 4, 4, layout="layer")
    runs = np.array([[0, 0, 1]])
    with pytest.raises(InvalidArgument):
        CopyPlan(a.buffers, b.buffers, runs, a.layer_bytes)
    with pytest.raises(InvalidArgument):
        CopyPlan(a.buffers, a.buffers, runs, a.layer_bytes, "sideways")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["runs", "per_block"])
def test_plan_native_and_python_copies_agree(mode):
    from kvmem import native

    spec = KVSpec(4, 2, 8)
    pool = PagePool(spec, 32, 4, layout="block")
    for b in pool.buffers:
        b.random_(0, 256, generator=torch.Generator().manual_seed(2))
    runs = page_runs([30, 31, 2, 3, 4, 17], [9, 10, 0, 1, 2, 5])
    out = []
    for nat in [False, True] if native.enabled() else [False]:
        host = HostPagePool(pool, 12)
        for b in host.buffers:
            b.zero_()
        segs = native.runs_to_segments(
            runs, pool.buffers[0].shape[1], pool.layer_bytes if mode == "per_block" else None
        )
        native.copy_segments(pool.buffers[0], host.buffers[0], segs, native=nat)
        out.append(host.buffers[0].clone())
        host2 = HostPagePool(pool, 12)
        for b in host2.buffers:
            b.zero_()
        CopyPlan(pool.buffers, host2.buffers, runs, pool.layer_bytes, mode).run()
        assert torch.equal(host2.buffers[0], out[-1])
    assert all(torch.equal(o, out[0]) for o in out)


@pytest.mark.parametrize("mode", ["runs", "per_block"])
def test_plan_with_out_of_range_or_overlapping_runs_copies_nothing(mode):
    spec = KVSpec(2, 1, 4)
    pool = PagePool(spec, 8, 4, layout="block")
    host = HostPagePool(pool, 4)
    for b in pool.buffers:
        b.fill_(7)
    for b in host.buffers:
        b.zero_()
    for runs in ([[0, 0, 1], [6, 3, 2]], [[0, 0, 2], [4, 1, 2]], [[9, 0, 1]]):
        plan = CopyPlan(pool.buffers, host.buffers, np.array(runs), pool.layer_bytes, mode)
        with pytest.raises(InvalidArgument):
            plan.run()
        assert all(int(b.sum()) == 0 for b in host.buffers)
