"""Triton kernels over the vmem backend's layout: one page per sequence, mostly unmapped.

The page size is the allocator's ``max_seq_len`` and only the pages under
each sequence's reserved KV are mapped; a kernel that touched a slot past a
sequence's length would fault (SIGSEGV). Kernels must equal the reference
within 1e-5 (float32 queries, float64 reference on the same stored KV).
"""

from __future__ import annotations

import pytest
import torch

from kvmem import KVSpec, create_allocator
from kvmem.attention import reference as ref
from kvmem.attention import triton as tk

TOL = 1e-5


@pytest.mark.parametrize("fmt", ["fp16", "int4"])
def test_triton_prefill_and_decode_read_only_mapped_kv(fmt):
    spec = KVSpec(1, 2, 16, dtype=torch.float32, kv_format=fmt)
    a = create_allocator(
        "vmem",
        spec,
        num_tokens=2048,
        device="cpu",
        page_bytes=4096,
        max_seqs=4,
        max_seq_len=4096,
        map_ahead=False,
    )
    g = torch.Generator().manual_seed(1)
    lens = {"a": 23, "b": 70}
    for sid, n in lens.items():
        a.add(sid, [1] * n)
        a.reserve(sid, n)
    assert a.max_seq_len * spec.bytes_per_token_layer > 16 * 4096  # rows far larger than mapped
    lay = a.layout(list(lens.items()))
    n = lay.num_tokens
    k, v = torch.randn(n, 2, 16, generator=g), torch.randn(n, 2, 16, generator=g)
    tk.write_kv(a.layer(0), lay, k, v)
    q = torch.randn(n, 6, 16, generator=g)
    out, lse = tk.prefill(q, a.layer(0), lay)
    want, want_lse = ref.prefill(q.double(), a.layer(0), lay)
    assert (out.double() - want).abs().max() < TOL and (lse.double() - want_lse).abs().max() < TOL
    for sid, m in lens.items():
        a.commit(sid, m)
        a.append(sid, [2])
        a.reserve(sid, 1)
    lay = a.layout([(sid, 1) for sid in lens])
    tk.write_kv(a.layer(0), lay, k[:2], v[:2])
    q = torch.randn(2, 6, 16, generator=g)
    out, lse = tk.decode(q, a.layer(0), lay)
    want, want_lse = ref.decode(q.double(), a.layer(0), lay)
    assert (out.double() - want).abs().max() < TOL and (lse.double() - want_lse).abs().max() < TOL
    a.close()
