"""Triton kernels against the float64 reference on the same stored (dequantized) KV.

Without a GPU these run in the Triton interpreter (see conftest.py), so
shapes are small: head_dim 16 (24 where noted), 2 KV heads, 6 query heads
(GQA group 3, which also exercises the padding of the head tile), page
size 4, a few sequences of up to 30 tokens with random page assignment.

Tolerances: the kernels compute in float32 for float32 queries; output and
LSE must match the float64 reference within 1e-5, and decode must give the
same result for any number of splits within 1e-6. Every format runs with
the block-major pool; the per-layer pool runs for one format of each kind
(the kernels see only strides, which the write test checks for all).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvmem import InvalidArgument, KVError, KVSpec, PagePool
from kvmem.attention import reference as ref
from kvmem.attention import triton as tk
from kvmem.layout import build_layout
from tests.attention.helpers import (
    DEV,
    fill,
    layout_of,
    make_pool,
    max_err,
    random_table,
    randq,
)

FORMATS = ["fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int4"]
PS = 4
SEQ_LENS = [1, 7, 13, 30]
TOL = 1e-5


def _storage(layer):  # every tensor the writer fills
    return [
        t
        for t in (layer.k, layer.v, layer.k_scale, layer.k_zero, layer.v_scale, layer.v_zero)
        if t is not None and t.dim() == 4
    ]


@pytest.mark.parametrize("layout", ["block", "layer"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_write_kv_stores_the_reference_codes(fmt, layout):
    spec, pool = make_pool(fmt, layout=layout)
    rng = np.random.default_rng(1)
    lens = [5, 11]
    table = random_table(rng, pool.num_pages, lens, PS)
    lay = layout_of(spec, PS, table, lens, lens)
    # slot -1 (padding) rows must be skipped
    slots = lay.slot_mapping.clone()
    skipped = int(slots[3])
    slots[3] = -1
    lay = type(lay)(**{**lay.__dict__, "slot_mapping": slots})
    n = sum(lens)
    g = torch.Generator().manual_seed(2)
    k = torch.randn(n, 2, 16, generator=g) * 3
    v = torch.randn(n, 2, 16, generator=g)
    k[0, 0, :4] = torch.tensor([1e4, -1e4, 1e-6, 0.0])  # fp8 saturation, subnormals, zero
    layer = pool.layer(1)
    dtype = torch.bfloat16 if fmt == "fp16" else torch.float16 if fmt == "bf16" else torch.float32
    k, v = k.to(DEV, dtype), v.to(DEV, dtype)
    ref.write_kv(layer, lay, k, v)
    want = [t.clone() for t in _storage(layer)]
    for t in _storage(layer):
        t.zero_()
    tk.write_kv(layer, lay, k, v)
    for got, exp in zip(_storage(layer), want, strict=True):
        assert torch.equal(got.view(torch.uint8), exp.view(torch.uint8))
    # the skipped slot is still empty, its neighbour written, and layer 0 not touched
    assert not layer.k[skipped // PS, skipped % PS].view(torch.uint8).any()
    s2 = int(lay.slot_mapping[2])
    assert layer.k[s2 // PS, s2 % PS].view(torch.uint8).any()
    assert all(int((t != 0).sum()) == 0 for t in _storage(pool.layer(0)))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_encoder_matches_torch_on_grid_ties_and_subnormals(fmt):
    spec, pool = make_pool(fmt, kv_heads=1, num_pages=64, page_size=16)
    pool.set_fp8_scales(1, torch.tensor([1.0]), torch.tensor([1.0]))
    f8 = spec.fmt.float8_dtype
    grid = torch.arange(256, dtype=torch.uint8).view(f8).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2  # ties: round to even
    x = torch.cat([grid, mids, mids + 1e-7 * mids.abs(), torch.tensor([1e6, -1e6, 3e-9, -0.0])])
    x = torch.cat([x, torch.zeros((-x.numel()) % 16)]).reshape(-1, 1, 16)
    n = x.shape[0]
    lay = layout_of(spec, 16, np.arange(n // 16 + 1, dtype=np.int32)[None, :], [n], [n])
    layer = pool.layer(1)
    tk.write_kv(layer, lay, x.to(DEV), x.to(DEV))
    got = layer.k.flatten(0, 1)[:n, 0].cpu()
    want = (
        x[:, 0]
        .clamp(
            -{"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}[fmt],
            {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}[fmt],
        )
        .to(f8)
        .view(torch.uint8)
    )
    assert torch.equal(got, want)


def _decode_case(fmt, layout="block", dim=16, seq_lens=SEQ_LENS, seed=0, **pool_kw):
    spec, pool = make_pool(fmt, layout=layout, dim=dim, **pool_kw)
    rng = np.random.default_rng(seed)
    table = random_table(rng, pool.num_pages, seq_lens, pool.page_size)
    fill(spec, pool, table, seq_lens, seed)
    dec = layout_of(spec, pool.page_size, table, seq_lens, [1] * len(seq_lens))
    return spec, pool, table, dec


@pytest.mark.parametrize(
    "fmt,layout",
    [(f, "block") for f in FORMATS] + [(f, "layer") for f in ("fp16", "fp8_e4m3", "int4")],
)
def test_decode_equals_reference_for_any_split_count(fmt, layout):
    spec, pool, _, dec = _decode_case(fmt, layout)
    layer = pool.layer(1)
    q = randq(len(SEQ_LENS), 6, 16, seed=3)
    want_o, want_l = ref.decode(q.double(), layer, dec)
    o1, l1 = tk.decode(q, layer, dec, num_splits=1)
    assert o1.dtype == torch.float32 and l1.dtype == torch.float32
    assert max_err(o1, want_o) <= TOL and max_err(l1, want_l) <= TOL
    for splits in (3,):
        o, lse = tk.decode(q, layer, dec, num_splits=splits)
        assert max_err(o, want_o) <= TOL and max_err(lse, want_l) <= TOL
        assert max_err(o, o1) <= 1e-6 and max_err(lse, l1) <= 1e-6


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunked_prefill_equals_reference(fmt):
    spec, pool, table, _ = _decode_case(fmt, seed=4)
    layer = pool.layer(1)
    q_lens = [1, 3, 5, 30]  # chunks over cached prefixes, and a whole prompt
    pre = layout_of(spec, PS, table, SEQ_LENS, q_lens)
    q = randq(sum(q_lens), 6, 16, seed=5)
    want_o, want_l = ref.prefill(q.double(), layer, pre)
    o, lse = tk.prefill(q, layer, pre)
    assert max_err(o, want_o) <= TOL and max_err(lse, want_l) <= TOL


@pytest.mark.parametrize("fmt", ["fp16", "int4"])
def test_non_power_of_two_head_dim(fmt):
    spec, pool, table, dec = _decode_case(fmt, dim=24, seq_lens=[9, 21], seed=6)
    layer = pool.layer(1)
    q = randq(2, 6, 24, seed=7)
    want = ref.decode(q.double(), layer, dec)
    got = tk.decode(q, layer, dec, num_splits=2)
    assert max_err(got[0], want[0]) <= TOL and max_err(got[1], want[1]) <= TOL
    pre = layout_of(spec, PS, table, [9, 21], [4, 21])
    q = randq(25, 6, 24, seed=8)
    want = ref.prefill(q.double(), layer, pre)
    got = tk.prefill(q, layer, pre)
    assert max_err(got[0], want[0]) <= TOL and max_err(got[1], want[1]) <= TOL


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_vmem_layout_one_page_per_sequence(fmt):
    """The vmem backend's layout: each sequence is one page of page_size = max_seq_len."""
    lens = [5, 30, 17]
    max_len = 32
    spec, pool = make_pool(fmt, num_pages=4, page_size=max_len)
    table = np.array([[2], [0], [3]], dtype=np.int32)
    fill(spec, pool, table, lens, seed=9)
    layer = pool.layer(1)
    dec = build_layout(max_len, table, np.array(lens), np.ones(3), (0, 1, 2), DEV, spec)
    assert dec.block_table.shape == (3, 1)
    q = randq(3, 6, 16, seed=10)
    want = ref.decode(q.double(), layer, dec)
    for splits in (1, 3):
        got = tk.decode(q, layer, dec, num_splits=splits)
        assert max_err(got[0], want[0]) <= TOL and max_err(got[1], want[1]) <= TOL
    pre = build_layout(max_len, table, np.array(lens), np.array([5, 2, 17]), (0, 1, 2), DEV, spec)
    q = randq(24, 6, 16, seed=11)
    want = ref.prefill(q.double(), layer, pre)
    got = tk.prefill(q, layer, pre)
    assert max_err(got[0], want[0]) <= TOL and max_err(got[1], want[1]) <= TOL


