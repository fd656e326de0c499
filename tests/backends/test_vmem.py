"""The vmem backend: physical memory follows tokens, views, errors, map-ahead, close."""

from __future__ import annotations

import gc
import math
import mmap
import os
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvmem import (
    DriverError,
    InvalidArgument,
    KVError,
    KVSpec,
    OutOfKVMemory,
    create_allocator,
)
from kvmem.attention import reference
from kvmem.backends.vmem import VMemAllocator
from kvmem.backends.vmem.host import HostDriver
from kvmem.layout import build_layout
from tests.conformance.kvmodel import token_values

KIB = 1024
SPEC = KVSpec(2, 2, 8, dtype=torch.float32)  # 128 bytes per token per layer
TB = SPEC.bytes_per_token_layer


def vmem(spec: KVSpec = SPEC, **opts) -> VMemAllocator:
    opts = {
        "num_tokens": 4096,
        "max_seqs": 8,
        "max_seq_len": 4096,
        "page_bytes": 4 * KIB,
        "map_ahead": False,
        **opts,
    }
    a = create_allocator("vmem", spec, device="cpu", **opts)
    assert isinstance(a, VMemAllocator)
    return a


def write_step(a: VMemAllocator, batch, tokens) -> None:
    """Lay out ``batch``, check each sequence's KV so far, write the new KV, commit.

    The KV model of the conformance suite (K row = the token's marker + layer,
    V row = its negation), built on the allocator's device.
    """
    lay = a.layout(batch)
    spec = a.spec
    rows = []
    for b, (sid, n) in enumerate(batch):
        done = int(lay.seq_lens[b]) - n
        check_kv(a, lay, b, tokens[sid][:done])
        rows += token_values(tokens[sid])[done : done + n]
    vals = torch.tensor(rows, dtype=torch.float32, device=a.device)[:, None, None]
    k = vals.expand(-1, spec.num_kv_heads, spec.head_dim)
    for i in range(spec.num_layers):
        reference.write_kv(a.layer(i), lay, k + i, -k - i)
    for sid, n in batch:
        a.commit(sid, n)


def check_kv(a: VMemAllocator, lay, b: int, toks) -> None:
    """Assert that sequence ``b`` of ``lay`` holds the KV of ``toks`` in every layer."""
    if not toks:
        return
    pages = lay.kv_indices[int(lay.kv_indptr[b]) : int(lay.kv_indptr[b + 1])]
    expect = torch.tensor(token_values(toks), dtype=torch.float64, device=a.device)
    for i in range(a.spec.num_layers):
        k, v = reference.gather_kv(a.layer(i), pages, len(toks), torch.float64)
        assert torch.equal(k[:, 0, 0], expect + i), f"layer {i} K of {lay.seq_ids[b]!r} is wrong"
        assert torch.equal(v[:, -1, -1], -expect - i), f"layer {i} V of {lay.seq_ids[b]!r} is wrong"


def snapshot(a):
    return a.stats(), {s: a.seq_info(s) for s in a.seq_ids()}


def memfd_bytes(a: VMemAllocator) -> int:
    return os.fstat(a.driver.fd).st_blocks * 512


def mapped_ranges() -> list[tuple[int, int]]:
    with open("/proc/self/maps") as f:
        return [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f]


def assert_kv(a: VMemAllocator, sid, toks) -> None:
    """The sequence's written KV is that of ``toks`` (read through a one-page layout)."""
    assert a.seq_info(sid).num_computed == len(toks)
    lay = build_layout(
        a.page_size,
        np.array([[a.slot(sid)]]),
        np.array([len(toks)]),
        np.array([1]),
        (sid,),
        a.device,
        a.spec,
    )
    check_kv(a, lay, 0, toks)


def decode_steps(a, tokens, sids, steps, start=100):
    for step in range(steps):
        for sid in sids:
            tokens[sid].append(start + step)
            a.append(sid, [start + step])
            a.reserve(sid, 1)
        write_step(a, [(sid, 1) for sid in sids], tokens)


# ------------------------------------------------------------ physical memory


