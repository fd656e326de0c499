"""A small SSE reader for the tests: one streamed completion, parsed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Streamed:
    """What one streamed request returned."""

    status: int
    headers: dict[str, str]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    done: bool = False  # saw ``data: [DONE]``
    error: dict[str, Any] | None = None


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Streamed:
    """POST a streaming completion and read it to the end."""
    body = {
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
        **body,
    }
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        out = Streamed(r.status_code, dict(r.headers))
        if r.status_code != 200:
            out.error = json.loads(await r.aread())["error"]
            return out
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: ") :]
            assert not out.done, "data after [DONE]"
            if data == "[DONE]":
                out.done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                out.error = chunk["error"]
                continue
            if chunk.get("usage"):
                out.usage = chunk["usage"]
            for c in chunk["choices"]:
                out.text += c["text"]
                out.token_ids += c["token_ids"]
                if c["finish_reason"] is not None:
                    assert out.finish_reason is None, "two finishing chunks"
                    out.finish_reason = c["finish_reason"]
    return out
