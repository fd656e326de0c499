"""The sharded backend: one sequence's KV split into rBlocks over the ranks of a process group.

Every rank of the group builds a :class:`ShardedAllocator` (collectively, in
the same order) and may own sequences; each rank also holds rBlocks for the
others. A sequence's KV is cut into rBlocks of ``rblock_size`` tokens::

    positions  0         R         2R        3R        4R
               [ rBlk 0 ][ rBlk 1 ][ rBlk 2 ][ rBlk 3 ][ rBlk 4 ] ...
    rank         0         0         0         2         2          (owner: rank 0)
                 \\___ owner's own memory ___/ \\__ lent by rank 2 __/

``reserve`` places each new rBlock through the placement directory
(:mod:`kvmem.distributed.directory`): on the owner while it has room, then
on a *lender*, a rank with free capacity. Space is taken in the directory
before any rBlock is placed, so when no rank has room the call raises
``OutOfKVMemory`` having changed nothing anywhere, and no data moves to a
lender that has no room. ``free`` releases the rBlocks on every rank that
holds them. ``fork`` shares rBlocks (copy-on-write at rBlock granularity:
the first ``reserve`` that would write into a shared, partly filled rBlock
copies it). ``commit``, ``append`` and the counts need no messages.

Attention over a sharded sequence is :func:`kvmem.distributed.decode` /
:func:`~kvmem.distributed.prefill`: the owner sends the new tokens' queries
(and each new token's K/V to the rank holding its slot) to the ranks
holding the sequence, each computes a partial output and LSE over its rBlocks
with kvmem's kernels, and the owner merges them with ``merge_states``. A
decode step exchanges one request and one reply with each holder rank,
whatever the context length.

``layout`` returns this rank's part, as every backend's layout describes
the memory of the rank that calls it: rows over the rBlocks held here,
``seq_lens`` counting the KV held here, and ``slot_mapping`` -1 for new
tokens whose slot lies on another rank.

``stats`` describes the group's memory (capacity and free come from the
directory) and this rank's sequences (filled, reserved, num_seqs), in
tokens; ``page_size`` is ``rblock_size``, the unit of allocation. ``extra``
adds this rank's own figures (``lent_tokens``, ``borrowed_tokens``, ...).

Without an initialised ``torch.distributed`` (or in a group of one) the
allocator runs as a world of one: same code, no threads, an in-memory
directory.

The sequence bookkeeping (tokens, counts, argument checks, the layout loop)
is :class:`~kvmem.backends.base.KVBackend`'s; the requests to the holders
are :mod:`kvmem.distributed.calls`. The backend declares ``fork`` and
``multi_process`` only: ``swap_out``, ``swap_in`` and
``free(keep_on_host=True)`` raise InvalidArgument (preempt by recompute).

Faults: every wait on another rank is bounded by ``timeout`` seconds (see
:mod:`kvmem.distributed.comm`); a rank that dies is reported as soon as its
connection closes, one that stops answering after ``timeout``, both as
:class:`PeerFailure`, after which the allocator refuses every call.
``close`` is collective: a rank with nothing to do may call it at once and
keeps serving the others until all of them have called it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kvmem.allocator import (
    Capabilities,
    KVStats,
    check_count,
    check_new_tokens,
    create_allocator,
)
from kvmem.backends.base import KVBackend, SeqState, ceil_div
from kvmem.distributed.attention import StepProfile
from kvmem.distributed.calls import Calls, failed_ranks
from kvmem.distributed.comm import Channel, PeerFailure, Traffic
from kvmem.distributed.directory import (
    PLACEMENTS,
    GuardedStore,
    Placement,
    PlacementDirectory,
)
from kvmem.distributed.holder import Holder
from kvmem.distributed.transport import Transport, control_group_for, group_backend
from kvmem.errors import IntegrityError, InvalidArgument, KVError, OutOfKVMemory
from kvmem.layout import BatchLayout, build_layout
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV

_HANDLE_BITS = 40
_instances: dict[str, itertools.count[int]] = {}


class _Block:
    """One rBlock of this rank's sequences: where it lies and how many of them share it."""

    __slots__ = ("rank", "refs")

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.refs = 1


