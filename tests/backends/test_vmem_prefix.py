"""Prefix caching of the vmem backend: full physical pages shared by mapping them again."""

from __future__ import annotations

from collections.abc import Hashable

import pytest

from kvmem import KVAllocator
from tests.conformance.kvmodel import check_kv, fill
from tests.conftest import make_allocator, small_spec


def _alloc(num_tokens: int = 96, **opts: object) -> KVAllocator:
    return make_allocator("vmem", small_spec(), num_tokens, **opts)


def _serve(a: KVAllocator, sid: Hashable, toks: list[int], kv: dict, salt: Hashable = None) -> int:
    """Add ``sid``, check the cached KV is these tokens', compute the rest; the hit."""
    kv[sid] = toks
    cached = a.add(sid, toks, cache_salt=salt)
    assert a.seq_info(sid).num_computed == cached
    fill(a, sid, kv, len(toks) - cached)  # checks the cached KV first, token by token
    return cached


def _page(a: KVAllocator) -> int:
    return a.granularity


def test_capability_and_page_size() -> None:
    with _alloc() as a:
        assert a.capabilities.prefix_caching
        assert _page(a) == 4  # 4 KiB pages of 1 KiB tokens
    with _alloc(prefix_caching=False) as a:
        assert not a.capabilities.prefix_caching
        assert a.add("s", list(range(20))) == 0


def test_a_live_sequence_shares_its_full_pages() -> None:
    with _alloc() as a:
        kv: dict = {}
        g = _page(a)
        prompt = list(range(100, 100 + 3 * g + 2))
        assert _serve(a, "a", prompt, kv) == 0
        used = a.stats().used_tokens
        assert _serve(a, "b", prompt + [7, 8], kv) == 3 * g
        st = a.stats()
        assert st.extra["shared_pages"] == 3 * a.spec.num_layers
        assert st.used_tokens - used < len(prompt)  # b's prefix took no new pages
        assert st.prefix_hits == 3 * g
        a.check_integrity()
        a.free("a")
        a.reserve("b", len(kv["b"]) + 1)
        check_kv(a, a.layout([("b", 1)]), 0, kv["b"])  # b keeps the shared pages
        a.free("b")
        a.check_integrity()


def test_a_freed_sequence_pages_stay_findable_until_reused() -> None:
    with _alloc() as a:
        kv: dict = {}
        g = _page(a)
        prompt = list(range(3 * g + 1))
        _serve(a, "a", prompt, kv)
        a.free("a")
        assert a.stats().cached_tokens == 3 * g
        assert _serve(a, "b", prompt, kv) == 3 * g  # the freed slot, taken whole
        assert a.stats().cached_tokens == 0
        a.free("b")
        # other sequences take every slot and page: the cached pages are gone
        for i in range(6):
            _serve(a, ("x", i), [1000 * (i + 1) + j for j in range(4 * g - 1)], kv)
        for i in range(6):
            a.free(("x", i))
        a.check_integrity()
        assert _serve(a, "c", prompt, kv) == 0
        a.check_integrity()


def test_salts_and_the_last_page_are_never_shared() -> None:
    with _alloc() as a:
        kv: dict = {}
        g = _page(a)
        prompt = list(range(2 * g))  # two full pages; the last token's page is never shared
        assert _serve(a, "a", prompt, kv, salt="t1") == 0
        assert _serve(a, "b", prompt, kv, salt="t2") == 0
        assert _serve(a, "c", prompt, kv, salt="t1") == g
        a.check_integrity()


def test_a_forked_hit_and_its_parent_write_their_own_pages() -> None:
    with _alloc() as a:
        kv: dict = {}
        g = _page(a)
        prompt = list(range(50, 50 + 2 * g + 3))
        _serve(a, "a", prompt, kv)
        assert _serve(a, "b", prompt, kv) == 2 * g
        a.fork("b", "c")
        kv["c"] = list(kv["b"])
        for sid, extra in (("b", [1, 2, 3]), ("c", [4, 5, 6]), ("a", [7, 8, 9])):
            kv[sid] = kv[sid] + extra
            a.append(sid, extra)
            fill(a, sid, kv, 3)
        for sid in ("a", "b", "c"):
            a.reserve(sid, a.seq_info(sid).num_computed + 1)
            check_kv(a, a.layout([(sid, 1)]), 0, kv[sid])
        a.check_integrity()


@pytest.mark.parametrize("n_before", [0, 1])
def test_no_hit_when_no_slot_is_free(n_before: int) -> None:
    with _alloc(num_tokens=256, max_seqs=2 + n_before) as a:
        kv: dict = {}
        g = _page(a)
        prompt = list(range(2 * g + 1))
        _serve(a, "a", prompt, kv)
        for i in range(1 + n_before):
            _serve(a, ("o", i), [900 + i], kv)
        assert a.add("b", prompt) == 0  # the prefix is live, but no slot is free to map it
        a.check_integrity()


def test_kv_events_follow_the_findable_pages() -> None:
    from kvmem.tiers import MEDIUMS, KVEventIndex

    with _alloc() as a:
        index = KVEventIndex()
        a.kv_events.subscribe(index.apply)  # type: ignore[attr-defined]
        kv: dict = {}
        g = _page(a)
        prompt = list(range(3 * g + 1))
        _serve(a, "a", prompt, kv)
        px = a._prefix  # type: ignore[attr-defined]
        want = {hash(k) for k in px.chain(px.root(None), prompt, 3)}
        assert index.snapshot()[MEDIUMS["device"]] == want
        _serve(a, "b", prompt, kv)  # shared: nothing new is stored
        assert index.snapshot()[MEDIUMS["device"]] == want
        a.free("a")
        a.free("b")
        for i in range(6):  # every slot and page taken by others: the pages are gone
            _serve(a, ("x", i), [1000 * (i + 1) + j for j in range(4 * g - 1)], kv)
        assert not index.snapshot()[MEDIUMS["device"]] & want
