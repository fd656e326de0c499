"""Cache tiers under the vmem backend: pages go down when evicted and come back on add."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvmem import InvalidArgument, KVAllocator, create_allocator
from kvmem.tiers import MEDIUMS, KVEventIndex, block_hash
from tests.conformance.kvmodel import write_step
from tests.conftest import small_spec
from tests.tiers.test_backend_tiers import churn, serve

G = 4  # tokens per page group: 4 KiB pages, 1 KiB per token and layer
SPEC = small_spec()
PROMPT = list(range(3 * G + 1))  # three full pages and one token


def make(**opts: Any) -> KVAllocator:
    """An 8-page vmem allocator (4 slots) with the given tier options."""
    opts.setdefault("map_ahead", False)
    return create_allocator(
        "vmem",
        SPEC,
        num_tokens=8 * G,
        device="cpu",
        page_bytes=4096,
        max_seqs=4,
        max_seq_len=64,
        **opts,
    )


def tier_opts(tier: str, tmp_path: Path, pages: int = 16) -> dict[str, Any]:
    if tier == "host":
        return {"host_cache_tokens": pages * G}
    return {"disk_cache_dir": tmp_path, "disk_cache_tokens": pages * G}


def page_bytes(alloc: KVAllocator, sid: Hashable, j: int) -> torch.Tensor:
    """A copy of page ``j`` of the sequence's row, every layer."""
    rows = alloc._tier_pages  # type: ignore[attr-defined]
    pid = rows.page(alloc.slot(sid), j)  # type: ignore[attr-defined]
    return torch.cat([b[pid].clone() for b in rows.buffers])


def compute(alloc: KVAllocator, sid: Hashable, toks: list[int], kv: dict) -> tuple[int, int]:
    """Add and compute ``toks`` (checking cached KV); return (hit claimed, hit loaded)."""
    hit = alloc.add(sid, toks)
    kv[sid] = toks
    done = alloc.seq_info(sid).num_computed
    alloc.reserve(sid, len(toks) - done)
    write_step(alloc, [(sid, len(toks) - done)], kv)
    alloc.check_integrity()
    return hit, done


@pytest.mark.parametrize("map_ahead", [False, True])
@pytest.mark.parametrize("policy", ["write_back", "write_through"])
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_evicted_pages_come_back_byte_identical(
    tier: str, policy: str, map_ahead: bool, tmp_path: Path
) -> None:
    alloc = make(tier_write_policy=policy, map_ahead=map_ahead, **tier_opts(tier, tmp_path))
    kv: dict = {}
    assert compute(alloc, "a", PROMPT, kv) == (0, 0)
    written = [page_bytes(alloc, "a", j) for j in range(3)]
    used = alloc.stats().extra[f"tier_{tier}_used_bytes"]
    assert used == (3 * 4096 * SPEC.num_layers if policy == "write_through" else 0)
    alloc.free("a")
    churn(alloc, kv, 1)  # fills the device: a's pages lose their keys
    st = alloc.stats()
    assert st.extra[f"tier_{tier}_used_bytes"] >= 3 * 4096 * SPEC.num_layers
    hit, done = compute(alloc, "b", PROMPT + [99], kv)  # KV checked token by token
    assert hit == done == 3 * G
    assert all(torch.equal(page_bytes(alloc, "b", j), written[j]) for j in range(3))
    st = alloc.stats()
    assert st.extra[f"tier_{tier}_hit_pages"] == 3
    assert st.extra[f"tier_bytes_{tier}_to_device"] == 3 * 4096 * SPEC.num_layers
    alloc.free("b")
    assert serve(alloc, "c", PROMPT, kv) == 3 * G  # from the device now
    assert alloc.stats().extra[f"tier_{tier}_hit_pages"] == 3
    alloc.close()


def test_host_then_disk_hits_in_one_add(tmp_path: Path) -> None:
    """An 8-page host tier spills to disk: the churn's seven pages push two of a's down."""
    alloc = make(host_cache_tokens=8 * G, disk_cache_dir=tmp_path, disk_cache_tokens=16 * G)
    kv: dict = {}
    serve(alloc, "a", PROMPT, kv)
    churn(alloc, kv, 1)
    assert serve(alloc, "b", PROMPT, kv) == 3 * G
    st = alloc.stats().extra
    assert (st["tier_host_hit_pages"], st["tier_disk_hit_pages"]) == (1, 2)
    assert st["tier_bytes_host_to_disk"] > 0
    alloc.close()


