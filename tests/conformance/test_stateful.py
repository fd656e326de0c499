"""Random add/append/reserve/commit/fork/free/swap sequences on every in-process backend.

After every step ``check_integrity`` must hold; every step that writes KV
first checks that the sequence's existing KV is intact (see kvmodel); a
failed reserve must change nothing; and when all sequences are freed no page
is left in use. On backends that swap, sequences are swapped out and back in
(several at a time, waiting on or polling the handle): every byte of their
KV and scales must come back (digests), a swap-in without room must raise
OutOfKVMemory and change nothing, and a swapped sequence holds no KV slots.

Prompts come back: ``readd`` adds the tokens of a freed sequence again and
``pressure`` fills the pool with a throwaway sequence, so cached pages are
evicted and found again. On the backends with cache tiers (tests/backends/
tiered.py) that makes pages go down to a tier and come back: after every
step no page loaded from a tier may differ from the bytes it had when it was
written down (:class:`~tests.backends.tiered.TierAudit`), and
``check_integrity`` checks every tier; the test fails if no page ever came
back from a tier.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from kvmem import IntegrityError, InvalidArgument, KVAllocator, OutOfKVMemory, SwapHandle
from tests.backends.tiered import TierAudit
from tests.conformance.conftest import TIERED
from tests.conformance.kvmodel import check_kv, kv_digest, snapshot, write_step
from tests.conftest import make_allocator, small_spec

PREFIXES = [[7] * 9, [3, 1, 4, 1, 5, 9, 2, 6]]  # shared prompt heads, to hit the prefix cache
CAPACITY = 48  # tokens: 12 pages of 4 (paged, grouped, vmem page groups, minimal)


def supports_swap(alloc: KVAllocator) -> bool:
    """Whether the backend declares swap (the others refuse swap calls with InvalidArgument)."""
    return alloc.capabilities.swap


def finish(handle: SwapHandle, how: str) -> None:
    """Wait for a swap, blocking or by polling ``done()``."""
    if how == "poll":
        deadline = time.monotonic() + 10
        while not handle.done():
            assert time.monotonic() < deadline, "swap did not finish"
            time.sleep(1e-4)
        handle.wait(timeout=0)
    else:
        handle.wait(timeout=10)


def machine_for(kind: str) -> type[RuleBasedStateMachine]:
    class AllocatorMachine(RuleBasedStateMachine):
        seqs = Bundle("seqs")

        def __init__(self) -> None:
            super().__init__()
            self.alloc = make_allocator(kind, small_spec(), CAPACITY)
            self.tokens: dict[int, list[int]] = {}
            self.next_id = 0
            self.swaps = supports_swap(self.alloc)
            self.on_host: dict[int, tuple[str, int]] = {}  # swapped out: (KV digest, num_computed)
            self.freed: list[list[int]] = []  # prompts of freed sequences, to add again
            self.audit: TierAudit | None = getattr(self.alloc, "tier_audit", None)

        def _new_id(self) -> int:
            self.next_id += 1
            return self.next_id

        @rule(
            target=seqs,
            prefix=st.sampled_from([0, 1, None]),
            tail=st.lists(st.integers(0, 5), min_size=1, max_size=12),
        )
        def add(self, prefix, tail):
            return self._add((PREFIXES[prefix] if prefix is not None else []) + tail)

        @rule(
            target=seqs,
            data=st.data(),
            evict=st.booleans(),
            extra=st.lists(st.integers(0, 5), max_size=2),
        )
        def readd(self, data, evict, extra):
            """A freed sequence's tokens again (a later turn when ``extra``): its pages come
            back from the device cache or, after ``evict`` (:meth:`pressure`), from a tier."""
            if not self.freed:
                return multiple()
            if evict:
                self.pressure()
            return self._add(data.draw(st.sampled_from(self.freed[-3:])) + extra)

        @rule()
        def pressure(self):
            """Room for a throwaway prompt, as much as the pool has: evicts cached pages.

            Its KV is never written, so it caches nothing itself (nor fills the tiers).
            """
            sid = self._new_id()
            n = CAPACITY
            self.alloc.add(sid, [100 + sid * CAPACITY + i for i in range(n)])
            while n > 0 and not self.alloc.can_reserve({sid: n}):
                n -= 1
            if n:
                self.alloc.reserve(sid, n)
            self.alloc.free(sid)

        def _add(self, toks):
            sid = self._new_id()
            loaded = TierAudit.total_loaded
            cached = self.alloc.add(sid, toks)
            assert 0 <= cached < len(toks)
            self.tokens[sid] = toks
            assert self.alloc.seq_info(sid).num_computed == cached  # every tier load succeeds
            event("prefix cache hit" if cached else "prefix cache miss")
            if TierAudit.total_loaded > loaded:
                event("pages loaded from a tier")
            if cached and self.alloc.can_reserve({sid: 1}):
                # cached KV must be the KV of these very tokens
                self.alloc.reserve(sid, 1)
                check_kv(self.alloc, self.alloc.layout([(sid, 1)]), 0, toks[:cached])
            return sid

        @rule(sid=seqs, toks=st.lists(st.integers(0, 5), min_size=1, max_size=3))
        def append(self, sid, toks):
            if sid in self.on_host:  # allowed, or refused without a change
                before = snapshot(self.alloc)
                try:
                    self.alloc.append(sid, toks)
                except InvalidArgument:
                    assert snapshot(self.alloc) == before
                    return
            else:
                self.alloc.append(sid, toks)
            self.tokens[sid] += toks

        @rule(sid=seqs, n=st.integers(1, 24))
        def reserve(self, sid, n):
            if sid in self.on_host:
                return
            fits = self.alloc.can_reserve({sid: n})
            before = snapshot(self.alloc)
            try:
                self.alloc.reserve(sid, n)
            except OutOfKVMemory:
                event("reserve: out of memory")
                assert not fits
                assert snapshot(self.alloc) == before
            else:
                assert fits
                info = self.alloc.seq_info(sid)
                assert info.capacity >= info.num_computed + n

        @rule(sid=seqs, tok=st.integers(0, 5))
        def decode(self, sid, tok):
            """An engine's decode step: the sampled token, one slot, its KV."""
            info = self.alloc.seq_info(sid)
            if info.swapped:
                return
            if info.num_tokens == info.num_computed:
                self.alloc.append(sid, [tok])
                self.tokens[sid].append(tok)
            try:
                self.alloc.reserve(sid, 1)
            except OutOfKVMemory:
                event("decode: out of memory")
                return
            write_step(self.alloc, [(sid, 1)], self.tokens)

        @rule(data=st.data())
        def step(self, data):
            ready = []
            for sid in self.tokens:
                info = self.alloc.seq_info(sid)
                room = min(info.capacity, info.num_tokens) - info.num_computed
                if room > 0 and not info.swapped:
                    ready.append((sid, room))
            if not ready:
                return
            picked = data.draw(
                st.lists(st.sampled_from(ready), min_size=1, unique_by=lambda r: r[0])
            )
            batch = [(sid, data.draw(st.integers(1, room))) for sid, room in picked]
            write_step(self.alloc, batch, self.tokens)

        @rule(target=seqs, parent=seqs)
        def fork(self, parent):
            if self.alloc.seq_info(parent).swapped:
                return multiple()  # nothing new (returning the parent would list it twice)
            child = self._new_id()
            before = snapshot(self.alloc)
            try:  # a backend may need memory to fork (a slot, copied pages)
                self.alloc.fork(parent, child)
            except OutOfKVMemory:
                event("fork: out of memory")
                assert snapshot(self.alloc) == before
                return multiple()
            self.tokens[child] = list(self.tokens[parent])
            return child

        @rule(
            sids=st.lists(seqs, min_size=1, max_size=3, unique=True),
            how=st.sampled_from(["wait", "poll"]),
        )
        def swap_out(self, sids, how):
            sids = [s for s in sids if s not in self.on_host]
            if not self.swaps or not sids:
                return
            digests = {}
            for sid in sids:
                try:  # room for one more entry, to lay the sequence out and read its KV
                    self.alloc.reserve(sid, 1)
                except OutOfKVMemory:
                    return
                n = self.alloc.seq_info(sid).num_computed
                digests[sid] = (kv_digest(self.alloc, self.alloc.layout([(sid, 1)]), 0, n), n)
            before = snapshot(self.alloc)
            try:
                handle = self.alloc.swap_out(sids)
            except OutOfKVMemory:  # the host pool is full: nothing moved
                event("swap_out: host pool full")
                assert snapshot(self.alloc) == before
                return
            finish(handle, how)
            event(f"swap_out of {len(sids)}")
            self.on_host.update(digests)
            for sid in sids:
                info = self.alloc.seq_info(sid)
                assert info.swapped and info.num_computed == digests[sid][1]
            st_ = self.alloc.stats()
            assert st_.num_swapped_seqs == len(self.on_host)
            assert st_.swapped_tokens == sum(n for _, n in self.on_host.values())

        @rule(data=st.data(), how=st.sampled_from(["wait", "poll"]))
        def swap_in(self, data, how):
            if not self.on_host:
                return
            sids = data.draw(
                st.lists(st.sampled_from(sorted(self.on_host)), min_size=1, max_size=3, unique=True)
            )
            before = snapshot(self.alloc)
            try:
                handle = self.alloc.swap_in(sids)
            except OutOfKVMemory:
                event("swap_in: out of memory")
                assert snapshot(self.alloc) == before
                assert all(self.alloc.seq_info(s).swapped for s in sids)
                return
            finish(handle, how)
            event(f"swap_in of {len(sids)}")
            for sid in sids:
                digest, n = self.on_host.pop(sid)
                info = self.alloc.seq_info(sid)
                assert not info.swapped and info.num_computed == n
                assert info.capacity >= n + 1, "swap_in must restore the reservation"
                lay = self.alloc.layout([(sid, 1)])
                assert kv_digest(self.alloc, lay, 0, n) == digest, f"KV of {sid} changed"
                check_kv(self.alloc, lay, 0, self.tokens[sid][:n])

        @rule(sid=consumes(seqs), finish=st.booleans())
        def free(self, sid, finish):
            """Free a sequence, after computing the rest of its tokens if ``finish`` (and it fits),
            so that its pages are cached for :meth:`readd`."""
            info = self.alloc.seq_info(sid)
            n = info.num_tokens - info.num_computed
            if finish and n > 0 and not info.swapped and self.alloc.can_reserve({sid: n}):
                self.alloc.reserve(sid, n)
                write_step(self.alloc, [(sid, n)], self.tokens)
            self.alloc.free(sid)
            self.freed.append(self.tokens.pop(sid))
            self.on_host.pop(sid, None)

        @invariant()
        def integrity(self):
            self.alloc.check_integrity()  # the tiers' too
            if self.audit is not None:
                assert not self.audit.mismatches, self.audit.mismatches
            st_ = self.alloc.stats()
            assert st_.used_tokens + st_.free_tokens == st_.capacity_tokens
            assert 0 <= st_.filled_tokens <= st_.used_tokens

        def teardown(self):
            for sid in list(self.tokens):
                self.alloc.free(sid)
            self.alloc.check_integrity()
            assert self.alloc.stats().used_tokens == 0, "pages leaked after freeing everything"
            assert self.alloc.stats().swapped_tokens == 0, "host KV leaked after freeing everything"
            self.alloc.close()

    AllocatorMachine.__name__ = f"AllocatorMachine_{kind}"
    return AllocatorMachine


def test_random_operation_sequences(backend):
    loaded = TierAudit.total_loaded
    run_state_machine_as_test(
        machine_for(backend),
        settings=settings(
            max_examples=150,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    if backend in TIERED:
        assert TierAudit.total_loaded > loaded, "no page ever came back from a tier"


def test_machine_finds_a_planted_leak():
    """The machine is able to fail: a backend that forgets to release pages is caught."""
    from kvmem.backends.paged import PagedAllocator

    class Leaky(PagedAllocator):
        def _drop(self, seq_id, s):
            del self._seqs[seq_id]
            self._free_rows.append(s.row)  # pages never released
            if self._host is not None:
                self._host.release(seq_id)  # only the pages leak

    import kvmem.allocator as reg

    reg.register_backend("leaky-test")(Leaky)
    try:
        with pytest.raises(IntegrityError, match="reference counts"):
            run_state_machine_as_test(
                machine_for("leaky-test"),
                settings=settings(
                    max_examples=30,
                    stateful_step_count=30,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                    database=None,
                    phases=[Phase.generate],
                ),
            )
    finally:
        del reg._REGISTERED["leaky-test"]
