"""Quantized KV under transformers: greedy agreement with fp32 DynamicCache; scales never 1.0."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from kvmem.errors import InvalidArgument
from kvmem.integrations.hf import kv_scales_from_state_dict, load_kv_scales
from tests.integrations.conftest import make_cache, prompts, tiny_model


def teacher_forced_agreement(model: Any, cache: Any, prompt_len: int = 16, new: int = 16) -> float:
    """Fraction of positions where greedy decoding on ``cache`` picks the fp32 DynamicCache token.

    The reference continuation is fed back token by token, so one early
    difference does not decide every later position.
    """
    ids, _ = prompts(4, prompt_len, seed=11)
    ids = ids.clamp(min=1)
    ref = model.generate(ids, max_new_tokens=new, do_sample=False)
    model.set_attn_implementation("kvmem")
    try:
        with torch.no_grad():
            logits = model(ref[:, :prompt_len], cache=cache).logits[:, -1]
            picks = [logits.argmax(-1)]
            for t in range(prompt_len, ref.shape[1] - 1):
                picks.append(model(ref[:, t : t + 1], cache=cache).logits[:, -1].argmax(-1))
    finally:
        model.set_attn_implementation("sdpa")
    return float((torch.stack(picks, 1) == ref[:, prompt_len:]).float().mean())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_fp8_greedy_agreement(kind: str) -> None:
    model = tiny_model(kind)
    with make_cache(model, kv_format="fp8_e4m3") as cache:
        agreement = teacher_forced_agreement(model, cache)
    print(f"{kind} fp8_e4m3: greedy agreement {agreement:.3f}")
    assert agreement >= 0.95


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int4"])
def test_agreement_with_sharper_logits(fmt: str) -> None:
    """Weights 5x the default init: logits less flat, so KV error shows in more argmaxes."""
    model = tiny_model("llama", initializer_range=0.1)
    with make_cache(model, kv_format=fmt) as cache:
        agreement = teacher_forced_agreement(model, cache)
    print(f"llama init 0.1 {fmt}: greedy agreement {agreement:.3f}")
    assert agreement >= {"fp8_e4m3": 0.85, "int4": 0.7}[fmt]


def _prefill_logit_error(model: Any, cache: Any) -> float:
    ids = prompts(2, 24, seed=5)[0]
    with torch.no_grad():
        ref = model(ids).logits
        model.set_attn_implementation("kvmem")
        try:
            got = model(ids, cache=cache).logits
        finally:
            model.set_attn_implementation("sdpa")
    return float((got - ref).abs().max() / ref.abs().max())


def test_fp8_calibrates_large_keys() -> None:
    """Keys far above fp8's 448: calibrated scales keep them; a scale of 1.0 would saturate."""
    model = tiny_model("llama", initializer_range=0.1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(3000.0)
            layer.self_attn.q_proj.weight.div_(3000.0)
    with make_cache(model, kv_format="fp8_e4m3") as cache:
        calibrated = _prefill_logit_error(model, cache)
        scales = cache.allocator.layer(0).k_scale
        assert scales is not None and bool((scales > 1.0).all())
    ones = {i: (1.0, 1.0) for i in range(2)}
    with make_cache(model, kv_format="fp8_e4m3", kv_scales=ones) as cache:
        saturated = _prefill_logit_error(model, cache)
    print(
        f"fp8 logit error with keys x3000: calibrated {calibrated:.4f}, scale 1.0 {saturated:.4f}"
    )
    assert calibrated < 0.15 and saturated > 4 * calibrated


def test_fp8_scales_from_a_checkpoint(tmp_path: Any) -> None:
    model = tiny_model("llama")
    tensors = {
        f"model.layers.{i}.self_attn.{n}_scale": torch.tensor(0.01 * (i + 1))
        for i in range(2)
        for n in "kv"
    }
    tensors["model.embed_tokens.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    scales = load_kv_scales(tmp_path)
    assert sorted(scales) == [0, 1]
    with make_cache(model, kv_format="fp8_e4m3", kv_scales=scales) as cache:
        _prefill_logit_error(model, cache)
        for i in range(2):
            layer = cache.allocator.layer(i)
            assert layer.k_scale is not None and layer.v_scale is not None
            torch.testing.assert_close(layer.k_scale, torch.full((2,), 0.01 * (i + 1)))
            torch.testing.assert_close(layer.v_scale, torch.full((2,), 0.01 * (i + 1)))
    with pytest.raises(InvalidArgument, match="not both"):
        kv_scales_from_state_dict({"model.layers.0.self_attn.k_scale": torch.tensor(1.0)})
    with pytest.raises(InvalidArgument, match="positive"):
        make_cache(model, kv_format="fp8_e4m3", kv_scales={0: (0.0, 1.0)})
    assert sorted(load_kv_scales(tmp_path / "model.safetensors")) == [0, 1]


def test_int4_smooths_rope_keys() -> None:
    model = tiny_model("llama", initializer_range=0.1)
    with make_cache(model, kv_format="int4") as cache:
        smoothed = teacher_forced_agreement(model, cache)
        k_smooth = cache.allocator.layer(0).k_smooth
        assert k_smooth is not None and not bool((k_smooth == 1.0).all())
        partner = (torch.arange(16) + 8) % 16  # rotate_half pairs: scales tied
        torch.testing.assert_close(k_smooth, k_smooth[:, partner])
    with make_cache(model, kv_format="int4", key_smoothing=False) as cache:
        plain = teacher_forced_agreement(model, cache)
        k_smooth = cache.allocator.layer(0).k_smooth
        assert k_smooth is not None and bool((k_smooth == 1.0).all())
    print(f"int4 greedy agreement: smoothed {smoothed:.3f}, plain {plain:.3f}")
    assert smoothed >= 0.6 and plain >= 0.6
