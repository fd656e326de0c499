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

Each prompt (completions take a list) runs as ``n`` (or ``best_of``) engine
requests; the first is the parent, the others name it with ``fork_from``,
so the engine prefills the prompt once and forks the samples from it.
Sample j is seeded ``seed + j``. Choice ``prompt_i * n + j`` is prompt i's
sample j (for ``best_of``: its j-th most likely). Streams interleave the
choices' chunks as their tokens come; ``usage`` counts every prompt once
and every generated token (``best_of``'s discarded samples included);
``usage.prompt_tokens_details.cached_tokens`` is the prompt tokens each
prompt's first request found in the prefix cache (any tier), as the
allocator holds them once tier loads have settled, or in its session's
parked KV.

Sessions: a body's ``session_id`` (see :mod:`kvmem.server.protocol`) goes
with the first sample's request (the conversation continues from choice
0); a session with a request still running answers 409 (``session_busy``).
``DELETE /v1/sessions/{session_id}`` ends a session, freeing its parked KV.

With ``kv_events`` the allocator's KV events (vLLM's schema) go out on a
ZeroMQ publisher socket (:mod:`kvmem.server.kvevents`) for the app's life.
Response shapes live in :mod:`kvmem.server.formatting`.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from kvmem.engine.sessions import SessionBusy
from kvmem.server.auth import APIKeyMiddleware
from kvmem.server.chat import ChatTemplate
from kvmem.server.formatting import Formatter, Sample, error_event
from kvmem.server.kvevents import KVEventsPublishing, publish_kv_events
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
    max_n: int = 16
    #: The ZeroMQ publisher of the allocator's KV events (``kv_events``), or None.
    kv_events: KVEventsPublishing | None = None