@pytest.mark.parametrize("qdtype", [torch.float16, torch.bfloat16])
def test_16bit_queries_compute_in_16bit_within_its_precision(qdtype):
    fmt = "fp16" if qdtype == torch.float16 else "bf16"
    spec, pool, table, dec = _decode_case(fmt, seed=12)
    layer = pool.layer(1)
    q = randq(4, 6, 16, seed=13, dtype=qdtype)
    want_o, want_l = ref.decode(q.double(), layer, dec)
    o, lse = tk.decode(q, layer, dec, num_splits=2)
    assert o.dtype == qdtype and lse.dtype == torch.float32
    tol = 4 * torch.finfo(qdtype).eps  # output rounding, p rounded to 16 bits
    assert max_err(o, want_o) <= tol and max_err(lse, want_l) <= 1e-4
    pre = layout_of(spec, PS, table, SEQ_LENS, [1, 2, 2, 2])
    q = randq(7, 6, 16, seed=14, dtype=qdtype)
    want_o, want_l = ref.prefill(q.double(), layer, pre)
    o, lse = tk.prefill(q, layer, pre)
    assert max_err(o, want_o) <= tol and max_err(lse, want_l) <= 1e-4


def test_fp8_queries_are_close_and_guarded():
    spec, pool, _, dec = _decode_case("fp8_e4m3", seed=15)
    layer = pool.layer(1)
    q = randq(4, 6, 16, seed=16)
    want_o, want_l = ref.decode(q.double(), layer, dec)
    o, lse = tk.decode(q, layer, dec, fp8_query=True, num_splits=2)
    # e4m3 keeps 3 mantissa bits: scores move by ~2^-4 relative
    assert max_err(o, want_o) <= 0.1 and max_err(lse, want_l) <= 0.1
    assert max_err(o, want_o) > 0  # the query really was quantized
    _, pool16, _, dec16 = _decode_case("int4", seed=15)
    with pytest.raises(InvalidArgument, match="fp8_e4m3"):
        tk.decode(q, pool16.layer(1), dec16, fp8_query=True)


