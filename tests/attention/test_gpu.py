"""The kernels on a GPU at realistic shapes, and the FlashInfer adapter (``pytest -m gpu``).

Llama-3-8B-like heads (32 query heads, 8 KV heads, head dim 128), page
size 16, a batch of sequences up to 4096 tokens with random page
assignment, in a block-major pool of 4 layers (the last one is read).
Skipped without CUDA; not run yet on this project's CPU-only machines.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmem import KVSpec, PagePool
from kvmem.attention import reference as ref
from kvmem.formats import fp8_scales
from kvmem.layout import build_layout

pytestmark = pytest.mark.gpu

HQ, HKV, D, PS = 32, 8, 128, 16
LENS = [1, 17, 300, 1023, 4096, 2500, 64, 777]


def _setup(fmt: str, lens: list[int] = LENS, layout: str = "block", per_head: bool = True):
    dev = torch.device("cuda")
    spec = KVSpec(4, HKV, D, dtype=torch.float16, kv_format=fmt)
    need = [(n + PS - 1) // PS for n in lens]
    pool = PagePool(spec, sum(need) + 8, PS, device=dev, layout=layout)  # type: ignore[arg-type]
    g = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(sum(lens), HKV, D, device=dev, generator=g)
    v = torch.randn(sum(lens), HKV, D, device=dev, generator=g)
    if spec.fmt.kind == "fp8":
        pool.set_fp8_scales(
            3, fp8_scales(k, fmt, per_head=per_head), fp8_scales(v, fmt, per_head=per_head)
        )
    perm = np.random.default_rng(1).permutation(pool.num_pages).astype(np.int32)
    table = np.zeros((len(lens), max(need)), np.int32)
    start = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[start : start + n]
        start += n
    ids = tuple(range(len(lens)))
    full = build_layout(PS, table.copy(), np.array(lens), np.array(lens), ids, dev, spec)
    from kvmem.attention import triton as tk

    tk.write_kv(pool.layer(3), full, k, v)
    return spec, pool, table, ids, dev


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int4"])
def test_decode_and_prefill_match_reference_at_llama_shapes(fmt):
    from kvmem.attention import triton as tk

    spec, pool, table, ids, dev = _setup(fmt)
    layer = pool.layer(3)
    dec = build_layout(PS, table.copy(), np.array(LENS), np.ones(len(LENS)), ids, dev, spec)
    q = torch.randn(len(LENS), HQ, D, device=dev)
    want = ref.decode(q.double(), layer, dec)
    for splits in (None, 1, 7):
        got = tk.decode(q, layer, dec, num_splits=splits)
        assert _err(got[0], want[0]) <= 1e-5 and _err(got[1], want[1]) <= 1e-5
    if fmt != "fp32":
        q16 = q.to(torch.bfloat16 if fmt == "bf16" else torch.float16)
        got = tk.decode(q16, layer, dec)
        want16 = ref.decode(q16.double(), layer, dec)
        tol = 2e-2 if fmt == "bf16" else 4e-3
        assert _err(got[0], want16[0]) <= tol and _err(got[1], want16[1]) <= 1e-2
    q_lens = [1, 17, 64, 512, 1000, 2500, 1, 100]
    pre = build_layout(PS, table.copy(), np.array(LENS), np.array(q_lens), ids, dev, spec)
    qp = torch.randn(sum(q_lens), HQ, D, device=dev)
    want = ref.prefill(qp.double(), layer, pre)
    got = tk.prefill(qp, layer, pre)
    assert _err(got[0], want[0]) <= 1e-5 and _err(got[1], want[1]) <= 1e-5


def test_per_layer_pool_and_vmem_layout_on_gpu():
    from kvmem.attention import triton as tk

    spec, pool, table, ids, dev = _setup("fp8_e4m3", layout="layer")
    dec = build_layout(PS, table.copy(), np.array(LENS), np.ones(len(LENS)), ids, dev, spec)
    q = torch.randn(len(LENS), HQ, D, device=dev)
    got = tk.decode(q, pool.layer(3), dec)
    want = ref.decode(q.double(), pool.layer(3), dec)
    assert _err(got[0], want[0]) <= 1e-5
    vspec = KVSpec(1, HKV, D, dtype=torch.float16, kv_format="int4")
    vpool = PagePool(vspec, 4, 4096, device=dev)
    lens = [4096, 100, 2000]
    vt = np.array([[3], [0], [2]], np.int32)
    full = build_layout(4096, vt.copy(), np.array(lens), np.array(lens), (0, 1, 2), dev, vspec)
    tk.write_kv(
        vpool.layer(0),
        full,
        torch.randn(sum(lens), HKV, D, device=dev),
        torch.randn(sum(lens), HKV, D, device=dev),
    )
    dec = build_layout(4096, vt.copy(), np.array(lens), np.ones(3), (0, 1, 2), dev, vspec)
    q = torch.randn(3, HQ, D, device=dev)
    got = tk.decode(q, vpool.layer(0), dec)
    want = ref.decode(q.double(), vpool.layer(0), dec)
    assert _err(got[0], want[0]) <= 1e-5 and _err(got[1], want[1]) <= 1e-5


def test_fp8_queries_on_fp8_tensor_cores():
    from kvmem.attention import triton as tk

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    spec, pool, table, ids, dev = _setup("fp8_e4m3")
    dec = build_layout(PS, table.copy(), np.array(LENS), np.ones(len(LENS)), ids, dev, spec)
    q = torch.randn(len(LENS), HQ, D, device=dev, dtype=torch.float16)
    got = tk.decode(q, pool.layer(3), dec, fp8_query=True)
    want = ref.decode(q.double(), pool.layer(3), dec)
    a, b = got[0].double().flatten(), want[0].double().flatten()
    assert float(a @ b / (a.norm() * b.norm())) >= 0.995


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp8_e4m3"])
def test_flashinfer_adapter_matches_reference(fmt):
    from kvmem.attention import flashinfer as fi

    if not fi.available():
        pytest.skip("flashinfer is not installed")
    spec, pool, table, ids, dev = _setup(fmt, per_head=False)  # FlashInfer: one scale a tensor
    layer = pool.layer(3)
    qdt = torch.bfloat16 if fmt == "bf16" else torch.float16
    dec = build_layout(PS, table.copy(), np.array(LENS), np.ones(len(LENS)), ids, dev, spec)
    q = torch.randn(len(LENS), HQ, D, device=dev, dtype=qdt)
    got = fi.decode(q, layer, dec)
    want = ref.decode(q.double(), layer, dec)
    tol = 2e-2 if fmt == "bf16" else 5e-3
    assert _err(got[0], want[0]) <= tol and _err(got[1], want[1]) <= 1e-2
    q_lens = [1, 17, 64, 512, 1000, 2500, 1, 100]
    pre = build_layout(PS, table.copy(), np.array(LENS), np.array(q_lens), ids, dev, spec)
    qp = torch.randn(sum(q_lens), HQ, D, device=dev, dtype=qdt)
    got = fi.prefill(qp, layer, pre)
    want = ref.prefill(qp.double(), layer, pre)
    assert _err(got[0], want[0]) <= tol and _err(got[1], want[1]) <= 1e-2
