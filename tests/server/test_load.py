"""Load and back-pressure: 200 concurrent streams, every one complete or a clean 429."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest
from conftest import HTTP, MODEL, get_metric
from sse import stream_completion

from kvmem.engine import ByteTokenizer

N = 200
MAX_QUEUE = 64


def _counter(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for m in re.finditer(rf"^kvmem:{name}{{([^}}]*)}} (\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_200_concurrent_streams_complete_or_get_429(make_server):
    # a pool too small for 64 running requests at once: preemption happens under the load
    srv = make_server(max_queue=MAX_QUEUE, num_kv_tokens=1536, max_num_seqs=64)
    prompts = [f"Request {i}: " + "lorem ipsum "[: i % 12] for i in range(N)]
    budgets = [3 + i % 10 for i in range(N)]

    async def one(client: httpx.AsyncClient, i: int):
        body = {
            "model": MODEL,
            "prompt": prompts[i],
            "max_tokens": budgets[i],
            "ignore_eos": True,
            "temperature": 0.0 if i % 2 else 0.8,
            "seed": i,
        }
        return await stream_completion(client, srv.url, body)

    async def run():
        limits = httpx.Limits(max_connections=N + 10, max_keepalive_connections=N + 10)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(N)))

    t0 = time.perf_counter()
    results = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    ok = [i for i, r in enumerate(results) if r.status == 200]
    busy = [i for i, r in enumerate(results) if r.status == 429]
    assert len(ok) + len(busy) == N, {r.status for r in results}
    assert len(ok) >= MAX_QUEUE  # a 429 needs MAX_QUEUE admitted requests still waiting
    tok = ByteTokenizer()
    for i in ok:
        r = results[i]
        assert r.done and r.error is None and r.finish_reason == "length", (i, r)
        assert len(r.token_ids) == budgets[i] == r.usage["completion_tokens"]
        assert r.usage["prompt_tokens"] == len(prompts[i].encode())
        assert r.text == tok.decode(r.token_ids)
    for i in busy:
        r = results[i]
        assert int(r.headers["retry-after"]) >= 1
        assert r.error["code"] == "queue_full" and r.error["type"] == "rate_limit_error"
    page = HTTP.get(f"{srv.url}/metrics").text
    assert get_metric(srv.url, "kv_cache_used_tokens") == 0
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "server_requests_in_flight",
        "server_queue_size",
    ):
        assert get_metric(srv.url, name) == 0, name
    assert _counter(page, "request_success_total", finished_reason="length") == len(ok)
    assert _counter(page, "request_rejected_total", status="429") == len(busy)
    assert _counter(page, "generation_tokens_total") == sum(budgets[i] for i in ok)
    print(
        f"{len(ok)} completed, {len(busy)} got 429, in {elapsed:.1f} s; "
        f"{_counter(page, 'num_preemptions_total'):.0f} preemptions"
    )


def test_full_queue_answers_429_with_retry_after(make_server):
    srv = make_server(max_queue=2, max_num_seqs=1)

    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            long = {
                "model": MODEL,
                "prompt": "long",
                "max_tokens": 1500,
                "ignore_eos": True,
                "stream": True,
            }
            async with client.stream("POST", f"{srv.url}/v1/completions", json=long) as a:
                lines = a.aiter_lines()
                while '"text"' not in await anext(lines):  # A runs: it has streamed a token
                    pass
                short = {"model": MODEL, "prompt": "short", "max_tokens": 4, "ignore_eos": True}
                waiting = [
                    asyncio.create_task(client.post(f"{srv.url}/v1/completions", json=short))
                    for _ in range(2)
                ]
                while get_metric(srv.url, "server_queue_size") < 2:
                    await asyncio.sleep(0.01)
                rejected = await client.post(f"{srv.url}/v1/completions", json=short)
                aclient = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    await aclient.completions.create(model=MODEL, prompt="x", max_tokens=2)
                await aclient.close()
            # A's client left: the two waiting requests run
            done = await asyncio.gather(*waiting)
            again = await client.post(f"{srv.url}/v1/completions", json=short)
            return rejected, done, again

    rejected, done, again = asyncio.run(run())
    assert rejected.status_code == 429 and int(rejected.headers["retry-after"]) >= 1
    assert "queue is full" in rejected.json()["error"]["message"]
    assert [d.status_code for d in done] == [200, 200]
    assert all(d.json()["usage"]["completion_tokens"] == 4 for d in done)
    assert again.status_code == 200
    assert get_metric(srv.url, "kv_cache_used_tokens") == 0