def test_physical_memory_follows_tokens_not_reservations():
    pb = 64 * KIB
    a = vmem(num_tokens=64 * 4096, max_seqs=64, max_seq_len=1 << 20, page_bytes=pb)
    ex = a.stats().extra
    assert ex["virtual_bytes_reserved"] >= 64 * (1 << 20) * SPEC.bytes_per_token
    assert memfd_bytes(a) == 0 and ex["physical_bytes_mapped"] == 0
    for i in range(64):
        a.add(i, [1] * 10)
        a.reserve(i, 10)
    ex = a.stats().extra
    one = SPEC.num_layers * pb  # one page per layer for each sequence
    assert ex["physical_bytes_mapped"] == 64 * one == memfd_bytes(a)
    assert ex["physical_bytes_mapped"] < 1e-3 * ex["virtual_bytes_reserved"]

    # growing one sequence by three pages' worth of tokens maps exactly three pages per layer
    tpp = pb // TB
    before, calls = memfd_bytes(a), ex["map_calls"]
    a.append(0, [2] * (3 * tpp))
    a.reserve(0, 10 + 3 * tpp)
    grown = memfd_bytes(a) - before
    assert grown == 3 * one and grown % pb == 0
    assert a.stats().extra["map_calls"] == calls + 3 * SPEC.num_layers

    # freeing it and starting a sequence of the same length reuses the slot: no map call
    slot, calls, backed = a.slot(0), a.stats().extra["map_calls"], memfd_bytes(a)
    a.free(0)
    a.add("again", [3] * (10 + 3 * tpp))
    a.reserve("again", 10 + 3 * tpp)
    ex = a.stats().extra
    assert a.slot("again") == slot
    assert ex["map_calls"] == calls and ex["unmap_calls"] == 0 and memfd_bytes(a) == backed
    a.check_integrity()
    a.close()


def test_pages_are_unmapped_only_when_another_slot_needs_them():
    tpp = 4 * KIB // TB  # 32 tokens per page
    a = vmem(num_tokens=10 * tpp, max_seqs=4)
    for sid, n in (("s", 1 * tpp), ("m", 4 * tpp), ("l", 5 * tpp)):
        a.add(sid, [1] * n)
        a.reserve(sid, n)
    for sid in "sml":
        a.free(sid)
    ex = a.stats().extra
    assert ex["unmap_calls"] == 0 and ex["idle_mapped_bytes"] == ex["physical_bytes_mapped"] > 0
    assert a.stats().used_tokens == 0 and a.stats().free_tokens == a.stats().capacity_tokens

    # best fit: a 3-page prompt takes the 4-page slot, which maps nothing new
    a.add("x", [1] * (3 * tpp))
    a.reserve("x", 3 * tpp)
    assert a.stats().extra["map_calls"] == 10 * SPEC.num_layers
    assert a.space.covered[a.slot("x")] == 4 * tpp

    # a 6-page prompt: the largest free slot (5 pages), plus one page taken from the 1-page slot
    a.add("y", [1] * (6 * tpp))
    a.reserve("y", 6 * tpp)
    ex = a.stats().extra
    assert ex["unmap_calls"] == SPEC.num_layers and ex["map_calls"] == 11 * SPEC.num_layers
    a.check_integrity()
    a.close()


# ------------------------------------------------------------------ views


