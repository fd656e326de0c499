"""The one allocator interface every KV backend implements, and the backend registry.

A sequence is named by a hashable ``seq_id`` of the caller's choosing. Per
sequence an allocator tracks three counts, always ordered::

    num_computed  <=  capacity (reserved slots)
    num_computed  <=  num_tokens (known token ids)

    tokens:   t0 t1 t2 t3 t4 t5 t6            (num_tokens = 7)
    KV:       ## ## ## ## ..                  (num_computed = 4)
    slots:    [..........][..........]        (capacity = 8 after reserve(seq, 4))

One decode step of an engine, for each running sequence::

    alloc.reserve(seq, 1)              # room for one more KV entry (may raise OutOfKVMemory)
    lay = alloc.layout([(seq, 1), ...])  # where to write it, where to read all KV
    ... attention writes KV at lay.slot_mapping, reads via lay.kv_indices ...
    alloc.commit(seq, 1)               # that KV now exists (full pages become shareable)
    alloc.append(seq, [next_token])    # the sampled token, whose KV comes next step

or the same step for the whole batch at once, one call per kind (the
block-table backends do each in one tight pass; others loop the single calls)::

    alloc.reserve_many(seqs, 1)        # all or nothing across the batch
    lay = alloc.layout([(seq, 1) for seq in seqs])
    alloc.commit_many(seqs, 1)
    alloc.append_many(seqs, [[tok] for tok in sampled])

Every method either succeeds or raises a :class:`~kvmem.errors.KVError`
subclass and leaves the allocator exactly as it was.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Protocol, TypeVar

import torch

from kvmem.errors import (
    DriverError,
    DuplicateSequence,
    IntegrityError,
    InvalidArgument,
    KVError,
    OutOfKVMemory,
    UnknownSequence,
)
from kvmem.layout import BatchLayout
from kvmem.native import token_list
from kvmem.spec import KVSpec
from kvmem.storage import LayerKV

__all__ = [
    "DriverError",
    "DuplicateSequence",
    "IntegrityError",
    "InvalidArgument",
    "Capabilities",
    "KVAllocator",
    "KVError",
    "KVStats",
    "OutOfKVMemory",
    "SeqInfo",
    "SwapHandle",
    "UnknownSequence",
    "available_backends",
    "backend_class",
    "create_allocator",
    "register_backend",
]

SeqId = Hashable


@dataclass(frozen=True)
class Capabilities:
    """What a backend does beyond the core contract, declared rather than probed.

    The engine, the server and the benchmarks read these; a call a backend
    does not declare raises :class:`~kvmem.errors.InvalidArgument`.
    """

    prefix_caching: bool = False
    """``add`` may report leading tokens whose KV is already cached."""
    swap: bool = False
    """``swap_out`` / ``swap_in`` move KV to host memory and back."""
    keep_on_host: bool = False
    """``free(seq, keep_on_host=True)`` parks KV on the host; ``resume`` takes it back."""
    fork: bool = False
    """``fork`` shares KV copy-on-write."""
    multi_process: bool = False
    """The allocator spans several processes (every rank must make the same calls)."""

    def names(self) -> list[str]:
        """The names of the capabilities that are on, in declaration order."""
        return [k for k, v in self.__dict__.items() if v]


@dataclass(frozen=True)
class KVStats:
    """A snapshot of an allocator's memory, in token slots (``*_bytes`` for bytes).

    ``capacity = used + free``; ``free`` includes ``cached`` slots, which hold
    reusable prefix KV but can be evicted at any time. ``used`` slots are held
    by sequences: ``filled`` of them hold KV, ``reserved`` are claimed for KV
    still to come, and the rest are the unused tail of partly filled pages.
    """

    page_size: int
    bytes_per_token: int
    capacity_tokens: int
    used_tokens: int
    filled_tokens: int
    reserved_tokens: int
    cached_tokens: int
    free_tokens: int
    swapped_tokens: int
    num_seqs: int
    num_swapped_seqs: int
    prefix_queries: int = 0
    prefix_hits: int = 0
    extra: Mapping[str, float] = field(default_factory=dict)

    def _b(self, tokens: int) -> int:
        return tokens * self.bytes_per_token

    @property
    def capacity_bytes(self) -> int:
        """Bytes of KV the allocator can hold."""
        return self._b(self.capacity_tokens)

    @property
    def used_bytes(self) -> int:
        """Bytes of pages held by sequences."""
        return self._b(self.used_tokens)

    @property
    def free_bytes(self) -> int:
        """Bytes of pages not held by any sequence (cached ones included)."""
        return self._b(self.free_tokens)

    @property
    def swapped_bytes(self) -> int:
        """Bytes of KV moved to host memory."""
        return self._b(self.swapped_tokens)

    @property
    def usage(self) -> float:
        """Fraction of capacity held by sequences."""
        return self.used_tokens / self.capacity_tokens if self.capacity_tokens else 0.0

    @property
    def fragmentation(self) -> float:
        """Fraction of held slots that hold no KV (reserved or wasted tail)."""
        return 1.0 - self.filled_tokens / self.used_tokens if self.used_tokens else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        """Fraction of prompt tokens offered to ``add`` that were found cached."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


