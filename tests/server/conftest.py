"""Fixtures of the server tests: servers on 127.0.0.1 on free ports, shut down at the end."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from kvmem.engine import Engine, random_model
from kvmem.server import AsyncEngine, ServerThread, create_app

# The tiny model's ops take microseconds; extra threads only contend on shared cores.
torch.set_num_threads(1)

MODEL = "kvmem-tiny"

#: One client for the tests' synchronous calls (``httpx.get`` builds a client, ~0.1 s, per call).
HTTP = httpx.Client(timeout=60)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny random model every server here serves (one copy, read-only)."""
    return random_model("tiny", seed=0)


ServerFactory = Callable[..., ServerThread]


@pytest.fixture(scope="module")
def make_server(tiny_model) -> Iterator[ServerFactory]:
    """Start servers (engine options as keywords, plus ``max_queue``); all stop at module end."""
    started: list[ServerThread] = []

    def make(max_queue: int = 256, **engine_options: Any) -> ServerThread:
        opts = {
            "num_kv_tokens": 4096,
            "max_num_seqs": 64,
            "max_num_batched_tokens": 512,
            "backend_options": {"page_size": 16},
            **engine_options,
        }
        runner = AsyncEngine(Engine(tiny_model, **opts), max_queue=max_queue)
        srv = ServerThread(create_app(runner, MODEL)).start()
        started.append(srv)
        return srv

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def server(make_server) -> ServerThread:
    """A server with the default engine options, for the module."""
    return make_server()


@pytest.fixture(scope="module")
def client(server) -> Iterator[openai.OpenAI]:
    """The official ``openai`` client of :func:`server`."""
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as c:
        yield c


def metric(text: str, name: str) -> float:
    """The value of one unlabelled-by-us ``kvmem:`` sample in a /metrics page."""
    m = re.search(rf"^kvmem:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"kvmem:{name} missing from /metrics"
    return float(m.group(1))


def get_metric(url: str, name: str) -> float:
    """Scrape ``url``/metrics and read one metric."""
    r = HTTP.get(f"{url}/metrics")
    assert r.status_code == 200
    return metric(r.text, name)
