"""vmem on any device: driver modules, tensors over raw addresses, one device sync per unmap batch.

The scenario tests run on the host driver here and on the CUDA driver where a
GPU is present (``@pytest.mark.gpu``), with the same assertions.
"""

from __future__ import annotations

import ast
import ctypes
import gc
import mmap
from pathlib import Path

import pytest
import torch

from kvmem import InvalidArgument, KVSpec, create_allocator
from kvmem.backends import vmem as vmem_pkg
from kvmem.backends.vmem import MetaDriver, VMemAllocator, make_driver
from kvmem.backends.vmem.dlpack import live_capsules, tensor_at
from kvmem.backends.vmem.host import HostDriver
from tests.backends.test_vmem import assert_kv, decode_steps, write_step

PKG = Path(vmem_pkg.__file__).parent
VMEM = "kvmem.backends.vmem"


# ------------------------------------------------------------- import graph


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """vmem modules that ``path`` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(VMEM + "."):
            out.add(node.module.removeprefix(VMEM + "."))
    return out


def test_vmem_modules_import_each_other_without_a_cycle():
    graph = {p.stem: _imports(p, top_level_only=False) for p in PKG.glob("*.py")}
    assert graph["driver"] == set(), "the driver interface must import no implementation"
    assert "driver" in graph["host"] and "driver" in graph["cuda"]
    assert {"host", "cuda"} <= graph["drivers"]
    assert not {"host", "cuda"} & _imports(PKG / "drivers.py", top_level_only=True)

    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for dep in graph.get(m, ()):
            visit(dep, [*path, m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_make_driver_picks_by_device_and_refuses_mismatches():
    drv = make_driver(None, "cpu")
    assert isinstance(drv, HostDriver)
    drv.close()
    assert isinstance(make_driver(None, "meta"), MetaDriver)
    mine = MetaDriver()
    assert make_driver(mine, "cpu") is mine
    with pytest.raises(InvalidArgument, match="host driver"):
        make_driver("host", "meta")
    with pytest.raises(InvalidArgument, match="unknown vmem driver"):
        make_driver("nvme", "cpu")


# --------------------------------------------------------- tensors at addresses


def test_tensor_at_views_memory_in_place_and_lets_the_capsule_go():
    gc.collect()
    base = live_capsules()
    buf = (ctypes.c_uint8 * 8192)()
    t = tensor_at(ctypes.addressof(buf), 8192, "cpu")
    assert t.dtype == torch.uint8 and t.shape == (8192,) and t.device.type == "cpu"
    assert t.data_ptr() == ctypes.addressof(buf)
    t[300] = 42
    buf[200] = 7
    assert buf[300] == 42 and int(t[200]) == 7
    rows = t.view(64, 128)[2:4]  # a view keeps the memory's capsule alive
    del t
    gc.collect()
    assert live_capsules() == base + 1
    assert int(rows[0, 300 - 2 * 128]) == 42  # row 2 starts at byte 256
    del rows
    gc.collect()
    assert live_capsules() == base


def test_tensor_at_a_reserved_unmapped_range_sees_pages_mapped_later():
    """The mechanism the CUDA driver uses, over a PROT_NONE host range."""
    drv = HostDriver()
    g = mmap.PAGESIZE
    base = drv.reserve(4 * g)
    try:
        whole = tensor_at(base, 4 * g, "cpu")  # nothing mapped: building it touches nothing
        page = drv.create(g)
        drv.map(base + 2 * g, g, page)
        whole[2 * g : 3 * g].fill_(9)
        assert int(drv.tensor(base + 2 * g, g).sum()) == 9 * g
        drv.unmap(base + 2 * g, g)
        drv.map(base, g, page)  # the same page elsewhere: the view reads its bytes there
        assert int(whole[:g].sum()) == 9 * g
        drv.unmap(base, g)
        del whole
        drv.release(page)
    finally:
        drv.free_range(base, 4 * g)
        drv.close()


@pytest.mark.parametrize(
    ("addr", "size", "device"), [(4096, 0, "cpu"), (0, 16, "cpu"), (4096, 16, "meta")]
)
def test_tensor_at_refuses_bad_ranges_and_devices(addr, size, device):
    base = live_capsules()
    with pytest.raises(InvalidArgument):
        tensor_at(addr, size, device)
    assert live_capsules() == base


# ------------------------------------------------------ one sync per unmap batch


def counting(drv) -> dict[str, int]:
    """Count the driver's device syncs and pages unmapped (wrapping its methods)."""
    n = {"syncs": 0, "unmaps": 0}
    sync, unmap, unmap_many = drv.synchronize, drv.unmap, drv.unmap_many
    inside = [False]  # a default unmap_many calls unmap: count its pages once

    def counted_sync() -> None:
        n["syncs"] += 1
        sync()

    def counted_unmap(addr: int, size: int) -> None:
        n["unmaps"] += not inside[0]
        unmap(addr, size)

    def counted_unmap_many(addrs, size):
        inside[0] = True
        try:
            done, err = unmap_many(addrs, size)
        finally:
            inside[0] = False
        n["unmaps"] += done
        return done, err

    drv.synchronize = counted_sync
    drv.unmap = counted_unmap
    drv.unmap_many = counted_unmap_many
    return n


