"""Host and disk cache tiers under the paged and grouped backends."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvmem import InvalidArgument, KVAllocator, KVSpec
from kvmem.tiers import MEDIUMS, KVEventIndex, block_hash
from tests.conformance.kvmodel import write_step
from tests.conftest import make_allocator

PS = 4
SPEC = KVSpec(2, 2, 8, dtype=torch.float32)
BACKENDS = ["paged", "grouped"]


def make(kind: str, tmp_path: Path, **opts: Any) -> KVAllocator:
    return make_allocator(kind, SPEC, 8 * PS, **opts)


def serve(alloc: KVAllocator, sid: Hashable, toks: list[int], kv: dict, salt: Any = None) -> int:
    """Add, then compute what the cache did not hold (checking the KV it did), and free."""
    hit = alloc.add(sid, toks, cache_salt=salt)
    kv[sid] = toks
    done = alloc.seq_info(sid).num_computed  # waits for loads; a failed one shrinks the hit
    assert done <= hit
    alloc.reserve(sid, len(toks) - done)
    write_step(alloc, [(sid, len(toks) - done)], kv)  # checks the cached KV against the tokens
    alloc.check_integrity()
    alloc.free(sid)
    return done


def churn(alloc: KVAllocator, kv: dict, tag: int) -> None:
    """Fill the device with other KV so every cached page is evicted."""
    serve(alloc, ("churn", tag), [10_000 * tag + i for i in range(8 * PS - 1)], kv)


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_evicted_prefixes_come_back_from_a_tier(kind: str, tier: str, tmp_path: Path) -> None:
    opts = (
        {"host_cache_tokens": 16 * PS}
        if tier == "host"
        else {"disk_cache_dir": tmp_path, "disk_cache_tokens": 16 * PS}
    )
    alloc = make(kind, tmp_path, **opts)
    kv: dict = {}
    prompt = list(range(3 * PS + 1))
    assert serve(alloc, "a", prompt, kv) == 0
    churn(alloc, kv, 1)
    st = alloc.stats()
    assert st.cached_tokens <= 8 * PS and st.extra[f"tier_{tier}_used_bytes"] > 0
    assert serve(alloc, "b", prompt + [99], kv) == 3 * PS  # KV checked token by token
    st = alloc.stats()
    assert st.extra[f"tier_{tier}_hit_pages"] == 3
    assert st.extra[f"tier_bytes_{tier}_to_device"] == 3 * alloc.pool.page_bytes
    assert serve(alloc, "c", prompt, kv) == 3 * PS  # now from the device again
    assert alloc.stats().extra[f"tier_{tier}_hit_pages"] == 3
    alloc.close()


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_corrupt_disk_page_costs_recomputation_only(kind: str, tmp_path: Path) -> None:
    alloc = make(kind, tmp_path, disk_cache_dir=tmp_path, disk_cache_tokens=16 * PS)
    kv: dict = {}
    prompt = list(range(3 * PS + 1))
    serve(alloc, "a", prompt, kv)
    churn(alloc, kv, 1)
    tier = alloc._tiers.disk  # type: ignore[attr-defined]
    tier.flush()
    second = tier.get(next(k for k in tier.lru_keys() if k[1] == tuple(prompt[PS : 2 * PS])))
    tier.file(second).write_bytes(b"not a page")
    hit = alloc.add("b", prompt, cache_salt=None)
    assert hit == 3 * PS  # what the tiers claimed
    kv["b"] = prompt
    assert alloc.seq_info("b").num_computed == PS  # what loaded intact
    alloc.reserve("b", len(prompt) - PS)
    write_step(alloc, [("b", len(prompt) - PS)], kv)
    alloc.check_integrity()
    assert alloc.stats().extra["tier_corrupt_pages"] == 1
    alloc.free("b")
    alloc.close()


@pytest.mark.parametrize("kind", BACKENDS)
def test_salted_prefixes_never_meet_in_a_tier(kind: str, tmp_path: Path) -> None:
    alloc = make(kind, tmp_path, host_cache_tokens=16 * PS)
    kv: dict = {}
    prompt = list(range(3 * PS + 1))
    serve(alloc, "a", prompt, kv, salt="alice")
    churn(alloc, kv, 1)
    assert serve(alloc, "b", prompt, kv, salt="bob") == 0
    assert serve(alloc, "c", prompt, kv, salt="alice") == 3 * PS
    alloc.close()


def test_write_through_stores_pages_as_they_fill(tmp_path: Path) -> None:
    alloc = make("paged", tmp_path, host_cache_tokens=16 * PS, tier_write_policy="write_through")
    kv: dict = {}
    serve(alloc, "a", list(range(3 * PS + 1)), kv)
    st = alloc.stats().extra
    assert st["tier_host_used_bytes"] == 3 * alloc.pool.page_bytes
    assert st["tier_bytes_device_to_host"] == 3 * alloc.pool.page_bytes
    alloc.close()


def test_bad_tier_options_are_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        make("paged", tmp_path, host_cache_tokens=1)
    with pytest.raises(InvalidArgument):
        make("paged", tmp_path, disk_cache_dir=tmp_path / "missing", disk_cache_tokens=64)
    with pytest.raises(InvalidArgument):
        make("paged", tmp_path, disk_cache_dir=tmp_path)
    with pytest.raises(InvalidArgument):
        make("paged", tmp_path, host_cache_tokens=64, prefix_caching=False)


@pytest.mark.parametrize("kind", BACKENDS)
def test_the_event_stream_rebuilds_every_medium(kind: str, tmp_path: Path) -> None:
    alloc = make(
        kind, tmp_path, host_cache_tokens=4 * PS, disk_cache_dir=tmp_path, disk_cache_tokens=8 * PS
    )
    index = KVEventIndex()
    alloc.kv_events.subscribe(index.apply)  # type: ignore[attr-defined]
    kv: dict = {}
    for i in range(12):
        conv = i % 4
        serve(alloc, (i, "x"), [conv * 1000 + t for t in range((1 + i // 4) * PS + 1)], kv)
    want = alloc._tiers.block_hashes()  # type: ignore[attr-defined]
    want[MEDIUMS["device"]] = {block_hash(k) for k in alloc._key if k is not None}  # type: ignore[attr-defined]
    assert index.snapshot() == {m: h for m, h in want.items() if h}
    assert set(index.snapshot()) == {"GPU", "CPU", "DISK"}
    alloc.close()