def create_app(
    runner: AsyncEngine,
    model_name: str = "kvmem-tiny",
    chat_template: ChatTemplate | None = None,
    metrics: ServerMetrics | None = None,
    api_key: str | None = None,
    guard_metrics: bool = False,
    max_n: int = 16,
    kv_events: str | None = None,
    kv_events_topic: str = "kv-events",
) -> FastAPI:
    """The application; the runner's engine thread starts and stops with the app's lifespan.

    ``max_n`` bounds ``n`` and ``best_of`` (samples per prompt). ``kv_events``
    is a ZeroMQ endpoint (``tcp://HOST:PORT``) the allocator's KV events are
    published on, under ``kv_events_topic``, until the app shuts down
    (InvalidArgument if the backend has no ``kv_events`` or the endpoint
    cannot be bound).

    With ``api_key`` every ``/v1/*`` route (and ``/metrics`` if ``guard_metrics``)
    answers 401 unless the request carries ``Authorization: Bearer <api_key>``.
    """
    if metrics is None:
        metrics = runner.metrics or ServerMetrics(
            model_name, runner.engine.allocator.stats().bytes_per_token
        )
        runner.metrics = metrics
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    state = ServerState(
        runner,
        metrics,
        model_name,
        chat_template or ChatTemplate(),
        created=int(time.time()),
        max_n=max_n,
    )
    if kv_events is not None:
        state.kv_events = publish_kv_events(runner.engine.allocator, kv_events, kv_events_topic)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            await runner.stop()
            if state.kv_events is not None:
                state.kv_events.close()

    app = FastAPI(title="kvmem", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kvmem = state
    if api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, guard_metrics=guard_metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status in (400, 404, 409, 413, 429, 503):
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

    @app.delete("/v1/sessions/{session_id}")
    async def end_session(session_id: str) -> JSONResponse:
        if not runner.alive:
            raise APIError(
                503, "the engine is not running", type="server_error", code="engine_dead"
            )
        try:
            known = await runner.end_session(session_id)
        except InvalidRequest as e:
            raise APIError(400, str(e), param="session_id", code="invalid_value") from None
        return JSONResponse({"id": session_id, "object": "session", "deleted": known})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _body(request, state)
        req: CompletionRequest = parse_body(CompletionRequest, body, max_n)
        _check_model(req.model, model_name)
        tok = runner.engine.tokenizer
        prompts = [
            _Prompt(tok.encode(p), p) if isinstance(p, str) else _Prompt(list(p), tok.decode(p))
            for p in req.prompts()
        ]
        return await _serve(request, state, req, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _body(request, state)
        req: ChatCompletionRequest = parse_body(ChatCompletionRequest, body, max_n)
        _check_model(req.model, model_name)
        text = state.chat_template.render(req.messages, req.add_generation_prompt)
        ids = runner.engine.tokenizer.encode(text)
        return await _serve(request, state, req, [_Prompt(ids)], chat=True)

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
    chat_req = isinstance(req, ChatCompletionRequest)
    least = 0 if not chat_req and getattr(req, "echo", False) else 1
    if asked is not None and asked < least:
        raise APIError(
            400,
            f"{param} must be at least {least}, got {asked}"
            + (" (0 only with echo)" if least and not chat_req else ""),
            param=param,
            code="invalid_value",
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


@dataclass(frozen=True)
class _Prompt:
    """One prompt of a request: its token ids and, for ``echo``, its text."""

    ids: list[int]
    text: str | None = None


async def _serve(
    request: Request,
    state: ServerState,
    req: CompletionRequest | ChatCompletionRequest,
    prompts: list[_Prompt],
    chat: bool,
) -> Response:
    budgets = [_budget(req, len(p.ids), state) for p in prompts]
    echo = isinstance(req, CompletionRequest) and req.echo
    asked = req.logprobs if isinstance(req, CompletionRequest) else req.engine_logprobs()
    streams: list[tuple[int, RequestStream]] = []  # (prompt index, stream), samples in order
    try:
        for i, (p, max_tokens) in enumerate(zip(prompts, budgets, strict=True)):
            scores = asked if echo and asked is not None else (0 if max_tokens == 0 else None)
            first: str | None = None
            for j in range(req.num_samples()):
                params = req.sampling_params(max_tokens, j, scores)
                s = state.runner.submit(
                    p.ids,
                    params,
                    priority=req.priority,
                    tenant=req.user or "default",
                    fork_from=first,
                    session_id=req.session_id if first is None else None,
                )
                first = first or s.request_id
                streams.append((i, s))
    except BaseException as e:
        for _, s in streams:
            state.runner.abort(s.request_id)
        raise _submit_error(e, req) from None

    def abort() -> None:  # a no-op once requests finished; frees the KV of those whose client left
        for _, s in streams:
            state.runner.abort(s.request_id)

    try:
        xid = request.headers.get("x-request-id")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{xid or uuid.uuid4().hex}"
        headers = {"x-request-id": xid} if xid else {}
        fmt = Formatter(
            rid,
            state.model_name,
            chat,
            req.return_token_ids,
            state.runner.engine.tokenizer,
            asked,
        )
        n_prompt = sum(len(p.ids) for p in prompts)
        firsts = _firsts(streams)
        if req.stream:
            gen = _sse([s for _, s in streams], fmt, req.include_usage(), n_prompt, firsts)
            return _AbortingStream(
                abort,
                gen,
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        outs = await _until_done_or_disconnect([s for _, s in streams], request.receive)
    except BaseException:
        abort()
        raise
    abort()
    if outs is None:
        return Response(status_code=499)  # nobody is listening any more
    samples = [Sample.collect(i, o) for (i, _), o in zip(streams, outs, strict=True)]
    choices = []
    for i, p in enumerate(prompts):
        mine = [x for x in samples if x.prompt_index == i]
        if len(mine) > req.n:  # best_of: the n most likely, most likely first
            mine = sorted(mine, key=lambda x: x.cumulative_logprob, reverse=True)[: req.n]
        for j, x in enumerate(mine):
            choices.append(fmt.choice(i * req.n + j, x, p.ids if echo else None, p.text))
    usage = fmt.usage(
        n_prompt, sum(len(x.token_ids) for x in samples), sum(s.cached_tokens for s in firsts)
    )
    return JSONResponse(fmt.full(choices, usage), headers=headers)


def _firsts(streams: list[tuple[int, RequestStream]]) -> list[RequestStream]:
    """Each prompt's first stream (its parent request, whose prefix hit ``usage`` reports)."""
    seen: dict[int, RequestStream] = {}
    for i, s in streams:
        seen.setdefault(i, s)
    return list(seen.values())


def _submit_error(
    e: BaseException, req: CompletionRequest | ChatCompletionRequest
) -> BaseException:
    """The HTTP error for a submission that failed (others pass through unchanged)."""
    if isinstance(e, SessionBusy):
        return APIError(409, str(e), param="session_id", code="session_busy")
    if isinstance(e, InvalidRequest):
        word = str(e).split(" ", 1)[0]
        param = word if word in type(req).model_fields else None
        return APIError(400, str(e), param=param, code="invalid_value")
    if isinstance(e, QueueFull):
        return APIError(
            429,
            str(e),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after)},
        )
    if isinstance(e, EngineDead):
        return APIError(503, str(e), type="server_error", code="engine_dead")
    return e


async def _until_done_or_disconnect(
    streams: list[RequestStream], receive: Callable[[], Awaitable[Any]]
) -> list[list[RequestOutput]] | None:
    """Every output of each stream, or None if the client disconnected first."""

    async def collect(stream: RequestStream) -> list[RequestOutput]:
        got: list[RequestOutput] = []
        while not (got and got[-1].finished):
            got.extend(await stream.get())
        return got

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    work: asyncio.Future[list[list[RequestOutput]]] = asyncio.gather(*(collect(s) for s in streams))
    watch = asyncio.ensure_future(disconnected())
    try:
        both: list[asyncio.Future[Any]] = [work, watch]
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    return list(work.result()) if work.done() and not work.cancelled() else None


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


async def _sse(
    streams: list[RequestStream],
    fmt: Formatter,
    include_usage: bool,
    n_prompt: int,
    firsts: list[RequestStream],
) -> AsyncIterator[str]:
    """The server-sent events of a streamed request: choice i follows ``streams[i]``."""
    n_out = 0
    if fmt.chat:
        for i in range(len(streams)):
            yield fmt.chunk([fmt.delta(i, [], None, role=True)], None, include_usage)
    merged: asyncio.Queue[tuple[int, list[RequestOutput]]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        while True:
            outs = await s.get()
            merged.put_nowait((i, outs))
            if outs[-1].finished:
                return

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, outs = await merged.get()
            last = outs[-1]
            n_out += sum(len(o.new_token_ids) for o in outs)
            if last.finished and last.finish_reason in ("error", "abort"):
                if any(o.new_token_ids or o.new_text for o in outs):
                    yield fmt.chunk([fmt.delta(i, outs, None)], None, include_usage)
                yield error_event(f"the request failed: {last.error or last.finish_reason}")
                break
            finish = last.finish_reason if last.finished else None
            yield fmt.chunk([fmt.delta(i, outs, finish)], None, include_usage)
            left -= last.finished
    finally:
        for p in pumps:
            p.cancel()
    if include_usage:
        n_cached = sum(s.cached_tokens for s in firsts)
        yield fmt.chunk([], fmt.usage(n_prompt, n_out, n_cached), True)
    yield "data: [DONE]\n\n"


__all__ = ["ServerState", "create_app"]