@dataclass(frozen=True)
class SeqInfo:
    """What an allocator knows of one sequence."""

    num_tokens: int
    num_computed: int
    capacity: int
    swapped: bool


class SwapHandle(Protocol):
    """An asynchronous swap in flight: poll it or wait for it."""

    def done(self) -> bool:
        """True once the copy has finished (successfully or not)."""
        ...

    def wait(self, timeout: float | None = None) -> None:
        """Block until done; re-raises the copy's error, if any."""
        ...


class KVAllocator(ABC):
    """The KV memory of one model replica: sequences, their slots, their KV tensors.

    Subclasses register with :func:`register_backend` and are built through
    :func:`create_allocator`. Constructors take the spec first and accept at
    least ``num_tokens`` or ``num_bytes`` (capacity) and ``device``. A backend
    normally subclasses :class:`kvmem.backends.base.KVBackend`, which implements
    the sequence bookkeeping and leaves only the memory to the backend.
    """

    spec: KVSpec
    page_size: int
    """Tokens per page of the :class:`~kvmem.layout.BatchLayout` kernels read."""
    granularity: int
    """Tokens a reservation rounds up to: the unit memory grows by, per sequence."""
    device: torch.device
    capabilities: Capabilities = Capabilities()
    """What this backend declares beyond the core contract (an instance may narrow it)."""

    @abstractmethod
    def add(self, seq_id: SeqId, token_ids: Sequence[int], cache_salt: Hashable = None) -> int:
        """Register a sequence with its prompt; return how many leading tokens already have KV.

        A prefix-caching backend may report cached tokens: those count as
        computed, and their slots are held. The last token is never reported
        cached, so the caller always has at least one token to run.
        ``cache_salt`` separates cache namespaces (a tenant, an adapter):
        prompts with different salts never share KV.
        Raises DuplicateSequence, InvalidArgument.
        """

    @abstractmethod
    def append(self, seq_id: SeqId, token_ids: Sequence[int]) -> None:
        """Add known tokens (e.g. the sampled one) whose KV is not written yet."""

    @abstractmethod
    def reserve(self, seq_id: SeqId, num_tokens: int) -> None:
        """Ensure slots for KV entries ``[num_computed, num_computed + num_tokens)``.

        Idempotent: reserving fewer than already held changes nothing.
        Raises OutOfKVMemory and changes nothing when the pool is short.
        """

    @abstractmethod
    def can_reserve(self, requests: Mapping[SeqId, int]) -> bool:
        """Whether ``reserve(seq, n)`` for every ``{seq: n}`` would succeed at once."""

    @abstractmethod
    def layout(self, batch: Sequence[tuple[SeqId, int]]) -> BatchLayout:
        """Kernel inputs for ``[(seq_id, num_new_tokens), ...]``.

        The new tokens of each sequence are its next uncomputed ones; their
        slots must be reserved. Changes nothing.
        """

    @abstractmethod
    def commit(self, seq_id: SeqId, num_tokens: int) -> None:
        """Record that ``num_tokens`` more KV entries are written."""

    # ------------------------------------------------------------ batched calls
    # Each equals the loop of its single call over the batch, except that it is
    # all or nothing: every argument and sequence is checked (and for
    # reserve_many, the room for all of them) before anything changes, with the
    # single call's typed errors. An empty batch changes nothing. Backends
    # override them with a faster pass; these versions use only the public calls.

    def append_many(self, seq_ids: Sequence[SeqId], token_ids: Sequence[Sequence[int]]) -> None:
        """``append(seq_ids[i], token_ids[i])`` for every i, all or nothing.

        Raises InvalidArgument (lengths differ, a sequence named twice, bad
        tokens) and UnknownSequence before any token is added.
        """
        ids = check_batch_ids(seq_ids)
        if isinstance(token_ids, (str, bytes)) or len(token_ids) != len(ids):
            raise InvalidArgument(f"{len(ids)} sequences need as many token lists")
        toks = [check_tokens(t) for t in token_ids]
        for sid in ids:
            self.seq_info(sid)
        for sid, t in zip(ids, toks, strict=True):
            self.append(sid, t)

    def reserve_many(self, seq_ids: Sequence[SeqId], num_tokens: int | Sequence[int]) -> None:
        """``reserve(seq_ids[i], n_i)`` for every i (``num_tokens``: one count for all, or
        one per sequence), all or nothing: OutOfKVMemory, changing nothing, unless they
        all fit at once (as :meth:`can_reserve` tells).
        """
        ids, counts = batch_counts(seq_ids, num_tokens, "num_tokens")
        requests = dict(zip(ids, counts, strict=True))
        if requests and not self.can_reserve(requests):
            raise OutOfKVMemory(f"the {len(ids)} reservations do not fit at once")
        for sid, n in requests.items():
            self.reserve(sid, n)

    def commit_many(self, seq_ids: Sequence[SeqId], num_tokens: int | Sequence[int]) -> None:
        """``commit(seq_ids[i], n_i)`` for every i (``num_tokens``: one count for all, or one
        per sequence), all or nothing: every count is checked against its sequence first."""
        ids, counts = batch_counts(seq_ids, num_tokens, "num_tokens")
        for sid, n in zip(ids, counts, strict=True):
            info = self.seq_info(sid)
            if info.swapped:
                raise InvalidArgument(f"sequence {sid!r} is swapped out; swap it in first")
            check_commit(sid, info.num_computed, info.capacity, info.num_tokens, n)
        for sid, n in zip(ids, counts, strict=True):
            self.commit(sid, n)

    @abstractmethod
    def fork(self, parent_id: SeqId, child_id: SeqId) -> None:
        """Make ``child_id`` a copy of the parent that shares its KV, copy-on-write."""

    @abstractmethod
    def free(self, seq_id: SeqId, keep_on_host: bool = False) -> None:
        """Release everything the sequence holds (device and host).

        With ``keep_on_host=True`` (backends declaring ``keep_on_host``) the
        sequence's KV is parked on the host for its next turn instead, to be
        taken back with :meth:`resume`; parked KV may be evicted at any time.
        """

    def resume(self, seq_id: SeqId, token_ids: Sequence[int], cache_salt: Hashable = None) -> int:
        """Start the next turn of a sequence parked with ``free(keep_on_host=True)``.

        If ``seq_id`` is parked with the same ``cache_salt`` and ``token_ids``
        extends its tokens, its KV comes back (OutOfKVMemory if it does not
        fit, the sequence staying parked), the new tokens are appended and its
        KV count is returned. Otherwise any parked copy is dropped and this is
        :meth:`add`. Backends without ``keep_on_host`` simply ``add``.
        """
        return self.add(seq_id, token_ids, cache_salt=cache_salt)

    @abstractmethod
    def swap_out(self, seq_ids: Iterable[SeqId]) -> SwapHandle:
        """Move the sequences' KV to host memory; their device slots are released."""

    @abstractmethod
    def swap_in(self, seq_ids: Iterable[SeqId]) -> SwapHandle:
        """Bring swapped sequences' KV back to the device."""

    @abstractmethod
    def layer(self, i: int) -> LayerKV:
        """The KV storage of layer ``i``."""

    @abstractmethod
    def stats(self) -> KVStats:
        """A snapshot of memory use."""

    @abstractmethod
    def seq_info(self, seq_id: SeqId) -> SeqInfo:
        """Counts of one sequence (raises UnknownSequence)."""

    @abstractmethod
    def seq_ids(self) -> list[SeqId]:
        """Every registered sequence, swapped ones included."""

    @abstractmethod
    def check_integrity(self) -> None:
        """Raise IntegrityError if any internal invariant is broken."""

    @abstractmethod
    def close(self) -> None:
        """Release all memory; the allocator cannot be used afterwards."""

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self.seq_ids()

    def __enter__(self) -> KVAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


