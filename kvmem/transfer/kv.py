"""A sequence's KV out of one allocator and into another, through the public allocator API.

Export reads the stored KV (codes and per-slot scales, every layer) of a
range of positions; import writes it into slots the destination hands out
from ``reserve`` + ``layout``, then commits. Only ``seq_info``, ``reserve``,
``layout``, ``layer(i)``, ``add``, ``append``, ``commit`` and ``free`` are
used, so every backend works on either side, and the two sides may differ in
backend and page size as long as the KVSpec is the same::

    source (paged, page 16)                 destination (vmem, one row per sequence)
    block_table [7, 2, 9]                   reserve + layout -> slot_mapping
    positions 0..39 -> slots 112.., 32..    positions 0..39 -> row 3, offsets 0..39
        read k/v[page, off] ── Chunk(start, parts) ──▶ write k/v[page, off], commit

The per-layer format scales (fp8 ``k_scale``/``v_scale``, int4 key
smoothing) are not per slot: they travel in :class:`SeqMeta` and must equal
the destination's, since codes mean nothing under another scale.

The destination side is all or nothing: :class:`Importer` registers the
sequence, writes chunk after chunk, and on any failure frees what it took
and raises; a finished import has exactly the source's tokens and computed
count.

A destination may already hold the sequence's first positions: its prefix
cache's full pages, or, on backends declaring ``keep_on_host``, a copy of
the same sequence id parked there by ``free(seq, keep_on_host=True)`` (the
previous turn of a conversation that decoded there) whose tokens the new
ones extend. ``Importer.begin`` registers with ``resume``, which takes such
a copy back; either way ``written`` says how many positions need not be
sent. An import that fails after taking a parked copy back parks it again.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvmem.allocator import KVAllocator
from kvmem.errors import InvalidArgument, UnknownSequence
from kvmem.spec import KVSpec

#: LayerKV parts with one entry per slot; 2-d or smaller ones are per-layer format scales
SLOT_PARTS = ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero")
SCALE_PARTS = ("k_scale", "v_scale", "k_smooth")


@dataclass
class SeqMeta:
    """What a destination needs besides the KV bytes: tokens, computed count, spec, scales."""

    tokens: list[int]
    num_computed: int
    spec: KVSpec
    scales: list[tuple[int, str, torch.Tensor]] = field(default_factory=list)


@dataclass
class Chunk:
    """The stored KV of positions ``[start, start + n)``: one tensor ``[n, ...]`` per slot part
    (layer after layer, in :data:`SLOT_PARTS` order)."""

    start: int
    parts: list[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        """How many positions the chunk covers."""
        return int(self.parts[0].shape[0]) if self.parts else 0


def _check_local(alloc: KVAllocator) -> None:
    if alloc.capabilities.multi_process:
        raise InvalidArgument("KV transfer needs a single-process allocator (not sharded)")


def slot_parts(alloc: KVAllocator) -> list[tuple[int, str]]:
    """``(layer, part name)`` of every per-slot tensor of ``alloc``'s storage."""
    out = []
    for i in range(alloc.spec.num_layers):
        layer = alloc.layer(i)
        for name in SLOT_PARTS:
            t = getattr(layer, name)
            if t is not None and t.dim() >= 3:
                out.append((i, name))
    return out


def format_scales(alloc: KVAllocator) -> list[tuple[int, str, torch.Tensor]]:
    """The per-layer format scales of ``alloc`` (CPU copies)."""
    out = []
    for i in range(alloc.spec.num_layers):
        layer = alloc.layer(i)
        for name in SCALE_PARTS:
            t = getattr(layer, name)
            if t is not None and t.dim() < 3:
                out.append((i, name, t.detach().cpu().clone()))
    return out


def export_meta(alloc: KVAllocator, seq_id: Hashable, tokens: Sequence[int]) -> SeqMeta:
    """Tokens, computed count and format scales of ``seq_id``; changes nothing.

    ``tokens`` are the sequence's token ids as the caller knows them (the
    allocator API does not hand them out); their count must match.
    """
    _check_local(alloc)
    info = alloc.seq_info(seq_id)
    if len(tokens) != info.num_tokens:
        raise InvalidArgument(
            f"{len(tokens)} tokens given; sequence {seq_id!r} has {info.num_tokens}"
        )
    return SeqMeta(list(tokens), info.num_computed, alloc.spec, format_scales(alloc))