def test_sdpa_over_the_contiguous_view_matches_dense_attention():
    spec = KVSpec(1, 2, 16, dtype=torch.float32)
    a = vmem(spec, num_tokens=2048, max_seq_len=1024)
    lens = {"a": 37, "b": 300}
    g = torch.Generator().manual_seed(0)
    for sid, n in lens.items():
        a.add(sid, list(range(n)))
        a.reserve(sid, n)
    lay = a.layout(list(lens.items()))
    k = torch.randn(sum(lens.values()), 2, 16, generator=g)
    v = torch.randn(sum(lens.values()), 2, 16, generator=g)
    reference.write_kv(a.layer(0), lay, k, v)
    for sid, n in lens.items():
        a.commit(sid, n)
    ks, vs = k.split(list(lens.values())), v.split(list(lens.values()))
    for b, (sid, n) in enumerate(lens.items()):
        kk, vv = a.kv_view(sid, 0)
        assert kk.shape == (n, 2, 16) and kk.data_ptr() == a.layer(0).k[a.slot(sid)].data_ptr()
        q = torch.randn(1, 2, 3, 16, generator=g)
        out = F.scaled_dot_product_attention(q, kk.transpose(0, 1)[None], vv.transpose(0, 1)[None])
        s = torch.einsum("hqd,khd->hqk", q[0].double(), ks[b].double()) / math.sqrt(16)
        want = torch.einsum("hqk,khd->hqd", s.softmax(-1), vs[b].double())
        assert torch.allclose(out[0].double(), want, atol=1e-5, rtol=0)

        # and the paged kernels read the same KV through the layout
        a.append(sid, [0])
        a.reserve(sid, 1)
        one = a.layout([(sid, 1)])
        k1, v1 = torch.randn(1, 2, 16, generator=g), torch.randn(1, 2, 16, generator=g)
        reference.write_kv(a.layer(0), one, k1, v1)
        dec, _ = reference.decode(q[0, :, :1].transpose(0, 1), a.layer(0), one)
        kk, vv = a.kv_view(sid, 0, n + 1)
        sd = F.scaled_dot_product_attention(
            q[:, :, :1], kk.transpose(0, 1)[None], vv.transpose(0, 1)[None]
        )
        assert torch.allclose(dec, sd[0].transpose(0, 1), atol=1e-5, rtol=0)
    with pytest.raises(InvalidArgument):
        a.kv_view("a", 0, 10_000)
    a.close()


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e5m2", "int4"])
def test_layer_views_do_not_overlap(fmt):
    spec = KVSpec(2, 2, 8, dtype=torch.float32, kv_format=fmt)
    a = vmem(spec, num_tokens=256)
    a.add("s", [1] * 40)
    a.reserve("s", 40)
    slot = a.slot("s")
    names = [
        n
        for n in ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")
        if getattr(a.layer(0), n) is not None and getattr(a.layer(0), n).dim() == 4
    ]
    for li in range(2):
        lay = a.layer(li)
        assert lay.k.shape == (8, a.max_seq_len, 2, spec.code_dim)
        assert lay.page_size == a.max_seq_len
        for i, n in enumerate(names):
            getattr(lay, n)[slot, :40].view(torch.uint8).fill_(16 * li + i + 1)
    for li in range(2):
        for i, n in enumerate(names):
            got = getattr(a.layer(li), n)[slot, :40].view(torch.uint8)
            assert bool((got == 16 * li + i + 1).all()), f"{n} of layer {li} was overwritten"
    a.close()


# ------------------------------------------------------------- copy on write


def test_fork_shares_pages_and_copies_the_page_written_next():
    tpp = 4 * KIB // TB
    a = vmem()
    tokens = {"p": list(range(1, tpp + 11))}
    a.add("p", tokens["p"])
    a.reserve("p", tpp + 10)
    write_step(a, [("p", tpp + 10)], tokens)
    mapped = a.stats().extra["physical_bytes_mapped"]
    a.fork("p", "c")
    tokens["c"] = list(tokens["p"])
    ex = a.stats().extra
    assert ex["physical_bytes_mapped"] == mapped and ex["shared_pages"] == 2 * SPEC.num_layers
    assert a.stats().used_tokens == 2 * tpp  # shared pages count once
    decode_steps(a, tokens, ["c"], 3)  # the child copies its partial page, not the full one
    assert a.stats().extra["shared_pages"] == SPEC.num_layers
    decode_steps(a, tokens, ["p"], 5, start=200)
    assert_kv(a, "p", tokens["p"])
    assert_kv(a, "c", tokens["c"])
    a.free("p")
    a.check_integrity()
    assert_kv(a, "c", tokens["c"])
    a.free("c")
    assert a.stats().used_tokens == 0
    a.close()


def test_parent_writing_reserved_room_after_a_fork_leaves_the_child_intact():
    a = vmem()
    tokens = {"p": [1, 2, 3, 4, 5, 6, 7, 8]}
    a.add("p", tokens["p"][:4])
    a.reserve("p", 8)  # room for 8, only 4 written before the fork
    write_step(a, [("p", 4)], tokens)
    a.fork("p", "c")
    tokens["c"] = tokens["p"][:4]
    a.append("p", tokens["p"][4:])
    write_step(a, [("p", 4)], tokens)  # no reserve needed: written into the shared page
    a.check_integrity()
    assert_kv(a, "c", tokens["c"])
    a.append("c", [9])
    tokens["c"].append(9)
    a.reserve("c", 1)  # the child copies the page before writing
    write_step(a, [("c", 1)], tokens)
    assert_kv(a, "p", tokens["p"])
    assert_kv(a, "c", tokens["c"])
    a.close()


