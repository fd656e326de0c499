"""FP8 KV scales are calibrated from the first K/V each layer writes, never a silent 1.0."""

from __future__ import annotations

import pytest
import torch

from kvmem import create_allocator
from kvmem.engine import Engine, SamplingParams
from kvmem.engine.weights import random_model
from kvmem.errors import InvalidArgument

PROMPT = list(range(1, 120))


@pytest.fixture(scope="module")
def big_keys():
    """The tiny model with keys 300x larger (queries 300x smaller: same attention in fp32)."""
    m = random_model("tiny", seed=0, dtype=torch.float32)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.k_proj.weight.mul_(300.0)
            layer.self_attn.q_proj.weight.mul_(1 / 300.0)
    return m


def prompt_logits(model, kv_format: str, headroom: float | None) -> torch.Tensor:
    alloc = create_allocator("paged", model.kv_spec(kv_format), num_tokens=1024)
    attn = model.attention_backend(alloc.spec, "reference")
    attn.fp8_headroom = headroom
    alloc.add("s", PROMPT)
    alloc.reserve("s", len(PROMPT))
    lay = alloc.layout([("s", len(PROMPT))])
    out = model(torch.tensor(PROMPT), torch.arange(len(PROMPT)), lay, alloc, attn=attn)
    alloc.close()
    return out


def test_calibrated_fp8_follows_the_model_where_scale_one_saturates(big_keys):
    ref = prompt_logits(big_keys, "fp32", None)
    calibrated = (prompt_logits(big_keys, "fp8_e4m3", 2.0) - ref).abs().mean().item()
    unit = (prompt_logits(big_keys, "fp8_e4m3", None) - ref).abs().mean().item()
    print(f"mean |logit error| vs fp32: calibrated {calibrated:.4f}, scale 1.0 {unit:.4f}")
    assert calibrated < 0.25 * unit


def test_the_engine_calibrates_each_layer_once_by_default(big_keys):
    eng = Engine(big_keys, kv_format="fp8_e4m3", num_kv_tokens=1024)
    eng.generate([PROMPT], SamplingParams(max_tokens=2, ignore_eos=True))
    k = [eng.allocator.layer(i).k_scale.clone() for i in range(eng.allocator.spec.num_layers)]
    assert all(bool((s > 1.0).all()) for s in k)  # keys far beyond 448: scales well above 1
    eng.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))
    after = [eng.allocator.layer(i).k_scale for i in range(eng.allocator.spec.num_layers)]
    assert all(torch.equal(a, b) for a, b in zip(k, after, strict=True))  # fixed after the first


def test_fp8_headroom_none_keeps_the_storage_scales_and_bad_values_are_refused(big_keys):
    eng = Engine(big_keys, kv_format="fp8_e4m3", num_kv_tokens=1024, fp8_headroom=None)
    eng.generate([PROMPT], SamplingParams(max_tokens=1, ignore_eos=True))
    assert bool((eng.allocator.layer(0).k_scale == 1.0).all())
    with pytest.raises(InvalidArgument, match="fp8_headroom"):
        Engine(big_keys, kv_format="fp8_e4m3", num_kv_tokens=1024, fp8_headroom=0.5)


def test_a_layer_adopts_migrated_scales_only_before_it_calibrates(big_keys):
    alloc = create_allocator("paged", big_keys.kv_spec("fp8_e4m3"), num_tokens=256)
    attn = big_keys.attention_backend(alloc.spec, "reference")
    attn.fp8_headroom = 2.0
    layer = alloc.layer(0)
    heads = layer.k_scale.shape
    assert attn.adopt_fp8_scales(layer, torch.full(heads, 3.0), torch.full(heads, 5.0))
    assert bool((layer.k_scale == 3.0).all()) and bool((layer.v_scale == 5.0).all())
    k = torch.randn(4, *heads, big_keys.kv_spec().head_dim) * 1e4
    assert not attn.calibrate(layer, k, k)  # adopted scales count as this layer's own
    assert not attn.adopt_fp8_scales(layer, torch.ones(heads), torch.ones(heads))
    assert bool((layer.k_scale == 3.0).all())
    fresh = alloc.layer(1)
    attn.fp8_headroom = None  # calibration off: the storage keeps its scales
    assert not attn.adopt_fp8_scales(fresh, torch.full(heads, 3.0), torch.full(heads, 3.0))
    alloc.close()
