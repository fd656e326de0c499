"""Sessions through the OpenAI API: ``session_id`` in ``extra_body`` keeps a conversation's KV."""

from __future__ import annotations

import time

import openai
import pytest
from conftest import HTTP, MODEL, metric

PAGE = 16


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 131 + 7 * i) % 250 + 1 for i in range(n)]


def complete(client, toks: list[int], max_tokens: int = 7, **extra):
    """A greedy completion of token ids; its generated ids, cached prompt tokens, response."""
    r = client.completions.create(
        model=MODEL,
        prompt=toks,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True, **extra},
    )
    return r.choices[0].model_extra["token_ids"], r.usage.prompt_tokens_details.cached_tokens, r


def test_the_second_turn_computes_only_the_new_tokens(client, server) -> None:
    p1 = prompt(1, 37)
    out1, cached1, _ = complete(client, p1, session_id="conv-1")
    assert cached1 == 0 and len(out1) == 7
    p2 = p1 + out1 + prompt(2, 9)
    # the next prompt without a session first: the prefix cache holds turn 1's full pages only
    plain, cached_plain, _ = complete(client, p2)
    assert cached_plain == (len(p1) + len(out1) - 1) // PAGE * PAGE
    out2, cached2, r2 = complete(client, p2, session_id="conv-1")
    # every token of turn 1 but its last sampled one (its KV was never computed)
    assert cached2 == len(p1) + len(out1) - 1 > cached_plain
    assert r2.usage.prompt_tokens == len(p2) and out2 == plain
    page = HTTP.get(f"{server.url}/metrics").text
    assert metric(page, "num_sessions_parked") >= 1
    d = HTTP.delete(f"{server.url}/v1/sessions/conv-1")
    assert d.status_code == 200 and d.json() == {
        "id": "conv-1",
        "object": "session",
        "deleted": True,
    }
    assert HTTP.delete(f"{server.url}/v1/sessions/conv-1").json()["deleted"] is False
    # the session ended: its next turn recomputes beyond the prefix cache's pages
    p3 = p2 + out2 + [5]
    _, cached3, _ = complete(client, p3, session_id="conv-1")
    assert cached3 == (len(p3) - 1) // PAGE * PAGE


def test_streamed_chat_turns_report_the_session_hit(client) -> None:
    # with 2 tokens the tiny model's answer is ASCII, so the chat template renders it back
    first = [{"role": "user", "content": "Hello there"}]
    r1 = client.chat.completions.create(
        model=MODEL,
        messages=first,
        max_tokens=2,
        temperature=0,
        extra_body={"session_id": "chat-1", "return_token_ids": True},
    )
    answer = r1.choices[0].message.content
    assert list(answer.encode()) == r1.choices[0].model_extra["token_ids"]
    n1 = r1.usage.prompt_tokens
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[
                *first,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "More."},
            ],
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"session_id": "chat-1"},
        )
    )
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == n1 + len(answer.encode()) - 1
    assert usage.completion_tokens == 3


@pytest.mark.parametrize("bad", ["", 5, None, ["a"]])
def test_a_bad_session_id_is_a_400(server, bad) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "session_id": bad}
    r = HTTP.post(f"{server.url}/v1/completions", json=body)
    if bad is None:  # JSON null: no session
        assert r.status_code == 200
        return
    assert r.status_code == 400 and r.json()["error"]["param"] == "session_id"


def test_a_session_takes_one_prompt(client) -> None:
    with pytest.raises(openai.BadRequestError, match="one prompt") as e:
        client.completions.create(
            model=MODEL, prompt=["a", "b"], max_tokens=2, extra_body={"session_id": "two"}
        )
    assert e.value.status_code == 400


def test_a_session_with_a_request_running_answers_409(client, server) -> None:
    with client.completions.create(
        model=MODEL,
        prompt=prompt(3, 20),
        max_tokens=2000,
        stream=True,
        extra_body={"ignore_eos": True, "session_id": "busy"},
    ) as stream:
        next(iter(stream))  # admitted and decoding
        with pytest.raises(openai.ConflictError) as e:
            complete(client, prompt(3, 30), session_id="busy")
        assert e.value.status_code == 409
        assert e.value.body["code"] == "session_busy"
        other, _, _ = complete(client, prompt(4, 10), session_id="not-busy")
        assert len(other) == 7
    # the client left: the request is aborted (once the server sees it go), the session free
    deadline = time.monotonic() + 30
    while True:
        try:
            out, cached, _ = complete(client, prompt(3, 30), session_id="busy")
            break
        except openai.ConflictError:
            assert time.monotonic() < deadline, "the session stayed busy"
            time.sleep(0.05)
    assert len(out) == 7 and cached == PAGE  # the page both prompts share