A = TypeVar("A", bound=type[KVAllocator])

BUILTIN_BACKENDS: dict[str, str] = {
    "paged": "kvmem.backends.paged:PagedAllocator",
    "grouped": "kvmem.backends.grouped:GroupedAllocator",
    "vmem": "kvmem.backends.vmem:VMemAllocator",
    "sharded": "kvmem.distributed.sharded:ShardedAllocator",
}
"""The built-in backends as lazy ``"module:Class"`` entries, imported on first use."""

ENTRY_POINT_GROUP = "kvmem.backends"
"""Third-party backends: entry points ``name = "package.module:Class"`` in this group."""

_REGISTERED: dict[str, type[KVAllocator]] = {}


def register_backend(name: str) -> Callable[[A], A]:
    """Class decorator: make a backend class available to :func:`create_allocator` as ``name``.

    For backends defined at run time (tests, notebooks); packaged backends
    declare an entry point in the ``kvmem.backends`` group instead.
    """

    def deco(cls: A) -> A:
        _REGISTERED[name] = cls
        return cls

    return deco


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load(target: str) -> type[KVAllocator]:
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, KVAllocator)):
        raise InvalidArgument(f"{target} is not a KVAllocator subclass")
    return cls


def available_backends() -> list[str]:
    """Names accepted by :func:`create_allocator`; nothing is imported."""
    return sorted({*BUILTIN_BACKENDS, *_entry_points(), *_REGISTERED})


