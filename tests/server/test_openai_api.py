"""The OpenAI API through the official ``openai`` client: completions and chat, streamed or not."""

from __future__ import annotations

import pytest
from conftest import HTTP, MODEL

from kvmem.engine import Engine, SamplingParams
from kvmem.server import ChatTemplate
from kvmem.server.protocol import ChatMessage

PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def reference(tiny_model):
    """What the engine itself generates, greedily, for a prompt (string or token ids)."""
    eng = Engine(tiny_model, num_kv_tokens=4096)

    def gen(prompt, max_tokens: int, **kw):
        params = SamplingParams(max_tokens=max_tokens, **kw)
        return eng.generate([prompt], params)[0]

    return gen


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_completion_matches_the_engine(client, reference):
    ref = reference(PROMPT, 12, ignore_eos=True)
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(PROMPT.encode())
    assert r.usage.total_tokens == 12 + len(PROMPT.encode())


def test_token_id_prompt_equals_text_prompt(client):
    kw = dict(model=MODEL, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    a = client.completions.create(prompt=PROMPT, **kw)
    b = client.completions.create(prompt=list(PROMPT.encode()), **kw)
    assert a.choices[0].text == b.choices[0].text and b.usage.prompt_tokens == len(PROMPT)


def test_streamed_completion_equals_the_whole_one(client, reference):
    ref = reference(PROMPT, 16, ignore_eos=True)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
    )
    body, usage = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in body) == ref.text
    toks = [t for c in body for t in c.choices[0].model_extra["token_ids"]]
    assert toks == ref.output_token_ids
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert usage.choices == [] and usage.usage.completion_tokens == 16
    assert all(c.usage is None for c in body)


def test_chat_and_streamed_chat(client, reference):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = ChatTemplate().render([ChatMessage(**m) for m in msgs])
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"
    ref = reference(prompt, 10, ignore_eos=True)
    kw = dict(
        model=MODEL,
        messages=msgs,
        max_completion_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    r = client.chat.completions.create(**kw)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(prompt.encode()) and r.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_content_parts_and_max_tokens_alias(client):
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    a = client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0, messages=[{"role": "user", "content": parts}]
    )
    b = client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0, messages=[{"role": "user", "content": "Hi there"}]
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens <= 6


def test_seeded_sampling_repeats_and_stop_strings_cut(client, reference):
    kw = dict(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=12,
        temperature=1.0,
        top_p=0.9,
        seed=7,
        extra_body={"ignore_eos": True, "top_k": 50},
    )
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    text = reference(PROMPT, 20, ignore_eos=True).text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=20,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]


def test_request_id_header_is_used_and_echoed(server):
    body = {
        "model": MODEL,
        "prompt": "hi",
        "max_tokens": 2,
        "logprobs": None,
        "repetition_penalty": 1.0,
    }
    r = HTTP.post(f"{server.url}/v1/completions", json=body, headers={"x-request-id": "abc-1"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "cmpl-abc-1" and r.headers["x-request-id"] == "abc-1"


def test_health(server):
    assert HTTP.get(f"{server.url}/health").status_code == 200
