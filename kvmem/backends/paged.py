r"""The paged backend: vLLM-style paged KV with prefix caching, copy-on-write fork and swap.

Pages, the prefix cache, block tables and fork are
:class:`~kvmem.backends.blocks.BlockTableBackend`'s (see
:mod:`kvmem.backends.blocks`); the sequence bookkeeping is
:class:`~kvmem.backends.base.KVBackend`'s. This module adds swap and
keep-on-host.

Swap. ``swap_out`` copies a sequence's KV pages to a host pool laid out like
the device pool (:mod:`kvmem.swap`) and releases its device pages;
``swap_in`` takes pages again (all or nothing) and copies the KV back. The
copies run on the swap manager's worker thread (CPU) or stream (CUDA); the
handle completes in submission order. A sequence's states::

             swap_out                 free(keep_on_host=True)
    resident --------> swapped <------------------------------ resident
        ^                 |  \                                   (finished)
        +---- swap_in ----+   parked: swapped, evictable from the host
                                      pool (LRU); resume() or swap_in()

* While a copy is in flight the device pages it reads stay held (not free)
  and the sequence cannot be used; any call naming the sequence first waits
  for its copy, and ``reserve``/``can_reserve``/``swap_in`` wait for
  in-flight swap-outs when they need the pages those will free.
* A copy that fails leaves the sequence where it was (a swap-out failure
  gives the sequence its device pages back; a swap-in failure returns them
  and the sequence stays on the host); the handle re-raises the error. A
  failed ``free(keep_on_host=True)`` frees the sequence.
* Reuse across turns: after ``swap_in`` the host copy is kept (evictable),
  with the count of leading KV entries it still matches; the next
  ``swap_out`` copies only the pages from the first one not fully on the
  host. Host copies are evicted LRU, copies of resident sequences before
  parked sequences (evicting a parked sequence unregisters it).
* One allocator is driven from one thread; only the copies run elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from functools import partial

import torch

from kvmem.allocator import Capabilities, SwapHandle, check_tokens
from kvmem.backends.base import ceil_div
from kvmem.backends.blocks import BlockTableBackend
from kvmem.backends.blockstate import BlockSeq
from kvmem.errors import (
    DuplicateSequence,
    IntegrityError,
    InvalidArgument,
    OutOfHostMemory,
    OutOfKVMemory,
)
from kvmem.spec import KVSpec
from kvmem.storage import StorageLayout
from kvmem.swap import (
    COPY_MODES,
    CopyMode,
    CopyPlan,
    HostCache,
    HostPagePool,
    SwapManager,
    Tier,
    Transfer,
    page_runs,
)
from kvmem.tiers import LoadHandle, WritePolicy

__all__ = ["PagedAllocator"]


def _nothing() -> None:
    """The work of a swap of no sequences."""


class PagedAllocator(BlockTableBackend):
    """vLLM-style paged KV with prefix caching and swap.

    Options: ``num_tokens`` or ``num_bytes`` (capacity), ``page_size`` (a
    power of two, default 16), ``device``, ``storage_layout`` (``"block"``
    or ``"layer"``, see :mod:`kvmem.storage`), ``prefix_caching`` (default
    True). Swap: ``host_num_tokens`` (host pool capacity, default the device
    capacity; allocated on the first swap-out), ``swap_mode`` (``"runs"``:
    one copy per run of consecutive pages per buffer, default;
    ``"per_block"``: one copy per page per layer, the vLLM 0.x baseline),
    ``swap_reuse`` (keep host copies after swap-in for reuse, default True).
    Cache tiers below the prefix cache: ``host_cache_tokens``,
    ``disk_cache_dir`` and ``disk_cache_tokens``, ``tier_write_policy``
    (see :mod:`kvmem.backends.blocks`).
    """

    capabilities = Capabilities(prefix_caching=True, swap=True, keep_on_host=True, fork=True)

    def __init__(
        self,
        spec: KVSpec,
        *,
        num_tokens: int | None = None,
        num_bytes: int | None = None,
        page_size: int = 16,
        device: torch.device | str = "cpu",
        storage_layout: StorageLayout = "block",
        prefix_caching: bool = True,
        host_num_tokens: int | None = None,
        swap_mode: CopyMode = "runs",
        swap_reuse: bool = True,
        host_cache_tokens: int | None = None,
        disk_cache_dir: str | os.PathLike[str] | None = None,
        disk_cache_tokens: int | None = None,
        tier_write_policy: WritePolicy = "write_back",
    ) -> None:
        if swap_mode not in COPY_MODES:
            raise InvalidArgument(f"swap_mode must be one of {COPY_MODES}, got {swap_mode!r}")
        if host_num_tokens is not None and (
            isinstance(host_num_tokens, bool)
            or not isinstance(host_num_tokens, int)
            or (isinstance(page_size, int) and host_num_tokens < page_size)
        ):
            raise InvalidArgument(
                f"host_num_tokens must be an int >= page_size, got {host_num_tokens!r}"
            )
        super().__init__(
            spec,
            num_tokens=num_tokens,
            num_bytes=num_bytes,
            page_size=page_size,
            device=device,
            storage_layout=storage_layout,
            prefix_caching=prefix_caching,
            host_cache_tokens=host_cache_tokens,
            disk_cache_dir=disk_cache_dir,
            disk_cache_tokens=disk_cache_tokens,
            tier_write_policy=tier_write_policy,
        )
        self.swap_mode: CopyMode = swap_mode
        self.swap_reuse = bool(swap_reuse)
        self._host_pages = (host_num_tokens or self.num_pages * page_size) // page_size
        self._host: HostCache | None = None
        self._swapper = SwapManager(self.device)
        self._held: dict[int, int] = {}  # pages read by in-flight swap-outs: count
        self._swap_counts = {"swap_out_bytes": 0, "swap_in_bytes": 0, "swap_copies": 0}

    # ---------------------------------------------------------- base hooks
    def _sync(self) -> None:
        """Run what finished swaps left to do (finished swap-ins publish their pages)."""
        if not self._closed:
            self._swapper.reap()

    def _await_transfer(self, s: BlockSeq) -> None:
        if isinstance(s.transfer, LoadHandle):
            super()._await_transfer(s)  # a load from the cache tiers
        else:
            self._swapper.settle(s.transfer)

    def _ensure_free(self, n: int) -> bool:
        """Whether ``n`` pages are free, after waiting for in-flight swaps if that helps."""
        self._swapper.reap()
        while len(self._free) < n and (t := self._swapper.oldest()) is not None:
            self._swapper.settle(t)
        return len(self._free) >= n

    def _drop(self, seq_id: Hashable, s: BlockSeq) -> None:
        """Release the sequence's pages (full ones stay cached) and its host copy."""
        super()._drop(seq_id, s)
        if self._host is not None:
            self._host.release(seq_id)

    def _park(self, seq_id: Hashable, s: BlockSeq) -> bool:
        """Swap the finished sequence out and keep it for its next turn (see :meth:`resume`).

        Only pages not already current on the host are copied; the copy is
        kept until evicted from the host pool (LRU), which unregisters it.
        Best effort: False (the sequence is freed) if the host pool has no room.
        """
        if s.swapped:
            s.parked = True
            assert self._host is not None
            self._host.set_tier(seq_id, "parked")
            return True
        try:
            self._swap_out([seq_id], park=True)
        except OutOfHostMemory:
            return False
        return True

    def _start_swap_out(self, ids: list[Hashable]) -> SwapHandle:
        """Copy the sequences' KV to the host pool and release their device pages.

        All or nothing: raises UnknownSequence, InvalidArgument (a sequence
        already swapped out, or named twice) or OutOfHostMemory (the host
        pool cannot take them even after evicting) and changes nothing.
        Reserved slots are kept in ``seq_info().capacity`` and taken again
        by ``swap_in``. The device pages stay held until the copy is done.
        """
        if not ids:
            return self._swapper.submit(_nothing)
        return self._swap_out(ids, park=False)

    def _start_swap_in(self, ids: list[Hashable]) -> SwapHandle:
        """Take device pages for swapped-out (or parked) sequences and copy their KV back.

        All or nothing: raises UnknownSequence, InvalidArgument (a sequence
        not swapped out, or named twice) or OutOfKVMemory (not enough free
        pages for every sequence's reserved slots) and changes nothing: the
        sequences stay on the host, intact. The sequences can be used at
        once; calls that need their KV wait for the copy.
        """
        if not ids:
            return self._swapper.submit(_nothing)
        seqs = [self._get(sid) for sid in ids]
        for sid, s in zip(ids, seqs, strict=True):
            if not s.swapped:
                raise InvalidArgument(f"sequence {sid!r} is not swapped out")
        ps = self.page_size
        need = sum(ceil_div(s.reserved, ps) for s in seqs)
        if not self._ensure_free(need):
            raise OutOfKVMemory(f"swap-in needs {need} pages, {len(self._free)} free")
        host = self._host
        assert host is not None
        src: list[int] = []
        dst: list[int] = []
        done: list[tuple[Hashable, BlockSeq, bool]] = []
        for sid, s in zip(ids, seqs, strict=True):
            s.blocks = self._take(s, ceil_div(s.reserved, ps), None)
            self._set_row(s, 0)
            copy = host.get(sid)
            m = ceil_div(s.num_computed, ps)
            if m:
                assert copy is not None
                src += copy.pages[:m]
                dst += s.blocks[:m]
            host.set_tier(sid, None)
            done.append((sid, s, s.parked))
            s.swapped = s.parked = False
        t = self._submit(
            host.pool.buffers, self.pool.buffers, src, dst, partial(self._swapped_in, done)
        )
        self._swap_counts["swap_in_bytes"] += t.nbytes
        for s in seqs:
            s.transfer = t
        return t

    def resume(
        self, seq_id: Hashable, token_ids: Sequence[int], cache_salt: Hashable = None
    ) -> int:
        """Start the next turn of a sequence kept with ``free(keep_on_host=True)``.

        If ``seq_id`` is parked with the same ``cache_salt`` and
        ``token_ids`` extends its tokens, it is swapped back in (only its KV
        pages move; OutOfKVMemory if they do not fit, the sequence staying
        parked), the new tokens are appended, and its KV count is returned.
        Otherwise any parked copy is dropped and this is ``add``. Raises
        DuplicateSequence if ``seq_id`` is registered and not parked.
        """
        toks = check_tokens(token_ids)
        s = self._lookup(seq_id)
        if s is not None:
            if not s.parked:
                raise DuplicateSequence(f"sequence {seq_id!r} is already registered")
            n = len(s.tokens)
            if (
                s.root == hash(("kvmem", cache_salt))
                and toks[:n] == s.tokens
                and len(toks) > s.num_computed
            ):
                self.swap_in([seq_id])
                s.tokens.extend(toks[n:])
                return s.num_computed
            self._drop(seq_id, s)
        return self.add(seq_id, toks, cache_salt=cache_salt)

    def _host_cache(self) -> HostCache:
        if self._host is None:
            self._host = HostCache(HostPagePool(self.pool, self._host_pages), self._evicted)
        return self._host

    def _evicted(self, seq_id: Hashable, tier: Tier) -> None:
        """A host copy was evicted; a parked sequence goes with it."""
        if tier == "parked":
            s = self._seqs[seq_id]
            self._drop(seq_id, s)

    def _submit(
        self,
        src_bufs: list[torch.Tensor],
        dst_bufs: list[torch.Tensor],
        src: list[int],
        dst: list[int],
        on_done: partial[None],
    ) -> Transfer:
        plan = CopyPlan(
            src_bufs,
            dst_bufs,
            page_runs(src, dst),
            self.pool.layer_bytes,
            self.swap_mode,
            non_blocking=self.device.type == "cuda",
        )
        self._swap_counts["swap_copies"] += plan.num_copies
        return self._swapper.submit(plan.run, on_done, plan.nbytes, plan.num_copies)

    def _swap_out(self, ids: list[Hashable], park: bool) -> Transfer:
        seqs = [self._get(sid) for sid in ids]
        for sid, s in zip(ids, seqs, strict=True):
            if s.swapped:
                raise InvalidArgument(f"sequence {sid!r} is already swapped out")
        ps = self.page_size
        host = self._host_cache()
        sizes = {sid: ceil_div(s.num_computed, ps) for sid, s in zip(ids, seqs, strict=True)}
        before = {sid: (len(c.pages), c.valid) for sid in ids if (c := host.get(sid)) is not None}
        host.ensure(sizes)  # the one step that can fail: nothing changed before it
        src: list[int] = []
        dst: list[int] = []
        done: list[tuple[Hashable, BlockSeq, list[int], tuple[int, int] | None, int]] = []
        for sid, s in zip(ids, seqs, strict=True):
            copy = host.get(sid)
            assert copy is not None
            n = sizes[sid]
            first = copy.valid // ps if self.swap_reuse else 0
            src += s.blocks[first:n]
            dst += copy.pages[first:n]
            host.set_tier(sid, None)
            for b in s.blocks:
                self._held[b] = self._held.get(b, 0) + 1
            done.append((sid, s, s.blocks, before.get(sid), first))
            self._table[s.row, : len(s.blocks)] = 0
            s.blocks = []
            s.swapped, s.parked = True, park
            self._free.forget(s)
        t = self._submit(
            self.pool.buffers, host.pool.buffers, src, dst, partial(self._swapped_out, done)
        )
        self._swap_counts["swap_out_bytes"] += t.nbytes
        for s in seqs:
            s.transfer = t
        return t

    def _unhold(self, blocks: list[int]) -> None:
        for b in blocks:
            self._held[b] -= 1
            if not self._held[b]:
                del self._held[b]

    def _swapped_out(
        self,
        done: list[tuple[Hashable, BlockSeq, list[int], tuple[int, int] | None, int]],
        err: BaseException | None,
    ) -> None:
        host = self._host
        assert host is not None
        for sid, s, blocks, before, first in done:
            s.transfer = None
            self._unhold(blocks)
            if err is None:
                copy = host.get(sid)
                assert copy is not None
                copy.valid = s.num_computed
                for b in reversed(blocks):
                    self._release(b)
                host.set_tier(sid, "parked" if s.parked else None)
            elif s.parked:  # a finished sequence whose copy failed: free it
                s.blocks = blocks
                self._drop(sid, s)
            else:  # back where it was; host pages from ``first`` on may be half written
                if before is None:
                    host.release(sid)
                else:
                    host.truncate(sid, before[0], first * self.page_size)
                    host.set_tier(sid, "resident")
                s.blocks = blocks
                s.swapped = False
                self._set_row(s, 0)

    def _swapped_in(
        self, done: list[tuple[Hashable, BlockSeq, bool]], err: BaseException | None
    ) -> None:
        host = self._host
        assert host is not None
        for sid, s, parked in done:
            s.transfer = None
            if err is None:
                if self.prefix_caching:
                    for i in range(s.num_computed // self.page_size):
                        self._publish(s.blocks[i], self._key_of(s, i))
                if self.swap_reuse:
                    host.set_tier(sid, "resident")
                else:
                    host.release(sid)
            else:
                for b in reversed(s.blocks):
                    self._release(b)
                self._table[s.row, : len(s.blocks)] = 0
                s.blocks = []
                s.swapped, s.parked = True, parked
                self._free.forget(s)
                host.set_tier(sid, "parked" if parked else None)

    # ----------------------------------------------------------- figures, checks
    def _stats_extra(self) -> dict[str, float]:
        """The host pool (``host_capacity_tokens``, ``host_used_tokens``), ``parked_seqs``,
        ``swaps_in_flight`` and cumulative ``swap_out_bytes``, ``swap_in_bytes``,
        ``swap_copies``. Pages read by an in-flight swap-out count as used until it is done.
        """
        ps = self.page_size
        host = self._host
        return {
            "host_capacity_tokens": float(self._host_pages * ps),
            "host_used_tokens": float(host.used_pages() * ps if host else 0),
            "parked_seqs": float(sum(s.parked for s in self._seqs.values())),
            "swaps_in_flight": float(self._swapper.pending),
            **{k: float(v) for k, v in self._swap_counts.items()},
            **super()._stats_extra(),
        }

    def _pinned(self) -> Mapping[int, int]:
        return self._held

    def _check_backend(self) -> None:
        """Verify the pages, the cache index, the block tables and the host pool."""
        super()._check_backend()
        if self._host is not None:
            self._check_host()

    def _check_swapped(self, sid: Hashable, s: BlockSeq) -> None:
        host = self._host
        copy = host.get(sid) if host is not None else None
        if s.blocks:
            raise IntegrityError(f"{sid!r}: swapped out but holds device pages")
        if not 0 <= s.num_computed <= s.reserved:
            raise IntegrityError(f"{sid!r}: counts out of order")
        if copy is None or len(copy.pages) < ceil_div(s.num_computed, self.page_size):
            raise IntegrityError(f"{sid!r}: swapped out without its KV on the host")
        if s.transfer is None and copy.valid < s.num_computed:
            raise IntegrityError(
                f"{sid!r}: host copy holds {copy.valid} of {s.num_computed} entries"
            )

    def _check_host(self) -> None:
        host = self._host
        assert host is not None
        host.check()
        for sid, copy in host.copies.items():
            s = self._seqs.get(sid)
            if s is None:
                raise IntegrityError(f"host copy of unknown sequence {sid!r}")
            if copy.valid > s.num_computed:
                raise IntegrityError(f"{sid!r}: host copy claims more KV than the sequence has")
            want: Tier | None = "parked" if s.parked else None if s.swapped else "resident"
            if s.transfer is not None:
                want = None  # pinned while copying
            if host.tier(sid) != want:
                raise IntegrityError(f"{sid!r}: host copy in tier {host.tier(sid)}, not {want}")

    def _shutdown(self) -> None:
        """Wait for swaps in flight, then drop the page pool and the host pool."""
        self._swapper.close()
        super()._shutdown()
        self._host = None