def _slots(alloc: KVAllocator, seq_id: Hashable, start: int, end: int) -> torch.Tensor:
    """Slot (page * page_size + offset) of each position in ``[start, end)``, all computed.

    Reads the page table through ``layout`` of one new token, so the
    sequence needs one reserved slot past its computed ones; one is
    reserved if it has none (the next decode step needs it anyway).
    """
    info = alloc.seq_info(seq_id)
    if not 0 <= start <= end <= info.num_computed:
        raise InvalidArgument(
            f"positions [{start}, {end}) of {seq_id!r} are not all computed "
            f"({info.num_computed} are)"
        )
    if info.capacity <= info.num_computed:
        alloc.reserve(seq_id, 1)
    lay = alloc.layout([(seq_id, 1)])
    ps = lay.page_size
    pos = torch.arange(start, end, dtype=torch.int64)
    pages = lay.block_table[0].to("cpu", torch.int64)[pos // ps]
    return pages * ps + pos % ps


def read_kv(alloc: KVAllocator, seq_id: Hashable, start: int, end: int) -> Chunk:
    """The stored KV of positions ``[start, end)`` of ``seq_id`` as one :class:`Chunk`."""
    _check_local(alloc)
    slots = _slots(alloc, seq_id, start, end)
    parts = []
    for i, name in slot_parts(alloc):
        t = getattr(alloc.layer(i), name)
        ps = t.shape[1]
        s = slots.to(t.device)
        parts.append(t[s // ps, s % ps].clone())
    return Chunk(start, parts)


def export_chunks(
    alloc: KVAllocator,
    seq_id: Hashable,
    start: int = 0,
    end: int | None = None,
    chunk_tokens: int = 256,
) -> Iterator[Chunk]:
    """The KV of positions ``[start, end)`` (default: every computed one) in chunks of at most
    ``chunk_tokens`` positions."""
    if type(chunk_tokens) is not int or chunk_tokens <= 0:
        raise InvalidArgument(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    stop = alloc.seq_info(seq_id).num_computed if end is None else end
    for a in range(start, stop, chunk_tokens):
        yield read_kv(alloc, seq_id, a, min(stop, a + chunk_tokens))


class Importer:
    """Builds a sequence in ``dst`` from a stream of chunks; all or nothing.

    ``begin`` registers it with the first tokens (``resume``: a copy parked
    here under the same id whose tokens these extend comes back, and counts
    as written); ``extend`` adds tokens the source generated since;
    ``write`` writes a chunk (the next positions, any prefix-cache hit or
    parked copy skipped) and commits it; ``finish`` checks that the sequence
    is complete; ``keep`` makes it final. Until then any failure frees the
    sequence in ``dst`` (parks it again if ``begin`` took it back) and
    re-raises (:meth:`abort` does the same on the caller's request).
    """

    def __init__(self, dst: KVAllocator, seq_id: Hashable, meta: SeqMeta) -> None:
        _check_local(dst)
        if meta.spec != dst.spec:
            raise InvalidArgument(f"KVSpec differs: source {meta.spec}, destination {dst.spec}")
        mine = {(i, n): t for i, n, t in format_scales(dst)}
        for i, n, t in meta.scales:
            if (i, n) not in mine or not torch.equal(mine[(i, n)], t.cpu()):
                raise InvalidArgument(f"layer {i} {n} differs between source and destination")
        self.dst = dst
        self.seq_id = seq_id
        self.parts = slot_parts(dst)
        self.written = 0
        self.num_tokens = 0
        self.active = False
        #: Whether ``begin`` took back a copy parked here (``abort`` then parks it again).
        self.resumed = False

    def begin(self, tokens: Sequence[int]) -> None:
        """Register the sequence with ``tokens``; a prefix-cache hit or a parked copy the
        tokens extend counts as written."""
        parked = self.dst.capabilities.keep_on_host and _parked(self.dst, self.seq_id)
        self.written = self.dst.resume(self.seq_id, list(tokens))
        self.resumed = parked and self.written > 0
        self.num_tokens = len(tokens)
        self.active = True

    def extend(self, tokens: Sequence[int]) -> None:
        """Tokens the source has appended since."""
        if tokens:
            self._guard(lambda: self.dst.append(self.seq_id, list(tokens)))
            self.num_tokens += len(tokens)

    def reserve(self, total: int) -> None:
        """Hold room for ``total`` positions of the sequence (written ones included)."""
        if total > self.written:
            self._guard(lambda: self.dst.reserve(self.seq_id, total - self.written))

    def write(self, chunk: Chunk) -> None:
        """Write and commit ``chunk``; it must start at or before the next unwritten position."""
        self._guard(lambda: self._write(chunk))

    def _write(self, chunk: Chunk) -> None:
        if chunk.start > self.written:
            raise InvalidArgument(f"chunk starts at {chunk.start}, {self.written} are written")
        skip = self.written - chunk.start
        n = chunk.num_tokens - skip
        if n <= 0:
            return
        if len(chunk.parts) != len(self.parts):
            raise InvalidArgument(f"expected {len(self.parts)} KV parts, got {len(chunk.parts)}")
        self.dst.reserve(self.seq_id, n)
        slots = self.dst.layout([(self.seq_id, n)]).slot_mapping.to(torch.int64)
        for (i, name), t in zip(self.parts, chunk.parts, strict=True):
            store = getattr(self.dst.layer(i), name)
            if t.shape[1:] != store.shape[2:] or t.dtype != store.dtype:
                raise InvalidArgument(f"KV part {name} of layer {i} does not fit the destination")
            s = slots.to(store.device)
            ps = store.shape[1]
            store[s // ps, s % ps] = t[skip:].to(store.device)
        self.dst.commit(self.seq_id, n)
        self.written += n

    def finish(self, num_computed: int) -> None:
        """Check that exactly ``num_computed`` positions are written."""
        if self.written != num_computed:
            self.abort()
            raise InvalidArgument(f"import ended with {self.written} of {num_computed} written")

    def keep(self) -> None:
        """The import is final: :meth:`abort` no longer frees the sequence."""
        self.active = False

    def abort(self) -> None:
        """Free what the import took (nothing if it never began or was kept); a parked copy
        that ``begin`` took back is parked again, with what was written since."""
        if self.active:
            self.active = False
            self.dst.free(self.seq_id, keep_on_host=self.resumed)

    def _guard(self, fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException:
            self.abort()
            raise


def _parked(alloc: KVAllocator, seq_id: Hashable) -> bool:
    """Whether ``seq_id`` is registered in ``alloc`` and out on the host (parked)."""
    try:
        return alloc.seq_info(seq_id).swapped
    except UnknownSequence:
        return False


def import_kv(dst: KVAllocator, seq_id: Hashable, meta: SeqMeta, chunks: Iterable[Chunk]) -> None:
    """Build ``seq_id`` in ``dst`` from ``meta`` and ``chunks``; all or nothing."""
    imp = Importer(dst, seq_id, meta)
    imp.begin(meta.tokens)
    try:
        for c in chunks:
            imp.write(c)
    except BaseException:  # the source's errors too: nothing stays here
        imp.abort()
        raise
    imp.finish(meta.num_computed)
    imp.keep()


def copy_sequence(
    src: KVAllocator,
    seq_id: Hashable,
    tokens: Sequence[int],
    dst: KVAllocator,
    dst_seq_id: Hashable | None = None,
    chunk_tokens: int = 256,
) -> None:
    """Copy ``seq_id`` (its ``tokens`` and KV) from ``src`` into ``dst`` (in one process)."""
    meta = export_meta(src, seq_id, tokens)
    chunks = export_chunks(src, seq_id, chunk_tokens=chunk_tokens)
    import_kv(dst, seq_id if dst_seq_id is None else dst_seq_id, meta, chunks)


__all__ = [
    "Chunk",
    "Importer",
    "SeqMeta",
    "copy_sequence",
    "export_chunks",
    "export_meta",
    "format_scales",
    "import_kv",
    "read_kv",
    "slot_parts",
]
