"""Reference attention against plain dense softmax(QK^T)V in float64."""

import math

import numpy as np
import pytest
import torch

from kvmem import InvalidArgument, KVSpec, PagePool
from kvmem.attention import reference as ref
from kvmem.formats import dequantize_fp8, dequantize_int4, quantize_fp8, quantize_int4
from kvmem.layout import build_layout

PS = 4


def dense(q, k, v, q_pos):
    """softmax(q k^T / sqrt(d)) v with a causal mask, GQA by repeating KV heads."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    mask = torch.arange(k.shape[0])[None, None, :] > q_pos[None, :, None]
    s = s.masked_fill(mask, -math.inf)
    p = torch.softmax(s, -1)
    return torch.einsum("hqk,khd->qhd", p, v), torch.logsumexp(s, -1).T


def make_layout(spec, pool, rng, seq_lens, q_lens):
    """A layout over randomly assigned, non-overlapping pages of ``pool``."""
    perm = rng.permutation(pool.num_pages)
    need = [(n + PS - 1) // PS for n in seq_lens]
    table = np.zeros((len(seq_lens), max(need)), dtype=np.int32)
    start = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[start : start + n]
        start += n
    ids = tuple(range(len(seq_lens)))
    return build_layout(
        PS, table, np.array(seq_lens), np.array(q_lens), ids, torch.device("cpu"), spec
    )


def fill(spec, pool, rng, seq_lens, kv_heads, dim):
    """Write random K/V for every position of every sequence; return them dense per sequence."""
    lay = make_layout(spec, pool, rng, seq_lens, seq_lens)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    k = torch.randn(sum(seq_lens), kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(sum(seq_lens), kv_heads, dim, generator=g, dtype=torch.float64)
    ref.write_kv(pool.layer(0), lay, k, v)
    return lay, k.split(seq_lens), v.split(seq_lens)


@pytest.mark.parametrize("q_heads,kv_heads", [(2, 2), (8, 2)])
def test_decode_and_chunked_prefill_equal_dense_float64(q_heads, kv_heads):
    dim = 16
    spec = KVSpec(1, kv_heads, dim, dtype=torch.float64)
    pool = PagePool(spec, 64, PS)
    rng = np.random.default_rng(0)
    seq_lens = [1, 7, 13, 30]
    lay_all, ks, vs = fill(spec, pool, rng, seq_lens, kv_heads, dim)
    layer = pool.layer(0)
    g = torch.Generator().manual_seed(3)

    # decode: the last token of each sequence
    dec = build_layout(
        PS,
        lay_all.block_table.numpy(),
        np.array(seq_lens),
        np.ones(4),
        lay_all.seq_ids,
        torch.device("cpu"),
        spec,
    )
    q = torch.randn(4, q_heads, dim, generator=g, dtype=torch.float64)
    out, lse = ref.decode(q, layer, dec)
    for b, n in enumerate(seq_lens):
        o, s = dense(q[b : b + 1], ks[b], vs[b], torch.tensor([n - 1]))
        assert torch.allclose(out[b : b + 1], o, atol=1e-10, rtol=0)
        assert torch.allclose(lse[b : b + 1], s, atol=1e-10, rtol=0)

    # chunked prefill: the last q_len tokens of each sequence are the new chunk
    q_lens = [1, 3, 5, 30]
    pre = build_layout(
        PS,
        lay_all.block_table.numpy(),
        np.array(seq_lens),
        np.array(q_lens),
        lay_all.seq_ids,
        torch.device("cpu"),
        spec,
    )
    q = torch.randn(sum(q_lens), q_heads, dim, generator=g, dtype=torch.float64)
    out, lse = ref.prefill(q, layer, pre)
    qs = q.split(q_lens)
    for b, (n, m) in enumerate(zip(seq_lens, q_lens, strict=True)):
        o, s = dense(qs[b], ks[b], vs[b], torch.arange(n - m, n))
        r0 = sum(q_lens[:b])
        assert torch.allclose(out[r0 : r0 + m], o, atol=1e-10, rtol=0)
        assert torch.allclose(lse[r0 : r0 + m], s, atol=1e-10, rtol=0)


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int4"])
def test_quantized_formats_store_what_the_quantizer_gives(fmt):
    dim, heads = 16, 2
    spec = KVSpec(
        1, heads, dim, dtype=torch.float32, kv_format=fmt, group_size=8 if fmt == "int4" else None
    )
    pool = PagePool(spec, 16, PS)
    if spec.fmt.kind == "fp8":
        pool.set_fp8_scales(0, torch.tensor([0.02, 0.05]), torch.tensor([0.03, 0.01]))
    layer = pool.layer(0)
    rng = np.random.default_rng(1)
    lay, ks, vs = fill(spec, pool, rng, [9], heads, dim)
    k, v = ks[0].float(), vs[0].float()
    if fmt in ("fp16", "bf16"):
        kd, vd = k.to(spec.fmt.storage_dtype).double(), v.to(spec.fmt.storage_dtype).double()
    elif spec.fmt.kind == "fp8":
        kd = dequantize_fp8(quantize_fp8(k, layer.k_scale, fmt), layer.k_scale, fmt, torch.float64)
        vd = dequantize_fp8(quantize_fp8(v, layer.v_scale, fmt), layer.v_scale, fmt, torch.float64)
    else:
        kd = dequantize_int4(*quantize_int4(k, 8), dtype=torch.float64)
        vd = dequantize_int4(*quantize_int4(v, 8), dtype=torch.float64)
    got_k, got_v = ref.gather_kv(layer, lay.kv_indices, 9, torch.float64)
    assert torch.equal(got_k, kd) and torch.equal(got_v, vd)
    q = torch.randn(9, 4, dim, dtype=torch.float64)
    out, lse = ref.prefill(q, layer, lay)
    o, s = dense(q, kd, vd, torch.arange(9))
    assert torch.allclose(out, o, atol=1e-10) and torch.allclose(lse, s, atol=1e-10)


def test_slot_minus_one_is_skipped():
    spec = KVSpec(1, 1, 8, dtype=torch.float64)
    pool = PagePool(spec, 4, PS)
    lay = make_layout(spec, pool, np.random.default_rng(2), [2], [2])
    lay = type(lay)(
        **{**lay.__dict__, "slot_mapping": torch.tensor([-1, lay.slot_mapping[1].item()])}
    )
    ones = torch.ones(2, 1, 8, dtype=torch.float64)
    ref.write_kv(pool.layer(0), lay, ones * 7, ones * 3)
    k = pool.layer(0).k.flatten(0, 1)
    v = pool.layer(0).v.flatten(0, 1)
    s = int(lay.slot_mapping[1])
    assert (k[s] == 7).all() and (v[s] == 3).all()
    # the row with slot -1 wrote nothing: only slot s holds non-zero KV
    assert int((k != 0).sum()) == 8 and int((v != 0).sum()) == 8


def test_merge_states_matches_attention_over_the_union():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)
    k = torch.randn(20, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(20, 2, 8, generator=g, dtype=torch.float64)
    pos = torch.full((3,), 100)
    full = dense(q, k, v, pos)
    parts = [dense(q, k[a:b], v[a:b], pos) for a, b in [(0, 5), (5, 12), (12, 20)]]
    left = ref.merge_states(*ref.merge_states(*parts[0], *parts[1]), *parts[2])
    right = ref.merge_states(*parts[0], *ref.merge_states(*parts[1], *parts[2]))
    swapped = ref.merge_states(*parts[2], *ref.merge_states(*parts[1], *parts[0]))
    for o, s in (left, right, swapped):
        assert torch.allclose(o, full[0], atol=1e-12) and torch.allclose(s, full[1], atol=1e-12)


def test_merge_states_with_empty_partials():
    v = torch.randn(3, 2, 8, dtype=torch.float64)
    s = torch.randn(3, 2, dtype=torch.float64)
    empty_v, empty_s = torch.zeros_like(v), torch.full_like(s, -math.inf)
    o, lse = ref.merge_states(v, s, empty_v, empty_s)
    assert torch.equal(o, v) and torch.equal(lse, s)
    o, lse = ref.merge_states(empty_v, empty_s, empty_v, empty_s)
    assert torch.equal(o, empty_v) and torch.isneginf(lse).all()


def test_bad_inputs_name_the_problem():
    spec = KVSpec(1, 2, 8, dtype=torch.float64)
    pool = PagePool(spec, 8, PS)
    lay = make_layout(spec, pool, np.random.default_rng(3), [5], [5])
    with pytest.raises(InvalidArgument, match="KV heads"):
        ref.write_kv(pool.layer(0), lay, torch.randn(5, 3, 8), torch.randn(5, 3, 8))
    with pytest.raises(InvalidArgument, match="multiple"):
        ref.prefill(torch.randn(5, 3, 8), pool.layer(0), lay)
    with pytest.raises(InvalidArgument, match=r"\[5, heads, 8\]"):
        ref.prefill(torch.randn(5, 2, 16), pool.layer(0), lay)
    other = PagePool(KVSpec(1, 2, 8, dtype=torch.float32), 8, PS)
    with pytest.raises(InvalidArgument, match="different KVSpec"):
        ref.prefill(torch.randn(5, 2, 8), other.layer(0), lay)
    with pytest.raises(InvalidArgument, match="one new token"):
        ref.decode(torch.randn(5, 2, 8), pool.layer(0), lay)
    with pytest.raises(InvalidArgument):
        ref.merge_states(torch.zeros(2, 4), torch.zeros(2), torch.zeros(3, 4), torch.zeros(3))
