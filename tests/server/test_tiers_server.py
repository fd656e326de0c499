"""The server over the cache tiers: KV events on ZeroMQ, cached_tokens in usage, tier metrics."""

from __future__ import annotations

import argparse
import re
import time

import openai
import pytest
from conftest import HTTP

from kvmem.errors import InvalidArgument
from kvmem.server import ServerThread
from kvmem.server.cli import add_parser, build_app

zmq = pytest.importorskip("zmq")
PAGE = 16


def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="cmd"))
    return ap.parse_args(["serve", "--preset", "tiny", *argv])


#: Per backend, options giving 16-token prefix pages (a vmem page group of the tiny model).
BACKENDS = {
    "paged": [f"page_size={PAGE}"],
    "vmem": ["page_bytes=4096", "max_seqs=16", "max_seq_len=1024"],
}


def _backend(name: str) -> list[str]:
    out = ["--backend", name]
    for opt in BACKENDS[name]:
        out += ["--backend-option", opt]
    return out


def _full_pages(n_tokens: int) -> int:
    """Prompt tokens a prefix cache can hold: full pages, never the last token's page."""
    return (n_tokens - 1) // PAGE * PAGE


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 131 + 7 * i) % 250 + 1 for i in range(n)]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_kv_events_reach_a_zeromq_subscriber(backend: str) -> None:
    from kvmem.tiers import BlockStored, decode_batch

    app = build_app(
        _args(
            "--num-kv-tokens",
            "1024",
            *_backend(backend),
            "--kv-events",
            "tcp://127.0.0.1:*",
            "--kv-events-topic",
            "kvt",
        )
    )
    pub = app.state.kvmem.kv_events
    assert pub is not None and pub.endpoint.startswith("tcp://127.0.0.1:")
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"kvt")
    sub.connect(pub.endpoint)
    try:
        with ServerThread(app) as srv:
            assert pub.publisher.wait_for_subscribers(1, timeout=10)
            prompt = _prompt(1, 3 * PAGE + 5)
            r = HTTP.post(
                f"{srv.url}/v1/completions",
                json={"prompt": prompt, "max_tokens": 4, "temperature": 0},
            )
            assert r.status_code == 200
            stored: list[int] = []
            seqs: list[int] = []
            deadline = time.monotonic() + 10
            while len(stored) < 3 and time.monotonic() < deadline:
                if not sub.poll(100):
                    continue
                topic, seq, payload = sub.recv_multipart()
                assert topic == b"kvt"
                seqs.append(int.from_bytes(seq, "big"))
                for ev in decode_batch(payload).events:
                    if isinstance(ev, BlockStored):
                        assert ev.block_size == PAGE
                        stored.extend(ev.block_hashes)
            assert seqs == list(range(len(seqs)))
            assert len(stored) == _full_pages(len(prompt) + 4) // PAGE
    finally:
        sub.close(0)
    assert pub.publisher._closed  # the app's shutdown closed the publisher


def test_kv_events_need_a_backend_that_emits_them() -> None:
    from types import SimpleNamespace

    from kvmem.server.kvevents import publish_kv_events

    no_events = SimpleNamespace(spec=None)  # an allocator without ``kv_events``
    with pytest.raises(InvalidArgument, match="emits no KV events"):
        publish_kv_events(no_events, "tcp://127.0.0.1:*")  # type: ignore[arg-type]


def test_kv_events_bad_endpoint_is_an_error() -> None:
    with pytest.raises(InvalidArgument, match="ZeroMQ endpoint"):
        build_app(_args("--num-kv-tokens", "1024", "--kv-events", "localhost:5557"))


def test_tier_backend_options_reach_the_allocator(tmp_path) -> None:
    app = build_app(
        _args(
            "--num-kv-tokens",
            "512",
            "--backend-option",
            "host_cache_tokens=1024",
            "--backend-option",
            f"disk_cache_dir={tmp_path}",
            "--backend-option",
            "disk_cache_tokens=2048",
        )
    )
    extra = app.state.kvmem.runner.engine.allocator.stats().extra
    bpt = app.state.kvmem.runner.engine.allocator.spec.bytes_per_token
    assert extra["tier_host_capacity_bytes"] == 1024 * bpt
    assert extra["tier_disk_capacity_bytes"] == 2048 * bpt
    app.state.kvmem.runner.engine.close()


def _cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_cached_tokens_through_the_openai_client(backend: str) -> None:
    app = build_app(_args("--num-kv-tokens", "2048", *_backend(backend)))
    assert app.state.kvmem.runner.engine.allocator.granularity == PAGE
    with (
        ServerThread(app) as srv,
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0) as c,
    ):
        prompt = _prompt(2, 4 * PAGE + 3)
        first = c.completions.create(model="kvmem-tiny", prompt=prompt, max_tokens=3)
        again = c.completions.create(model="kvmem-tiny", prompt=prompt, max_tokens=3)
        assert _cached(first.usage) == 0
        assert _cached(again.usage) == _full_pages(len(prompt))
        assert again.usage.prompt_tokens == len(prompt)

        msgs = [{"role": "user", "content": "tell me about paged attention " * 4}]
        c.chat.completions.create(model="kvmem-tiny", messages=msgs, max_tokens=2)
        chat = c.chat.completions.create(model="kvmem-tiny", messages=msgs, max_tokens=2)
        n_chat = chat.usage.prompt_tokens
        assert _cached(chat.usage) == _full_pages(n_chat) > 0

        stream = c.chat.completions.create(
            model="kvmem-tiny",
            messages=msgs,
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [ch.usage for ch in stream if ch.usage is not None]
        assert len(usage) == 1 and _cached(usage[0]) == _full_pages(n_chat)


def test_host_tier_hits_show_in_usage_and_metrics() -> None:
    app = build_app(
        _args(
            "--num-kv-tokens",
            str(8 * PAGE),
            "--backend-option",
            f"page_size={PAGE}",
            "--backend-option",
            f"host_cache_tokens={64 * PAGE}",
            "--max-num-seqs",
            "1",
        )
    )
    body = {"max_tokens": 2, "temperature": 0}
    with ServerThread(app) as srv:
        url = f"{srv.url}/v1/completions"
        target = _prompt(3, 5 * PAGE + 1)
        first = HTTP.post(url, json={"prompt": target, **body}).json()
        for k in range(4):  # other prompts take the device pages: target's go to the host
            assert HTTP.post(url, json={"prompt": _prompt(10 + k, 5 * PAGE), **body}).is_success
        again = HTTP.post(url, json={"prompt": target, **body}).json()
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == _full_pages(len(target))
        text = HTTP.get(f"{srv.url}/metrics").text
        assert _labelled(text, "prefix_cache_hit_tokens_total", 'tier="host"') > 0
        assert _labelled(text, "kv_tier_bytes_total", 'direction="device_to_host"') > 0
        assert _labelled(text, "kv_tier_bytes_total", 'direction="host_to_device"') > 0
        assert _labelled(text, "kv_tier_bytes_total", 'direction="disk_to_device"') == 0


def _labelled(text: str, name: str, label: str) -> float:
    """The value of the ``kvmem:name`` sample carrying ``label``."""
    m = re.search(rf"^kvmem:{name}{{[^}}]*{re.escape(label)}[^}}]*}} (\S+)$", text, re.M)
    assert m, f"kvmem:{name}{{{label}}} missing from /metrics"
    return float(m.group(1))