# -------------------------------------------------------------- bad input


def test_a_sequence_longer_than_the_maximum_is_refused():
    a = vmem(max_seq_len=100)
    assert a.max_seq_len >= 100 and a.max_seq_len * TB % (4 * KIB) == 0
    with pytest.raises(InvalidArgument, match="max_seq_len"):
        a.add("x", [1] * (a.max_seq_len + 1))
    a.add("s", [1] * 10)
    a.reserve("s", 10)
    before = snapshot(a)
    with pytest.raises(InvalidArgument, match="max_seq_len"):
        a.reserve("s", a.max_seq_len + 1)
    with pytest.raises(InvalidArgument, match="max_seq_len"):
        a.append("s", [1] * a.max_seq_len)
    assert not a.can_reserve({"s": a.max_seq_len + 1})
    assert snapshot(a) == before and "x" not in a
    a.close()


@pytest.mark.parametrize("pb", [6000, mmap.PAGESIZE + 512, 0, -4096, 1.5])
def test_page_size_must_be_a_multiple_of_the_system_page(pb):
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(InvalidArgument, match="page_bytes"):
        vmem(page_bytes=pb)
    assert len(os.listdir("/proc/self/fd")) == fds  # the driver's memfd was closed


def test_exhausted_pool_and_slots_raise_out_of_memory_and_change_nothing():
    tpp = 4 * KIB // TB
    a = vmem(num_tokens=4 * tpp, max_seqs=2)
    a.add("a", [1] * 100)
    a.reserve("a", 100)  # 4 pages: the whole pool
    a.add("b", [1])
    before = snapshot(a)
    with pytest.raises(OutOfKVMemory):
        a.reserve("b", 1)
    assert snapshot(a) == before and not a.can_reserve({"b": 1})
    a.check_integrity()
    a.free("a")
    a.reserve("b", 1)
    a.add("c", [1])
    a.reserve("c", 1)
    a.add("d", [1])
    before = snapshot(a)
    with pytest.raises(OutOfKVMemory, match="slot"):
        a.reserve("d", 1)  # both slots in use
    assert snapshot(a) == before and not a.can_reserve({"d": 1})
    a.close()


class FlakyDriver(HostDriver):
    """A host driver whose n-th page map runs with a bad file descriptor."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.calls = 0

    def map_many(self, pages, size):
        for i, page in enumerate(pages):
            self.calls += 1
            fd = self.fd
            if self.calls == self.fail_at:
                self.fd = 10_000 + os.getpid() % 1000
            try:
                done, err = super().map_many([page], size)
            finally:
                self.fd = fd
            if err is not None:
                return i, err
        return len(pages), None


@pytest.mark.parametrize("fail_at", [3, 4, 6])
def test_driver_failure_surfaces_as_driver_error_and_changes_nothing(fail_at):
    tpp = 4 * KIB // TB
    a = vmem(driver=FlakyDriver(fail_at), num_tokens=16 * tpp)
    a.add("s", [1] * 10)
    a.reserve("s", 10)  # maps calls 1 and 2 (one page, two layers)
    before = snapshot(a)[1], a.stats().used_tokens
    with pytest.raises(DriverError, match="Bad file descriptor"):
        a.reserve("s", 3 * tpp)
    assert (snapshot(a)[1], a.stats().used_tokens) == before
    a.check_integrity()
    a.reserve("s", 3 * tpp)  # the driver works again
    assert a.seq_info("s").capacity == 3 * tpp
    a.check_integrity()
    a.close()


def test_a_failed_construction_reports_the_os_error_and_leaks_nothing():
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(DriverError, match="Cannot allocate memory"):
        vmem(max_seq_len=1 << 45, max_seqs=1 << 10)  # far beyond the address space
    assert len(os.listdir("/proc/self/fd")) == fds


# ------------------------------------------------------------- map ahead


class RecordingDriver(HostDriver):
    """A host driver that notes which thread made each map call."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def map_many(self, pages, size):
        self.threads += [threading.current_thread().name] * len(pages)
        return super().map_many(pages, size)