class _Seq(SeqState):
    """A sequence this rank owns: its handle (unique in the group) and its rBlocks."""

    __slots__ = ("handle", "blocks")

    def __init__(self, handle: int, tokens: list[int]) -> None:
        super().__init__(tokens)
        self.handle = handle
        self.blocks: list[_Block] = []


class ShardedAllocator(KVBackend[_Seq]):
    """DistAttention-style KV sharded over a torch.distributed group (Infinite-LLM rBlocks).

    Options: ``num_tokens`` or ``num_bytes`` (this rank's capacity),
    ``device``, ``page_size`` (of the local backend), ``rblock_size``
    (tokens per rBlock, a multiple of the local page size; default 4
    pages), ``local_backend`` (any registered backend, default ``"paged"``)
    and ``local_options`` for it, ``group`` (the process group of this
    allocator's messages, gloo or NCCL; default: a new one over the whole
    world, NCCL on CUDA devices), ``control_group`` (a gloo group over the
    same ranks for the metadata beside an NCCL group; made when missing),
    ``timeout`` (seconds, bounds every wait on another rank; default 30),
    ``heartbeat`` (seconds between liveness messages; default timeout / 3,
    at most 5), ``placement`` (``"local_first"`` or ``"spread"``, see
    :meth:`PlacementDirectory.plan`), ``attention_impl`` (passed to
    :mod:`kvmem.attention`).

    Messages go through :mod:`kvmem.distributed.transport`: on NCCL the
    tensors are sent from the device and only metadata passes through the
    host (not run yet on a GPU).
    """

    capabilities = Capabilities(fork=True, multi_process=True)

    def __init__(
        self,
        spec: KVSpec,
        *,
        num_tokens: int | None = None,
        num_bytes: int | None = None,
        device: torch.device | str = "cpu",
        page_size: int = 16,
        rblock_size: int | None = None,
        local_backend: str = "paged",
        local_options: Mapping[str, Any] | None = None,
        group: Any = None,
        control_group: Any = None,
        timeout: float = 30.0,
        heartbeat: float | None = None,
        placement: Placement = "local_first",
        attention_impl: str = "auto",
    ) -> None:
        if placement not in PLACEMENTS:
            raise InvalidArgument(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if local_backend == "sharded":
            raise InvalidArgument("the local backend of a sharded allocator cannot be sharded")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
        super().__init__()
        opts = {"page_size": page_size, **(local_options or {})}
        local = create_allocator(
            local_backend, spec, num_tokens=num_tokens, num_bytes=num_bytes, device=device, **opts
        )
        try:
            rb = (
                4 * local.page_size
                if rblock_size is None
                else check_count("rblock_size", rblock_size)
            )
            self.holder = Holder(local, rb, attention_impl)
        except BaseException:
            local.close()
            raise
        self.spec = spec
        self.local = local
        self.page_size = local.page_size
        self.granularity = rb
        self.device = local.device
        self.rblock_size = rb
        self.placement: Placement = placement
        self.timeout = float(timeout)
        self.attention_impl = attention_impl
        self.profile = StepProfile()
        self._owned_groups: list[Any] = []
        self._pg, self.channel = self._connect(group, control_group, heartbeat)
        self.rank = self.channel.rank if self.channel else 0
        self.world_size = self.channel.size if self.channel else 1
        self.calls = Calls(self.rank, self.channel, self.holder)
        self._handles = itertools.count(self.rank << _HANDLE_BITS)
        store = self._pg.get_group_store() if self._pg is not None else dist.HashStore()
        if self._pg is not None:
            n = next(_instances.setdefault(self._pg.group_name, itertools.count()))
            store = dist.PrefixStore(f"kvmem.sharded.{n}/", store)
        on_failure = self.channel.record_failure if self.channel else None
        guarded = GuardedStore(store, self.rank, on_failure)
        self.directory = PlacementDirectory(guarded, self.world_size)
        try:
            self.directory.register(self.rank, self.holder.capacity_blocks, self.timeout)
        except PeerFailure as e:
            self.local.close()
            raise PeerFailure(
                f"rank {self.rank}: not every rank built its sharded allocator within "
                f"{self.timeout:g} s ({e})"
            ) from None
        if self.channel:
            self.channel.start(self.holder.handle)

    def _connect(
        self, group: Any, control: Any, heartbeat: float | None
    ) -> tuple[Any, Channel | None]:
        """The group and channel of this allocator's messages (None in a world of one).

        Without ``group`` a new one over the whole world is made: NCCL on a
        CUDA device (with a gloo control group beside it), gloo otherwise.
        """
        if group is None:
            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
                return None, None
            backend = "nccl" if self.device.type == "cuda" and dist.is_nccl_available() else "gloo"
            group = dist.new_group(backend=backend, timeout=timedelta(seconds=self.timeout))
            if backend != "gloo" and control is None:
                control = control_group_for(group, self.timeout)
            self._owned_groups = [g for g in (group, control) if g is not None]
        if group.size() == 1:
            return None, None
        if control is None and group_backend(group) != "gloo":
            control = control_group_for(group, self.timeout)
            self._owned_groups.append(control)
        transport = Transport(group, self.timeout, control=control, device=self.device)
        return control or group, Channel(transport, heartbeat)

    # ------------------------------------------------------------ helpers
    def _check_open(self) -> None:
        """Refuse calls once closed, or once a peer has failed (PeerFailure)."""
        super()._check_open()
        if self.channel is not None:
            self.channel.check()

    def _get(self, seq_id: Hashable) -> _Seq:
        self._check_open()
        return super()._get(seq_id)

    def _give_back(self, results: Mapping[int, Any]) -> None:
        """Return to the directory the rBlocks that "drop"/"cow" results say were released."""
        for r, res in results.items():
            if not isinstance(res, KVError):
                self.directory.give(r, int(res[0]))

    def _record(self, s: _Seq) -> None:
        self.directory.record(s.handle, [b.rank for b in s.blocks])

    # ------------------------------------------------------------ base hooks
    def _admit(self, seq_id: Hashable, tokens: list[int], cache_salt: Hashable) -> _Seq:
        """A sequence this rank owns; nothing is cached across ranks (``cache_salt`` unused)."""
        return _Seq(next(self._handles), tokens)

    def _needed(self, s: _Seq, target: int) -> tuple[int, bool]:
        new = max(0, ceil_div(target, self.rblock_size) - len(s.blocks))
        idx = s.num_computed // self.rblock_size
        return new, idx < len(s.blocks) and s.blocks[idx].refs > 1

    def _out_of_memory(self, seq_id: Hashable, need: int) -> OutOfKVMemory:
        free = self.directory.free()
        per = ", ".join(f"rank {r}: {f}" for r, f in enumerate(free))
        return OutOfKVMemory(
            f"sequence {seq_id!r} needs {need} more rBlocks of {self.rblock_size} tokens; "
            f"free rBlocks: {per}"
        )

    def _grow(self, seq_id: Hashable, s: _Seq, target: int) -> None:
        """Place the new rBlocks, borrowing from other ranks.

        All or nothing: space for every new rBlock is taken in the directory
        first; if the group is short, OutOfKVMemory and nothing changed.
        """
        new, cow = self._needed(s, target)
        if new + cow == 0:
            s.reserved = max(s.reserved, target)
            return
        first = len(s.blocks) - cow
        # the shared rBlock is the one the next KV entry goes to; with slots
        # reserved ahead before a fork it is not the last one held
        cow_idx = s.num_computed // self.rblock_size
        prefer = s.blocks[cow_idx].rank if cow else None
        holders = [b.rank for b in s.blocks]
        ranks = self.directory.plan(
            self.rank, first, new + cow, holders, self.placement, prefer=prefer
        )
        if ranks is None:
            raise self._out_of_memory(seq_id, new + cow)
        placed = self._place(s, ranks[cow:])
        if cow:
            try:
                self._copy_on_write(s, cow_idx, ranks[0])
            except KVError:
                self._unplace(s.handle, self._per_rank(len(s.blocks), ranks[cow:]))
                self.directory.give(ranks[0], 1)
                raise
        s.blocks.extend(placed)
        s.reserved = max(s.reserved, target)
        self._record(s)

    def _copy_on_write(self, s: _Seq, idx: int, dst: int) -> None:
        """Give ``s`` a private copy of its shared rBlock ``idx`` on rank ``dst`` (space taken)."""
        old = s.blocks[idx]
        nslots = s.num_computed - idx * self.rblock_size
        if dst == old.rank:
            released = self.calls.one(dst, ("cow", s.handle, idx, nslots))[0]
            self.directory.give(dst, released)
        else:
            _, parts = self.calls.one(old.rank, ("read", s.handle, idx, nslots))
            self.calls.one(dst, ("place", s.handle, [idx]), parts)
            try:
                released = self.calls.one(old.rank, ("drop", s.handle, [idx]))[0]
            except KVError:
                # its space is the caller's to return
                self.calls.one(dst, ("drop", s.handle, [idx]))
                raise
            self.directory.give(old.rank, released)
        old.refs -= 1
        s.blocks[idx] = _Block(dst)

    @staticmethod
    def _per_rank(start: int, ranks: Sequence[int]) -> dict[int, list[int]]:
        per: dict[int, list[int]] = {}
        for i, r in enumerate(ranks):
            per.setdefault(r, []).append(start + i)
        return per

    def _place(self, s: _Seq, ranks: Sequence[int]) -> list[_Block]:
        """Place rBlocks ``len(s.blocks) ..`` of ``s`` on ``ranks`` (space already taken).

        Returns the new blocks, not yet attached to ``s``; on failure every
        placed one is dropped, all the space is returned, and the error raised.
        """
        per = self._per_rank(len(s.blocks), ranks)
        res = self.calls.many({r: (("place", s.handle, idxs), []) for r, idxs in per.items()})
        failed = {r: e for r, e in res.items() if isinstance(e, KVError)}
        if failed:
            self._unplace(s.handle, {r: i for r, i in per.items() if r not in failed})
            for r in failed:
                self.directory.give(r, len(per[r]))
            raise next(iter(failed.values()))
        return [_Block(r) for r in ranks]

    def _unplace(self, handle: int, per: Mapping[int, list[int]]) -> None:
        """Drop rBlocks ``{rank: [index, ...]}`` just placed for ``handle``; return their space."""
        self._give_back(self.calls.many({r: (("drop", handle, i), []) for r, i in per.items()}))

    def _can_grow(self, grow: list[tuple[_Seq, int]]) -> bool:
        """Whether the new rBlocks fit in the group's free rBlocks."""
        total = 0
        for s, target in grow:
            new, cow = self._needed(s, target)
            total += new + cow
        return total <= sum(self.directory.free())

    def _pages(self, s: _Seq) -> Sequence[int]:
        """The local pages of the rBlocks of ``s`` held on this rank."""
        return [int(p) for p in self.holder.row(s.handle)]

    def _make_layout(
        self,
        ids: tuple[Hashable, ...],
        seqs: list[_Seq],
        seq_lens: np.ndarray,
        query_lens: np.ndarray,
    ) -> BatchLayout:
        """This rank's part of the batch: its rBlocks of each sequence and its new-token slots.

        ``seq_lens`` counts the KV of each sequence held on this rank (up to
        and including the new tokens); ``slot_mapping`` is -1 for new tokens
        whose slot lies on another rank; ``query_start_loc`` spans every new
        token. In a world of one this is the whole sequence.
        """
        rows: list[np.ndarray] = []
        lens, local_new, masks = [], [], []
        qlens = query_lens.tolist()
        with self.holder.lock:
            for s, p1 in zip(seqs, seq_lens.tolist(), strict=True):
                rows.append(self.holder.row(s.handle))
                lens.append(int(self.holder.visible(s.handle, np.array([p1 - 1]))[0]))
                mask = self.holder.held_mask(s.handle, s.num_computed, p1)
                masks.append(mask)
                local_new.append(int(mask.sum()))
        width = max([len(r) for r in rows] + [1])
        table = np.zeros((len(rows), width), dtype=np.int32)
        for i, r in enumerate(rows):
            table[i, : len(r)] = r
        lay = build_layout(
            self.page_size,
            table,
            np.asarray(lens),
            np.asarray(local_new),
            ids,
            self.device,
            self.spec,
        )
        if local_new == qlens:
            return lay
        here = torch.from_numpy(np.concatenate(masks)).to(self.device)
        slots = torch.full((sum(qlens),), -1, dtype=torch.int64, device=self.device)
        slots[here] = lay.slot_mapping
        qsl = np.zeros(len(qlens) + 1, dtype=np.int32)
        np.cumsum(qlens, out=qsl[1:])
        return dataclasses.replace(
            lay,
            slot_mapping=slots,
            query_start_loc=torch.from_numpy(qsl).to(self.device),
            max_query_len=max(qlens),
        )

    def _fork(self, parent_id: Hashable, p: _Seq, child_id: Hashable) -> _Seq:
        """The child shares the parent's rBlocks that hold KV, copy-on-write, on the same ranks."""
        c = _Seq(next(self._handles), list(p.tokens))
        nb = ceil_div(p.num_computed, self.rblock_size)
        c.blocks = p.blocks[:nb]
        c.num_computed = c.reserved = p.num_computed
        ranks = {b.rank for b in c.blocks}
        res = self.calls.many({r: (("fork", p.handle, c.handle, nb), []) for r in ranks})
        failed = [e for e in res.values() if isinstance(e, KVError)]
        if failed:
            self.calls.many(
                {r: (("drop", c.handle, None), []) for r in res if r not in failed_ranks(res)}
            )
            raise failed[0]
        for b in c.blocks:
            b.refs += 1
        if c.blocks:
            self._record(c)
        return c

    def _drop(self, seq_id: Hashable, s: _Seq) -> None:
        """Release the sequence's rBlocks on every rank that holds them."""
        ranks = {b.rank for b in s.blocks}
        res = self.calls.many({r: (("drop", s.handle, None), []) for r in ranks})
        self._give_back(res)
        failed = [e for e in res.values() if isinstance(e, KVError)]
        if failed:
            raise failed[0]
        for b in s.blocks:
            b.refs -= 1
        if s.blocks:
            self.directory.record(s.handle, [])
        del self._seqs[seq_id]

    def _layer(self, i: int) -> LayerKV:
        """The KV storage of layer ``i`` on this rank."""
        return self.local.layer(i)

    def placement_of(self, seq_id: Hashable) -> list[int]:
        """The rank holding each rBlock of a sequence this rank owns, in position order."""
        return [b.rank for b in self._get(seq_id).blocks]

    def stats(self) -> KVStats:
        """The group's capacity and free rBlocks, this rank's sequences (see the module doc)."""
        self._check_open()
        r = self.rblock_size
        caps, free = self.directory.capacities, self.directory.free()
        filled: dict[int, int] = {}
        own: dict[int, _Block] = {}
        for s in self._seqs.values():
            for i, b in enumerate(s.blocks):
                own[id(b)] = b
                f = min(r, max(0, s.num_computed - i * r))
                filled[id(b)] = max(filled.get(id(b), 0), f)
        with self.holder.lock:
            held = self.holder.held_blocks
            lent = self.holder.lent_blocks(self.rank, _HANDLE_BITS)
        borrowed = sum(1 for b in own.values() if b.rank != self.rank)
        return KVStats(
            page_size=r,
            bytes_per_token=self.spec.bytes_per_token,
            capacity_tokens=sum(caps) * r,
            used_tokens=(sum(caps) - sum(free)) * r,
            filled_tokens=sum(filled.values()),
            reserved_tokens=sum(s.reserved - s.num_computed for s in self._seqs.values()),
            cached_tokens=0,
            free_tokens=sum(free) * r,
            swapped_tokens=0,
            num_seqs=len(self._seqs),
            num_swapped_seqs=0,
            extra={
                "rank": self.rank,
                "world_size": self.world_size,
                "local_capacity_tokens": caps[self.rank] * r,
                "local_used_tokens": held * r,
                "local_free_tokens": free[self.rank] * r,
                "lent_tokens": lent * r,
                "borrowed_tokens": borrowed * r,
            },
        )

    def _check_backend(self) -> None:
        """Check this rank's sequences against every holder's view and the directory.

        Exact while no other rank is in the middle of a reserve or free.
        """
        r = self.rblock_size
        refs: dict[int, int] = {}
        blocks: dict[int, _Block] = {}
        expect: dict[int, dict[int, list[int]]] = {}
        for sid, s in self._seqs.items():
            if s.reserved > len(s.blocks) * r or len(s.blocks) != ceil_div(s.reserved, r):
                raise IntegrityError(f"{sid!r}: {len(s.blocks)} rBlocks for {s.reserved} slots")
            for i, b in enumerate(s.blocks):
                refs[id(b)] = refs.get(id(b), 0) + 1
                blocks[id(b)] = b
                expect.setdefault(b.rank, {}).setdefault(s.handle, []).append(i)
            if self.directory.lookup(s.handle) != [b.rank for b in s.blocks]:
                raise IntegrityError(f"{sid!r}: the directory's placement differs")
        if any(blocks[k].refs != n for k, n in refs.items()):
            raise IntegrityError("rBlock share counts do not match the sequences")
        self.holder.check()
        handles = [s.handle for s in self._seqs.values()]
        ranks = set(range(self.world_size)) if self.channel else {self.rank}
        views = self.calls.many({k: (("views", handles), []) for k in ranks})
        checks = self.calls.many({k: (("check",), []) for k in ranks - {self.rank}})
        for v in itertools.chain(views.values(), checks.values()):
            if isinstance(v, KVError):
                raise v
        free, caps = self.directory.free(), self.directory.capacities
        for k in ranks:
            held_views, held = views[k][0]
            for h in handles:
                if held_views[h] != expect.get(k, {}).get(h, []):
                    raise IntegrityError(f"rank {k} holds rBlocks {held_views[h]} of handle {h}")
            if free[k] != caps[k] - held:
                raise IntegrityError(
                    f"rank {k}: the directory says {free[k]} rBlocks free; "
                    f"it holds {held} of {caps[k]}"
                )

    def _shutdown(self) -> None:
        """``close`` is collective: serve the other ranks until all of them close, then release
        everything."""
        try:
            if self.channel is not None and self.channel.failure is None:
                self.calls.barrier(self.directory.store, "closing", self.world_size)
                self.channel.stop()
                for g in self._owned_groups:
                    dist.destroy_process_group(g)
        finally:
            self.local.close()

    # ------------------------------------------------------------ for attention
    def traffic(self) -> Traffic:
        """Bytes and messages this rank's calls have sent and received so far."""
        return self.channel.traffic if self.channel else Traffic()

    def attention_plan(
        self, batch: Sequence[tuple[Hashable, int]]
    ) -> list[tuple[int, int, int, list[int]]]:
        """``(handle, p0, p1, rank of each rBlock)`` per sequence, checked for attention."""
        self._check_open()
        if not batch:
            raise InvalidArgument("attention over an empty batch")
        out = []
        seen: set[Hashable] = set()
        for sid, n in batch:
            s = self._get(sid)
            if sid in seen:
                raise InvalidArgument(f"sequence {sid!r} appears twice in the batch")
            seen.add(sid)
            p0, p1 = s.num_computed, check_new_tokens(sid, s.num_computed, s.reserved, n)
            out.append((s.handle, p0, p1, [b.rank for b in s.blocks]))
        return out


__all__ = ["ShardedAllocator", "StepProfile"]