def backend_class(kind: str) -> type[KVAllocator]:
    """The class registered as ``kind``, imported now (InvalidArgument if unknown)."""
    if kind in _REGISTERED:
        return _REGISTERED[kind]
    target = BUILTIN_BACKENDS.get(kind) or _entry_points().get(kind)
    if target is None:
        raise InvalidArgument(
            f"unknown backend {kind!r}; available: {', '.join(available_backends())}"
        )
    cls = _load(target)
    _REGISTERED[kind] = cls
    return cls


def create_allocator(kind: str, spec: KVSpec, **options: Any) -> KVAllocator:
    """Build the backend registered as ``kind`` (``"paged"``, ``"vmem"``, ...)."""
    if not isinstance(kind, str):
        raise InvalidArgument(f"backend kind must be a str, got {kind!r}")
    factory: Callable[..., KVAllocator] = backend_class(kind)  # constructors take the spec
    if not isinstance(spec, KVSpec):
        raise InvalidArgument(f"spec must be a KVSpec, got {type(spec).__name__}")
    return factory(spec, **options)


def capacity_pages(
    spec: KVSpec, page_size: int, num_tokens: int | None, num_bytes: int | None
) -> int:
    """Pages of ``page_size`` tokens for a capacity given in tokens or in bytes."""
    if (num_tokens is None) == (num_bytes is None):
        raise InvalidArgument("give exactly one of num_tokens or num_bytes")
    if num_bytes is not None:
        if num_bytes <= 0:
            raise InvalidArgument(f"num_bytes must be positive, got {num_bytes}")
        pages = num_bytes // spec.bytes_per_page(page_size)
    else:
        assert num_tokens is not None
        if num_tokens <= 0:
            raise InvalidArgument(f"num_tokens must be positive, got {num_tokens}")
        pages = num_tokens // page_size
    if pages <= 0:
        raise InvalidArgument("capacity is smaller than one page")
    return int(pages)


