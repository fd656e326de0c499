"""An engine step that raises: every client gets the step's error, not a bare abort."""

from __future__ import annotations

import asyncio

import httpx
from conftest import HTTP, MODEL
from sse import stream_completion

from kvmem.engine import Engine
from kvmem.server import AsyncEngine, ServerThread, create_app


def test_a_failing_step_reports_its_error_to_plain_and_streaming_clients(tiny_model):
    eng = Engine(tiny_model, num_kv_tokens=512, backend_options={"page_size": 16})

    def boom(*args, **kwargs):
        raise RuntimeError("device exploded")

    eng.executor.execute = boom
    runner = AsyncEngine(eng)
    with ServerThread(create_app(runner, MODEL)) as srv:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
        r = HTTP.post(f"{srv.url}/v1/completions", json=body)
        assert r.status_code == 500
        msg = r.json()["error"]["message"]
        assert "engine step failed" in msg and "device exploded" in msg, msg

        async def streamed():
            async with httpx.AsyncClient(timeout=60) as client:
                return await stream_completion(client, srv.url, body)

        s = asyncio.run(streamed())
        assert s.status == 200 and s.error is not None and s.done
        assert "engine step failed" in s.error["message"], s.error
        assert "device exploded" in s.error["message"], s.error
        assert runner.step_errors >= 2
