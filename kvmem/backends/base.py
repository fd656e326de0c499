r"""The shared half of every backend: per-sequence bookkeeping and the contract around it.

:class:`KVBackend` holds what does not depend on how memory is laid out:
the sequences (:class:`SeqState`: tokens, ``num_computed``, ``reserved``),
the closed guard, lookups and their errors, argument checks, ``add``,
``append``, ``commit``, ``seq_info``, ``seq_ids``, the ``layout`` loop, the
heads of ``reserve``, ``can_reserve``, ``fork``, ``free`` and the swap calls,
the shared part of ``check_integrity``, and the capability rule: a call the
backend does not declare in :attr:`~kvmem.allocator.KVAllocator.capabilities`
raises :class:`~kvmem.errors.InvalidArgument`. A backend implements only
what differs, as hooks (names start with ``_``; the public methods call
them after every check has passed)::

    public call          base does                               then calls hook
    -------------------  --------------------------------------  ---------------------------
    add                  closed guard, _sync, duplicate, tokens   _admit(seq_id, tokens, salt)
    append               lookup, tokens, max_seq_len              (none)
    reserve              lookup, resident, count, already held    _grow(seq_id, s, target)
    can_reserve          counts, resident, keep only growing      _can_grow([(s, target), ...])
    layout               empty batch, resident, reserved, dups    _make_layout -> _page_rows
                                                                    -> _pages(s)
    commit               lookup, resident, reserved, known        _on_commit(s, end)
    append_many          the checks of append, for every one      (none)
    reserve_many         the checks of reserve, for every one     _grow_many([(id, s, target)])
                                                                    -> _can_grow, _grow
    commit_many          the checks of commit, for every one      _on_commit(s, end)
    fork                 capability, resident parent, duplicate   _fork(parent_id, p, child_id)
    free                 capability (keep_on_host), lookup        _park / _drop(seq_id, s)
    swap_out / swap_in   capability, closed guard, id list        _start_swap_out / _start_swap_in
    layer                closed guard, index range                _layer(i)
    check_integrity      closed guard, _sync, counts in order     _check_backend()
    close                once only; forgets every sequence        _shutdown()

Every hook either succeeds or raises a :class:`~kvmem.errors.KVError` having
changed nothing, so the all-or-nothing promise of the contract holds.

The counts the base keeps, per sequence, and what a backend's memory must
cover (``granularity`` = 4 tokens here)::

    tokens     t0 t1 t2 t3 t4 t5 t6 t7 t8         len(tokens)  = 9
    KV         ## ## ## ## ## ##                  num_computed = 6
    reserved   [.................]                reserved     = 7  (after reserve(s, 1))
    pages      [ page 3  ][ page 9  ]             the backend's: _pages(s) = [3, 9]

The base changes ``num_computed`` (``commit``) and ``tokens`` (``append``)
itself; ``reserved``, ``swapped`` and ``transfer`` belong to the backend's
hooks, which also own whatever per-sequence fields a subclass of
:class:`SeqState` adds (pages, a slot, a handle).

A minimal backend (a dict of pages, no prefix caching, no swap) is about
120 lines: see ``tests/backends/minimal.py``, which the conformance suite runs on.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from kvmem.allocator import (
    KVAllocator,
    SeqInfo,
    SwapHandle,
    batch_counts,
    check_batch_ids,
    check_commit,
    check_count,
    check_new_tokens,
    check_seq_ids,
    check_tokens,
    raise_unknown,
)
from kvmem.errors import DuplicateSequence, IntegrityError, InvalidArgument, KVError, OutOfKVMemory
from kvmem.layout import BatchLayout, build_layout
from kvmem.storage import LayerKV

__all__ = ["KVBackend", "SeqState", "ceil_div"]


def ceil_div(a: int, b: int) -> int:
    """``a / b`` rounded up, for non-negative ints."""
    return -(-a // b)


class SeqState:
    """What every backend tracks for one sequence; subclasses add their own ``__slots__``.

    ``swapped``: the sequence's KV is on the host (it holds no device
    memory and must be swapped in before ``reserve``, ``layout``, ``commit``
    or ``fork``). ``transfer``: a swap of this sequence in flight, or None;
    any lookup of the sequence waits for it first (:meth:`KVBackend._await_transfer`).
    """

    __slots__ = ("tokens", "num_computed", "reserved", "swapped", "transfer")

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.num_computed = 0
        self.reserved = 0
        self.swapped = False
        self.transfer: Any = None


S = TypeVar("S", bound=SeqState)

#: capability -> hooks a backend declaring it must override
_CAPABILITY_HOOKS: dict[str, tuple[str, ...]] = {
    "swap": ("_start_swap_out", "_start_swap_in"),
    "keep_on_host": ("_park",),
    "fork": ("_fork",),
}


class KVBackend(KVAllocator, Generic[S]):
    """Base class of the backends: shared sequence bookkeeping, hooks for the memory.

    A subclass sets ``spec``, ``page_size``, ``granularity`` and ``device``
    in its constructor (after calling ``super().__init__()``), declares its
    :attr:`capabilities`, and implements the abstract hooks below plus
    ``stats``. Hooks for a capability it declares (``_fork`` for ``fork``,
    ``_start_swap_out``/``_start_swap_in`` for ``swap``, ``_park`` for
    ``keep_on_host``) must be overridden; a class that declares one without
    its hooks is refused when it is defined.

    The hot path (``append``, ``reserve``, ``layout``, ``commit``, once per
    sequence per decode step) costs one dict lookup and a few comparisons
    in the base before the hook runs.
    """

    max_seq_len: int | None = None
    """The most tokens one sequence may have (None: no limit); ``add``/``append`` refuse more."""

    def __init__(self) -> None:
        self._seqs: dict[Hashable, S] = {}
        self._closed = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        caps = cls.__dict__.get("capabilities")
        if caps is None:
            return
        for cap, hooks in _CAPABILITY_HOOKS.items():
            missing = [
                h for h in hooks if getattr(caps, cap) and getattr(cls, h) is getattr(KVBackend, h)
            ]
            if missing:
                raise TypeError(f"{cls.__name__} declares {cap!r} but does not implement {missing}")

    # ============================================================ hooks to implement
    @abstractmethod
    def _admit(self, seq_id: Hashable, tokens: list[int], cache_salt: Hashable) -> S:
        """A new sequence's state for ``add`` (``tokens`` checked; not yet registered).

        A prefix-caching backend takes the cached leading pages here and sets
        ``num_computed`` and ``reserved`` to the tokens they cover (never all
        of ``tokens``). The base registers the returned state.
        """

    @abstractmethod
    def _grow(self, seq_id: Hashable, s: S, target: int) -> None:
        """Make room for KV entries up to ``target`` (> ``s.reserved``), set ``s.reserved``.

        Raises OutOfKVMemory, changing nothing, when memory is short. Also
        where a page shared with a fork is copied before it is written.
        """

    @abstractmethod
    def _can_grow(self, grow: list[tuple[S, int]]) -> bool:
        """Whether ``_grow(s, target)`` for every ``(s, target)`` would succeed at once."""

    @abstractmethod
    def _pages(self, s: S) -> Sequence[int]:
        """The pages (of ``page_size`` slots) holding ``s``'s KV slots, in order: its block-table
        row. KV entry ``i`` lies in slot ``i % page_size`` of page ``_pages(s)[i // page_size]``.
        """

    @abstractmethod
    def _drop(self, seq_id: Hashable, s: S) -> None:
        """Release everything ``s`` holds (device and host) and unregister it from ``_seqs``."""

    @abstractmethod
    def _layer(self, i: int) -> LayerKV:
        """The KV storage of layer ``i`` (index already checked)."""

    @abstractmethod
    def _check_backend(self) -> None:
        """Raise IntegrityError if the backend's own structures are inconsistent.

        Runs after the base has checked every sequence's counts.
        """

    # ----------------------------------------------------------- optional hooks
    def _sync(self) -> None:
        """Bring state up to date before ``add``/``check_integrity`` (e.g. reap finished swaps)."""

    def _on_commit(self, s: S, end: int) -> None:
        """``s``'s KV now reaches ``end`` (``s.num_computed`` still the old count).

        Called on every commit: keep it cheap when no page filled. A
        prefix-caching backend publishes the pages that filled up here.
        """

    def _grow_many(self, grow: list[tuple[Hashable, S, int]]) -> None:
        """``_grow(seq_id, s, target)`` for every entry (distinct, each ``target > s.reserved``),
        all or nothing: OutOfKVMemory, changing nothing, unless :meth:`_can_grow` says they all
        fit. A backend with a cheaper pass (most growths fit in memory already held) overrides it.
        """
        if len(grow) == 1:
            self._grow(*grow[0])
            return
        if not self._can_grow([(s, target) for _, s, target in grow]):
            raise OutOfKVMemory(
                f"{len(grow)} sequences (first {grow[0][0]!r}) need more room than is free"
            )
        for sid, s, target in grow:
            self._grow(sid, s, target)

    def _page_rows(self, seqs: list[S], seq_lens: np.ndarray) -> tuple[np.ndarray, bool]:
        """The int32 [B, W] page table of a layout batch and whether it is zero past each row.

        Row ``b`` holds at least ``ceil(seq_lens[b] / page_size)`` pages.
        The default gathers :meth:`_pages`; backends with a dense block
        table of their own return slices of it.
        """
        ps = self.page_size
        need = (seq_lens.astype(np.int64) + ps - 1) // ps
        table = np.zeros((len(seqs), max(int(need.max()), 1)), dtype=np.int32)
        for b, s in enumerate(seqs):
            row = self._pages(s)[: int(need[b])]
            table[b, : len(row)] = row
        return table, True

    def _make_layout(
        self,
        ids: tuple[Hashable, ...],
        seqs: list[S],
        seq_lens: np.ndarray,
        query_lens: np.ndarray,
    ) -> BatchLayout:
        """The layout of a checked batch: ``seq_lens`` after this step, ``query_lens`` new tokens.

        The default builds it from :meth:`_page_rows`; a backend whose
        layout differs (the sharded one describes only this rank's part)
        overrides this.
        """
        table, zero_padded = self._page_rows(seqs, seq_lens)
        return build_layout(
            self.page_size,
            table,
            seq_lens,
            query_lens,
            ids,
            self.device,
            self.spec,
            zero_padded=zero_padded,
        )

    def _fork(self, parent_id: Hashable, p: S, child_id: Hashable) -> S:
        """The child's state, sharing (or copying) the parent's KV (backends declaring ``fork``).

        ``p`` is resident and ``child_id`` unregistered; the base registers
        the result. Raise (OutOfKVMemory, ...) having changed nothing.
        """
        raise NotImplementedError

    def _park(self, seq_id: Hashable, s: S) -> bool:
        """Keep a finished sequence's KV on the host (``free(keep_on_host=True)``).

        Return False when it cannot (e.g. no host room): the base then drops
        the sequence. Backends declaring ``keep_on_host``.
        """
        raise NotImplementedError

    def _start_swap_out(self, ids: list[Hashable]) -> SwapHandle:
        """Start moving the sequences' KV to the host (distinct ids; backends with ``swap``)."""
        raise NotImplementedError

    def _start_swap_in(self, ids: list[Hashable]) -> SwapHandle:
        """Start bringing swapped sequences back (distinct ids; backends declaring ``swap``)."""
        raise NotImplementedError

    def _await_transfer(self, s: S) -> None:
        """Wait for ``s.transfer`` and run what completes it (backends that set ``transfer``)."""
        raise NotImplementedError

    def _shutdown(self) -> None:
        """Release the backend's memory (``close``; called once). The base then forgets every
        sequence and refuses further calls."""

    # ================================================================ shared helpers
    def _check_open(self) -> None:
        """Raise KVError if the allocator is closed (backends may add checks, e.g. peers)."""
        if self._closed:
            raise KVError("allocator is closed")

    def _lookup(self, seq_id: Hashable) -> S | None:
        """The sequence or None, its swap in flight (if any) finished first."""
        self._check_open()
        s = self._seqs.get(seq_id)
        if s is not None and s.transfer is not None:
            self._await_transfer(s)
            s = self._seqs.get(seq_id)  # a failed park may have dropped it
        return s

    def _get(self, seq_id: Hashable) -> S:
        """The sequence (UnknownSequence if not registered), its swap in flight finished."""
        s = self._seqs.get(seq_id)
        if s is None or s.transfer is not None:
            s = self._lookup(seq_id)
            if s is None:
                raise raise_unknown(seq_id)
        return s

    def _resident(self, seq_id: Hashable) -> S:
        """The sequence, which must not be swapped out (InvalidArgument)."""
        s = self._get(seq_id)
        if s.swapped:
            raise self._swapped_error(seq_id)
        return s

    @staticmethod
    def _swapped_error(seq_id: Hashable) -> InvalidArgument:
        return InvalidArgument(f"sequence {seq_id!r} is swapped out; swap it in first")

    def _require(self, capability: str, call: str) -> None:
        """InvalidArgument unless the backend declares ``capability``."""
        if not getattr(self.capabilities, capability):
            on = ", ".join(self.capabilities.names()) or "none"
            raise InvalidArgument(
                f"{type(self).__name__} does not support {call} "
                f"(no {capability!r} capability; it declares: {on})"
            )

    def _check_length(self, seq_id: Hashable, n: int) -> None:
        limit = self.max_seq_len
        if limit is not None and n > limit:
            raise InvalidArgument(
                f"sequence {seq_id!r} would have {n} tokens, more than max_seq_len {limit}"
            )

    # ================================================================ the contract
    def add(self, seq_id: Hashable, token_ids: Sequence[int], cache_salt: Hashable = None) -> int:
        """Register a sequence with its prompt; return how many leading tokens already have KV.

        Raises DuplicateSequence, InvalidArgument (bad tokens, over ``max_seq_len``).
        """
        self._check_open()
        self._sync()
        if seq_id in self._seqs:
            raise DuplicateSequence(f"sequence {seq_id!r} is already registered")
        toks = check_tokens(token_ids)
        self._check_length(seq_id, len(toks))
        s = self._admit(seq_id, toks, cache_salt)
        self._seqs[seq_id] = s
        return s.num_computed

    def append(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Add known tokens whose KV is still to be written (swapped sequences too)."""
        s = self._get(seq_id)
        if type(token_ids) is list and len(token_ids) == 1:
            t = token_ids[0]
            if type(t) is int and t >= 0:
                if self.max_seq_len is not None:
                    self._check_length(seq_id, len(s.tokens) + 1)
                s.tokens.append(t)
                return
        toks = check_tokens(token_ids)
        self._check_length(seq_id, len(s.tokens) + len(toks))
        s.tokens.extend(toks)

    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        """Ensure slots for the next ``num_tokens`` KV entries (all or nothing).

        Idempotent: reserving no more than already held changes nothing.
        Raises OutOfKVMemory, InvalidArgument (bad count, swapped out).
        """
        s = self._get(seq_id)
        if s.swapped:
            raise self._swapped_error(seq_id)
        if type(num_tokens) is not int or num_tokens <= 0:
            check_count("num_tokens", num_tokens)
        target = s.num_computed + num_tokens
        if target > s.reserved:
            self._grow(seq_id, s, target)

    def can_reserve(self, requests: Mapping[Hashable, int]) -> bool:
        """Whether every ``reserve(seq, n)`` of ``requests`` would succeed at once."""
        self._check_open()
        grow: list[tuple[S, int]] = []
        for sid, n in requests.items():
            check_count("num_tokens", n)
            s = self._resident(sid)
            target = s.num_computed + n
            if target > s.reserved:
                grow.append((s, target))
        return self._can_grow(grow)

    def layout(self, batch: Sequence[tuple[Hashable, int]]) -> BatchLayout:
        """Kernel inputs for ``[(seq_id, num_new_tokens), ...]``; changes nothing.

        Each sequence's new tokens are its next uncomputed ones and must lie
        in reserved slots; a sequence may appear once.
        """
        self._check_open()
        if not batch:
            raise InvalidArgument("layout of an empty batch")
        ids: list[Hashable] = []
        lens: list[int] = []
        qlens: list[int] = []
        states: list[S] = []
        seqs = self._seqs
        for sid, n in batch:
            s = seqs.get(sid)
            if s is None or s.swapped or s.transfer is not None:
                s = self._resident(sid)
            if type(n) is not int or n <= 0 or s.num_computed + n > s.reserved:
                check_new_tokens(sid, s.num_computed, s.reserved, n)  # raises
            ids.append(sid)
            states.append(s)
            lens.append(s.num_computed + n)
            qlens.append(n)
        if len(set(ids)) != len(ids):
            raise InvalidArgument("a sequence appears twice in the batch")
        return self._make_layout(
            tuple(ids), states, np.array(lens, dtype=np.int32), np.array(qlens, dtype=np.int32)
        )

    def commit(self, seq_id: Hashable, num_tokens: int) -> None:
        """Record that ``num_tokens`` more KV entries are written (reserved, of known tokens)."""
        s = self._get(seq_id)
        if s.swapped:
            raise self._swapped_error(seq_id)
        end = check_commit(seq_id, s.num_computed, s.reserved, len(s.tokens), num_tokens)
        self._on_commit(s, end)
        s.num_computed = end

    # ---------------------------------------------------------------- batched calls
    def _states(self, ids: Sequence[Hashable], resident: bool) -> list[S]:
        """The state of every id (UnknownSequence; with ``resident``, InvalidArgument if one is
        swapped out), swaps in flight finished."""
        seqs = self._seqs
        out: list[S] = []
        for sid in ids:
            s = seqs.get(sid)
            if s is None or s.transfer is not None or (resident and s.swapped):
                s = self._resident(sid) if resident else self._get(sid)
            out.append(s)
        if not ids:
            self._check_open()
        return out

    def append_many(self, seq_ids: Sequence[Hashable], token_ids: Sequence[Sequence[int]]) -> None:
        """``append(seq_ids[i], token_ids[i])`` for every i, all or nothing (swapped ones too).

        Raises InvalidArgument (lengths differ, a sequence named twice, bad
        tokens, over ``max_seq_len``) and UnknownSequence before any change.
        """
        ids = check_batch_ids(seq_ids)
        try:
            same = len(token_ids) == len(ids) and not isinstance(token_ids, (str, bytes))
        except TypeError:
            same = False
        if not same:
            raise InvalidArgument(f"{len(ids)} sequences need as many token lists")
        states = self._states(ids, resident=False)
        limit = self.max_seq_len
        toks: list[Sequence[int]] = []
        for sid, s, t in zip(ids, states, token_ids, strict=True):
            if not (type(t) is list and len(t) == 1 and type(t[0]) is int and t[0] >= 0):
                t = check_tokens(t)
            if limit is not None:
                self._check_length(sid, len(s.tokens) + len(t))
            toks.append(t)
        for s, t in zip(states, toks, strict=True):
            s.tokens += t

    def reserve_many(self, seq_ids: Sequence[Hashable], num_tokens: int | Sequence[int]) -> None:
        """``reserve(seq_ids[i], n_i)`` for every i, all or nothing across the batch.

        ``num_tokens``: one count for all or one per sequence. OutOfKVMemory when the growths
        do not all fit at once; InvalidArgument (bad counts, a sequence named twice or swapped
        out, over ``max_seq_len``); UnknownSequence: every one changes nothing.
        """
        ids, counts = batch_counts(seq_ids, num_tokens, "num_tokens")
        states = self._states(ids, resident=True)
        limit = self.max_seq_len
        grow: list[tuple[Hashable, S, int]] = []
        for sid, s, n in zip(ids, states, counts, strict=True):
            target = s.num_computed + n
            if target > s.reserved:
                if limit is not None and target > limit:
                    raise InvalidArgument(f"{sid!r}: {target} entries > max_seq_len {limit}")
                grow.append((sid, s, target))
        if grow:
            self._grow_many(grow)

    def commit_many(self, seq_ids: Sequence[Hashable], num_tokens: int | Sequence[int]) -> None:
        """``commit(seq_ids[i], n_i)`` for every i, all or nothing (every count checked first).

        ``num_tokens`` is one count for every sequence or one per sequence.
        """
        ids, counts = batch_counts(seq_ids, num_tokens, "num_tokens")
        states = self._states(ids, resident=True)
        for sid, s, n in zip(ids, states, counts, strict=True):
            if s.num_computed + n > min(s.reserved, len(s.tokens)):
                check_commit(sid, s.num_computed, s.reserved, len(s.tokens), n)  # raises
        for s, n in zip(states, counts, strict=True):
            self._on_commit(s, s.num_computed + n)
            s.num_computed += n

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Make ``child_id`` a copy of the parent sharing its KV (backends declaring ``fork``)."""
        self._require("fork", "fork")
        p = self._resident(parent_id)
        if child_id in self._seqs:
            raise DuplicateSequence(f"sequence {child_id!r} is already registered")
        self._seqs[child_id] = self._fork(parent_id, p, child_id)

    def free(self, seq_id: Hashable, keep_on_host: bool = False) -> None:
        """Release everything the sequence holds; ``keep_on_host`` parks it (if declared)."""
        if keep_on_host:
            self._require("keep_on_host", "free(keep_on_host=True)")
        s = self._get(seq_id)
        if keep_on_host and self._park(seq_id, s):
            return
        self._drop(seq_id, s)

    def _swap_ids(self, seq_ids: Iterable[Hashable]) -> list[Hashable]:
        self._check_open()
        return check_seq_ids(seq_ids)

    def swap_out(self, seq_ids: Iterable[Hashable]) -> SwapHandle:
        """Move the sequences' KV to host memory (backends declaring ``swap``)."""
        self._require("swap", "swap_out")
        return self._start_swap_out(self._swap_ids(seq_ids))

    def swap_in(self, seq_ids: Iterable[Hashable]) -> SwapHandle:
        """Bring swapped sequences' KV back to the device (backends declaring ``swap``)."""
        self._require("swap", "swap_in")
        return self._start_swap_in(self._swap_ids(seq_ids))

    def layer(self, i: int) -> LayerKV:
        """The KV storage of layer ``i`` (InvalidArgument if out of range)."""
        self._check_open()
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.spec.num_layers:
            raise InvalidArgument(f"layer {i!r} out of range 0..{self.spec.num_layers - 1}")
        return self._layer(i)

    def seq_info(self, seq_id: Hashable) -> SeqInfo:
        """Counts of one sequence (UnknownSequence if not registered)."""
        s = self._get(seq_id)
        return SeqInfo(len(s.tokens), s.num_computed, s.reserved, s.swapped)

    def pending_transfer(self, seq_id: Hashable) -> SwapHandle | None:
        """The copy in flight for ``seq_id`` (a tier load or a swap), or None; never waits.

        A scheduler polls its ``done()`` to keep a loading sequence out of a
        step (every other call naming the sequence waits for the copy).
        """
        self._check_open()
        s = self._seqs.get(seq_id)
        return None if s is None else s.transfer

    def seq_ids(self) -> list[Hashable]:
        """Every registered sequence, swapped ones included."""
        return list(self._seqs)

    def __contains__(self, seq_id: object) -> bool:
        try:
            return seq_id in self._seqs
        except TypeError:  # unhashable: never registered
            return False

    def check_integrity(self) -> None:
        """Raise IntegrityError if a sequence's counts are out of order or the backend's
        structures are inconsistent (:meth:`_check_backend`)."""
        self._check_open()
        self._sync()
        limit = self.max_seq_len
        for sid, s in self._seqs.items():
            if not 0 <= s.num_computed <= s.reserved:
                raise IntegrityError(f"{sid!r}: counts out of order")
            if s.num_computed > len(s.tokens):
                raise IntegrityError(f"{sid!r}: more KV than tokens")
            if limit is not None and (len(s.tokens) > limit or s.reserved > limit):
                raise IntegrityError(f"{sid!r}: more than max_seq_len {limit} tokens")
        self._check_backend()

    def close(self) -> None:
        """Release all memory (:meth:`_shutdown`) and every sequence; idempotent."""
        if self._closed:
            return
        try:
            self._shutdown()
        finally:
            self._closed = True
            self._seqs.clear()
