"""n, best_of, logprobs, echo and prompt lists through the official ``openai`` client."""

from __future__ import annotations

import threading
from collections import defaultdict

import openai
import pytest
import torch
from conftest import MODEL

from kvmem import create_allocator
from kvmem.engine import ByteTokenizer
from kvmem.server import ChatTemplate
from kvmem.server.protocol import ChatMessage

PROMPT = "The quick brown fox jumps over"
TOK = ByteTokenizer()
SAMPLE = dict(model=MODEL, temperature=1.0, max_tokens=8, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def logprobs_of(tiny_model):
    """log-softmax of the model's logits at every position of a token sequence, run alone."""

    def run(ids: list[int]) -> torch.Tensor:
        alloc = create_allocator("paged", tiny_model.kv_spec(), num_tokens=4096, page_size=16)
        alloc.add("s", ids)
        alloc.reserve("s", len(ids))
        layout = alloc.layout([("s", len(ids))])
        logits = tiny_model(torch.tensor(ids), torch.arange(len(ids)), layout, alloc)
        alloc.close()
        return torch.log_softmax(logits.float(), -1)

    return run


def one(client, seed: int, prompt=PROMPT, **kw) -> str:
    r = client.completions.create(prompt=prompt, seed=seed, **{**SAMPLE, **kw})
    assert len(r.choices) == 1
    return r.choices[0].text


def test_n4_equals_single_requests_with_derived_seeds(client):
    r = client.completions.create(prompt=PROMPT, n=4, seed=21, **SAMPLE)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.text for c in r.choices]
    assert texts == [one(client, 21 + i) for i in range(4)]
    assert len(set(texts)) > 1
    assert r.usage.completion_tokens == 4 * 8 and r.usage.prompt_tokens == len(PROMPT)


def test_n4_streamed_equals_single_requests(client):
    got: dict[int, str] = defaultdict(str)
    finish: dict[int, str] = {}
    stream = client.completions.create(
        prompt=PROMPT, n=4, seed=33, stream=True, stream_options={"include_usage": True}, **SAMPLE
    )
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            got[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert sorted(got) == [0, 1, 2, 3] and finish == {i: "length" for i in range(4)}
    assert [got[i] for i in range(4)] == [one(client, 33 + i) for i in range(4)]
    assert usage is not None and usage.completion_tokens == 32


def test_chat_n_streamed_and_not(client):
    msgs = [{"role": "user", "content": "Tell me a story"}]
    kw = dict(model=MODEL, messages=msgs, temperature=1.0, max_tokens=6, seed=4)
    singles = [
        client.chat.completions.create(**{**kw, "seed": 4 + i}).choices[0].message.content
        for i in range(3)
    ]
    r = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == singles
    got: dict[int, str] = defaultdict(str)
    for chunk in client.chat.completions.create(n=3, stream=True, **kw):
        for c in chunk.choices:
            got[c.index] += c.delta.content or ""
    assert [got[i] for i in range(3)] == singles


def test_best_of_returns_the_n_most_likely(client):
    r = client.completions.create(prompt=PROMPT, n=2, best_of=4, seed=50, **SAMPLE)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.logprobs is None for c in r.choices)  # not asked for
    cands = []
    for i in range(4):
        s = client.completions.create(prompt=PROMPT, seed=50 + i, logprobs=0, **SAMPLE)
        c = s.choices[0]
        cands.append((sum(c.logprobs.token_logprobs), c.text))
    best = [t for _, t in sorted(cands, reverse=True)[:2]]
    assert [c.text for c in r.choices] == best
    assert r.usage.completion_tokens == 4 * 8


def test_completion_logprobs_match_the_model(client, logprobs_of):
    r = client.completions.create(
        prompt=PROMPT,
        logprobs=3,
        seed=8,
        model=MODEL,
        temperature=0.8,
        top_p=0.9,
        max_tokens=6,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    c = r.choices[0]
    toks = c.model_extra["token_ids"]
    ids = TOK.encode(PROMPT)
    ref = logprobs_of(ids + toks)
    lp = c.logprobs
    assert lp.tokens == [TOK.decode([t]) for t in toks]
    for i, t in enumerate(toks):
        row = ref[len(ids) - 1 + i]
        assert lp.token_logprobs[i] == pytest.approx(float(row[t]), abs=1e-5)
        top = lp.top_logprobs[i]
        allowed = {TOK.decode([x]) for x in torch.topk(row, 3).indices.tolist()} | {lp.tokens[i]}
        assert set(top) <= allowed and max(top.values()) == pytest.approx(
            float(row.max()), abs=1e-5
        )
    offsets = [0]
    for s in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(s))
    assert lp.text_offset == offsets


