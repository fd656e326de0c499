"""A model of what KV each sequence should hold, to check any backend's data path.

Every token's K row is filled with one number derived from the token ids up
to and including it, and its V row with minus that number. Two sequences with
the same prefix therefore expect the same KV for it, which is exactly what a
prefix cache or a fork may share; any slot mix-up shows as a wrong number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from kvmem import KVAllocator
from kvmem.attention import reference


def token_values(tokens: Sequence[int]) -> list[float]:
    """The KV marker of each position of ``tokens``."""
    out, h = [], 17
    for t in tokens:
        h = (h * 1_000_003 + t + 1) % 16_777_213
        out.append(float(h))
    return out


def snapshot(alloc: KVAllocator) -> tuple[Any, dict[Hashable, Any]]:
    """Everything observable about an allocator's state: stats and every sequence's counts."""
    return alloc.stats(), {s: alloc.seq_info(s) for s in alloc.seq_ids()}


def fill(alloc: KVAllocator, sid: Hashable, tokens: dict, n: int) -> None:
    """Reserve, write (the model's values) and commit the next ``n`` tokens of ``sid``."""
    alloc.reserve(sid, n)
    write_step(alloc, [(sid, n)], tokens)


def write_step(alloc: KVAllocator, batch: list[tuple[Hashable, int]], tokens: dict) -> None:
    """Lay out ``batch``, check every sequence's existing KV, write the new KV, commit."""
    lay = alloc.layout(batch)
    spec = alloc.spec
    rows = []
    for b, (sid, n) in enumerate(batch):
        done = int(lay.seq_lens[b]) - n
        check_kv(alloc, lay, b, tokens[sid][:done])
        rows += token_values(tokens[sid])[done : done + n]
    vals = torch.tensor(rows, dtype=torch.float32)[:, None, None]
    k = vals.expand(-1, spec.num_kv_heads, spec.head_dim)
    for i in range(spec.num_layers):
        reference.write_kv(alloc.layer(i), lay, k + i, -k - i)
    for sid, n in batch:
        alloc.commit(sid, n)


def check_kv(alloc: KVAllocator, lay, b: int, tokens: Sequence[int]) -> None:
    """Assert that sequence ``b`` of ``lay`` holds the KV of ``tokens`` in every layer."""
    if not tokens:
        return
    pages = lay.kv_indices[int(lay.kv_indptr[b]) : int(lay.kv_indptr[b + 1])]
    spec = alloc.spec
    marks = torch.tensor(token_values(tokens), dtype=torch.float64)[:, None, None]
    expect = marks.expand(-1, spec.num_kv_heads, spec.head_dim)
    for i in range(spec.num_layers):
        k, v = reference.gather_kv(alloc.layer(i), pages, len(tokens), torch.float64)
        k, v = k.cpu(), v.cpu()
        assert torch.equal(k, expect + i), f"layer {i} K of {lay.seq_ids[b]!r} is wrong"
        assert torch.equal(v, -expect - i), f"layer {i} V of {lay.seq_ids[b]!r} is wrong"


def kv_digest(alloc: KVAllocator, lay, b: int, length: int) -> str:
    """SHA-256 of every stored byte of the first ``length`` KV entries of sequence ``b`` of
    ``lay``: codes, per-token int4 scales and zeros, and the per-layer fp8 scales."""
    pages = lay.kv_indices[int(lay.kv_indptr[b]) : int(lay.kv_indptr[b + 1])]
    return pages_digest(alloc, pages, length)


def pages_digest(alloc: KVAllocator, pages: torch.Tensor, length: int) -> str:
    """:func:`kv_digest` of the first ``length`` slots of ``pages``."""
    pages = pages.long()
    h = hashlib.sha256()
    for i in range(alloc.spec.num_layers):
        layer = alloc.layer(i)
        # those slots only: a vmem page is a whole virtual row, mapped only as far as the KV
        pos = torch.arange(length)
        page, off = pages[pos // layer.page_size], pos % layer.page_size
        for name in ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero"):
            t = getattr(layer, name)
            if t is None:
                continue
            if t.dim() == 4:  # per page and slot: the sequence's first ``length`` slots
                t = t[page, off]
            h.update(name.encode())
            h.update(t.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
