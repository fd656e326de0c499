"""Shared builders for the attention tests: pools, random page tables, layouts."""

from __future__ import annotations

import numpy as np
import torch

from kvmem import KVSpec, PagePool
from kvmem.attention import reference as ref
from kvmem.layout import BatchLayout, build_layout

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: fp8 scales that differ per KV head (2 heads), so a wrong head index shows.
FP8_K_SCALES = torch.tensor([0.02, 0.05])
FP8_V_SCALES = torch.tensor([0.03, 0.01])


def make_pool(
    fmt: str,
    *,
    kv_heads: int = 2,
    dim: int = 16,
    num_pages: int = 48,
    page_size: int = 4,
    layout: str = "block",
    group_size: int | None = None,
    num_layers: int = 2,
    key_rotation: str = "none",
) -> tuple[KVSpec, PagePool]:
    """A pool of ``num_layers`` layers (tests use the last, so layer offsets matter)."""
    if fmt == "int4" and group_size is None:
        group_size = 8
    spec = KVSpec(
        num_layers,
        kv_heads,
        dim,
        dtype=torch.float32,
        kv_format=fmt,
        group_size=group_size if fmt == "int4" else None,
        key_rotation=key_rotation,  # type: ignore[arg-type]
    )
    pool = PagePool(spec, num_pages, page_size, device=DEV, layout=layout)  # type: ignore[arg-type]
    if spec.fmt.kind == "fp8":
        for i in range(num_layers):
            pool.set_fp8_scales(i, FP8_K_SCALES[:kv_heads], FP8_V_SCALES[:kv_heads])
    return spec, pool


def random_table(
    rng: np.random.Generator, num_pages: int, seq_lens: list[int], page_size: int
) -> np.ndarray:
    """Dense page rows over randomly assigned, distinct pages."""
    perm = rng.permutation(num_pages)
    need = [(n + page_size - 1) // page_size for n in seq_lens]
    table = np.zeros((len(seq_lens), max(need)), dtype=np.int32)
    start = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[start : start + n]
        start += n
    return table


def layout_of(
    spec: KVSpec, page_size: int, table: np.ndarray, seq_lens: list[int], q_lens: list[int]
) -> BatchLayout:
    """A BatchLayout on the test device."""
    return build_layout(
        page_size,
        table,
        np.array(seq_lens),
        np.array(q_lens),
        tuple(range(len(seq_lens))),
        DEV,
        spec,
    )


def fill(
    spec: KVSpec,
    pool: PagePool,
    table: np.ndarray,
    seq_lens: list[int],
    seed: int,
    layer: int = -1,
) -> None:
    """Write random K/V for every position of every sequence with the reference writer."""
    lay = layout_of(spec, pool.page_size, table, seq_lens, seq_lens)
    g = torch.Generator().manual_seed(seed)
    n, h, d = sum(seq_lens), spec.num_kv_heads, spec.head_dim
    k = torch.randn(n, h, d, generator=g).to(DEV)
    v = torch.randn(n, h, d, generator=g).to(DEV)
    ref.write_kv(pool.layer(layer % spec.num_layers), lay, k, v)


def randq(
    n: int, heads: int, dim: int, seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fresh random queries on the test device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, heads, dim, generator=g).to(device=DEV, dtype=dtype)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, in float64."""
    return float((a.double() - b.double()).abs().max())
