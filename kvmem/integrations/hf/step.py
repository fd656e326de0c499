"""One forward pass of a transformers model over kvmem memory: which rows write where.

A transformers batch is a rectangle: ``B`` rows, each left-padded to the same
length. kvmem sequences hold no padding, so each row maps to one sequence
plus a count of leading pad columns::

    padded columns:   0   1   2   3   4   5 | 6   (past = 6, this step q = 1)
    row 0 (pad 2):    .   .   t0  t1  t2  t3| t4  -> sequence KV [t0..t3], writes t4
    row 1 (pad 0):    u0  u1  u2  u3  u4  u5| u6  -> sequence KV [u0..u5], writes u6

A row's KV occupies padded columns ``[pad, pad + computed)``; every row
reaches the same ``past``. Rows that are exact copies of another row (the
``num_beams`` copies of a prompt) write nothing: they are *followers*,
forked from their leader once its KV is committed, so copies share pages.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from kvmem.allocator import KVAllocator
from kvmem.errors import InvalidArgument, OutOfKVMemory
from kvmem.layout import BatchLayout
from kvmem.storage import LayerKV

from .inputs import UNKNOWN_TOKEN, new_id, same_rows
from .quant import dequantize


@dataclass
class Row:
    """One row of the batch: its kvmem sequence and where its KV sits among the padded columns."""

    seq: Hashable
    pad: int
    """Leading pad columns."""
    computed: int
    """KV entries written (the allocator's ``num_computed``)."""
    known: int
    """Token ids the allocator knows (``>= computed``)."""


@dataclass
class Step:
    """The plan of one forward pass, made at layer 0 and used by every layer."""

    rows: list[Row]
    """The batch rows once the step is committed (followers included)."""
    leaders: list[int]
    """Indices into ``rows`` of the rows that write KV, in layout order."""
    src: torch.Tensor
    """Per row, the position in ``leaders`` of the row whose KV it reads (int64 [B])."""
    new: list[int]
    """Per leader, the new tokens it writes."""
    past: int
    """Padded length before the step."""
    q: int
    """Columns in this step."""
    layout: BatchLayout
    sel: torch.Tensor
    """Flat ``row * q + column`` of every written token, in layout order (int64)."""
    lsel: torch.Tensor
    """The same tokens as ``leader_position * q + column`` (int64)."""
    added: list[Hashable]
    """Sequences registered by this step (freed if it is abandoned)."""
    followers: list[tuple[int, int]]
    """``(row, leader row)`` pairs forked when the step commits."""
    written: set[int] = field(default_factory=set)
    committed: bool = False
    _gather: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def total(self) -> int:
        """Padded length after the step."""
        return self.past + self.q

    @property
    def is_decode(self) -> bool:
        """One new token per writing row."""
        return self.layout.max_query_len == 1

    def pick(self, x: torch.Tensor) -> torch.Tensor:
        """The written tokens of ``x`` ``[B, heads, q, D]`` as ``[tokens, heads, D]``."""
        b, h, q, d = x.shape
        flat = x.transpose(1, 2).reshape(b * q, h, d)
        return flat.index_select(0, self.sel.to(x.device))

    def spread(self, out: torch.Tensor) -> torch.Tensor:
        """Per-token outputs ``[tokens, heads, D]`` back to ``[B, q, heads, D]`` (pads zero)."""
        nl = len(self.leaders)
        full = out.new_zeros(nl * self.q, *out.shape[1:])
        full[self.lsel.to(out.device)] = out
        full = full.view(nl, self.q, *out.shape[1:])
        if nl != len(self.rows):
            full = full.index_select(0, self.src.to(out.device))
        return full

    def _gather_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._gather is None:
            lay = self.layout
            dev = lay.block_table.device
            lens = lay.seq_lens.long()
            pads = torch.tensor(
                [self.rows[i].pad for i in self.leaders], dtype=torch.long, device=dev
            )
            who = torch.repeat_interleave(torch.arange(len(self.leaders), device=dev), lens)
            start = torch.cumsum(lens, 0) - lens
            t = torch.arange(int(lens.sum()), device=dev) - start[who]
            page = lay.block_table.long()[who, t // lay.page_size]
            off = t % lay.page_size
            dest = who * self.total + pads[who] + t
            self._gather = (page, off, dest)
        return self._gather

    def dense(self, layer: LayerKV, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's K and V as ``[B, kv_heads, past + q, head_dim]``, right-aligned, pads zero.

        Reads only the slots that hold the rows' KV (never a page's unused tail).
        """
        page, off, dest = self._gather_index()
        k, v = dequantize(layer, page, off, dtype)
        spec = layer.spec
        nl = len(self.leaders)
        out = []
        for x in (k, v):
            full = x.new_zeros(nl * self.total, spec.num_kv_heads, spec.head_dim)
            full[dest.to(x.device)] = x
            full = full.view(nl, self.total, spec.num_kv_heads, spec.head_dim)
            if nl != len(self.rows):
                full = full.index_select(0, self.src.to(x.device))
            out.append(full.transpose(1, 2).contiguous())
        return out[0], out[1]


def plan_step(
    alloc: KVAllocator,
    rows: list[Row],
    copies: int,
    past: int,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor | None,
    sliding: int | None,
) -> Step:
    """Plan one forward pass over layer-0 K/V ``[B, heads, q, D]``: register, reserve, lay out.

    ``rows`` are the cached rows (``[]`` for a fresh batch, whose rows are
    registered here with unknown token ids and deduplicated); with
    ``copies > 1`` each cached row stands for that many consecutive batch
    rows (``generate`` expanding a prepared prompt for beam search). ``pos``
    are the position ids ``[B or 1, q]``. All or nothing: on any error the
    sequences registered here are freed again.
    """
    b, _, q, _ = k.shape
    total = past + q
    if pos is not None:
        pos = pos.expand(b, q).detach().cpu()
    plan: list[Row] = []
    if rows:
        for i in range(b):
            r = rows[i // copies]
            plan.append(Row(r.seq, r.pad, r.computed, r.known))
        group = [i - i % copies for i in range(b)]
    else:
        for i in range(b):
            real = int(pos[i, -1]) + 1 if pos is not None else q
            if not 1 <= real <= q:
                got = [] if pos is None else pos[i].tolist()
                raise InvalidArgument(f"row {i}: positions {got} do not start at 0")
            plan.append(Row(None, total - real, 0, 0))
        group = same_rows(k, v, pos)
    leaders = sorted(set(group))
    new = []
    for i in leaders:
        r = plan[i]
        if r.pad >= past and r.computed == 0:
            n = total - r.pad
        else:
            n = q if r.pad + r.computed == past else 0
        if not 1 <= n <= q or (pos is not None and int(pos[i, -1]) != r.computed + n - 1):
            last = "?" if pos is None else str(int(pos[i, -1]))
            raise InvalidArgument(
                f"row {i}: position {last} does not continue the cached {r.computed} tokens; "
                "call reset() or prepare() before an unrelated batch"
            )
        new.append(n)
    if (
        sliding is not None
        and max(plan[i].computed + n for i, n in zip(leaders, new, strict=True)) > sliding
    ):
        raise InvalidArgument(
            f"sequences longer than the sliding window ({sliding}) are not supported"
        )
    added: list[Hashable] = []
    try:
        for i, n in zip(leaders, new, strict=True):
            if plan[i].seq is None:
                sid = new_id()
                alloc.add(sid, [UNKNOWN_TOKEN] * n, cache_salt=sid)
                added.append(sid)
                plan[i] = Row(sid, plan[i].pad, 0, n)
        need = {plan[i].seq: n for i, n in zip(leaders, new, strict=True)}
        if not alloc.can_reserve(need):
            raise OutOfKVMemory(
                f"the KV pool cannot take {sum(new)} more tokens for {len(leaders)} sequences"
            )
        for sid, n in need.items():
            alloc.reserve(sid, n)
        layout = alloc.layout(list(need.items()))
    except BaseException:
        for sid in added:
            alloc.free(sid)
        raise
    src_of = {row: j for j, row in enumerate(leaders)}
    sel: list[int] = []
    lsel: list[int] = []
    for j, (i, n) in enumerate(zip(leaders, new, strict=True)):
        sel.extend(range(i * q + q - n, i * q + q))
        lsel.extend(range(j * q + q - n, j * q + q))
    return Step(
        rows=plan,
        leaders=leaders,
        src=torch.tensor([src_of[group[i]] for i in range(b)], dtype=torch.long),
        new=new,
        past=past,
        q=q,
        layout=layout,
        sel=torch.tensor(sel, dtype=torch.long, device=k.device),
        lsel=torch.tensor(lsel, dtype=torch.long, device=k.device),
        added=added,
        followers=[(i, group[i]) for i in range(b) if i not in src_of],
    )
