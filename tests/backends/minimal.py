"""A minimal backend on :class:`~kvmem.backends.base.KVBackend`: a dict of free pages.

No prefix cache, no swap; ``fork`` copies the parent's pages. It exists to
show that a backend written on the base class needs only its memory hooks,
and the conformance suite runs on it (registered as ``"minimal"``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from itertools import islice

import torch

from kvmem.allocator import Capabilities, KVStats, capacity_pages, register_backend
from kvmem.backends.base import KVBackend, SeqState, ceil_div
from kvmem.errors import IntegrityError, OutOfKVMemory
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV, PagePool


class PagesSeq(SeqState):
    """A sequence and the pages it holds, in order."""

    __slots__ = ("pages",)

    def __init__(self, tokens: list[int]) -> None:
        super().__init__(tokens)
        self.pages: list[int] = []


@register_backend("minimal")
class MinimalAllocator(KVBackend[PagesSeq]):
    """Pages of ``page_size`` slots handed out from a dict of free pages."""

    capabilities = Capabilities(fork=True)

    def __init__(
        self,
        spec: KVSpec,
        *,
        num_tokens: int | None = None,
        num_bytes: int | None = None,
        page_size: int = 4,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.spec, self.page_size, self.granularity = spec, page_size, page_size
        self.device = torch.device(device)
        self.num_pages = capacity_pages(spec, page_size, num_tokens, num_bytes)
        self.pool = PagePool(spec, self.num_pages, page_size, self.device, "block")
        self.free_pages = dict.fromkeys(range(self.num_pages))

    def _new_pages(self, s: PagesSeq, target: int) -> int:
        return max(0, ceil_div(target, self.page_size) - len(s.pages))

    def _take(self, seq_id: Hashable, n: int) -> list[int]:
        if n > len(self.free_pages):
            raise OutOfKVMemory(f"{seq_id!r} needs {n} pages, {len(self.free_pages)} free")
        pages = list(islice(self.free_pages, n))
        for p in pages:
            del self.free_pages[p]
        return pages

    def _admit(self, seq_id: Hashable, tokens: list[int], cache_salt: Hashable) -> PagesSeq:
        return PagesSeq(tokens)

    def _grow(self, seq_id: Hashable, s: PagesSeq, target: int) -> None:
        s.pages += self._take(seq_id, self._new_pages(s, target))
        s.reserved = target

    def _can_grow(self, grow: list[tuple[PagesSeq, int]]) -> bool:
        return sum(self._new_pages(s, t) for s, t in grow) <= len(self.free_pages)

    def _pages(self, s: PagesSeq) -> Sequence[int]:
        return s.pages

    def _fork(self, parent_id: Hashable, p: PagesSeq, child_id: Hashable) -> PagesSeq:
        n = ceil_div(p.num_computed, self.page_size)
        c = PagesSeq(list(p.tokens))
        c.pages = self._take(child_id, n)
        self.pool.copy_pages(p.pages[:n], c.pages)
        c.num_computed = c.reserved = p.num_computed
        return c

    def _drop(self, seq_id: Hashable, s: PagesSeq) -> None:
        del self._seqs[seq_id]
        self.free_pages.update(dict.fromkeys(s.pages))

    def _layer(self, i: int) -> LayerKV:
        return self.pool.layer(i)

    def stats(self) -> KVStats:
        """Memory use in token slots."""
        ps, seqs = self.page_size, self._seqs.values()
        return KVStats(
            page_size=ps,
            bytes_per_token=self.spec.bytes_per_token,
            capacity_tokens=self.num_pages * ps,
            used_tokens=(self.num_pages - len(self.free_pages)) * ps,
            filled_tokens=sum(s.num_computed for s in seqs),
            reserved_tokens=sum(s.reserved - s.num_computed for s in seqs),
            cached_tokens=0,
            free_tokens=len(self.free_pages) * ps,
            swapped_tokens=0,
            num_seqs=len(self._seqs),
            num_swapped_seqs=0,
        )

    def _check_backend(self) -> None:
        held = [p for s in self._seqs.values() for p in s.pages]
        if len(set(held)) != len(held) or not self.free_pages.keys().isdisjoint(held):
            raise IntegrityError("a page is held twice, or held and free")
        if len(held) + len(self.free_pages) != self.num_pages:
            raise IntegrityError("pages leaked")
        for sid, s in self._seqs.items():
            if len(s.pages) != ceil_div(s.reserved, self.page_size):
                raise IntegrityError(f"{sid!r}: {len(s.pages)} pages for {s.reserved} slots")

    def _shutdown(self) -> None:
        self.pool.buffers.clear()