def test_map_ahead_moves_driver_calls_off_the_decode_step():
    drv = RecordingDriver()
    a = vmem(driver=drv, map_ahead=True)
    tokens = {s: [1] * 20 for s in "abcd"}
    for sid in tokens:
        a.add(sid, tokens[sid])
        a.reserve(sid, 20)
    write_step(a, [(sid, 20) for sid in tokens], tokens)
    assert a.wait_map_ahead(10)
    caller = threading.current_thread().name
    prefill_maps = drv.threads.count(caller)
    for step in range(80):
        decode_steps(a, tokens, list(tokens), 1, start=step)
        assert a.wait_map_ahead(10)  # the worker runs while "the GPU computes"
        a.check_integrity()
    assert drv.threads.count(caller) == prefill_maps  # no map call on the caller's thread
    assert a.stats().extra["map_ahead_groups"] >= 4 * 3
    a.close()


def test_map_ahead_is_safe_without_waiting_and_under_memory_pressure():
    tpp = 4 * KIB // TB
    a = vmem(num_tokens=12 * tpp, max_seqs=6, map_ahead=True, map_ahead_tokens=2 * tpp)
    tokens = {s: [1] * 5 for s in "abc"}
    for sid in tokens:
        a.add(sid, tokens[sid])
        a.reserve(sid, 5)
    write_step(a, [(sid, 5) for sid in tokens], tokens)
    a.wait_map_ahead(10)
    assert a.stats().extra["map_ahead_groups"] > 0
    for step in range(2 * tpp):  # every reserve races the worker
        decode_steps(a, tokens, list(tokens), 1, start=step)
        if step % 16 == 0:
            a.check_integrity()
    # the worker has mapped pool pages ahead of these three; a new sequence still gets them
    a.wait_map_ahead(10)
    st = a.stats()
    assert st.extra["idle_mapped_bytes"] > 0 and st.extra["physical_bytes_mapped"] > st.used_bytes
    a.add("d", [1] * st.free_tokens)
    a.reserve("d", st.free_tokens)
    assert a.stats().free_tokens == 0
    a.check_integrity()
    for sid in tokens:
        assert_kv(a, sid, tokens[sid])
    a.close()


def test_a_driver_failure_in_the_worker_leaves_the_caller_to_map():
    drv = FlakyDriver(fail_at=3)  # calls 1-2: the prefill page; 3: the worker's first map
    a = vmem(driver=drv, map_ahead=True)
    tokens = {"s": [1] * 20}
    a.add("s", tokens["s"])
    a.reserve("s", 20)
    write_step(a, [("s", 20)], tokens)
    assert a.wait_map_ahead(10)
    assert a.stats().extra["map_ahead_errors"] == 1 and drv.calls >= 3
    decode_steps(a, tokens, ["s"], 40)  # crosses into pages the worker failed to map
    a.check_integrity()
    assert_kv(a, "s", tokens["s"])
    a.close()


# ------------------------------------------------------------------ close


def test_close_releases_every_mapping_range_and_the_memfd():
    a = vmem(map_ahead=True)
    tokens = {"s": [1] * 50}
    a.add("s", tokens["s"])
    a.reserve("s", 50)
    write_step(a, [("s", 50)], tokens)
    a.wait_map_ahead(10)
    fd, base, size = a.driver.fd, a.space.base, a.space.virtual_bytes
    worker = a._mapper._worker
    assert worker is not None and worker.running
    assert any(lo <= base < hi for lo, hi in mapped_ranges())
    a.close()
    assert not any(lo < base + size and base < hi for lo, hi in mapped_ranges())
    with pytest.raises(OSError):
        os.fstat(fd)
    assert not worker.running
    with pytest.raises(KVError):
        a.stats()
    with pytest.raises(KVError):
        a.layer(0)
    a.close()  # idempotent


def test_an_allocator_dropped_without_close_is_released():
    a = vmem(map_ahead=True)
    a.add("s", [1] * 40)
    a.reserve("s", 40)
    fd, base = a.driver.fd, a.space.base
    del a
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert not any(lo <= base < hi for lo, hi in mapped_ranges())


