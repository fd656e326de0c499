"""INT4 key smoothing and Hadamard rotation: calibration, invariance, kernels honouring them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmem import InvalidArgument, KVSpec, PagePool
from kvmem.attention import reference as ref
from kvmem.attention import triton as tk
from kvmem.attention.smoothing import (
    calibrate_key_smoothing,
    hadamard,
    rope_partner,
    transform_keys,
    transform_queries,
)
from tests.attention.helpers import DEV, layout_of, make_pool, max_err, random_table, randq


def outlier_keys(n: int, heads: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, heads, dim, generator=g)
    k[:, :, 1] *= 20  # an outlier channel; its RoPE partner is ordinary
    return k


@pytest.mark.parametrize("rope", ["half", "interleaved"])
def test_calibrated_scales_are_tied_across_rope_pairs(rope):
    k = outlier_keys(64, 2, 16, seed=0)
    s = calibrate_key_smoothing(k, rope=rope)
    partner = rope_partner(16, rope)
    assert s.shape == (2, 16) and s.dtype == torch.float32
    assert torch.equal(s, s[:, partner])
    assert int(partner[1]) == (9 if rope == "half" else 0)
    assert bool((s[:, 1] > 4 * s[:, 2]).all())  # the outlier pair is scaled down most
    assert torch.allclose(torch.log(s).mean(dim=1), torch.zeros(2), atol=1e-5)
    with_q = calibrate_key_smoothing(k, alpha=0.5, rope=rope, queries=torch.randn(64, 4, 16))
    assert torch.equal(with_q, with_q[:, partner])


def test_smoothing_and_rotation_leave_q_dot_k_unchanged():
    spec, pool = make_pool("int4", key_rotation="hadamard")
    layer = pool.layer(1)
    k = outlier_keys(32, 2, 16, seed=1).double()
    pool.set_key_smoothing(1, calibrate_key_smoothing(k))
    q = torch.randn(32, 6, 16, dtype=torch.float64)
    kt = transform_keys(layer, k.to(DEV)).cpu()
    qt = transform_queries(layer, q.to(DEV)).cpu()
    want = torch.einsum("thd,thd->th", q, k.repeat_interleave(3, dim=1))
    got = torch.einsum("thd,thd->th", qt, kt.repeat_interleave(3, dim=1))
    assert torch.allclose(got, want, atol=1e-10)
    h = hadamard(16, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
    assert (kt - k).abs().max() > 1  # the stored keys really are transformed


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_triton_matches_reference_with_smoothing(rotation):
    spec, pool = make_pool("int4", key_rotation=rotation)
    layer = pool.layer(1)
    lens = [9, 22]
    k = outlier_keys(sum(lens), 2, 16, seed=2).to(DEV)
    v = torch.randn(sum(lens), 2, 16).to(DEV)
    pool.set_key_smoothing(1, calibrate_key_smoothing(k))
    table = random_table(np.random.default_rng(3), pool.num_pages, lens, 4)
    lay = layout_of(spec, 4, table, lens, lens)
    ref.write_kv(layer, lay, k, v)
    want_codes = [layer.k.clone(), layer.k_scale.clone(), layer.k_zero.clone()]
    layer.k.zero_()
    tk.write_kv(layer, lay, k, v)
    assert torch.equal(layer.k, want_codes[0]) and torch.equal(layer.k_scale, want_codes[1])
    assert torch.equal(layer.k_zero, want_codes[2])
    dec = layout_of(spec, 4, table, lens, [1, 1])
    q = randq(2, 6, 16, seed=4)
    want = ref.decode(q.double(), layer, dec)
    got = tk.decode(q, layer, dec, num_splits=2)
    assert max_err(got[0], want[0]) <= 1e-5 and max_err(got[1], want[1]) <= 1e-5
    pre = layout_of(spec, 4, table, lens, [3, 22])
    q = randq(25, 6, 16, seed=5)
    want = ref.prefill(q.double(), layer, pre)
    got = tk.prefill(q, layer, pre)
    assert max_err(got[0], want[0]) <= 1e-5 and max_err(got[1], want[1]) <= 1e-5


def test_smoothing_configuration_errors():
    fp16 = PagePool(KVSpec(1, 2, 16), 4, 4)
    with pytest.raises(InvalidArgument, match="int4 only"):
        fp16.set_key_smoothing(0, torch.ones(2, 16))
    spec, pool = make_pool("int4")
    with pytest.raises(InvalidArgument, match="shape"):
        pool.set_key_smoothing(0, torch.ones(3, 16))
    with pytest.raises(InvalidArgument, match="positive"):
        pool.set_key_smoothing(0, torch.zeros(16))
    pool.set_key_smoothing(0, torch.full((16,), 2.0))  # one row for every head
    assert bool((pool.layer(0).k_smooth == 2).all()) and bool((pool.layer(1).k_smooth == 1).all())
    with pytest.raises(InvalidArgument, match="int4 only"):
        KVSpec(1, 2, 16, kv_format="fp8", key_rotation="hadamard")
    with pytest.raises(InvalidArgument, match="power-of-two"):
        KVSpec(1, 2, 24, kv_format="int4", key_rotation="hadamard")
    with pytest.raises(InvalidArgument, match="alpha"):
        calibrate_key_smoothing(torch.randn(4, 2, 16), alpha=2.0)
    with pytest.raises(InvalidArgument, match="rope"):
        rope_partner(16, "neox")  # type: ignore[arg-type]