def test_a_corrupt_disk_page_ends_the_hit(tmp_path: Path) -> None:
    alloc = make(disk_cache_dir=tmp_path, disk_cache_tokens=16 * G)
    kv: dict = {}
    serve(alloc, "a", PROMPT, kv)
    churn(alloc, kv, 1)
    disk = alloc._tiers.disk  # type: ignore[attr-defined]
    disk.flush()
    second = disk.get(next(k for k in disk.lru_keys() if k[1] == tuple(PROMPT[G : 2 * G])))
    disk.file(second).write_bytes(b"not a page")
    hit, done = compute(alloc, "b", PROMPT, kv)  # the recomputed pages are checked too
    assert (hit, done) == (3 * G, G)
    st = alloc.stats().extra
    assert st["tier_corrupt_pages"] == 1 and st["tier_load_failed_pages"] == 2
    alloc.close()


def test_a_failed_host_load_costs_recomputation_only(tmp_path: Path) -> None:
    alloc = make(host_cache_tokens=16 * G)
    kv: dict = {}
    serve(alloc, "a", PROMPT, kv)
    churn(alloc, kv, 1)
    tiers = alloc._tiers  # type: ignore[attr-defined]
    submit = tiers.swapper.submit

    def broken(work: Any, *args: Any) -> Any:
        def fail() -> None:
            raise OSError("copy failed")

        return submit(fail, *args)

    tiers.swapper.submit = broken
    assert alloc.add("b", PROMPT) == 3 * G
    kv["b"] = PROMPT
    info = alloc.seq_info("b")
    assert info.num_computed == 0 and info.capacity >= 3 * G  # the slots stay, to compute
    alloc.reserve("b", len(PROMPT))
    write_step(alloc, [("b", len(PROMPT))], kv)
    alloc.check_integrity()
    assert alloc.stats().extra["tier_load_failed_pages"] == 3
    tiers.swapper.submit = submit
    alloc.free("b")
    assert serve(alloc, "c", PROMPT, kv) == 3 * G  # b's recomputed pages are cached again
    alloc.close()


def test_salted_prefixes_never_meet_in_a_tier() -> None:
    alloc = make(host_cache_tokens=16 * G)
    kv: dict = {}
    serve(alloc, "a", PROMPT, kv, salt="alice")
    churn(alloc, kv, 1)
    assert serve(alloc, "b", PROMPT, kv, salt="bob") == 0
    assert serve(alloc, "c", PROMPT, kv, salt="alice") == 3 * G
    alloc.close()


def test_the_event_stream_rebuilds_every_medium(tmp_path: Path) -> None:
    alloc = make(host_cache_tokens=4 * G, disk_cache_dir=tmp_path, disk_cache_tokens=8 * G)
    index = KVEventIndex()
    alloc.kv_events.subscribe(index.apply)  # type: ignore[attr-defined]
    kv: dict = {}
    for i in range(12):
        conv = i % 4
        serve(alloc, (i, "x"), [conv * 1000 + t for t in range((1 + i // 4) * G + 1)], kv)
    want = alloc._tiers.block_hashes()  # type: ignore[attr-defined]
    device = alloc._prefix._where  # type: ignore[attr-defined]
    want[MEDIUMS["device"]] = {block_hash(k) for k in device}
    assert index.snapshot() == {m: h for m, h in want.items() if h}
    assert set(index.snapshot()) == {"GPU", "CPU", "DISK"}
    alloc.close()


def test_bad_tier_options_are_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        make(host_cache_tokens=1)
    with pytest.raises(InvalidArgument):
        make(host_cache_tokens=True)
    with pytest.raises(InvalidArgument):
        make(disk_cache_dir=tmp_path / "missing", disk_cache_tokens=16 * G)
    with pytest.raises(InvalidArgument):
        make(disk_cache_dir=tmp_path)
    with pytest.raises(InvalidArgument):
        make(host_cache_tokens=16 * G, prefix_caching=False)
    with pytest.raises(InvalidArgument):
        make(host_cache_tokens=16 * G, tier_write_policy="sometimes")
    a = make()  # defaults: no tiers
    assert not any(k.startswith("tier_") for k in a.stats().extra)
    a.close()
