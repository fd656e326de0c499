"""The paged and vmem backends with small host and disk tiers, for the conformance suite.

Their tiers are a few pages each, so that pages really go down and come back:
``paged-tiered`` writes through (every filled page goes down to host memory
and disk), ``vmem-tiered`` writes back (a page goes down when it loses its
last slot). Every check of the suite (KV values after each step, prefix hits
holding the KV of their tokens, ``check_integrity`` of the tiers, no page
leaked) runs with the tiers working underneath, and :class:`TierAudit`
checks that every page loaded from a tier holds the bytes it had when it was
written down.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from kvmem.allocator import register_backend
from kvmem.backends.paged import PagedAllocator
from kvmem.backends.vmem import VMemAllocator
from kvmem.spec import KVSpec
from kvmem.tiers import BlockKey, LoadHandle, TierManager, block_hash

#: One directory for every test allocator's disk tier (each makes its own subdirectory).
DISK_DIR = tempfile.mkdtemp(prefix="kvmem-test-tiers-")
atexit.register(shutil.rmtree, DISK_DIR, ignore_errors=True)


class TierAudit:
    """Watches a tier manager: each page's bytes when written down, and what loads bring back.

    ``mismatches`` lists pages loaded with bytes other than those written;
    ``loaded`` counts pages loaded and checked (``total_loaded`` over every
    audit, so a test can assert that loads happened at all).
    """

    total_loaded: ClassVar[int] = 0

    def __init__(self, tiers: TierManager) -> None:
        self.tiers = tiers
        self.written: dict[BlockKey, torch.Tensor] = {}
        self.mismatches: list[str] = []
        self.loaded = 0
        evicted, filled, finish = tiers.evicted, tiers.filled, tiers._finish

        def on_evicted(pairs: Sequence[tuple[BlockKey, int]]) -> None:
            self._record(pairs)
            evicted(pairs)

        def on_filled(pairs: Sequence[tuple[BlockKey, int]]) -> None:
            self._record(pairs)
            filled(pairs)

        def on_finish(h: LoadHandle) -> None:
            finish(h)
            self._check(h)

        tiers.evicted = on_evicted  # type: ignore[method-assign]
        tiers.filled = on_filled  # type: ignore[method-assign]
        tiers._finish = on_finish  # type: ignore[method-assign]

    def _page(self, page: int) -> torch.Tensor:
        return torch.cat([b[page].to("cpu", copy=True) for b in self.tiers.pool.buffers])

    def _record(self, pairs: Sequence[tuple[BlockKey, int]]) -> None:
        for key, page in pairs:
            self.written[key] = self._page(page)

    def _check(self, h: LoadHandle) -> None:
        n = h.result()
        for key, page in zip(h.keys[:n], h.pages[:n], strict=True):
            want = self.written.get(key)
            if want is None or not torch.equal(self._page(page), want):
                self.mismatches.append(f"page {block_hash(key):#x} came back changed")
            else:
                self.loaded += 1
                TierAudit.total_loaded += 1


@register_backend("paged-tiered")
class TieredPaged(PagedAllocator):
    """``paged`` with a 16-token host tier and a 32-token disk tier, written through."""

    def __init__(self, spec: KVSpec, **options: Any) -> None:
        options.setdefault("host_cache_tokens", 16)
        options.setdefault("disk_cache_dir", DISK_DIR)
        options.setdefault("disk_cache_tokens", 32)
        options.setdefault("tier_write_policy", "write_through")
        super().__init__(spec, **options)
        self.tier_audit = None if self._tiers is None else TierAudit(self._tiers)


@register_backend("vmem-tiered")
class TieredVMem(VMemAllocator):
    """``vmem`` (the suite's options) with a 4-page host tier and an 8-page disk tier (16 and
    32 tokens with the suite's spec), written back; no tiers where a token's bytes do not
    divide the page (no prefix caching then)."""

    def __init__(self, spec: KVSpec, **options: Any) -> None:
        for k, v in {"page_bytes": 4096, "max_seqs": 64, "max_seq_len": 16384}.items():
            options.setdefault(k, v)
        options.setdefault("map_ahead", False)
        page_tokens, rest = divmod(options["page_bytes"], spec.bytes_per_token_layer)
        if not rest and options.get("prefix_caching", True):
            options.setdefault("host_cache_tokens", 4 * page_tokens)
            options.setdefault("disk_cache_dir", DISK_DIR)
            options.setdefault("disk_cache_tokens", 8 * page_tokens)
            options.setdefault("tier_write_policy", "write_back")
        super().__init__(spec, **options)
        self.tier_audit = None if self._tiers is None else TierAudit(self._tiers)