def test_merge_states_is_associative_commutative_and_handles_empty():
    g = torch.Generator().manual_seed(17)
    q = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)
    k = torch.randn(20, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(20, 2, 8, generator=g, dtype=torch.float64)

    def part(a, b):
        s = torch.einsum("qhd,khd->qhk", q, k[a:b]) / math.sqrt(8)
        lse = torch.logsumexp(s, -1)
        o = torch.einsum("qhk,khd->qhd", torch.exp(s - lse[..., None]), v[a:b])
        return o.float().to(DEV), lse.float().to(DEV)

    full = part(0, 20)
    p = [part(0, 5), part(5, 12), part(12, 20)]
    m = tk.merge_states
    left = m(*m(*p[0], *p[1]), *p[2])
    right = m(*p[0], *m(*p[1], *p[2]))
    swapped = m(*p[2], *m(*p[1], *p[0]))
    for o, s in (left, right, swapped):
        assert max_err(o, full[0]) <= 1e-6 and max_err(s, full[1]) <= 1e-6
    assert max_err(left[0], right[0]) <= 1e-6 and max_err(left[0], swapped[0]) <= 1e-6
    empty = (torch.zeros_like(p[0][0]), torch.full_like(p[0][1], -math.inf))
    o, s = m(*p[1], *empty)
    assert torch.equal(o, p[1][0]) and torch.equal(s, p[1][1])
    o, s = m(*empty, *empty)
    assert torch.equal(o, empty[0]) and torch.isneginf(s).all()
    o16, s16 = m(p[0][0].half(), p[0][1], p[1][0].half(), p[1][1])
    want = ref.merge_states(*p[0], *p[1])
    assert o16.dtype == torch.float16 and max_err(o16, want[0]) <= 2e-3


def test_empty_batch_and_splits_beyond_length():
    spec, pool, table, dec = _decode_case("fp16", seq_lens=[1, 2], seed=18)
    layer = pool.layer(1)
    q = randq(2, 6, 16, seed=19)
    want = ref.decode(q.double(), layer, dec)
    got = tk.decode(q, layer, dec, num_splits=64)  # most splits are empty (LSE -inf)
    assert max_err(got[0], want[0]) <= TOL and max_err(got[1], want[1]) <= TOL
    empty = build_layout(PS, np.zeros((0, 1), np.int32), np.zeros(0), np.zeros(0), (), DEV, spec)
    o, lse = tk.prefill(torch.zeros(0, 6, 16, device=DEV), layer, empty)
    assert o.shape == (0, 6, 16) and lse.shape == (0, 6)


def test_choose_num_splits_fills_the_device():
    assert tk.choose_num_splits(256, 8, 4096, sms=132) == 1  # big batch: no stage 2
    one_long = tk.choose_num_splits(1, 8, 65536, sms=132)
    assert 8 <= one_long <= 64 and 8 * one_long >= 2 * 132
    assert tk.choose_num_splits(1, 8, 300, sms=132) == 1  # too short to split
    assert tk.choose_num_splits(4, 8, 2048, sms=132) == 8  # capped at 256 tokens a split


def test_bad_inputs_name_the_problem():
    spec, pool, _, dec = _decode_case("fp16", seq_lens=[5, 6], seed=20)
    layer = pool.layer(1)
    with pytest.raises(InvalidArgument, match="multiple"):
        tk.decode(randq(2, 5, 16, 0), layer, dec)
    with pytest.raises(InvalidArgument, match=r"\[2, heads, 16\]"):
        tk.decode(randq(2, 6, 8, 0), layer, dec)
    with pytest.raises(InvalidArgument, match="KV heads"):
        tk.write_kv(layer, dec, randq(2, 3, 16, 0), randq(2, 3, 16, 0))
    with pytest.raises(InvalidArgument, match="different KVSpec"):
        other = PagePool(KVSpec(2, 2, 16, dtype=torch.float16), 8, PS, device=DEV)
        tk.decode(randq(2, 6, 16, 0), other.layer(1), dec)
    with pytest.raises(InvalidArgument, match="float64"):
        tk.decode(randq(2, 6, 16, 0, dtype=torch.float64), layer, dec)
    with pytest.raises(KVError, match="floating"):
        tk.prefill(torch.ones(2, 6, 16, dtype=torch.int32, device=DEV), layer, dec)
    with pytest.raises(InvalidArgument, match="one new token"):
        three = layout_of(spec, PS, np.zeros((1, 2), np.int32), [5], [3])
        tk.decode(randq(3, 6, 16, 0), layer, three)
    with pytest.raises(InvalidArgument, match="num_splits"):
        tk.decode(randq(2, 6, 16, 0), layer, dec, num_splits=0)
    with pytest.raises(ValueError, match="merge"):
        tk.merge_states(torch.zeros(2, 4), torch.zeros(2), torch.zeros(3, 4), torch.zeros(3))
    spec64, pool64 = make_pool("fp64")
    lay64 = layout_of(spec64, PS, np.zeros((1, 2), np.int32), [5], [1])
    with pytest.raises(InvalidArgument, match="fp64 KV format"):
        tk.decode(randq(1, 6, 16, 0), pool64.layer(1), lay64)


def test_layer_with_scalar_fp8_scales():
    """A LayerKV built by another backend may hold one fp8 scale per tensor as a 0-dim tensor."""
    import dataclasses

    spec, pool = make_pool("fp8_e5m2")
    scalar = {"k_scale": torch.tensor(0.05, device=DEV), "v_scale": torch.tensor(0.02, device=DEV)}
    layer = dataclasses.replace(pool.layer(1), **scalar)
    lens = [9, 14]
    table = random_table(np.random.default_rng(21), pool.num_pages, lens, PS)
    lay = layout_of(spec, PS, table, lens, lens)
    k, v = randq(23, 2, 16, 22), randq(23, 2, 16, 23)
    tk.write_kv(layer, lay, k, v)
    codes = layer.k.clone()
    ref.write_kv(layer, lay, k, v)
    assert torch.equal(codes, layer.k)
    dec = layout_of(spec, PS, table, lens, [1, 1])
    q = randq(2, 6, 16, 24)
    got, want = tk.decode(q, layer, dec, num_splits=2), ref.decode(q.double(), layer, dec)
    assert max_err(got[0], want[0]) <= TOL and max_err(got[1], want[1]) <= TOL
