"""Greedy output is the same on every backend, chunk budget and preemption; quantized KV agrees."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from engine_helpers import PROMPTS, run_checked

from kvmem import KVError, create_allocator
from kvmem.backends.paged import PagedAllocator
from kvmem.engine import Engine, SamplingParams, SwapUnavailable, random_model

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model32():
    return random_model("tiny", seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(model32):
    eng = Engine(model32, num_kv_tokens=4096, max_num_batched_tokens=512)
    outs = [c.output_token_ids for c in eng.generate(PROMPTS, GREEDY)]
    assert len({tuple(o) for o in outs}) == len(outs)  # distinct prompts, distinct outputs
    return outs


@pytest.mark.parametrize("budget", [512, 16, 5])
def test_greedy_identical_across_backends_and_chunk_budgets(
    backend, budget, model32, reference, backend_options
):
    eng = Engine(
        model32,
        backend=backend,
        backend_options=backend_options(backend),
        num_kv_tokens=4096,
        max_num_batched_tokens=budget,
    )
    assert run_checked(eng, PROMPTS, GREEDY) == reference
    assert eng.metrics().num_preemptions == 0


def test_greedy_identical_with_preemption_by_recompute(
    backend, model32, reference, backend_options
):
    eng = Engine(
        model32,
        backend=backend,
        backend_options=backend_options(backend),
        num_kv_tokens=160,
        max_num_batched_tokens=32,
        preemption="recompute",
    )
    assert run_checked(eng, PROMPTS, GREEDY) == reference
    m = eng.metrics()
    assert m.num_preemptions > 0
    preempted = [r for r in eng.finished if r.metrics.num_preemptions]
    assert preempted
    if eng.allocator.stats().prefix_queries:  # a prefix-caching backend: readmission reuses KV
        assert sum(r.metrics.num_cached_tokens for r in preempted) > 0


def test_greedy_identical_with_preemption_by_swap(backend, model32, reference, backend_options):
    try:
        eng = Engine(
            model32,
            backend=backend,
            backend_options=backend_options(backend),
            num_kv_tokens=160,
            max_num_batched_tokens=32,
            preemption="swap",
        )
    except SwapUnavailable as e:
        pytest.skip(f"backend {backend!r} does not swap yet: {e}")
    assert run_checked(eng, PROMPTS, GREEDY) == reference
    assert eng.metrics().num_preemptions > 0


class _NoSwap(PagedAllocator):
    """A paged allocator that declares no swap (as the paged backend was before swap landed)."""

    capabilities = replace(PagedAllocator.capabilities, swap=False)

    def swap_out(self, seq_ids):
        raise AssertionError("the engine must read the capability, not try a swap")


def test_swap_on_a_backend_without_swap_is_a_clear_error(model32):
    alloc = _NoSwap(model32.kv_spec(), num_tokens=256)
    with pytest.raises(SwapUnavailable, match="swap is unavailable|unavailable") as ei:
        Engine(model32, allocator=alloc, preemption="swap")
    assert isinstance(ei.value, KVError)
    assert alloc.stats().capacity_tokens == 256  # the caller's allocator is left open


def teacher_forced_agreement(model, seqs, prompt_lens, kv_format):
    """Fraction of positions where greedy argmax with ``kv_format`` KV picks the reference token."""
    agree = total = 0
    for seq, p in zip(seqs, prompt_lens, strict=True):
        alloc = create_allocator("paged", model.kv_spec(kv_format), num_tokens=1024)
        alloc.add("s", seq)
        alloc.reserve("s", len(seq))
        lay = alloc.layout([("s", len(seq))])
        logits = model(torch.tensor(seq), torch.arange(len(seq)), lay, alloc)
        pred = logits[p - 1 : -1].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(pred, seq[p:], strict=True))
        total += len(pred)
        alloc.close()
    return agree / total


def test_quantized_kv_agrees_with_fp16_over_256_tokens():
    """fp8 (e4m3) KV: >= 95% of 256 greedy tokens agree with fp16 KV; int4 figure printed.

    Agreement is per position along the fp16 run (teacher-forced): a random
    model is chaotic, so free-running sequences part for good at the first
    near-tie and a positional comparison after that measures nothing.
    """
    model = random_model("tiny", seed=0, dtype=torch.float16)
    eng = Engine(model, kv_format="fp16", num_kv_tokens=4096)
    runs = eng.generate(PROMPTS[:3], SamplingParams(max_tokens=256, ignore_eos=True))
    seqs = [c.prompt_token_ids + c.output_token_ids for c in runs]
    plens = [len(c.prompt_token_ids) for c in runs]
    assert all(len(c.output_token_ids) == 256 for c in runs)
    assert teacher_forced_agreement(model, seqs, plens, "fp16") == 1.0
    fp8 = teacher_forced_agreement(model, seqs, plens, "fp8_e4m3")
    int4 = teacher_forced_agreement(model, seqs, plens, "int4")
    print(f"greedy agreement with fp16 KV over 256 tokens: fp8_e4m3 {fp8:.3f}, int4 {int4:.3f}")
    assert fp8 >= 0.95
    assert int4 >= 0.85  # no target; measured 0.954 on this model
