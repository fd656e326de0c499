"""kvmem.server: an OpenAI-compatible HTTP server over :mod:`kvmem.engine` (FastAPI + uvicorn).

``kvmem serve --preset tiny`` (or ``python -m kvmem.server``) serves
``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming or not),
``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus,
``kvmem:*``). The engine steps in its own thread (:mod:`.runner`), so the
event loop never waits on model compute; a bounded waiting queue answers
429 when full; a client that disconnects has its request aborted and its
KV freed at once. In Python::

    from kvmem.engine import Engine
    from kvmem.server import AsyncEngine, ServerThread, create_app

    app = create_app(AsyncEngine(Engine(), max_queue=64), "kvmem-tiny")
    with ServerThread(app) as srv:  # a free port on 127.0.0.1
        print(srv.url)

The names below load on first use, so ``kvmem.server.cli`` (the ``serve``
sub-command's options) imports without the ``server`` extra installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmem.server.app import create_app
    from kvmem.server.chat import ChatTemplate
    from kvmem.server.launch import ServerThread, serve
    from kvmem.server.metrics import ServerMetrics
    from kvmem.server.protocol import APIError
    from kvmem.server.runner import AsyncEngine, QueueFull, RequestStream

_EXPORTS = {
    "APIError": "protocol",
    "AsyncEngine": "runner",
    "ChatTemplate": "chat",
    "QueueFull": "runner",
    "RequestStream": "runner",
    "ServerMetrics": "metrics",
    "ServerThread": "launch",
    "create_app": "app",
    "serve": "launch",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmem.server' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kvmem.server.{module}"), name)


__all__ = [
    "APIError",
    "AsyncEngine",
    "ChatTemplate",
    "QueueFull",
    "RequestStream",
    "ServerMetrics",
    "ServerThread",
    "create_app",
    "serve",
]
