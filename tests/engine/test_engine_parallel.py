"""Parallel sampling (``fork_from``), logprobs and prompt logprobs in the engine."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kvmem import create_allocator
from kvmem.allocator import Capabilities
from kvmem.engine import Engine, SamplingParams, random_model

PROMPT = list(range(3, 203))  # 200 tokens: 12 full pages of 16 and 8 tokens more


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=0)


def params(seed: int, **kw) -> SamplingParams:
    base = dict(max_tokens=6, temperature=1.0, seed=seed, ignore_eos=True)
    return SamplingParams(**{**base, **kw})


def run_group(engine: Engine, n: int, seed: int, **kw) -> tuple[list[list[int]], list[int]]:
    """n samples of PROMPT (sample i seeded seed + i); their tokens and KV used after each step."""
    got: dict[str, list[int]] = {}

    def track(o):
        got.setdefault(o.request_id, []).extend(o.new_token_ids)

    first = engine.add_request(PROMPT, params(seed, **kw), on_output=track)
    ids = [first] + [
        engine.add_request(PROMPT, params(seed + i, **kw), on_output=track, fork_from=first)
        for i in range(1, n)
    ]
    used = []
    while engine.has_unfinished():
        engine.step()
        engine.allocator.check_integrity()
        used.append(engine.allocator.stats().used_tokens)
    assert engine.allocator.stats().used_tokens == 0, "KV leaked"
    return [got[i] for i in ids], used


def singles(engine: Engine, n: int, seed: int) -> list[list[int]]:
    done = engine.generate([PROMPT] * n, [params(seed + i) for i in range(n)])
    return [c.output_token_ids for c in done]


def test_forked_samples_equal_single_requests_and_share_the_prompt(model):
    eng = Engine(model, num_kv_tokens=4096, backend_options={"page_size": 16})
    ps, n = 16, 8
    toks, used = run_group(eng, n, seed=11)
    assert toks == singles(eng, n, seed=11)
    assert len({tuple(t) for t in toks}) > 1, "samples with different seeds should differ"
    full = len(PROMPT) // ps
    # After the prefill every sample shares all the prompt's pages; each decode then
    # copies at most the partial last page and adds at most one page per sample.
    assert used[0] == -(-len(PROMPT) // ps) * ps
    separate = n * -(-len(PROMPT) // ps) * ps
    for u in used[:-1]:
        assert full * ps <= u <= full * ps + n * 2 * ps < separate


def test_fork_on_every_backend_gives_the_same_results(model, backend, backend_options):
    eng = Engine(
        model, num_kv_tokens=4096, backend=backend, backend_options=backend_options(backend)
    )
    toks, _ = run_group(eng, 3, seed=5)
    assert toks == singles(eng, 3, seed=5)


def test_without_fork_samples_run_as_separate_requests(model):
    alloc = create_allocator("paged", model.kv_spec(), num_tokens=4096, page_size=16)
    alloc.capabilities = replace(alloc.capabilities, fork=False)
    assert alloc.capabilities == Capabilities(prefix_caching=True, swap=True, keep_on_host=True)
    eng = Engine(model, allocator=alloc)
    toks, _ = run_group(eng, 3, seed=5)
    assert toks == singles(eng, 3, seed=5)


def test_parent_aborted_before_its_prefill_leaves_the_samples_running(model):
    eng = Engine(model, num_kv_tokens=4096, backend_options={"page_size": 16})
    first = eng.add_request(PROMPT, params(1))
    kid = eng.add_request(PROMPT, params(2), fork_from=first)
    assert eng.abort(first)
    while eng.has_unfinished():
        eng.step()
    r = eng.request(kid)
    assert r is not None and r.finish_reason == "length" and r.num_output_tokens == 6
    assert eng.allocator.stats().used_tokens == 0


def test_unknown_fork_parent_is_refused(model):
    from kvmem.engine import InvalidRequest

    eng = Engine(model, num_kv_tokens=4096)
    with pytest.raises(InvalidRequest, match="fork_from"):
        eng.add_request(PROMPT, params(1), fork_from="nobody")
    assert not eng.has_unfinished()


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits at every position of ``ids``, run alone."""
    alloc = create_allocator("paged", model.kv_spec(), num_tokens=4096, page_size=16)
    alloc.add("s", ids)
    alloc.reserve("s", len(ids))
    layout = alloc.layout([("s", len(ids))])
    logits = model(torch.tensor(ids), torch.arange(len(ids)), layout, alloc)
    alloc.close()
    return torch.log_softmax(logits.float(), -1)


def test_logprobs_are_the_raw_distribution(model):
    eng = Engine(model, num_kv_tokens=4096, max_num_batched_tokens=64)
    outs = list(eng.stream(PROMPT[:40], params(3, temperature=0.7, top_k=5, logprobs=3)))
    lps = [lp for o in outs for lp in o.logprobs]
    toks = [t for o in outs for t in o.new_token_ids]
    ref = reference_logprobs(model, PROMPT[:40] + toks)
    assert [lp.token_id for lp in lps] == toks
    for i, lp in enumerate(lps):
        row = ref[39 + i]
        assert lp.logprob == pytest.approx(float(row[toks[i]]), abs=1e-5)
        top = torch.topk(row, 3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_prompt_logprobs_skip_no_cached_position(model):
    eng = Engine(model, num_kv_tokens=4096, max_num_batched_tokens=48)
    eng.generate([PROMPT[:100]], params(1))  # the prompt's full pages are now cached
    outs = list(eng.stream(PROMPT[:100], params(1, max_tokens=0, prompt_logprobs=2)))
    assert len(outs) == 1 and outs[0].finished and outs[0].new_token_ids == []
    plp = outs[0].prompt_logprobs
    ref = reference_logprobs(model, PROMPT[:100])
    assert [lp.token_id for lp in plp] == PROMPT[1:100]
    got = torch.tensor([lp.logprob for lp in plp])
    want = ref[torch.arange(99), torch.tensor(PROMPT[1:100])]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert eng.allocator.stats().used_tokens == 0


def test_max_tokens_zero_needs_prompt_logprobs():
    from kvmem.engine import InvalidRequest

    with pytest.raises(InvalidRequest, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequest, match="logprobs"):
        SamplingParams(logprobs=-1)


def test_forks_are_made_by_the_scheduler_update(model):
    from test_engine_ownership import Recording

    alloc = Recording(create_allocator("paged", model.kv_spec(), num_tokens=4096, page_size=16))
    eng = Engine(model, allocator=alloc, max_num_batched_tokens=64)
    toks, _ = run_group(eng, 4, seed=2)
    forks = {k: n for k, n in alloc.calls.items() if k[2] == "fork"}
    assert forks == {("kvmem.engine.scheduler", "update", "fork"): 3}
    adds = sum(n for k, n in alloc.calls.items() if k[2] == "add")
    assert adds == 1  # only the parent's prompt was registered (and prefilled)
    assert toks == singles(eng, 4, seed=2)


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_forked_samples_survive_preemption(model, preemption):
    eng = Engine(
        model,
        num_kv_tokens=256,
        preemption=preemption,
        backend_options={"page_size": 16},
        max_num_batched_tokens=64,
    )
    toks, _ = run_group(eng, 4, seed=7, max_tokens=24)
    assert eng.metrics().num_preemptions > 0
    ref = Engine(model, num_kv_tokens=4096, backend_options={"page_size": 16})
    want = ref.generate([PROMPT] * 4, [params(7 + i, max_tokens=24) for i in range(4)])
    assert toks == [c.output_token_ids for c in want]
