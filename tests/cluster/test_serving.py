"""``kvmem serve --instances 2``: one OpenAI endpoint over two engine processes."""

from __future__ import annotations

import argparse
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from kvmem.cluster.serving import merge_metrics
from kvmem.engine import Engine, EngineMetrics, SamplingParams
from kvmem.engine.errors import InvalidRequest
from kvmem.server import ServerThread
from kvmem.server.cli import add_arguments, build_app

pytestmark = pytest.mark.timeout(180)
GENERATED = re.compile(r"^kvmem:generation_tokens(_total)?\{")


def _app(*argv: str) -> Any:
    """The server app ``kvmem serve`` builds from these options."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    return build_app(p.parse_args(list(argv)))


def _disagg_app(decode_instances: int) -> Any:
    """One prefill instance and ``decode_instances`` decode ones, reference kernels."""
    return _app(
        *["--prefill-instances", "1", "--decode-instances", str(decode_instances)],
        *["--num-kv-tokens", "512", "--attention-impl", "reference"],
        *["--max-num-batched-tokens", "32"],
    )


def test_two_instances_answer_like_one_engine():
    app = _app("--instances", "2", "--num-kv-tokens", "2048", "--attention-impl", "reference")
    prompts = ["hello there", "the cluster answers"]
    with Engine(num_kv_tokens=2048, attention_impl="reference", seed=0) as eng:
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        ref = [c.text for c in eng.generate(prompts, params)]
    srv = ServerThread(app).start()
    try:
        assert app.state.kvmem.runner.engine.cluster.n == 2
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as c:
            name = c.models.list().data[0].id
            got = [
                c.completions.create(
                    model=name,
                    prompt=pr,
                    max_tokens=8,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
                .choices[0]
                .text
                for pr in prompts
            ]
        assert got == ref
        # /metrics merges the instances': both requests' tokens, wherever they ran
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(f"{srv.url}/metrics").text
            line = next(x for x in text.splitlines() if GENERATED.match(x))
            if float(line.split()[-1]) == 16 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert float(line.split()[-1]) == 16, line
    finally:
        srv.stop()


def test_merged_metrics_sum_counts_and_take_ratios_of_the_sums():
    a = _metrics(kv_capacity_tokens=100, kv_used_tokens=50, prompt_tokens=30, hits=10, rate=0.25)
    b = _metrics(kv_capacity_tokens=300, kv_used_tokens=0, prompt_tokens=60, hits=0, rate=0.0)
    m = merge_metrics([a, b])
    assert m.kv_capacity_tokens == 400 and m.kv_used_tokens == 50 and m.kv_usage == 0.125
    assert m.prompt_tokens == 90 and m.prefix_cache_hit_tokens == 10
    assert m.prefix_cache_hit_rate == pytest.approx(0.25 * 40 / 100)
    assert m.kv_extra == {"tier_host_hit_pages": 3.0} and m.time == 2.0
    with pytest.raises(InvalidRequest):
        merge_metrics([])


def _metrics(
    *, kv_capacity_tokens: int, kv_used_tokens: int, prompt_tokens: int, hits: int, rate: float
) -> EngineMetrics:
    return EngineMetrics(
        time=float(kv_capacity_tokens > 100) + 1.0,
        num_running=1,
        num_waiting=0,
        num_swapped=0,
        num_finished=1,
        num_aborted=0,
        num_steps=3,
        num_preemptions=0,
        prompt_tokens=prompt_tokens,
        generation_tokens=4,
        tokens_per_s=1.0,
        kv_capacity_tokens=kv_capacity_tokens,
        kv_used_tokens=kv_used_tokens,
        kv_usage=kv_used_tokens / kv_capacity_tokens,
        kv_cached_tokens=0,
        kv_swapped_tokens=0,
        prefix_cache_hit_rate=rate,
        prefix_cache_hit_tokens=hits,
        kv_extra={"tier_host_hit_pages": 1.5},
    )


def test_zero_instances_is_refused():
    with pytest.raises(Exception, match="--instances"):
        _app("--instances", "0")


def test_prefill_and_decode_instances_answer_like_one_engine_through_the_openai_api():
    app = _disagg_app(1)
    base = "kvmem serves its first token from a prefill instance and the rest elsewhere; "
    # different lengths, several chunks each; a second wave extends the first prompt, whose
    # pages are then in the prefill side's prefix cache
    first = [base, "short", base * 2 + "and more"]
    prompts = first + [base + "second turn", base + "third one"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with Engine(num_kv_tokens=512, attention_impl="reference", max_num_batched_tokens=32) as eng:
        ref = [c.output_token_ids for c in eng.generate(prompts, params)]
    srv = ServerThread(app).start()
    try:
        assert app.state.kvmem.runner.engine.cluster.prefill == 1
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as c:
            name = c.models.list().data[0].id

            def ask(prompt: str) -> list[int]:
                r = c.completions.create(
                    model=name,
                    prompt=prompt,
                    max_tokens=12,
                    temperature=0,
                    extra_body={"ignore_eos": True, "return_token_ids": True},
                )
                return list(r.choices[0].model_extra["token_ids"])

            with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent requests
                got = list(pool.map(ask, first))
                got += list(pool.map(ask, prompts[len(first) :]))
            assert got == ref
            # a prompt the decode side could never hold: a 400 before any work
            with pytest.raises(openai.BadRequestError, match="KV pool|decode instance"):
                c.completions.create(model=name, prompt="x" * 600, max_tokens=4)
        # the same check behind the engine interface, whatever the HTTP layer checks first
        with pytest.raises(InvalidRequest, match="decode instance"):
            app.state.kvmem.runner.engine.add_request([1] * 512)
        cluster = app.state.kvmem.runner.engine.cluster
        deadline = time.monotonic() + 10  # the prefill side's reports may trail the outputs
        while len(cluster.handoffs) < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(cluster.handoffs) == len(prompts)  # every request went through a decode instance
        want = 2 * (len(base.encode()) // 16 * 16)  # the second wave's prefix, cached
        while cluster.metrics[0].prefix_cache_hit_tokens < want and time.monotonic() < deadline:
            time.sleep(0.05)  # metrics come in every 0.25 s
        assert cluster.metrics[0].prefix_cache_hit_tokens >= want
    finally:
        srv.stop()


def test_prefill_and_decode_instances_go_together():
    with pytest.raises(Exception, match="go together"):
        _app("--prefill-instances", "1")


def test_a_session_over_prefill_and_decode_instances_through_the_openai_api():
    app = _disagg_app(2)
    p1 = [(7 * j) % 200 + 1 for j in range(40)]
    srv = ServerThread(app).start()
    try:
        cluster = app.state.kvmem.runner.engine.cluster
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as c:
            name = c.models.list().data[0].id

            def ask(prompt: list[int]) -> list[int]:
                r = c.completions.create(
                    model=name,
                    prompt=prompt,
                    max_tokens=10,
                    temperature=0,
                    extra_body={"ignore_eos": True, "return_token_ids": True, "session_id": "c1"},
                )
                return list(r.choices[0].model_extra["token_ids"])

            out1 = ask(p1)
            p2 = p1 + out1 + [5, 6, 7, 8]
            out2 = ask(p2)
        with Engine(
            num_kv_tokens=512, attention_impl="reference", max_num_batched_tokens=32
        ) as eng:
            params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
            assert [out1, out2] == [c.output_token_ids for c in eng.generate([p1, p2], params)]
        deadline = time.monotonic() + 10  # the prefill side's reports may trail the outputs
        while len(cluster.handoffs) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        (_, _, d1, s1), (_, _, d2, s2) = cluster.handoffs
        assert d1 == d2 and s1.tokens_cached == 0 and s2.tokens_cached >= len(p1) + len(out1) - 1
        gone = httpx.delete(f"{srv.url}/v1/sessions/c1").json()
        assert gone["deleted"] is True
    finally:
        srv.stop()
