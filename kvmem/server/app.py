"""The FastAPI application: OpenAI's completions, chat completions and models, health, metrics.

Responses follow OpenAI's shapes as vLLM and SGLang serve them. Streams are
server-sent events, one ``data: {chunk}`` per engine step that produced
tokens for the request (several tokens coalesce into one chunk when the
client reads slower than the engine produces), a last chunk with the
``finish_reason``, a usage chunk when ``stream_options.include_usage`` is
set, then ``data: [DONE]``. Errors are ``{"error": {"message", "type",
"param", "code"}}`` with the HTTP status: 400 for a bad request or one
that cannot fit the context or the KV pool, 404 for an unknown model, 429
(with ``Retry-After``) when the waiting queue is full, 503 when the engine
is down, 401 for a missing or wrong API key (when the server has one). A
client that disconnects has its request aborted at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from kvmem.engine import InvalidRequest, RequestOutput
from kvmem.server.auth import APIKeyMiddleware
from kvmem.server.chat import ChatTemplate
from kvmem.server.metrics import CONTENT_TYPE, ServerMetrics
from kvmem.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_body,
)
from kvmem.server.runner import AsyncEngine, EngineDead, QueueFull, RequestStream


@dataclass
class ServerState:
    """What the routes share: the engine runner, metrics, the model's name and chat template."""

    runner: AsyncEngine
    metrics: ServerMetrics
    model_name: str
    chat_template: ChatTemplate
    max_body_bytes: int = 32 << 20
    created: int = 0


