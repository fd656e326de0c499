"""Requests: sampling parameters, per-request state, and what the engine streams out."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch

from kvmem.engine.errors import InvalidRequest
from kvmem.engine.metrics import RequestMetrics
from kvmem.engine.tokenizer import IncrementalDecoder

if TYPE_CHECKING:
    from kvmem.allocator import KVAllocator


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature == 0`` is greedy (``top_p``/``top_k`` then do nothing).
    ``top_k <= 0`` and ``top_p == 1`` switch those filters off. ``seed``
    gives the request its own random stream, so its samples do not depend on
    what else is in the batch. Generation stops at ``max_tokens``, at an EOS
    token (unless ``ignore_eos``), at any of ``stop_token_ids``, or when the
    text contains one of ``stop`` (the text is cut before it).

    ``logprobs`` (None: off) reports, for each generated token, its
    log-probability and the ``logprobs`` most likely alternatives;
    ``prompt_logprobs`` does the same for every prompt token after the first
    (the prompt is then never served from the prefix cache, since its logits
    are needed). Both come from the log-softmax of the model's raw logits,
    before temperature, top-k or top-p. ``max_tokens == 0`` is allowed only
    with ``prompt_logprobs``: the prompt is scored and nothing generated.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InvalidRequest(f"{name} must be an int >= 0 or None, got {v!r}")
        mt = self.max_tokens
        least = 0 if self.prompt_logprobs is not None else 1
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < least:
            what = "an int >= 0 (prompt_logprobs set)" if least == 0 else "a positive int"
            raise InvalidRequest(f"max_tokens must be {what}, got {mt!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise InvalidRequest(f"top_k must be an int, got {self.top_k!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidRequest(f"seed must be an int or None, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stops):
            raise InvalidRequest("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", stops)

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax."""
        return self.temperature == 0


class RequestStatus(Enum):
    """Where a request is in the engine."""

    WAITING = "waiting"  # queued, or preempted by recompute: holds no KV
    RUNNING = "running"  # holds KV on the device
    SWAPPED = "swapped"  # preempted by swap: KV in host memory
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probabilities: the token there, its own, and the top alternatives.

    ``top`` lists ``(token_id, logprob)`` pairs, most likely first (empty when
    no alternatives were asked for).
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """One step's news for one request, as streamed to callbacks and iterators.

    ``finish_reason`` is ``"stop"`` (EOS, stop token or string), ``"length"``
    (max_tokens, the model's context, or the whole KV capacity), ``"abort"``,
    or ``"error"`` (then ``error`` says why); None while running.
    ``logprobs`` has one entry per new token when the request asked for
    them; ``prompt_logprobs`` (prompt tokens 1.., the first has none) comes
    once, with the first output, when asked for. ``num_cached_tokens``: the
    prompt tokens the prefix cache (any tier) held at admission, once loads
    settled; None before the request is admitted.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int | None = None


@dataclass(frozen=True)
class Completion:
    """A finished request, as :meth:`Engine.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    finish_reason: str | None
    metrics: RequestMetrics


OutputCallback = Callable[[RequestOutput], None]


@dataclass(eq=False)
class Request:
    """The engine's state of one request (tokens, KV progress, scheduling fields, metrics).

    ``token_ids`` is the prompt followed by the generated tokens;
    ``num_computed`` of them have KV written. That count is the allocator's
    (read through ``kv``, set by the scheduler while the request's sequence
    is registered), never a copy kept here.

    ``seq_id`` is the allocator sequence the request runs under: its own id,
    or its session's sequence (:mod:`kvmem.engine.sessions`), which outlives
    the request; ``keep_kv`` says whether that sequence's KV is parked for
    the session's next turn when the request finishes.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: Hashable = "default"
    priority: int = 0
    arrival_time: float = 0.0
    #: The true output length when known (a replayed trace): only oracle predictors read it.
    output_len_hint: int | None = None
    on_output: OutputCallback | None = None
    #: Prefix-cache namespace: prompts with different salts never share KV.
    cache_salt: Hashable = None
    token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    #: The allocator holding this request's sequence; None while it holds no KV.
    kv: KVAllocator | None = field(default=None, repr=False)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    decoder: IncrementalDecoder | None = None
    text: str = ""  # output text decoded so far
    emitted: int = 0  # characters of ``text`` already streamed out
    swap_handle: Any = None
    seq_no: int = 0  # arrival order tie-break
    #: Scheduler-owned: predicted remaining output tokens and when it was predicted.
    predicted_remaining: float = 0.0
    predicted_at: int = 0
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    #: The request whose prompt KV this one forks from once it is computed (parallel sampling).
    fork_of: Request | None = field(default=None, repr=False)
    #: Prompt tokens 1.. scored so far (``params.prompt_logprobs``), sent with the first output.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list, repr=False)
    prompt_logprobs_sent: bool = False
    #: The conversation this request is a turn of (None: a request of its own).
    session_id: str | None = None
    #: The allocator sequence id (None: ``request_id``).
    seq_id: Hashable = None
    #: Park the sequence's KV on the host when the request finishes (not when it fails).
    keep_kv: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.seq_id is None:
            self.seq_id = self.request_id

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens."""
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_computed(self) -> int:
        """Tokens whose KV is written (0 while the request holds no KV)."""
        kv = self.kv
        return 0 if kv is None else kv.seq_info(self.seq_id).num_computed

    @property
    def num_to_compute(self) -> int:
        """Known tokens whose KV is not written yet (1 for a decode)."""
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        """True once the request has left the engine."""
        return self.status is RequestStatus.FINISHED

    def completion(self) -> Completion:
        """The finished request as :meth:`Engine.generate` returns it."""
        return Completion(
            self.request_id,
            list(self.prompt_token_ids),
            self.output_token_ids,
            self.text,
            self.finish_reason,
            self.metrics,
        )

    def output(
        self,
        toks: list[int],
        text: str,
        finished: bool = False,
        reason: str | None = None,
        error: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> RequestOutput:
        """An output of this request; the prompt's logprobs ride on its first one."""
        prompt_lps = None
        if self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent:
            self.prompt_logprobs_sent = True
            prompt_lps = list(self.prompt_logprobs)
        return RequestOutput(
            self.request_id,
            toks,
            text,
            finished,
            reason,
            error,
            logprobs,
            prompt_lps,
            self.metrics.prompt_cached_tokens,
        )


__all__ = [
    "Completion",
    "OutputCallback",
    "Request",
    "RequestOutput",
    "RequestStatus",
    "SamplingParams",
    "TokenLogprob",
]
