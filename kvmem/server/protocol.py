"""The OpenAI request bodies the server accepts, their validation, and OpenAI-style errors.

Bodies are parsed strictly from JSON (a string where a number belongs is a
400, as with OpenAI); unknown fields are ignored, as vLLM and SGLang do.
Fields that benchmark clients send are accepted: ``ignore_eos``,
``stop_token_ids``, ``top_k``, ``repetition_penalty`` (1.0 only),
``stream_options.include_usage``, ``min_tokens`` (0 only), vLLM's
``return_token_ids`` (each choice then carries the generated ``token_ids``)
and ``priority``; ``user`` names the request's tenant (the ``fair`` policy
shares the engine between tenants and preempts by priority). The extension
``session_id`` (a non-empty string; the ``openai`` client sends it in
``extra_body``) makes the request a turn of a conversation whose KV the
engine keeps between turns (:mod:`kvmem.engine.sessions`); it takes one
prompt.

``n`` samples per prompt (up to the server's ``max_n``), completions'
``best_of``, ``logprobs`` (up to :data:`MAX_LOGPROBS` alternatives), ``echo``
(with ``max_tokens`` 0 to score a prompt) and lists of prompts are served
(see :mod:`kvmem.server.app`). Features the engine does not have
(``suffix``, penalties, tools) and combinations that cannot be served
(``best_of`` above ``n`` or ``echo`` with ``stream``) are refused with a 400
that names the field, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvmem.engine import SamplingParams

#: The most alternatives per position ``logprobs`` / ``top_logprobs`` may ask for (OpenAI's 20).
MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's API returns for an error."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingRequest(_Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    user: str | None = None
    priority: int = 0
    return_token_ids: bool = False
    session_id: str | None = None

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        """The output budget the client asked for (None: not given)."""
        raise NotImplementedError

    def num_samples(self) -> int:
        """Samples generated per prompt (``best_of`` where given, else ``n``)."""
        return self.n

    def engine_logprobs(self) -> int | None:
        """Alternatives per generated token the engine reports (None: no logprobs)."""
        raise NotImplementedError

    def check_supported(self, max_n: int = 16) -> None:
        """Refuse (400) what the engine cannot do, and ``n`` beyond ``max_n``."""
        if not 1 <= self.n <= max_n:
            raise APIError(400, f"n must be in 1..{max_n} on this server, got {self.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v not in (None, 0):
                raise APIError(400, f"{name} is not supported (must be 0)", param=name)
        if self.repetition_penalty not in (None, 1):
            raise APIError(
                400, "repetition_penalty is not supported (must be 1.0)", param="repetition_penalty"
            )
        if self.min_tokens:
            raise APIError(400, "min_tokens is not supported (must be 0)", param="min_tokens")
        if self.session_id is not None and not self.session_id:
            raise APIError(400, "session_id must be a non-empty string", param="session_id")
        if self.stream_options is not None and not self.stream:
            raise APIError(
                400, "stream_options is only allowed with stream=true", param="stream_options"
            )

    def sampling_params(
        self, max_tokens: int, sample: int = 0, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """The engine's SamplingParams of sample ``sample`` (raises the engine's InvalidRequest).

        Sample i of a request with ``seed`` s is seeded ``s + i``: it is the
        same as a one-sample request with seed ``s + i``.
        """
        top_k = self.top_k if self.top_k is not None and self.top_k > 0 else 0
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=top_k,
            seed=None if self.seed is None else self.seed + sample,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=self.engine_logprobs(),
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``. Prompts: a string, token ids, or a list of either."""

    prompt: str | list[int] | list[str | list[int]]
    max_tokens: int | None = 16
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def requested_max_tokens(self) -> int | None:
        """``max_tokens`` (OpenAI's default 16; null means up to the context)."""
        return self.max_tokens

    def num_samples(self) -> int:
        """Samples generated per prompt: ``best_of`` where given, else ``n``."""
        return self.best_of if self.best_of is not None else self.n

    def engine_logprobs(self) -> int | None:
        """``logprobs``; 0 when only ``best_of`` needs the samples' cumulative logprobs."""
        if self.logprobs is None and self.num_samples() > self.n:
            return 0
        return self.logprobs

    def check_supported(self, max_n: int = 16) -> None:
        """Refuse (400) what the engine cannot do, and ``n`` or ``best_of`` beyond ``max_n``."""
        super().check_supported(max_n)
        if self.best_of is not None:
            if not self.n <= self.best_of <= max_n:
                raise APIError(
                    400,
                    f"best_of must be in n..{max_n} (n={self.n}) on this server, "
                    f"got {self.best_of}",
                    param="best_of",
                )
            if self.stream and self.best_of > self.n:
                raise APIError(400, "best_of greater than n cannot be streamed", param="best_of")
        if self.session_id is not None and len(self.prompts()) > 1:
            raise APIError(400, "a request with a session_id takes one prompt", param="session_id")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(
                400,
                f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}",
                param="logprobs",
            )
        if self.echo and self.stream:
            raise APIError(400, "echo cannot be used with stream=true", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, in order (a string, or token ids, each)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "the prompt is empty", param="prompt")
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Strict):
    """One part of a message's content; only text parts are supported."""

    type: str
    text: str | None = None


class ChatMessage(_Strict):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        c = self.content
        if c is None:
            return ""
        if isinstance(c, str):
            return c
        out = []
        for part in c:
            if part.type != "text" or part.text is None:
                raise APIError(
                    400,
                    f"content parts of type {part.type!r} are not supported; only text",
                    param="messages",
                )
            out.append(part.text)
        return "".join(out)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens``, else the deprecated ``max_tokens`` (None: to the context)."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def engine_logprobs(self) -> int | None:
        """``top_logprobs`` (0 if not given) when ``logprobs`` is true, else None."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self, max_n: int = 16) -> None:
        """Refuse (400) what the engine cannot do, and ``n`` beyond ``max_n``."""
        super().check_supported(max_n)
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(
                    400,
                    f"top_logprobs must be in 0..{MAX_LOGPROBS}, got {self.top_logprobs}",
                    param="top_logprobs",
                )
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        if self.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        rf = self.response_format
        if rf is not None and rf.get("type", "text") != "text":
            raise APIError(
                400, "only response_format type 'text' is supported", param="response_format"
            )


def parse_body(model: type[_SamplingRequest], body: bytes, max_n: int = 16) -> Any:
    """Validate a JSON body into ``model``; malformed JSON or a wrong field is an APIError 400."""
    try:
        req = model.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    req.check_supported(max_n)
    return req


def _validation_error(e: ValidationError) -> APIError:
    errs = e.errors()
    first = errs[0]
    if first["type"] == "json_invalid":
        return APIError(
            400, f"the request body is not valid JSON: {first['msg']}", code="invalid_json"
        )
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    loc = first["loc"]
    param = str(loc[0]) if loc else None
    # a union's members add their type names to ``loc``: report every member's complaint once
    same = [x for x in errs if x["loc"][:1] == loc[:1]]
    if first["type"] == "missing":
        msg = f"'{param}' is a required field"
    else:
        reasons = "; ".join(dict.fromkeys(x["msg"] for x in same))
        msg = f"invalid value for '{param}': {reasons}"
    return APIError(400, msg, param=param, code="invalid_value")


__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "MAX_LOGPROBS",
    "StreamOptions",
    "parse_body",
]
