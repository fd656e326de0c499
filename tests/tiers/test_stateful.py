"""Random stores, loads and file damage: a load never hands back bytes other than those stored."""

from __future__ import annotations

import shutil
import tempfile

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvmem.tiers import TierManager
from tests.tiers.util import chain, make_pool, page

KEYS = chain(10)
DEVICE_PAGES = 6


class TierMachine(RuleBasedStateMachine):
    """A tier manager under a device of six pages; each key always has the same bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = make_pool(DEVICE_PAGES)
        self.dir = tempfile.mkdtemp()
        self.content = {}
        for i, key in enumerate(KEYS):
            g = torch.Generator().manual_seed(100 + i)
            self.content[key] = torch.randint(
                0, 256, (self.pool.page_bytes,), dtype=torch.uint8, generator=g
            )
        self.m: TierManager | None = None

    @initialize(policy=st.sampled_from(["write_back", "write_through"]), host=st.integers(0, 3))
    def build(self, policy: str, host: int) -> None:
        pb = self.pool.page_bytes
        self.m = TierManager(
            self.pool,
            host_bytes=host * pb or None,
            disk_dir=self.dir,
            disk_bytes=4 * pb,
            write_policy=policy,  # type: ignore[arg-type]
        )

    def _write_device(self, key: object, p: int) -> None:
        row = self.content[key]
        off = 0
        for b in self.pool.buffers:
            n = b.shape[1]
            b[p].copy_(row[off : off + n])
            off += n

    @rule(k=st.integers(0, len(KEYS) - 1), p=st.integers(0, DEVICE_PAGES - 1))
    def store(self, k: int, p: int) -> None:
        assert self.m is not None
        key = KEYS[k]
        self._write_device(key, p)
        self.m.filled([(key, p)])
        self.m.evicted([(key, p)])
        self.pool.buffers[0][p].zero_()  # the device page is reused at once

    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        assert self.m is not None
        held = [k for t in self.m.tiers for k in t.lru_keys()]
        if not held:
            return
        keys = data.draw(st.lists(st.sampled_from(held), min_size=1, max_size=4, unique=True))
        found = self.m.match(keys)
        assert found, "a key some tier holds is found"
        pages = data.draw(st.permutations(range(DEVICE_PAGES)))[: len(found)]
        n = self.m.load(keys[: len(found)], pages).result()
        assert 0 <= n <= len(found)
        for key, p in zip(keys[:n], pages[:n], strict=True):
            assert torch.equal(page(self.pool, p), self.content[key]), "wrong bytes served"

    @rule(data=st.data(), how=st.sampled_from(["flip", "cut", "empty"]))
    def damage(self, data: st.DataObject, how: str) -> None:
        assert self.m is not None and self.m.disk is not None
        on_disk = self.m.disk.lru_keys()
        if not on_disk:
            return
        e = self.m.disk.get(data.draw(st.sampled_from(on_disk)))
        assert e is not None
        self.m.disk.flush()
        f = self.m.disk.file(e)
        raw = bytearray(f.read_bytes())
        if not raw:
            return
        if how == "flip":
            raw[len(raw) // 2] ^= 1
            f.write_bytes(bytes(raw))
        elif how == "cut":
            f.write_bytes(bytes(raw[:-3]))
        else:
            f.write_bytes(b"")

    @invariant()
    def consistent(self) -> None:
        if self.m is not None:
            self.m.check_integrity()

    def teardown(self) -> None:
        if self.m is not None:
            self.m.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TierMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_tiers_serve_only_what_was_stored = TierMachine.TestCase
