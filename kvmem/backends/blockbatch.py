r"""The batched calls of the block-table backends, a decode step's hot path.

:class:`~kvmem.backends.blocks.BlockTableBackend` answers ``reserve_many``,
``commit_many``, ``append_many`` and ``layout`` here, with the contract of
:class:`~kvmem.backends.base.KVBackend`'s versions (all or nothing, the
single calls' typed errors) in one pass over the batch instead of one call
per sequence. A decode step of B sequences, each one new token::

    reserve_many  B x (computed + 1 <= pages held * page_size, next page unshared?)
                  -> set reserved          (about 1 in page_size grows: takes a page,
                                            in the same pass unless events or tiers
                                            must hear of an eviction)
    layout        B x (resident, reserved) -> rows of the dense block table, read in place
    commit_many   B x (within reserved and known tokens) -> set computed
                  (about 1 in page_size fills a page: hashed and published, in the
                  same pass unless KV events or tiers must hear of it)
    append_many   B x (non-negative int)   -> tokens.append

The common case of each runs in C++ over the sequence states
(:func:`kvmem.native.batch_passes`); anything else (an unknown, swapped or
loading sequence, an id named twice, a bad count, a shared page to copy, a
table row to widen, evictions or publications that KV events or tiers must
hear of) goes to the Python code below, which gives the same results and
raises the right error.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from kvmem.allocator import batch_counts, check_commit
from kvmem.backends.blockstate import BlockSeq, BlockTables
from kvmem.backends.freepages import FreeQueue
from kvmem.errors import OutOfKVMemory
from kvmem.layout import BatchLayout, from_arrays
from kvmem.native import batch_passes, native_hashes

__all__ = ["append_many", "commit_many", "layout", "reserve_many"]


def _passes(b: BlockTables) -> Any:
    """The native batch passes, or None (the Python versions)."""
    if b.native_passes is False or b.max_seq_len is not None:
        return None
    return batch_passes()


def _counts(seq_ids: Sequence[Hashable], num_tokens: int | Sequence[int]) -> Any:
    """``(ids, counts)`` for a native pass, which checks the ids (known, none twice) and each
    count itself, or None."""
    if type(seq_ids) is not list and type(seq_ids) is not tuple or not seq_ids:
        return None
    if type(num_tokens) is int:
        return (seq_ids, [num_tokens] * len(seq_ids)) if num_tokens > 0 else None
    if type(num_tokens) is list and len(num_tokens) == len(seq_ids):
        return seq_ids, num_tokens
    return None


def reserve_many(
    b: BlockTables, seq_ids: Sequence[Hashable], num_tokens: int | Sequence[int]
) -> None:
    """Growths that fit in the pages a sequence holds (the next KV's page not shared) are set
    at once; the rest take pages once their total is known to be free. On any error every
    growth already set is put back."""
    seqs, ps, ref = b._seqs, b.page_size, b._ref
    ext = _passes(b)
    fast = None if ext is None else _counts(seq_ids, num_tokens)
    if fast is not None:
        ids, counts = fast
        grow = _growth(b)
        table = None if grow is None else _table_tensor(b)
        got = ext.reserve_pass(seqs, ids, counts, ps, ref, len(b._free), grow, table)
        if type(got) is int:  # short of pages: perhaps swaps in flight free some
            if not b._ensure_free(got):
                raise _short(b, len(ids), ids[0], got)
            got = ext.reserve_pass(seqs, ids, counts, ps, ref, len(b._free), grow, table)
        if type(got) is tuple:  # grown in the pass too
            b._num_cached_free -= got[1]
            return
        if type(got) is list:
            for i in got:
                grown = seqs[ids[i]]
                target = grown.num_computed + counts[i]
                b._grow_into(grown, target, *b._needed(grown, target))
            return
    ids, counts = batch_counts(seq_ids, num_tokens, "num_tokens")
    cheap: list[tuple[BlockSeq, int]] = []
    slow: list[tuple[Hashable, BlockSeq, int]] = []
    need = 0
    try:
        for sid, n in zip(ids, counts, strict=True):
            s = seqs.get(sid)
            if s is None or s.swapped or s.transfer is not None:
                s = b._resident(sid)
            target = s.num_computed + n
            if target <= s.reserved:
                continue
            if target <= len(s.blocks) * ps and ref[s.blocks[s.num_computed // ps]] == 1:
                cheap.append((s, s.reserved))
                s.reserved = target
            else:
                new, cow = b._needed(s, target)
                need += new + cow
                slow.append((sid, s, target))
        if slow and not b._ensure_free(need):
            raise _short(b, len(slow), slow[0][0], need)
    except BaseException:
        for s, old in cheap:
            s.reserved = old
        raise
    if not ids:
        b._check_open()
    for sid, s, target in slow:
        b._grow(sid, s, target)


def _growth(b: BlockTables) -> tuple[Any, ...] | None:
    """What the reserve pass needs to take pages itself, as ``_grow_into`` would: when the
    free pages are a :class:`~kvmem.backends.freepages.FreeQueue` and nothing else hears of
    an eviction (no KV event subscriber, no tiers). Else None: the backend grows."""
    if type(b._free) is not FreeQueue or b.kv_events.active or b._tiers is not None:
        return None
    return (b._free.queue, b._key, b._index, b._page_hash)


def _table_tensor(b: BlockTables) -> torch.Tensor:
    """The dense block table as a tensor sharing its memory (made again when it grew)."""
    view = b._table_view
    if view is None or view[0] is not b._table:  # the table grew: a new array
        view = b._table_view = (b._table, torch.from_numpy(b._table))
    return view[1]


def _short(b: BlockTables, n: int, first: Hashable, need: int) -> OutOfKVMemory:
    return OutOfKVMemory(f"{n} sequences (first {first!r}) need {need} pages, {len(b._free)} free")


def commit_many(
    b: BlockTables, seq_ids: Sequence[Hashable], num_tokens: int | Sequence[int]
) -> None:
    """Every commit checked first, then each applied; pages that fill up are published as by
    ``commit``."""
    seqs, ps = b._seqs, b.page_size
    ext = _passes(b)
    fast = None if ext is None else _counts(seq_ids, num_tokens)
    if fast is not None:
        ids, counts = fast
        fill = ext.commit_pass(seqs, ids, counts, ps, b.prefix_caching, _publication(b))
        if fill is not None:
            for i in fill:
                filled = seqs[ids[i]]
                end = filled.num_computed + counts[i]
                b._on_commit(filled, end)
                filled.num_computed = end
            return
    ids, counts = batch_counts(seq_ids, num_tokens, "num_tokens")
    states: list[BlockSeq] = []
    for sid, n in zip(ids, counts, strict=True):
        s = seqs.get(sid)
        if s is None or s.swapped or s.transfer is not None:
            s = b._resident(sid)
        end = s.num_computed + n
        if end > s.reserved or end > len(s.tokens):
            check_commit(sid, s.num_computed, s.reserved, len(s.tokens), n)  # raises
        states.append(s)
    if not ids:
        b._check_open()
    cache = b.prefix_caching
    for s, n in zip(states, counts, strict=True):
        end = s.num_computed + n
        if cache and end // ps > s.num_computed // ps:
            b._on_commit(s, end)
        s.num_computed = end


def _publication(b: BlockTables) -> tuple[list[Any], dict[int, int], list[int]] | None:
    """What the commit pass needs to publish filled pages itself, as ``_on_commit`` would: when
    the hashes are native and nothing else hears of a publication (no KV event subscriber, no
    tiers). Else None: the backend publishes."""
    if not b.prefix_caching or b.kv_events.active or b._tiers is not None:
        return None
    return (b._key, b._index, b._page_hash) if native_hashes() else None


def append_many(
    b: BlockTables, seq_ids: Sequence[Hashable], token_ids: Sequence[Sequence[int]]
) -> bool:
    """Lists of non-negative ints appended in one native pass; False when the call is left to
    :meth:`KVBackend.append_many` (nothing changed)."""
    ext = _passes(b)
    if ext is None or type(token_ids) is not list or not seq_ids:
        return False
    if type(seq_ids) is not list and type(seq_ids) is not tuple:
        return False
    return len(seq_ids) == len(token_ids) and bool(ext.append_pass(b._seqs, seq_ids, token_ids))


def layout(b: BlockTables, batch: Sequence[tuple[Hashable, int]]) -> BatchLayout | None:
    """The layout, the batch checked and its table rows gathered in one native pass; None when
    it is left to :meth:`KVBackend.layout`."""
    ext = _passes(b)
    if ext is None:
        return None
    got = ext.layout_pass(b._seqs, batch, _table_tensor(b), b.page_size)
    if got is None:
        return None
    ids, max_len, max_q, arrays = got
    return from_arrays(b.page_size, arrays, ids, b.device, b.spec, max_len, max_q)
