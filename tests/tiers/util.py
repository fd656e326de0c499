"""Helpers of the tier tests: pools with random bytes, page chains, page bytes."""

from __future__ import annotations

import torch

from kvmem import KVSpec, PagePool
from kvmem.tiers import BlockKey

PAGE = 4


def make_pool(num_pages: int = 8, layout: str = "block", kv_format: str = "auto") -> PagePool:
    """A small CPU pool filled with random bytes."""
    spec = KVSpec(2, 2, 8, dtype=torch.float16, kv_format=kv_format)
    pool = PagePool(spec, num_pages, PAGE, "cpu", layout)  # type: ignore[arg-type]
    randomize(pool, 0)
    return pool


def randomize(pool: PagePool, seed: int) -> None:
    """Fill every page of ``pool`` with random bytes."""
    g = torch.Generator().manual_seed(seed)
    for b in pool.buffers:
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=g))


def page(pool: PagePool, i: int) -> torch.Tensor:
    """A copy of device page ``i``'s bytes over every buffer."""
    return torch.cat([b[i].clone() for b in pool.buffers])


def chain(n: int, root: int = 7, tag: int = 0) -> list[BlockKey]:
    """``n`` chained page keys (as the paged backend builds them) seeded by ``root``."""
    keys: list[BlockKey] = []
    parent = root
    for i in range(n):
        key = (parent, tuple(range(tag * 1000 + i * PAGE, tag * 1000 + (i + 1) * PAGE)))
        keys.append(key)
        parent = hash(key)
    return keys