def test_meta_device_keeps_the_books_without_memory():
    spec = KVSpec(32, 8, 128, dtype=torch.float16)  # Llama-3-8B
    a = create_allocator(
        "vmem",
        spec,
        num_bytes=64 << 30,
        device="meta",
        max_seqs=256,
        max_seq_len=8192,
        page_bytes=2 << 20,
        map_ahead=False,
    )
    a.add("s", [1] * 1500)
    a.reserve("s", 1500)
    ex = a.stats().extra
    assert a.layer(0).k.device.type == "meta" and a.layer(0).k.shape == (256, 8192, 8, 128)
    assert ex["physical_bytes_held"] == 3 * 32 * (2 << 20)  # 1500 tokens: 3 pages of 512
    a.check_integrity()
    a.close()


# -------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_driver_maps_and_unmaps_device_pages():
    pytest.importorskip("cuda")
    from kvmem.backends.vmem.cuda import CudaDriver

    drv = CudaDriver("cuda")
    g = drv.granularity
    base = drv.reserve(4 * g)
    whole = drv.tensor(base, 4 * g)  # over reserved, unmapped addresses: no pointer query
    assert whole.device == drv.device and whole.data_ptr() == base
    page = drv.create(g)
    drv.map(base + g, g, page)
    t = drv.tensor(base + g, g)
    t.fill_(7)
    assert int(t.sum()) == 7 * g and drv.allocated_bytes() == g
    assert int(whole[g : g + 16].sum()) == 7 * 16  # the earlier view sees the page mapped later
    drv.synchronize()
    drv.unmap(base + g, g)
    drv.map(base, g, page)  # the same physical page at another address keeps its bytes
    assert int(drv.tensor(base, g)[:16].sum()) == 7 * 16
    drv.synchronize()
    drv.unmap(base, g)
    del t, whole
    drv.release(page)
    drv.free_range(base, 4 * g)
    drv.close()


@pytest.mark.gpu
def test_vmem_on_cuda_decodes_and_serves_sdpa():
    pytest.importorskip("cuda")
    spec = KVSpec(2, 2, 64, dtype=torch.float16)
    a = create_allocator(
        "vmem",
        spec,
        num_tokens=1 << 16,
        device="cuda",
        max_seqs=8,
        max_seq_len=8192,
        map_ahead=True,
    )
    tokens = {"a": [1] * 700, "b": [2] * 50}
    for sid in tokens:
        a.add(sid, tokens[sid])
        a.reserve(sid, len(tokens[sid]))
    write_step(a, [(sid, len(tokens[sid])) for sid in tokens], tokens)
    decode_steps(a, tokens, list(tokens), 40)
    a.check_integrity()
    k, v = a.kv_view("a", 0)
    q = torch.randn(1, 2, 1, 64, device="cuda", dtype=torch.float16)
    out = F.scaled_dot_product_attention(q, k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    assert torch.isfinite(out).all()
    a.close()


def test_random_operations_with_the_worker_running_keep_kv_and_books_right():
    rng = np.random.default_rng(7)
    tpp = 4 * KIB // TB
    a = vmem(num_tokens=14 * tpp, max_seqs=6, map_ahead=True, map_ahead_tokens=tpp)
    tokens: dict[int, list[int]] = {}
    next_id = 0
    for step in range(400):
        op = rng.choice(["add", "decode", "decode", "decode", "prefill", "fork", "free"])
        live = list(tokens)
        if op == "add" or not live:
            next_id += 1
            tokens[next_id] = [int(t) for t in rng.integers(0, 50, rng.integers(1, 40))]
            a.add(next_id, tokens[next_id])
            continue
        sid = live[rng.integers(len(live))]
        info = a.seq_info(sid)
        if op == "free":
            a.free(sid)
            del tokens[sid]
        elif op == "fork":
            try:
                a.fork(sid, next_id + 1)
            except OutOfKVMemory:
                continue  # no free slot
            next_id += 1
            tokens[next_id] = list(tokens[sid])
        else:
            if info.num_tokens == info.num_computed:
                a.append(sid, [step % 50])
                tokens[sid].append(step % 50)
            n = 1 if op == "decode" else len(tokens[sid]) - info.num_computed
            try:
                a.reserve(sid, n)
            except OutOfKVMemory:
                continue
            write_step(a, [(sid, n)], tokens)
        if step % 25 == 0:
            a.check_integrity()
    a.check_integrity()
    for sid in list(tokens):
        if a.seq_info(sid).num_computed:
            assert_kv(a, sid, tokens[sid][: a.seq_info(sid).num_computed])
        a.free(sid)
    assert a.stats().used_tokens == 0
    a.close()