def check_count(name: str, n: object) -> int:
    """``n`` as a positive int, else InvalidArgument naming ``name``."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InvalidArgument(f"{name} must be a positive int, got {n!r}")
    return n


_INT = {int}


def check_tokens(token_ids: Sequence[int]) -> list[int]:
    """A non-empty list of non-negative token ids, else InvalidArgument."""
    toks = token_list(token_ids)  # the common case, checked and copied in one native pass
    if toks is not None:
        return toks
    if type(token_ids) is list and set(map(type, token_ids)) == _INT:
        toks = token_ids.copy()  # a prompt of plain ints: no conversion needed
    else:
        try:
            toks = [int(t) for t in token_ids]
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"token ids must be ints: {e}") from None
    if not toks:
        raise InvalidArgument("token ids must not be empty")
    if min(toks) < 0:
        raise InvalidArgument("token ids must be non-negative")
    return toks


def check_commit(
    seq_id: SeqId, num_computed: int, reserved: int, known: int, num_tokens: object
) -> int:
    """The KV length after committing ``num_tokens`` more entries, else InvalidArgument.

    The new entries must lie in reserved slots and belong to known tokens.
    """
    n = num_tokens if type(num_tokens) is int and num_tokens > 0 else None
    end = num_computed + (n if n is not None else check_count("num_tokens", num_tokens))
    if end > reserved:
        raise InvalidArgument(
            f"sequence {seq_id!r}: commit to {end} tokens beyond the {reserved} reserved"
        )
    if end > known:
        raise InvalidArgument(
            f"sequence {seq_id!r}: commit to {end} tokens but only {known} are known; "
            "append them first"
        )
    return end


def check_new_tokens(seq_id: SeqId, num_computed: int, reserved: int, num_tokens: object) -> int:
    """The KV length after a layout's ``num_tokens`` new entries, else InvalidArgument.

    The new entries must lie in reserved slots.
    """
    n = num_tokens if type(num_tokens) is int and num_tokens > 0 else None
    end = num_computed + (n if n is not None else check_count("num_new_tokens", num_tokens))
    if end > reserved:
        raise InvalidArgument(
            f"sequence {seq_id!r}: {end - num_computed} new tokens need {end} reserved slots, "
            f"{reserved} are; call reserve first"
        )
    return end


def batch_ids(batch: Sequence[tuple[SeqId, int]]) -> tuple[SeqId, ...]:
    """The sequence ids of a layout batch, else InvalidArgument if one appears twice."""
    ids = tuple(sid for sid, _ in batch)
    if len(set(ids)) != len(ids):
        raise InvalidArgument("a sequence appears twice in the batch")
    return ids


def check_batch_ids(seq_ids: Sequence[SeqId]) -> Sequence[SeqId]:
    """``seq_ids`` (a list or tuple of distinct ids), else InvalidArgument (batched calls)."""
    if not isinstance(seq_ids, (list, tuple)):
        if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, Sequence):
            raise InvalidArgument(f"pass a sequence of sequence ids, got {seq_ids!r}")
        seq_ids = list(seq_ids)
    try:
        distinct = len(set(seq_ids)) == len(seq_ids)
    except TypeError:
        raise InvalidArgument("sequence ids must be hashable") from None
    if not distinct:
        raise InvalidArgument("a sequence is named twice")
    return seq_ids


def batch_counts(
    seq_ids: Sequence[SeqId], num_tokens: int | Sequence[int], name: str
) -> tuple[Sequence[SeqId], list[int]]:
    """The ids of a batched call and one positive count per id (``num_tokens`` is one int for
    every sequence, or one per sequence), else InvalidArgument."""
    ids = check_batch_ids(seq_ids)
    if type(num_tokens) is int and num_tokens > 0:
        return ids, [num_tokens] * len(ids)
    if isinstance(num_tokens, (str, bytes)) or not isinstance(num_tokens, Sequence):
        return ids, [check_count(name, num_tokens)] * len(ids)
    if len(num_tokens) != len(ids):
        raise InvalidArgument(f"{len(ids)} sequences need {len(ids)} counts, got {len(num_tokens)}")
    counts = list(num_tokens)
    for n in counts:
        if type(n) is not int or n <= 0:
            check_count(name, n)
    return ids, counts


def check_seq_ids(seq_ids: Iterable[SeqId]) -> list[SeqId]:
    """``seq_ids`` as a list of distinct ids, else InvalidArgument (swap calls take these)."""
    if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, Iterable):
        raise InvalidArgument(f"pass an iterable of sequence ids, got {seq_ids!r}")
    ids = list(seq_ids)
    if len(set(ids)) != len(ids):
        raise InvalidArgument("a sequence is named twice")
    return ids


def raise_unknown(seq_id: SeqId) -> UnknownSequence:
    """The error for an unregistered sequence."""
    return UnknownSequence(f"unknown sequence {seq_id!r}")