def fork_free_and_reclaim(a: VMemAllocator, n: dict[str, int]) -> None:
    """Copy-on-write, unsharing on free and a reclaim: each is one batch with one sync."""
    nl, tpp = a.spec.num_layers, a.granularity

    def step(fn, syncs: int, unmaps: int) -> None:
        before = dict(n)
        fn()
        assert (n["syncs"] - before["syncs"], n["unmaps"] - before["unmaps"]) == (syncs, unmaps)

    tokens = {"p": list(range(tpp + 10))}
    a.add("p", tokens["p"])
    a.reserve("p", tpp + 10)
    write_step(a, [("p", tpp + 10)], tokens)
    a.fork("p", "c")
    tokens["c"] = list(tokens["p"])
    assert a.stats().extra["shared_pages"] == 2 * nl
    step(lambda: decode_steps(a, tokens, ["c"], 1), 1, nl)  # c copies its partial page
    step(lambda: decode_steps(a, tokens, ["p"], 1, start=200), 0, 0)  # p's page is its own now
    a.check_integrity()
    assert_kv(a, "p", tokens["p"])
    assert_kv(a, "c", tokens["c"])
    step(lambda: a.free("p"), 1, 2 * nl)  # p's slot drops the shared page and all after it
    for sid in ("d", "e"):  # two free slots left with one idle page each
        a.add(sid, [3] * tpp)
        a.reserve(sid, tpp)
    step(lambda: (a.free("d"), a.free("e")), 0, 0)
    tokens["big"] = [5] * (4 * tpp)
    a.add("big", tokens["big"])
    step(lambda: a.reserve("big", 4 * tpp), 1, nl)  # grows d's old slot, takes e's page
    write_step(a, [("big", 4 * tpp)], tokens)
    a.check_integrity()
    assert_kv(a, "c", tokens["c"])
    assert_kv(a, "big", tokens["big"])


def test_copy_on_write_free_and_reclaim_sync_once_per_batch_on_the_host():
    spec = KVSpec(2, 2, 8, dtype=torch.float32)
    drv = HostDriver()
    n = counting(drv)
    tpp = 4096 // spec.bytes_per_token_layer
    a = create_allocator(
        "vmem",
        spec,
        device="cpu",
        driver=drv,
        num_tokens=6 * tpp,
        max_seqs=4,
        max_seq_len=8 * tpp,
        page_bytes=4096,
        map_ahead=False,
    )
    fork_free_and_reclaim(a, n)
    a.close()


def test_a_reclaim_across_free_slots_syncs_once():
    spec = KVSpec(2, 2, 8, dtype=torch.float32)
    drv = HostDriver()
    n = counting(drv)
    tpp = 4096 // spec.bytes_per_token_layer
    a = create_allocator(
        "vmem",
        spec,
        device="cpu",
        driver=drv,
        num_tokens=6 * tpp,
        max_seqs=4,
        max_seq_len=8 * tpp,
        page_bytes=4096,
        map_ahead=False,
    )
    for sid in "abc":  # three free slots with two idle pages each: the pool is empty
        a.add(sid, [1] * (2 * tpp))
        a.reserve(sid, 2 * tpp)
    for sid in "abc":
        a.free(sid)
    assert n == {"syncs": 0, "unmaps": 0}
    a.add("big", [2] * (5 * tpp))
    a.reserve("big", 5 * tpp)  # grows one slot by 3 pages, taken from the other two slots
    assert n == {"syncs": 1, "unmaps": 3 * spec.num_layers}
    a.check_integrity()
    a.close()


def test_close_unmaps_every_page_after_one_sync():
    spec = KVSpec(3, 2, 8, dtype=torch.float32)
    drv = HostDriver()
    drv.free_unmaps = False  # as the CUDA driver: each page is unmapped before the range goes
    n = counting(drv)
    a = create_allocator(
        "vmem", spec, device="cpu", driver=drv, num_tokens=4096, max_seqs=4, page_bytes=4096
    )
    for sid, length in (("a", 100), ("b", 300), ("c", 5)):
        a.add(sid, [1] * length)
        a.reserve(sid, length)
    a.free("b")  # its pages stay mapped under its free slot
    assert a.wait_map_ahead(10)
    mapped = int(a.stats().extra["pages_mapped"])
    assert mapped >= spec.num_layers * (1 + 3 + 1)
    a.close()
    assert n == {"syncs": 1, "unmaps": mapped}


@pytest.mark.gpu
def test_copy_on_write_free_and_reclaim_on_cuda():
    pytest.importorskip("cuda")
    spec = KVSpec(2, 2, 64, dtype=torch.float16)
    drv = make_driver(None, "cuda")
    n = counting(drv)
    tpp = drv.granularity // spec.bytes_per_token_layer
    a = create_allocator(
        "vmem",
        spec,
        device="cuda",
        driver=drv,
        num_tokens=6 * tpp,
        max_seqs=4,
        max_seq_len=8 * tpp,
        map_ahead=False,
    )
    assert a.layer(0).k.device.type == "cuda"
    fork_free_and_reclaim(a, n)
    a.close()
