"""Quantization accuracy on synthetic attention: head dim 128, 1024 tokens, fresh random data.

The baseline is attention over the same K/V stored in fp16; the quantized
runs store them as fp8 or int4. Both are computed by the float64
reference (the Triton kernels are tested equal to it, on the same stored
codes, in test_triton.py and test_smoothing.py), so the figures measure
the formats, not the arithmetic. The attention is the causal prefill of
the last 32 tokens of one 1024-token sequence (8 query heads over 2 KV
heads), compared over every output element:

- cosine similarity, and relative L2 error ``|o - o16| / |o16|``;
- fp8 scales are calibrated per KV head (amax / fp8 max) from the data;
- the outlier fixture makes one RoPE pair of key channels 20x larger (two
  channels of 128), as real models have; smoothing scales are calibrated
  from the first 256 keys only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmem import KVSpec, PagePool
from kvmem.attention import reference as ref
from kvmem.attention.smoothing import calibrate_key_smoothing
from kvmem.formats import fp8_scales
from kvmem.layout import build_layout

D, N, HKV, HQ, NQ, PS = 128, 1024, 2, 8, 32, 16


def attend(
    fmt: str,
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    smooth: torch.Tensor | None = None,
    rotation: str = "none",
) -> torch.Tensor:
    """Output of the last NQ tokens' prefill over K/V stored in ``fmt``."""
    spec = KVSpec(1, HKV, D, dtype=torch.float16, kv_format=fmt, key_rotation=rotation)  # type: ignore[arg-type]
    pool = PagePool(spec, N // PS, PS)
    if spec.fmt.kind == "fp8":
        pool.set_fp8_scales(0, fp8_scales(k, fmt, per_head=True), fp8_scales(v, fmt, per_head=True))
    if smooth is not None:
        pool.set_key_smoothing(0, smooth)
    table = np.random.default_rng(0).permutation(N // PS).astype(np.int32)[None]
    cpu = torch.device("cpu")
    full = build_layout(PS, table.copy(), np.array([N]), np.array([N]), (0,), cpu, spec)
    ref.write_kv(pool.layer(0), full, k, v)
    lay = build_layout(PS, table.copy(), np.array([N]), np.array([NQ]), (0,), cpu, spec)
    return ref.prefill(q.double(), pool.layer(0), lay)[0]


def metrics(o: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative L2 error) of ``o`` against ``base``."""
    a, b = o.flatten().double(), base.flatten().double()
    return float(a @ b / (a.norm() * b.norm())), float((a - b).norm() / b.norm())


def data(seed: int, outliers: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(N, HKV, D, generator=g)
    v = torch.randn(N, HKV, D, generator=g).half()
    q = torch.randn(NQ, HQ, D, generator=g).half()
    if outliers:
        c = int(torch.randint(0, D // 2, (1,), generator=g))
        k[:, :, [c, c + D // 2]] *= 20
    return k.half(), v, q


@pytest.fixture(scope="module")
def plain():
    k, v, q = data(10, outliers=False)
    return k, v, q, attend("fp16", k, v, q)


@pytest.fixture(scope="module")
def outlier():
    k, v, q = data(11, outliers=True)
    return k, v, q, attend("fp16", k, v, q)


def test_fp8_e4m3_on_plain_data(plain):
    k, v, q, base = plain
    cos, rel = metrics(attend("fp8_e4m3", k, v, q), base)
    assert cos >= 0.999 and rel <= 0.06, (cos, rel)
    cos5, rel5 = metrics(attend("fp8_e5m2", k, v, q), base)
    assert cos5 < cos and cos5 >= 0.99  # two mantissa bits: worse, still close


def test_int4_on_plain_data(plain):
    k, v, q, base = plain
    cos, _ = metrics(attend("int4", k, v, q), base)
    assert cos >= 0.985, cos


def test_outlier_channels_and_smoothing(outlier):
    k, v, q, base = outlier
    fp8_cos, _ = metrics(attend("fp8_e4m3", k, v, q), base)
    raw_cos, _ = metrics(attend("int4", k, v, q), base)
    smooth = calibrate_key_smoothing(k[:256])
    smooth_cos, _ = metrics(attend("int4", k, v, q, smooth), base)
    rot_cos, _ = metrics(
        attend("int4", k, v, q, calibrate_key_smoothing(k[:256], alpha=0.5), "hadamard"), base
    )
    assert fp8_cos >= 0.98, fp8_cos
    assert raw_cos <= 0.9, raw_cos  # the outliers take the int4 range from every other channel
    assert smooth_cos >= 0.97, smooth_cos
    assert rot_cos >= 0.97, rot_cos
