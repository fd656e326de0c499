"""Bad requests over raw HTTP: each a 4xx with an OpenAI-style body; the server keeps serving."""

from __future__ import annotations

import pytest
from conftest import HTTP, MODEL

CTX = 2048  # the tiny preset's context
KV = 512  # the pool of the server below: smaller than the context, so both limits are reachable


@pytest.fixture(scope="module")
def url(make_server):
    return make_server(num_kv_tokens=KV).url


def ok_completion(**over):
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **over}


def ok_chat(**over):
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        **over,
    }


CASES = [
    # (name, path, body, status, param, words in the message)
    ("malformed json", "completions", b'{"prompt": "x", ', 400, None, "not valid JSON"),
    ("not an object", "completions", b"[1, 2]", 400, None, "JSON object"),
    ("empty body", "chat/completions", b"", 400, None, "not valid JSON"),
    ("missing prompt", "completions", {"model": MODEL}, 400, "prompt", "required"),
    ("missing messages", "chat/completions", {"model": MODEL}, 400, "messages", "required"),
    (
        "string max_tokens",
        "completions",
        ok_completion(max_tokens="10"),
        400,
        "max_tokens",
        "integer",
    ),
    (
        "float max_tokens",
        "completions",
        ok_completion(max_tokens=3.5),
        400,
        "max_tokens",
        "integer",
    ),
    (
        "string temperature",
        "completions",
        ok_completion(temperature="hot"),
        400,
        "temperature",
        "number",
    ),
    ("numeric prompt", "completions", ok_completion(prompt=5), 400, "prompt", "string"),
    ("string stream", "completions", ok_completion(stream="yes"), 400, "stream", "boolean"),
    ("messages not a list", "chat/completions", ok_chat(messages="hi"), 400, "messages", "array"),
    (
        "unknown role",
        "chat/completions",
        ok_chat(messages=[{"role": "wizard", "content": "x"}]),
        400,
        "messages",
        "system",
    ),
    (
        "image part",
        "chat/completions",
        ok_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "messages",
        "only text",
    ),
    ("unknown model", "completions", ok_completion(model="gpt-9"), 404, "model", "gpt-9"),
    (
        "negative max_tokens",
        "completions",
        ok_completion(max_tokens=-5),
        400,
        "max_tokens",
        "at least 1",
    ),
    (
        "zero max_completion_tokens",
        "chat/completions",
        ok_chat(max_completion_tokens=0),
        400,
        "max_completion_tokens",
        "at least 1",
    ),
    (
        "huge max_tokens",
        "completions",
        ok_completion(max_tokens=10**12),
        400,
        "max_tokens",
        f"maximum context length is {CTX}",
    ),
    (
        "more than the KV pool",
        "completions",
        ok_completion(max_tokens=KV + 100),
        400,
        "max_tokens",
        f"KV pool ({KV} tokens)",
    ),
    (
        "prompt fills the pool",
        "completions",
        ok_completion(prompt="x" * KV),
        400,
        "prompt",
        "no room for output",
    ),
    (
        "negative temperature",
        "completions",
        ok_completion(temperature=-1),
        400,
        "temperature",
        "temperature",
    ),
    ("top_p above 1", "chat/completions", ok_chat(top_p=2), 400, "top_p", "top_p"),
    (
        "token id outside the vocabulary",
        "completions",
        ok_completion(prompt=[1, 99999]),
        400,
        "prompt",
        "token ids",
    ),
    ("n above max_n", "completions", ok_completion(n=17), 400, "n", "1..16"),
    ("n zero", "chat/completions", ok_chat(n=0), 400, "n", "1..16"),
    ("best_of below n", "completions", ok_completion(n=3, best_of=2), 400, "best_of", "n..16"),
    ("best_of above max_n", "completions", ok_completion(best_of=17), 400, "best_of", "n..16"),
    (
        "best_of streamed",
        "completions",
        ok_completion(n=1, best_of=2, stream=True),
        400,
        "best_of",
        "cannot be streamed",
    ),
    ("logprobs above 20", "completions", ok_completion(logprobs=21), 400, "logprobs", "0..20"),
    ("negative logprobs", "completions", ok_completion(logprobs=-1), 400, "logprobs", "0..20"),
    (
        "top_logprobs above 20",
        "chat/completions",
        ok_chat(logprobs=True, top_logprobs=21),
        400,
        "top_logprobs",
        "0..20",
    ),
    (
        "top_logprobs without logprobs",
        "chat/completions",
        ok_chat(top_logprobs=2),
        400,
        "top_logprobs",
        "logprobs set to true",
    ),
    ("echo streamed", "completions", ok_completion(echo=True, stream=True), 400, "echo", "stream"),
    (
        "max_tokens 0 without echo",
        "completions",
        ok_completion(max_tokens=0),
        400,
        "max_tokens",
        "0 only with echo",
    ),
    ("empty prompt list", "completions", ok_completion(prompt=[]), 400, "prompt", "empty"),
    (
        "penalty",
        "completions",
        ok_completion(frequency_penalty=0.5),
        400,
        "frequency_penalty",
        "not supported",
    ),
    (
        "stream_options without stream",
        "completions",
        ok_completion(stream_options={"include_usage": True}),
        400,
        "stream_options",
        "stream",
    ),
]


@pytest.mark.parametrize("name,path,body,status,param,words", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_a_clear_4xx(url, name, path, body, status, param, words):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = HTTP.post(f"{url}/v1/{path}", headers={"content-type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"] and err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_unknown_route_and_method_are_json_errors(url):
    r = HTTP.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and "message" in r.json()["error"]
    r = HTTP.get(f"{url}/v1/completions")
    assert r.status_code == 405 and "message" in r.json()["error"]


def test_server_keeps_serving_after_bad_requests(url):
    for _, path, body, *_ in CASES:  # every bad request again, then good ones
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        HTTP.post(f"{url}/v1/{path}", headers={"content-type": "application/json"}, **kw)
    near_full = ok_completion(prompt="y" * (KV - 40), max_tokens=40, ignore_eos=True)
    r = HTTP.post(f"{url}/v1/completions", json=near_full, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
    r = HTTP.post(f"{url}/v1/chat/completions", json=ok_chat())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    assert HTTP.get(f"{url}/health").status_code == 200
    m = HTTP.get(f"{url}/metrics").text
    assert 'kvmem:request_rejected_total{model_name="kvmem-tiny",status="400"}' in m
