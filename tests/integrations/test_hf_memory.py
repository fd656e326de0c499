"""KVMemCache memory behaviour: beams share pages, prefixes are reused across calls."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache

from tests.integrations.conftest import make_cache, prompts, tiny_model


@pytest.fixture(scope="module")
def llama() -> Any:
    return tiny_model("llama")


def _forward(model: Any, ids: torch.Tensor, cache: Any, attn: str = "kvmem") -> torch.Tensor:
    model.set_attn_implementation(attn)
    try:
        with torch.no_grad():
            return model(ids, cache=cache).logits
    finally:
        model.set_attn_implementation("sdpa")


def test_copies_of_a_prompt_share_its_pages(llama: Any) -> None:
    """num_beams copies of a prompt are written once and forked: one row's pages in all."""
    ids, _ = prompts(1, 10)
    with make_cache(llama) as cache:
        _forward(llama, ids.repeat(4, 1), cache)
        shared = cache.allocator.stats().used_tokens
        assert len(set(cache.seq_ids())) == 4
        cache.allocator.check_integrity()
    with make_cache(llama) as single:
        _forward(llama, ids, single)
        assert shared == single.allocator.stats().used_tokens == 12  # 10 tokens, pages of 4


def test_reorder_forks_and_frees(llama: Any) -> None:
    ids, _ = prompts(2, 9)
    with make_cache(llama) as cache:
        _forward(llama, ids, cache)
        alloc = cache.allocator
        before = alloc.stats().used_tokens
        old = cache.seq_ids()
        cache.reorder_cache(torch.tensor([1, 1, 1]))
        new = cache.seq_ids()
        assert new[0] == old[1] and old[0] not in alloc and len(set(new)) == 3
        assert alloc.stats().used_tokens == before // 2  # row 0 freed, row 1 shared three times
        alloc.check_integrity()
        # the copies diverge copy-on-write: only their partly filled last page is copied
        _forward(llama, torch.tensor([[5], [6], [7]]), cache)
        assert alloc.stats().used_tokens == before // 2 + 2 * 4
        alloc.check_integrity()
        with pytest.raises(Exception, match="out of range"):
            cache.reorder_cache(torch.tensor([0, 3]))
        assert cache.seq_ids() == [new[0], new[1], new[2]]


def test_beam_search_holds_less_than_dynamic_cache(llama: Any) -> None:
    ids, _ = prompts(1, 40)
    held: list[int] = []

    def probe(cache: Any) -> Any:
        class Probe:
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> Any:
                if isinstance(cache, DynamicCache):
                    held.append(
                        sum(x.nbytes for layer in cache.layers for x in (layer.keys, layer.values))
                    )
                else:
                    held.append(cache.kv_bytes())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        return Probe()

    dyn = DynamicCache(config=llama.config)
    llama.generate(
        ids,
        cache=dyn,
        num_beams=4,
        max_new_tokens=8,
        do_sample=False,
        stopping_criteria=[probe(dyn)],
    )
    dyn_peak, held[:] = max(held), []
    with make_cache(llama) as cache:
        llama.set_attn_implementation("kvmem")
        try:
            llama.generate(
                ids,
                cache=cache,
                num_beams=4,
                max_new_tokens=8,
                do_sample=False,
                stopping_criteria=[probe(cache)],
            )
        finally:
            llama.set_attn_implementation("sdpa")
    assert max(held) <= 0.5 * dyn_peak


@pytest.mark.parametrize(("attn", "beams"), [("kvmem", 1), ("sdpa", 1), ("kvmem", 3)])
def test_prefix_reuse_matches_a_cold_call(llama: Any, attn: str, beams: int) -> None:
    system = prompts(1, 20, seed=3)[0]
    first = torch.cat([system, prompts(1, 5, seed=4)[0]], 1)
    second = torch.cat([system, prompts(1, 7, seed=5)[0]], 1)
    cold = llama.generate(second, max_new_tokens=6, do_sample=False, num_beams=beams)
    with make_cache(llama) as cache:
        llama.set_attn_implementation(attn)
        try:
            assert cache.prepare(first) == 0
            llama.generate(first, cache=cache, max_new_tokens=6, do_sample=False)
            done = cache.tokens_computed
            assert cache.prepare(second) == 20  # the shared system prompt: 5 full pages of 4
            warm = llama.generate(
                second, cache=cache, max_new_tokens=6, do_sample=False, num_beams=beams
            )
        finally:
            llama.set_attn_implementation("sdpa")
        # the new prompt tokens once (beams share them), then each beam's decode steps
        assert cache.tokens_computed - done == 27 - 20 + 5 * beams
        cache.allocator.check_integrity()
    assert torch.equal(warm, cold)


def test_prefix_reuse_in_a_padded_batch(llama: Any) -> None:
    system = prompts(1, 16, seed=3)[0]
    tails = prompts(2, 6, seed=6)[0]
    row0 = torch.cat([system[0], tails[0]])
    row1 = torch.cat([torch.zeros(4, dtype=torch.long), system[0], tails[1, :2]])
    batch = torch.stack([row0, row1])
    mask = (torch.arange(22) >= torch.tensor([[0], [4]])).long()  # row 1: 4 pads, one page
    cold = llama.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with make_cache(llama) as cache:
        cache.prepare(system)
        llama.generate(system, cache=cache, max_new_tokens=1, do_sample=False)
        present = cache.prepare(batch, mask)
        assert present == 16  # row 0: 16 cached; row 1: 4 pads + 12 of its 16 cached
        warm = llama.generate(
            batch, attention_mask=mask, cache=cache, max_new_tokens=5, do_sample=False
        )
    assert torch.equal(warm, cold)


def test_no_prefix_reuse_without_the_capability(llama: Any) -> None:
    ids, _ = prompts(1, 12)
    cold = llama.generate(ids, max_new_tokens=4, do_sample=False)
    with make_cache(llama, "vmem", prefix_caching=False) as cache:
        cache.prepare(ids)
        assert not cache.allocator.capabilities.prefix_caching
        llama.generate(ids, cache=cache, max_new_tokens=4, do_sample=False)
        assert cache.prepare(ids) == 0
        assert torch.equal(
            llama.generate(ids, cache=cache, max_new_tokens=4, do_sample=False), cold
        )


def test_unknown_tokens_never_hit_the_prefix_cache(llama: Any) -> None:
    """Without prepare() the cache cannot know token ids: nothing it writes is found by lookups."""
    ids, _ = prompts(1, 12)
    with make_cache(llama) as cache:
        llama.generate(ids, cache=cache, max_new_tokens=2, do_sample=False)
        assert cache.prepare(ids) == 0
