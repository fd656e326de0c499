"""KVMemCache misuse: each a typed error, nothing half-written."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvmem.errors import InvalidArgument, KVError, OutOfKVMemory
from kvmem.integrations.hf import KVMemCache
from tests.integrations.conftest import make_cache, prompts, tiny_config, tiny_model


@pytest.fixture(scope="module")
def llama() -> Any:
    return tiny_model("llama")


def _gen(model: Any, cache: Any, ids: torch.Tensor, attn: str = "kvmem", **kw: Any) -> Any:
    model.set_attn_implementation(attn)
    try:
        return model.generate(ids, cache=cache, max_new_tokens=3, do_sample=False, **kw)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("attn", ["kvmem", "sdpa"])
@pytest.mark.parametrize(
    "other", [{"num_key_value_heads": 4}, {"head_dim": 8}, {"num_hidden_layers": 1}]
)
def test_cache_of_another_model(llama: Any, other: dict[str, Any], attn: str) -> None:
    cfg = tiny_config("llama", **other)
    with KVMemCache(cfg, "paged", num_tokens=256, device="cpu", page_size=4) as cache:
        with pytest.raises(InvalidArgument, match="layer|KV heads"):
            _gen(llama, cache, prompts(1)[0], attn)
        assert cache.allocator.seq_ids() == [] and cache.get_seq_length() == 0
        assert cache.allocator.stats().used_tokens == 0
        cache.allocator.check_integrity()


@pytest.mark.parametrize("backend", ["paged", "vmem"])
def test_batch_larger_than_the_pool(llama: Any, backend: str) -> None:
    ids, mask = prompts(4, 40)
    opts = {"max_seqs": 4} if backend == "vmem" else {}
    with make_cache(llama, backend, num_tokens=64, **opts) as cache:
        with pytest.raises(OutOfKVMemory):
            _gen(llama, cache, ids, attention_mask=mask)
        alloc = cache.allocator
        assert alloc.seq_ids() == [] and alloc.stats().used_tokens == 0
        assert cache.get_seq_length() == 0 and cache.seq_ids() == []
        alloc.check_integrity()
        ref = llama.generate(ids[:1], max_new_tokens=3, do_sample=False)
        assert torch.equal(_gen(llama, cache, ids[:1]), ref)  # still usable


def test_calls_after_close(llama: Any) -> None:
    cache = make_cache(llama)
    _gen(llama, cache, prompts(1)[0])
    cache.close()
    cache.close()  # idempotent
    with pytest.raises(KVError, match="closed"):
        _gen(llama, cache, prompts(1)[0])
    with pytest.raises(KVError, match="closed"):
        cache.prepare(prompts(1)[0])
    with pytest.raises(KVError, match="closed"):
        cache.reorder_cache(torch.tensor([0]))
    with pytest.raises(KVError, match="closed"):
        _ = cache.allocator


def test_unrelated_batch_on_a_filled_cache(llama: Any) -> None:
    with make_cache(llama) as cache:
        _gen(llama, cache, prompts(2)[0])
        held = cache.allocator.stats().used_tokens
        with pytest.raises(InvalidArgument, match="rows"):
            _gen(llama, cache, prompts(3)[0])
        llama.set_attn_implementation("kvmem")
        try:
            with pytest.raises(InvalidArgument, match="reset"):
                llama(prompts(2, 4)[0], cache=cache, position_ids=torch.arange(4)[None])
        finally:
            llama.set_attn_implementation("sdpa")
        assert cache.allocator.stats().used_tokens == held
        cache.reset()
        assert cache.allocator.stats().used_tokens == 0
        _gen(llama, cache, prompts(3)[0])


def test_kvmem_attention_needs_a_kvmem_cache(llama: Any) -> None:
    with pytest.raises(InvalidArgument, match="KVMemCache"):
        _gen(llama, None, prompts(1)[0])


def test_bad_arguments(llama: Any) -> None:
    with pytest.raises(InvalidArgument, match="unknown backend"):
        KVMemCache(llama.config, "nope", num_tokens=64)
    with pytest.raises(InvalidArgument, match="fp8_scale"):
        KVMemCache(llama.config, num_tokens=64, fp8_scale="row")
    with pytest.raises(InvalidArgument, match="format"):
        KVMemCache(llama.config, num_tokens=64, kv_format="fp3")
    with pytest.raises(InvalidArgument, match="num_tokens"):
        KVMemCache(llama.config)
    with make_cache(llama) as cache:
        ids, mask = prompts(2)
        with pytest.raises(InvalidArgument, match="left padding"):
            cache.prepare(ids, mask.flip(1))
        with pytest.raises(InvalidArgument, match="token ids"):
            cache.prepare(torch.tensor([[1, -2]]))
        with pytest.raises(InvalidArgument, match="crop"):
            cache.crop(-1)
        assert cache.seq_ids() == []


def test_a_failed_forward_leaves_no_sequence(llama: Any) -> None:
    """A forward that stopped between layers is dropped and reported at the next one."""
    with make_cache(llama) as cache:
        k = torch.randn(2, 2, 5, 16)
        pos = {"kwargs": {"position_ids": torch.arange(5)[None]}}
        cache.update(k, k, 0, **pos)
        assert len(cache.allocator.seq_ids()) == 2 and cache.get_seq_length() == 0
        with pytest.raises(InvalidArgument, match="dropped"):
            cache.update(k, k, 0, **pos)
        assert cache.allocator.seq_ids() == [] and cache.allocator.stats().used_tokens == 0
        same = k[:1].expand(2, -1, -1, -1)
        cache.update(same, same, 0, **pos)
        assert len(cache.allocator.seq_ids()) == 1  # identical rows write one sequence
        cache.update(same, same, 1, **pos)
        assert cache.get_seq_length() == 5 and len(cache.allocator.seq_ids()) == 2  # forked
        assert cache.allocator.stats().used_tokens == 8  # 5 tokens in 2 shared pages of 4
        with pytest.raises(InvalidArgument, match="outside a forward"):
            cache.update(same, same, 1, **pos)
        cache.allocator.check_integrity()


def test_model_with_fewer_layers_than_the_cache(llama: Any) -> None:
    cfg = tiny_config("llama", num_hidden_layers=3)
    with KVMemCache(cfg, "paged", num_tokens=256, device="cpu", page_size=4) as cache:
        with pytest.raises(InvalidArgument, match="fewer layers"):
            _gen(llama, cache, prompts(1)[0])
        assert cache.allocator.seq_ids() == [] and cache.get_seq_length() == 0
