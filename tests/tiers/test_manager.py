"""The tier manager: LRU and capacity per tier, write policies, round trips, failures."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from kvmem import IntegrityError, InvalidArgument, KVError, PagePool
from kvmem.tiers import DiskTier, TierManager
from tests.tiers.util import chain, make_pool, page, randomize


def disk_files(m: TierManager) -> list[Path]:
    assert m.disk is not None
    m.disk.flush()
    return sorted(m.disk.path.glob("*.kvp"))


def test_host_tier_is_an_lru_of_its_capacity(tmp_path: Path) -> None:
    pool = make_pool()
    keys = chain(6)
    with TierManager(pool, host_bytes=3 * pool.page_bytes + 7) as m:
        assert m.host is not None and m.host.capacity_pages == 3
        m.evicted([(k, i % 8) for i, k in enumerate(keys[:3])])
        m.load(keys[:1], [5]).result()  # touch keys[0]: keys[1] is now the oldest
        m.evicted([(keys[3], 3)])
        assert m.host.lru_keys() == [keys[2], keys[0], keys[3]]
        m.evicted([(k, i) for i, k in enumerate(keys[4:6])])
        assert m.host.lru_keys() == [keys[3], keys[4], keys[5]]
        st = m.stats()
        assert st["host_evictions"] == 3
        assert st["host_used_bytes"] == 3 * pool.page_bytes
        assert m.match(keys) == []  # keys[0] is gone, so the chain misses from its start
        assert m.match(keys[3:]) == ["host"] * 3
        m.check_integrity()


def test_disk_tier_is_an_lru_of_its_capacity(tmp_path: Path) -> None:
    pool = make_pool()
    keys = chain(5)
    with TierManager(pool, disk_dir=tmp_path, disk_bytes=2 * pool.page_bytes) as m:
        m.evicted([(k, i) for i, k in enumerate(keys[:2])])
        m.load(keys[:1], [6]).result()
        m.evicted([(keys[2], 2)])
        assert m.disk is not None and m.disk.lru_keys() == [keys[0], keys[2]]
        assert len(disk_files(m)) == 2
        assert m.stats()["disk_evictions"] == 1
        m.check_integrity()


def test_write_back_stores_on_eviction_and_cascades_to_disk(tmp_path: Path) -> None:
    pool = make_pool()
    keys = chain(4)
    with TierManager(
        pool, host_bytes=2 * pool.page_bytes, disk_dir=tmp_path, disk_bytes=8 * pool.page_bytes
    ) as m:
        m.filled([(k, i) for i, k in enumerate(keys)])
        assert m.match(keys) == [] and m.stats()["bytes_device_to_host"] == 0
        m.evicted([(k, i) for i, k in enumerate(keys)])
        assert m.match(keys) == ["disk", "disk", "host", "host"]
        st = m.stats()
        assert st["bytes_device_to_host"] == 4 * pool.page_bytes
        assert st["bytes_host_to_disk"] == 2 * pool.page_bytes
        assert st["bytes_device_to_disk"] == 0
        m.evicted([(keys[3], 3)])  # already on the host: touched, not copied again
        assert m.stats()["bytes_device_to_host"] == 4 * pool.page_bytes
        m.check_integrity()


def test_write_through_stores_on_fill_in_every_tier(tmp_path: Path) -> None:
    pool = make_pool()
    keys = chain(3)
    with TierManager(
        pool,
        host_bytes=8 * pool.page_bytes,
        disk_dir=tmp_path,
        disk_bytes=8 * pool.page_bytes,
        write_policy="write_through",
    ) as m:
        m.filled([(k, i) for i, k in enumerate(keys)])
        assert m.host is not None and m.disk is not None
        assert set(m.host.lru_keys()) == set(keys) == set(m.disk.lru_keys())
        assert len(disk_files(m)) == 3
        before = m.stats()
        m.evicted([(k, i) for i, k in enumerate(keys)])  # nothing left to copy
        after = m.stats()
        assert after["bytes_device_to_host"] == before["bytes_device_to_host"]
        assert after["bytes_device_to_disk"] == before["bytes_device_to_disk"]
        assert after["bytes_device_to_disk"] == 3 * pool.page_bytes
        m.check_integrity()


@pytest.mark.parametrize("layout", ["block", "layer"])
@pytest.mark.parametrize("kv_format", ["auto", "fp8_e4m3", "int4"])
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_round_trips_are_byte_identical(
    tmp_path: Path, layout: str, kv_format: str, tier: str
) -> None:
    pool = make_pool(8, layout, kv_format)
    keys = chain(4)
    want = [page(pool, i) for i in range(4)]
    opts = (
        {"host_bytes": 4 * pool.page_bytes}
        if tier == "host"
        else {"disk_dir": tmp_path, "disk_bytes": 4 * pool.page_bytes}
    )
    with TierManager(pool, **opts) as m:  # type: ignore[arg-type]
        m.evicted([(k, i) for i, k in enumerate(keys)])
        randomize(pool, 1)  # the device pages are reused for other KV
        assert not torch.equal(page(pool, 4), want[0])
        h = m.load(keys, [7, 6, 5, 4])
        assert h.result() == 4
        for i, p in enumerate([7, 6, 5, 4]):
            assert torch.equal(page(pool, p), want[i])
        assert m.stats()[f"bytes_{tier}_to_device"] == 4 * pool.page_bytes
        m.check_integrity()


def test_salted_chains_never_meet(tmp_path: Path) -> None:
    pool = make_pool()
    plain, salted = chain(2, root=1), chain(2, root=2)
    assert [k[1] for k in plain] == [k[1] for k in salted]
    with TierManager(
        pool, host_bytes=4 * pool.page_bytes, disk_dir=tmp_path, disk_bytes=4 * pool.page_bytes
    ) as m:
        m.evicted([(k, i) for i, k in enumerate(plain)])
        assert m.match(salted) == []
        with pytest.raises(InvalidArgument):
            m.load(salted, [4, 5])
        assert m.match(plain) == ["host", "host"]


@pytest.mark.parametrize("bad", ["missing", "file", "proc"])
def test_a_bad_disk_directory_is_an_error_at_construction(tmp_path: Path, bad: str) -> None:
    pool = make_pool()
    if bad == "missing":
        where = tmp_path / "nope"
    elif bad == "file":
        where = tmp_path / "f"
        where.write_text("")
    else:
        where = Path("/proc")  # a directory nobody, root included, can create files in
        if not where.is_dir():
            pytest.skip("no /proc on this system")
    with pytest.raises(InvalidArgument, match="disk cache directory"):
        TierManager(pool, disk_dir=where, disk_bytes=4 * pool.page_bytes)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_disk_directory_is_an_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(InvalidArgument, match="not writable"):
        TierManager(make_pool(), disk_dir=ro, disk_bytes=1 << 20)


def test_bad_options_are_errors() -> None:
    pool = make_pool()
    with pytest.raises(InvalidArgument):
        TierManager(pool, host_bytes=pool.page_bytes - 1)
    with pytest.raises(InvalidArgument):
        TierManager(pool, disk_bytes=1 << 20)
    with pytest.raises(InvalidArgument):
        TierManager(pool, host_bytes=1 << 20, write_policy="sometimes")  # type: ignore[arg-type]


def test_a_full_disk_evicts_and_a_failing_disk_never_fails_a_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = make_pool()
    keys = chain(8)
    with TierManager(pool, disk_dir=tmp_path, disk_bytes=3 * pool.page_bytes) as m:
        m.evicted([(k, i) for i, k in enumerate(keys[:6])])
        assert m.disk is not None and m.disk.lru_keys() == keys[3:6]
        assert len(disk_files(m)) == 3
        monkeypatch.setattr(DiskTier, "_write", staticmethod(lambda path, blob: False))  # ENOSPC
        m.evicted([(keys[6], 6), (keys[7], 7)])
        m.disk.flush()
        assert m.match(keys[6:]) == []  # the failed writes are dropped, not served
        assert m.stats()["write_failures"] == 2
        assert m.disk.lru_keys() == [keys[5]]
        m.check_integrity()


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap", "delete"])
def test_a_corrupt_page_file_is_a_miss(tmp_path: Path, damage: str) -> None:
    pool = make_pool()
    keys = chain(3)
    want = [page(pool, i) for i in range(3)]
    with TierManager(pool, disk_dir=tmp_path, disk_bytes=4 * pool.page_bytes) as m:
        m.evicted([(k, i) for i, k in enumerate(keys)])
        files = disk_files(m)
        assert len(files) == 3
        target = files[1]  # the second page of the chain
        data = bytearray(target.read_bytes())
        if damage == "flip":
            data[-5] ^= 0x40
            target.write_bytes(bytes(data))
        elif damage == "truncate":
            target.write_bytes(bytes(data[:-1]))
        elif damage == "swap":
            target.write_bytes(files[2].read_bytes())  # a whole, valid file of another page
        else:
            target.unlink()
        randomize(pool, 3)
        h = m.load(keys, [4, 5, 6])
        assert h.result() == 1  # the hit ends before the corrupt page
        assert torch.equal(page(pool, 4), want[0])
        assert m.match(keys) == ["disk"]  # the corrupt page was dropped
        st = m.stats()
        assert st["corrupt_pages"] == 1 and st["load_failed_pages"] == 2
        m.check_integrity()


def test_a_failed_load_costs_recomputation_only(tmp_path: Path) -> None:
    pool = make_pool()
    keys = chain(2)
    with TierManager(pool, disk_dir=tmp_path, disk_bytes=4 * pool.page_bytes) as m:
        m.evicted([(k, i) for i, k in enumerate(keys)])
        disk_files(m)[0].write_bytes(b"garbage")
        assert m.load(keys, [4, 5]).result() == 0
        # the engine recomputes the page's KV and the cache takes it again
        randomize(pool, 9)
        want = page(pool, 4)
        m.evicted([(keys[0], 4)])
        assert m.match(keys) == ["disk", "disk"]
        randomize(pool, 10)
        assert m.load(keys[:1], [2]).result() == 1
        assert torch.equal(page(pool, 2), want)
        m.check_integrity()


def test_a_failed_host_copy_is_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmem.swap import CopyPlan

    pool = make_pool()
    keys = chain(2)
    with TierManager(pool, host_bytes=4 * pool.page_bytes) as m:
        m.evicted([(k, i) for i, k in enumerate(keys)])

        def broken(self: CopyPlan) -> None:
            raise RuntimeError("copy engine fault")

        monkeypatch.setattr(CopyPlan, "run", broken)
        assert m.load(keys, [4, 5]).result() == 0
        monkeypatch.undo()
        assert m.load(keys, [4, 5]).result() == 2  # the host pages themselves are fine
        m.check_integrity()


def test_pages_being_loaded_are_not_evicted() -> None:
    pool = make_pool()
    keys = chain(4)
    with TierManager(pool, host_bytes=2 * pool.page_bytes) as m:
        m.evicted([(k, i) for i, k in enumerate(keys[:2])])
        gate = threading.Event()
        m.swapper.submit(lambda: None if gate.wait(10) else None)  # holds the copy worker
        h = m.load(keys[:2], [4, 5])
        m.check_integrity()  # two pins, matching the load in flight
        m.evicted([(keys[2], 2)])  # no victim: every host page is being read
        assert m.stats()["store_skipped"] == 1
        assert m.match(keys[:2]) == ["host", "host"]
        assert not h.done()
        with pytest.raises(TimeoutError):
            h.wait(0.05)
        gate.set()
        h.wait(10)
        assert h.done() and h.result() == 2 and m.stats()["load_waits"] == 2
        m.evicted([(keys[3], 3)])
        assert m.host is not None
        assert m.host.lru_keys() == [keys[1], keys[3]]  # keys[0] was the least recently used
        m.check_integrity()


def test_a_load_of_a_key_in_no_tier_changes_nothing() -> None:
    pool = make_pool()
    keys = chain(3)
    with TierManager(pool, host_bytes=4 * pool.page_bytes) as m:
        m.evicted([(keys[0], 0)])
        with pytest.raises(InvalidArgument):
            m.load(keys, [4, 5, 6])
        with pytest.raises(InvalidArgument):
            m.load(keys[:1], [4, 5])
        m.check_integrity()  # no pin left behind


def test_integrity_catches_stray_and_missing_files(tmp_path: Path) -> None:
    pool = make_pool()
    with TierManager(pool, disk_dir=tmp_path, disk_bytes=4 * pool.page_bytes) as m:
        m.evicted([(chain(1)[0], 0)])
        assert m.disk is not None
        (m.disk.path / "999999999999.kvp").write_bytes(b"")
        with pytest.raises(IntegrityError, match="stray"):
            m.check_integrity()
        (m.disk.path / "999999999999.kvp").unlink()
        disk_files(m)[0].unlink()
        with pytest.raises(IntegrityError, match="missing"):
            m.check_integrity()


def test_close_removes_the_tier_directory_and_clear_drops_everything(tmp_path: Path) -> None:
    pool = make_pool()
    keys = chain(3)
    m = TierManager(
        pool, host_bytes=pool.page_bytes, disk_dir=tmp_path, disk_bytes=4 * pool.page_bytes
    )
    m.evicted([(k, i) for i, k in enumerate(keys)])
    assert m.match(keys) == ["disk", "disk", "host"]
    m.clear()
    assert m.match(keys) == [] and disk_files(m) == []
    m.check_integrity()
    assert m.disk is not None
    where = m.disk.path
    m.close()
    assert not where.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(KVError):
        m.match(keys)


def test_meta_pools_keep_bookkeeping_only(tmp_path: Path) -> None:
    spec = make_pool().spec
    pool = PagePool(spec, 64, 4, "meta")
    keys = chain(10)
    with TierManager(
        pool, host_bytes=2 * pool.page_bytes, disk_dir=tmp_path, disk_bytes=4 * pool.page_bytes
    ) as m:
        m.evicted([(k, i) for i, k in enumerate(keys)])
        assert m.match(keys[4:]) == ["disk"] * 4 + ["host"] * 2
        assert m.load(keys[4:], list(range(6))).result() == 6
        assert disk_files(m) == []
        assert m.stats()["bytes_disk_to_device"] == 4 * pool.page_bytes
        m.check_integrity()