def test_chat_logprobs_match_the_model(client, logprobs_of):
    msgs = [{"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        logprobs=True,
        top_logprobs=2,
        max_tokens=5,
        seed=3,
        temperature=1.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    c = r.choices[0]
    toks = c.model_extra["token_ids"]
    text = ChatTemplate().render([ChatMessage(role="user", content="Hi there")], True)
    ids = TOK.encode(text)
    ref = logprobs_of(ids + toks)
    content = c.logprobs.content
    assert len(content) == len(toks)
    for i, (e, t) in enumerate(zip(content, toks, strict=True)):
        row = ref[len(ids) - 1 + i]
        assert e.token == TOK.decode([t]) and e.bytes == list(e.token.encode())
        assert e.logprob == pytest.approx(float(row[t]), abs=1e-5)
        want = torch.topk(row, 2).values.tolist()
        assert [x.logprob for x in e.top_logprobs] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("warm_cache", [False, True])
def test_echo_scores_the_prompt(client, logprobs_of, warm_cache):
    prompt = "Scoring a prompt: every token after the first one has a logprob here."
    if warm_cache:  # the prompt's pages cached: the scored positions must still be computed
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    c = r.choices[0]
    ids = TOK.encode(prompt)
    assert c.text == prompt and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = c.logprobs
    assert lp.tokens == [TOK.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = logprobs_of(ids)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert lp.text_offset == list(range(len(ids)))


def test_echo_with_generation_prefixes_the_prompt(client):
    r = client.completions.create(prompt=PROMPT, echo=True, logprobs=0, seed=2, **SAMPLE)
    c = r.choices[0]
    assert c.text.startswith(PROMPT) and c.text[len(PROMPT) :] == one(client, 2)
    assert len(c.logprobs.tokens) == len(PROMPT) + 8


def test_a_list_of_prompts_answers_in_order(client):
    prompts = ["First prompt", "Second, longer prompt", list(TOK.encode("Third"))]
    r = client.completions.create(prompt=prompts, n=2, seed=9, **SAMPLE)
    assert [c.index for c in r.choices] == list(range(6))
    for i, p in enumerate(prompts):
        for j in range(2):
            assert r.choices[i * 2 + j].text == one(client, 9 + j, prompt=p)
    r = client.completions.create(prompt=prompts, temperature=0, max_tokens=4, model=MODEL)
    assert len(r.choices) == 3
    assert r.usage.prompt_tokens == sum(
        len(TOK.encode(p)) if isinstance(p, str) else len(p) for p in prompts
    )


def test_n8_holds_the_prompt_once(make_server):
    srv = make_server(num_kv_tokens=4096, backend_options={"page_size": 16})
    engine = srv.server.config.app.state.kvmem.runner.engine
    prompt = "x" * 300  # 18 full pages of 16, and 12 tokens more
    n, out_len, ps = 8, 24, 16
    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            m = engine.metrics()
            seen.append((m.num_running, m.kv_used_tokens))

    t = threading.Thread(target=watch)
    t.start()
    try:
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0) as c:
            r = c.completions.create(
                model=MODEL, prompt=prompt, n=n, max_tokens=out_len, extra_body={"ignore_eos": True}
            )
    finally:
        done.set()
        t.join()
    assert len(r.choices) == n
    full = len(prompt) // ps
    tail_pages = -(-(len(prompt) % ps + out_len) // ps)
    bound = full * ps + n * tail_pages * ps  # the full pages once, each sample's own tail
    all_running = [u for k, u in seen if k == n]
    assert all_running, "never saw the 8 samples running together"
    assert max(all_running) <= bound < n * len(prompt)
    assert min(all_running) >= full * ps


def test_streamed_logprobs_equal_the_full_response(client):
    kw = dict(prompt=PROMPT, logprobs=2, seed=12, **SAMPLE)
    full = client.completions.create(**kw).choices[0].logprobs
    tokens, lps, offsets = [], [], []
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert tokens == full.tokens and lps == pytest.approx(full.token_logprobs, abs=1e-6)
    assert offsets == full.text_offset


def test_max_n_is_the_servers(tiny_model):
    from kvmem.engine import Engine
    from kvmem.server import AsyncEngine, ServerThread, create_app

    runner = AsyncEngine(Engine(tiny_model, num_kv_tokens=1024))
    srv = ServerThread(create_app(runner, MODEL, max_n=2)).start()
    try:
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0) as c:
            assert len(c.completions.create(prompt="a", n=2, **SAMPLE).choices) == 2
            with pytest.raises(openai.BadRequestError, match=r"1\.\.2") as e:
                c.completions.create(prompt="a", n=3, **SAMPLE)
            assert e.value.body["param"] == "n"
            with pytest.raises(openai.BadRequestError, match=r"n\.\.2"):
                c.completions.create(prompt="a", n=1, best_of=3, **SAMPLE)
    finally:
        srv.stop()


def test_echo_with_n_scores_the_prompt_once_per_choice(client):
    prompt = "Two choices, one prompt."
    r = client.completions.create(
        model=MODEL, prompt=[prompt, prompt[:10]], n=2, echo=True, logprobs=0, max_tokens=0
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [prompt, prompt, prompt[:10], prompt[:10]]
    a, b = r.choices[0].logprobs, r.choices[1].logprobs
    assert a.token_logprobs == b.token_logprobs and len(a.tokens) == len(prompt)
    short = r.choices[2].logprobs.token_logprobs
    assert short[0] is None and short[1:] == pytest.approx(a.token_logprobs[1:10], abs=1e-5)


def test_chat_streamed_logprobs_equal_the_full_response(client):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Stream me"}],
        logprobs=True,
        top_logprobs=3,
        max_tokens=6,
        seed=5,
        temperature=1.0,
        n=2,
        extra_body={"ignore_eos": True},
    )
    full = client.chat.completions.create(**kw)
    got: dict[int, list] = defaultdict(list)
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.logprobs is not None:
                got[c.index] += c.logprobs.content
    for c in full.choices:
        want = c.logprobs.content
        assert [e.token for e in got[c.index]] == [e.token for e in want] and len(want) == 6
        assert [e.logprob for e in got[c.index]] == pytest.approx([e.logprob for e in want])
        assert all(len(e.top_logprobs) == 3 for e in want)
