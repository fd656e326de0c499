"""KVMemCache under model.generate: token-identical to DynamicCache in fp32."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvmem.integrations.hf import KVMemCache
from tests.integrations.conftest import BACKENDS, make_cache, prompts, tiny_model


def _generate(model: Any, attn: str, ids: torch.Tensor, mask: torch.Tensor, **kw: Any) -> Any:
    model.set_attn_implementation(attn)
    kw.setdefault("max_new_tokens", 6)
    try:
        return model.generate(ids, attention_mask=mask, **kw)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("beams", [1, 4])
def test_matches_dynamic_cache(model: Any, backend: str, batch: int, beams: int) -> None:
    """attn_implementation="kvmem": the kernels read the pages in place."""
    _check_against_dynamic(model, backend, batch, beams, "kvmem")


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("beams", [1, 4])
def test_dense_path_matches_dynamic_cache(backend: str, batch: int, beams: int) -> None:
    """SDPA attention on dense K/V gathered from the pages (models that bypass the interface)."""
    _check_against_dynamic(tiny_model("llama"), backend, batch, beams, "sdpa")


def _check_against_dynamic(model: Any, backend: str, batch: int, beams: int, attn: str) -> None:
    ids, mask = prompts(batch)
    ref = _generate(model, "sdpa", ids, mask, do_sample=False, num_beams=beams)
    with make_cache(model, backend) as cache:
        out = _generate(model, attn, ids, mask, cache=cache, do_sample=False, num_beams=beams)
        cache.allocator.check_integrity()
        assert len(cache.seq_ids()) == batch * beams
    assert torch.equal(out, ref)


@pytest.mark.parametrize("attn", ["kvmem", "sdpa"])
def test_sampling_matches_dynamic_cache(model: Any, attn: str) -> None:
    ids, mask = prompts(4)
    torch.manual_seed(7)
    ref = _generate(model, "sdpa", ids, mask, do_sample=True, top_k=20)
    with make_cache(model) as cache:
        torch.manual_seed(7)
        out = _generate(model, attn, ids, mask, cache=cache, do_sample=True, top_k=20)
    assert torch.equal(out, ref)


def test_past_key_values_keyword(model: Any) -> None:
    ids, mask = prompts(2)
    ref = _generate(model, "sdpa", ids, mask, do_sample=False)
    with make_cache(model) as cache, pytest.warns(FutureWarning, match="past_key_values"):
        out = _generate(model, "kvmem", ids, mask, past_key_values=cache, do_sample=False)
    assert torch.equal(out, ref)


def test_continuation_of_a_cached_batch(model: Any) -> None:
    """A second generate on the output continues the cached sequences (as with DynamicCache)."""
    ids, mask = prompts(2)
    ref = _generate(model, "sdpa", ids, mask, do_sample=False, max_new_tokens=12)
    with make_cache(model) as cache:
        first = _generate(model, "kvmem", ids, mask, cache=cache, do_sample=False)
        past = cache.get_seq_length()
        mask2 = torch.cat([mask, torch.ones(2, first.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
        out = _generate(model, "kvmem", first, mask2, cache=cache, do_sample=False)
        assert past == first.shape[1] - 1
    assert torch.equal(out, ref)


def test_model_forward_without_generate(model: Any) -> None:
    """Plain forward calls, prompt then one token at a time, match DynamicCache logits."""
    from transformers import DynamicCache

    ids, _ = prompts(1, 12)
    dyn = DynamicCache(config=model.config)
    with torch.no_grad(), make_cache(model, "vmem") as cache:
        model.set_attn_implementation("kvmem")
        try:
            a = model(ids[:, :8], cache=cache).logits
            b = model(ids[:, 8:9], cache=cache).logits
        finally:
            model.set_attn_implementation("sdpa")
        ra = model(ids[:, :8], cache=dyn).logits
        rb = model(ids[:, 8:9], cache=dyn).logits
        assert cache.get_seq_length() == dyn.get_seq_length() == 9
    torch.testing.assert_close(a, ra, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, rb, rtol=1e-4, atol=1e-5)


def test_cache_built_from_a_copy_of_the_config(model: Any) -> None:
    """The cache cannot see the model use "kvmem": it returns dense K/V, the kernels read pages."""
    import copy

    ids, mask = prompts(2)
    ref = _generate(model, "sdpa", ids, mask, do_sample=False)
    cfg = copy.deepcopy(model.config)
    with KVMemCache(cfg, "paged", num_tokens=512, attn_impl="reference", page_size=4) as cache:
        out = _generate(model, "kvmem", ids, mask, cache=cache, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("fmt", ["auto", "fp8_e4m3", "int4"])
def test_triton_kernels(fmt: str) -> None:
    """The Triton kernels (the interpreter on CPU) give the reference kernels' tokens."""
    model = tiny_model("llama")
    ids, mask = prompts(2, 8)
    outs = []
    for impl in ("triton", "reference"):
        with make_cache(model, attn_impl=impl, kv_format=fmt) as cache:
            outs.append(_generate(model, "kvmem", ids, mask, cache=cache, max_new_tokens=3))
    assert torch.equal(outs[0], outs[1])
    if fmt == "auto":
        assert torch.equal(outs[0], _generate(model, "sdpa", ids, mask, max_new_tokens=3))
