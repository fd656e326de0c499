"""API keys: every ``/v1/*`` route asks for ``Authorization: Bearer KEY``.

An ASGI middleware, so it guards streamed responses the same way as plain
ones and answers before a request body is read. Keys are compared in
constant time (:func:`hmac.compare_digest`). ``/health`` stays open (load
balancers probe it); ``/metrics`` is guarded only when asked.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from kvmem.server.protocol import APIError


class APIKeyMiddleware:
    """Reject ``/v1/*`` (and optionally ``/metrics``) requests without the right bearer key."""

    def __init__(self, app: ASGIApp, api_key: str, guard_metrics: bool = False) -> None:
        if not api_key:
            raise ValueError("the API key must not be empty")
        self.app = app
        self._key = api_key.encode()
        self._prefixes = ("/v1/", "/metrics") if guard_metrics else ("/v1/",)

    def _guarded(self, path: str) -> bool:
        return any(path == p.rstrip("/") or path.startswith(p) for p in self._prefixes)

    def authorized(self, header: bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries the key (constant-time compare)."""
        if header is None:
            return False
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization")
        if self.authorized(header):
            await self.app(scope, receive, send)
            return
        message = (
            "Missing API key: send 'Authorization: Bearer <key>'."
            if header is None
            else "Incorrect API key provided."
        )
        err = APIError(401, message, code="invalid_api_key")
        body = json.dumps(err.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


__all__ = ["APIKeyMiddleware"]
