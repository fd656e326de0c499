"""Helpers of the swap tests: allocators, KV writes, digests."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch

from kvmem import KVAllocator, KVSpec
from kvmem.attention import reference
from tests.conformance.kvmodel import kv_digest, pages_digest, write_step
from tests.conformance.test_stateful import supports_swap
from tests.conftest import conformance_backends, make_allocator

#: Backends with the host-pool swap of kvmem.swap (keep_on_host, resume, swap_mode, reuse).
HOST_POOL_BACKENDS = ["paged", "grouped"]


def swap_backends() -> list[str]:
    """In-process backends whose swap_out/swap_in work."""
    out = []
    for kind in conformance_backends():
        with make_allocator(kind, KVSpec(1, 1, 4, dtype=torch.float32), 64) as a:
            if supports_swap(a):
                out.append(kind)
    return out


def fill(alloc: KVAllocator, sid: Hashable, tokens: dict[Hashable, list[int]], n: int) -> None:
    """Reserve, write (the kvmodel values) and commit the next ``n`` tokens of ``sid``."""
    alloc.reserve(sid, n)
    write_step(alloc, [(sid, n)], tokens)


def write_random(alloc: KVAllocator, sid: Hashable, n: int, seed: int) -> None:
    """Reserve, write random K and V (through the format's quantizer) and commit ``n`` tokens."""
    spec = alloc.spec
    alloc.reserve(sid, n)
    lay = alloc.layout([(sid, n)])
    g = torch.Generator().manual_seed(seed)
    for i in range(spec.num_layers):
        k = torch.randn(n, spec.num_kv_heads, spec.head_dim, generator=g) * 3
        v = torch.randn(n, spec.num_kv_heads, spec.head_dim, generator=g) * 3
        reference.write_kv(alloc.layer(i), lay, k.to(alloc.device), v.to(alloc.device))
    alloc.commit(sid, n)


def digest(alloc: Any, sid: Hashable) -> str:
    """Digest of every byte of ``sid``'s KV, through its block table (paged, grouped)."""
    pages = torch.tensor(alloc.block_table(sid), dtype=torch.long)
    return pages_digest(alloc, pages, alloc.seq_info(sid).num_computed)


def digest_any(alloc: KVAllocator, sid: Hashable) -> str:
    """Digest of every byte of ``sid``'s KV through a layout (any backend; needs a free slot)."""
    return kv_digest(alloc, alloc.layout([(sid, 1)]), 0, alloc.seq_info(sid).num_computed)


def snapshot(alloc: KVAllocator) -> tuple[Any, dict[Hashable, Any]]:
    """Everything observable about an allocator's state."""
    return alloc.stats(), {s: alloc.seq_info(s) for s in alloc.seq_ids()}
