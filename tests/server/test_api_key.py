"""API keys: /v1/* needs the bearer key, /health stays open, /metrics only when asked."""

from __future__ import annotations

import openai
import pytest
from conftest import HTTP, MODEL

from kvmem.engine import Engine
from kvmem.server import AsyncEngine, ServerThread, create_app
from kvmem.server.auth import APIKeyMiddleware

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def servers(tiny_model):
    """One server whose /metrics is open, one that guards it too."""
    started = []
    for guard in (False, True):
        runner = AsyncEngine(Engine(tiny_model, num_kv_tokens=2048), max_queue=16)
        app = create_app(runner, MODEL, api_key=KEY, guard_metrics=guard)
        started.append(ServerThread(app).start())
    yield started
    for s in started:
        s.stop()


def test_the_right_key_works_with_the_openai_client(servers):
    with openai.OpenAI(base_url=f"{servers[0].url}/v1", api_key=KEY, max_retries=0) as c:
        out = c.completions.create(model=MODEL, prompt="hello", max_tokens=3)
        assert out.usage.completion_tokens == 3
        assert [m.id for m in c.models.list().data] == [MODEL]


@pytest.mark.parametrize("key", ["wrong-key", KEY + "x", KEY[:-1]])
def test_a_wrong_key_gets_401_with_an_openai_error(servers, key):
    with (
        openai.OpenAI(base_url=f"{servers[0].url}/v1", api_key=key, max_retries=0) as c,
        pytest.raises(openai.AuthenticationError) as e,
    ):
        c.completions.create(model=MODEL, prompt="hello", max_tokens=3)
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "path,method",
    [("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST")],
)
def test_a_missing_key_gets_401_on_every_v1_route(servers, path, method):
    r = HTTP.request(method, servers[0].url + path, json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert err["code"] == "invalid_api_key" and "Missing API key" in err["message"]


def test_streaming_is_guarded_too(servers):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}
    r = HTTP.post(servers[0].url + "/v1/completions", json=body)
    assert r.status_code == 401
    ok = HTTP.post(
        servers[0].url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")


def test_health_stays_open_and_metrics_are_guarded_only_when_asked(servers):
    open_, guarded = servers
    for s in servers:
        assert HTTP.get(s.url + "/health").status_code == 200
    assert HTTP.get(open_.url + "/metrics").status_code == 200
    assert HTTP.get(guarded.url + "/metrics").status_code == 401
    r = HTTP.get(guarded.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and "kvmem:" in r.text


def test_the_key_comparison_accepts_only_the_exact_bearer_token():
    mw = APIKeyMiddleware(lambda *a: None, KEY)
    assert mw.authorized(f"Bearer {KEY}".encode())
    assert mw.authorized(f"bearer {KEY}".encode())
    assert not mw.authorized(KEY.encode())
    assert not mw.authorized(f"Basic {KEY}".encode())
    assert not mw.authorized(b"Bearer ")
    assert not mw.authorized(None)
    with pytest.raises(ValueError):
        APIKeyMiddleware(lambda *a: None, "")


def _parse(argv: list[str]):
    import argparse

    from kvmem.server.cli import add_parser

    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="cmd"))
    return ap.parse_args(["serve", *argv])


def test_serve_takes_the_key_from_the_option_or_the_environment(monkeypatch, capsys):
    from kvmem.server.cli import main

    monkeypatch.delenv("KVMEM_API_KEY", raising=False)
    assert _parse([]).api_key is None
    assert _parse(["--api-key", "k1"]).api_key == "k1"
    monkeypatch.setenv("KVMEM_API_KEY", "k2")
    assert _parse([]).api_key == "k2"
    assert _parse(["--api-key", "k1"]).api_key == "k1"
    assert main(["--api-key", " ", "--port", "1"]) == 2
    assert "must not be empty" in capsys.readouterr().err
    monkeypatch.delenv("KVMEM_API_KEY")
    assert main(["--metrics-need-key", "--port", "1"]) == 2
    assert "needs --api-key" in capsys.readouterr().err