def create_app(
    runner: AsyncEngine,
    model_name: str = "kvmem-tiny",
    chat_template: ChatTemplate | None = None,
    metrics: ServerMetrics | None = None,
    api_key: str | None = None,
    guard_metrics: bool = False,
) -> FastAPI:
    """The application; the runner's engine thread starts and stops with the app's lifespan.

    With ``api_key`` every ``/v1/*`` route (and ``/metrics`` if ``guard_metrics``)
    answers 401 unless the request carries ``Authorization: Bearer <api_key>``.
    """
    if metrics is None:
        metrics = runner.metrics or ServerMetrics(
            model_name, runner.engine.allocator.stats().bytes_per_token
        )
        runner.metrics = metrics
    state = ServerState(
        runner, metrics, model_name, chat_template or ChatTemplate(), created=int(time.time())
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            await runner.stop()

    app = FastAPI(title="kvmem", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kvmem = state
    if api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, guard_metrics=guard_metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status in (400, 404, 413, 429, 503):
            state.metrics.rejected.labels(model_name, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return JSONResponse(
            err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        err = APIError(
            500,
            f"internal error: {type(exc).__name__}: {exc}",
            type="server_error",
            code="internal_error",
        )
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if not runner.alive:
            raise APIError(
                503, "the engine is not running", type="server_error", code="engine_dead"
            )
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": model_name,
                        "object": "model",
                        "created": state.created,
                        "owned_by": "kvmem",
                        "root": model_name,
                        "parent": None,
                        "max_model_len": runner.engine.max_model_len,
                    }
                ],
            }
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        snap = await runner.engine_metrics()
        return Response(state.metrics.render(snap), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse_body(CompletionRequest, await _body(request, state))
        _check_model(req.model, model_name)
        prompt = req.single_prompt()
        ids = runner.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return await _serve(request, state, req, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req: ChatCompletionRequest = parse_body(ChatCompletionRequest, await _body(request, state))
        _check_model(req.model, model_name)
        text = state.chat_template.render(req.messages, req.add_generation_prompt)
        ids = runner.engine.tokenizer.encode(text)
        return await _serve(request, state, req, ids, chat=True)

    return app


async def _body(request: Request, state: ServerState) -> bytes:
    body = await request.body()
    if len(body) > state.max_body_bytes:
        raise APIError(
            413,
            f"the request body is larger than {state.max_body_bytes} bytes",
            code="body_too_large",
        )
    return body


def _check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise APIError(
            404,
            f"The model `{name}` does not exist; this server serves `{served}`.",
            param="model",
            code="model_not_found",
        )


def _budget(
    req: CompletionRequest | ChatCompletionRequest, n_prompt: int, state: ServerState
) -> int:
    """The request's max_tokens, checked against the model's context and the KV pool."""
    eng = state.runner.engine
    ctx, kv = eng.max_model_len, eng.kv_capacity_tokens
    limit = min(ctx, kv)
    asked = req.requested_max_tokens()
    param = (
        "max_completion_tokens"
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None
        else "max_tokens"
    )
    if asked is not None and asked < 1:
        raise APIError(
            400, f"{param} must be at least 1, got {asked}", param=param, code="invalid_value"
        )
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
    where = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if n_prompt >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens and the KV pool holds {kv}; "
            f"the {where} has {n_prompt} tokens, which leaves no room for output.",
            param=where,
            code="context_length_exceeded",
        )
    max_tokens = asked if asked is not None else limit - n_prompt
    if n_prompt + max_tokens > ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the {where}, {max_tokens} for the "
            f"completion). Please reduce the length of the {where} or completion.",
            param=param,
            code="context_length_exceeded",
        )
    if n_prompt + max_tokens > kv:
        raise APIError(
            400,
            f"The request needs up to {n_prompt + max_tokens} tokens of KV ({n_prompt} in the "
            f"{where}, {max_tokens} for the completion), more than the server's whole KV pool "
            f"({kv} tokens). Please reduce the length of the {where} or completion.",
            param=param,
            code="kv_capacity_exceeded",
        )
    return max_tokens


async def _serve(
    request: Request,
    state: ServerState,
    req: CompletionRequest | ChatCompletionRequest,
    ids: list[int],
    chat: bool,
) -> Response:
    max_tokens = _budget(req, len(ids), state)
    try:
        params = req.sampling_params(max_tokens)
        stream = state.runner.submit(
            ids, params, priority=req.priority, tenant=req.user or "default"
        )
    except InvalidRequest as e:
        word = str(e).split(" ", 1)[0]
        param = word if word in type(req).model_fields else None
        raise APIError(400, str(e), param=param, code="invalid_value") from None
    except QueueFull as e:
        raise APIError(
            429,
            str(e),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after)},
        ) from None
    except EngineDead as e:
        raise APIError(503, str(e), type="server_error", code="engine_dead") from None

    def abort() -> None:  # a no-op once the request finished; frees the KV of one whose client left
        state.runner.abort(stream.request_id)

    try:
        xid = request.headers.get("x-request-id")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{xid or uuid.uuid4().hex}"
        headers = {"x-request-id": xid} if xid else {}
        fmt = _Formatter(rid, state.model_name, chat, req.return_token_ids, len(ids))
        if req.stream:
            gen = _sse(stream, fmt, req.include_usage())
            return _AbortingStream(
                abort,
                gen,
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        outs = await _until_done_or_disconnect(stream, request.receive)
    except BaseException:
        abort()
        raise
    abort()
    if outs is None:
        return Response(status_code=499)  # nobody is listening any more
    return JSONResponse(fmt.full(outs), headers=headers)


async def _until_done_or_disconnect(
    stream: RequestStream, receive: Callable[[], Awaitable[Any]]
) -> list[RequestOutput] | None:
    """All of a request's outputs, or None if the client disconnected first."""

    async def collect() -> list[RequestOutput]:
        got: list[RequestOutput] = []
        while not (got and got[-1].finished):
            got.extend(await stream.get())
        return got

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(collect())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    return work.result() if work.done() and not work.cancelled() else None


class _AbortingStream(StreamingResponse):
    """A StreamingResponse that aborts its request however the response ends (disconnects too)."""

    def __init__(
        self, on_close: Callable[[], None], content: AsyncIterator[str], **kw: Any
    ) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _Formatter:
    """Builds one request's OpenAI response objects."""

    def __init__(self, rid: str, model: str, chat: bool, token_ids: bool, n_prompt: int) -> None:
        self.rid, self.model, self.chat, self.token_ids = rid, model, chat, token_ids
        self.n_prompt = n_prompt
        self.created = int(time.time())
        self.obj = "chat.completion" if chat else "text_completion"

    def usage(self, n_out: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.n_prompt,
            "completion_tokens": n_out,
            "total_tokens": self.n_prompt + n_out,
        }

    def full(self, outs: list[RequestOutput]) -> dict[str, Any]:
        last = outs[-1]
        if last.finish_reason in ("error", "abort"):
            raise APIError(
                500,
                f"the request failed: {last.error or last.finish_reason}",
                type="server_error",
                code="request_failed",
            )
        text = "".join(o.new_text for o in outs)
        toks = [t for o in outs for t in o.new_token_ids]
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": last.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if self.token_ids:
            choice["token_ids"] = toks
        return {
            "id": self.rid,
            "object": self.obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(len(toks)),
        }

    def chunk(
        self, choices: list[dict[str, Any]], usage: dict[str, int] | None, with_usage: bool
    ) -> str:
        c: dict[str, Any] = {
            "id": self.rid,
            "object": self.obj + ".chunk" if self.chat else self.obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if with_usage:
            c["usage"] = usage
        return f"data: {json.dumps(c, separators=(',', ':'))}\n\n"

    def delta(
        self, text: str, toks: list[int], finish: str | None, role: bool = False
    ) -> dict[str, Any]:
        ch: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            d: dict[str, Any] = {"role": "assistant"} if role else {}
            if text or role or finish is None:
                d["content"] = text
            ch["delta"] = d
        else:
            ch["text"] = text
        if self.token_ids:
            ch["token_ids"] = toks
        return ch


def _error_event(message: str) -> str:
    err = APIError(500, message, type="server_error", code="request_failed")
    return f"data: {json.dumps(err.body())}\n\n"


async def _sse(stream: RequestStream, fmt: _Formatter, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of one streamed request."""
    n_out = 0
    if fmt.chat:
        yield fmt.chunk([fmt.delta("", [], None, role=True)], None, include_usage)
    while True:
        outs = await stream.get()
        last = outs[-1]
        text = "".join(o.new_text for o in outs)
        toks = [t for o in outs for t in o.new_token_ids]
        n_out += len(toks)
        if last.finished and last.finish_reason in ("error", "abort"):
            if text or toks:
                yield fmt.chunk([fmt.delta(text, toks, None)], None, include_usage)
            yield _error_event(f"the request failed: {last.error or last.finish_reason}")
            break
        if last.finished:
            yield fmt.chunk([fmt.delta(text, toks, last.finish_reason)], None, include_usage)
            break
        yield fmt.chunk([fmt.delta(text, toks, None)], None, include_usage)
    if include_usage:
        yield fmt.chunk([], fmt.usage(n_out), True)
    yield "data: [DONE]\n\n"


__all__ = ["ServerState", "create_app"]
