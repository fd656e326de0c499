"""The continuous-batching engine: requests in, tokens out, KV through one allocator.

::

    add_request ──► inbox ──► step():  drain inbox (adds, aborts, priorities)
                                       scheduler.schedule()   add / reserve / preempt,
                                                              the step's layout and layers
                                       executor.execute()     one forward, mixed batch
                                       sample, stop checks
                                       scheduler.update()     commit, append, free: the one
                                                              KV update of the step
                                       stream RequestOutputs to callbacks

The scheduler owns every allocator call (the engine only builds the
allocator and reads its stats); the executor and the model get the step's
layout and the layers' KV from the plan.

Threads: ``step`` may run in a background thread while ``add_request``,
``abort`` and ``set_priority`` are called from another (a server's event
loop). Those calls only touch a locked inbox that ``step`` drains at its
start and end; ``abort`` also drains it at once when no step is running, so
an aborted request's KV is freed immediately or at the end of the step in
flight. Everything else (``metrics``) takes the step lock.

Works with every registered backend and KV format: memory is reached only
through :class:`~kvmem.allocator.KVAllocator` methods and its declared
capabilities. One loop serves: :meth:`Engine.serve_forever` (a server's
engine thread, :mod:`kvmem.server.runner`) and :meth:`Engine.run` both step
through it (:mod:`kvmem.engine.loops`). Requests with a ``session_id`` keep
their conversation's KV on the host between turns (:mod:`kvmem.engine.sessions`).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import replace
from typing import Any

import torch

from kvmem.allocator import KVAllocator, create_allocator
from kvmem.engine.clock import Clock, WallClock
from kvmem.engine.config import EngineConfig
from kvmem.engine.errors import InvalidRequest
from kvmem.engine.executor import Executor, ModelExecutor
from kvmem.engine.handover import Migrations, accept
from kvmem.engine.intake import check_priority, prompt_token_ids
from kvmem.engine.loops import Loops
from kvmem.engine.metrics import EngineMetrics, kv_fields
from kvmem.engine.model import LlamaModel
from kvmem.engine.policies import make_policy
from kvmem.engine.request import (
    OutputCallback,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    TokenLogprob,
)
from kvmem.engine.roles import Handoffs
from kvmem.engine.sampling import read_logits, sample_requests
from kvmem.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from kvmem.engine.sessions import Sessions, check_session_id, session_seq_id
from kvmem.engine.stopping import advance_text, stop_reason
from kvmem.engine.tokenizer import ByteTokenizer, IncrementalDecoder, Tokenizer
from kvmem.errors import InvalidArgument, KVError

log = logging.getLogger(__name__)
_Pending = list[tuple[Request, RequestOutput]]
#: How long a step with nothing to run waits for a swap copy in flight.
_IDLE_SWAP_WAIT_S = 0.005


class Engine(Loops):
    """A reference continuous-batching LLM engine over a kvmem allocator.

    Build it from a model (default: the ``tiny`` random preset), or from an
    executor (the scheduling benchmark's simulated one). The allocator is
    built from ``config`` unless one is given (its spec must be the
    model's). Keyword overrides are applied to ``config``::

        eng = Engine(random_model("tiny"), backend="paged", kv_format="fp8")
        [c] = eng.generate(["Hello"], SamplingParams(max_tokens=8))
    """

    def __init__(
        self,
        model: LlamaModel | None = None,
        config: EngineConfig | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        executor: Executor | None = None,
        clock: Clock | None = None,
        allocator: KVAllocator | None = None,
        **overrides: Any,
    ) -> None:
        try:
            config = replace(config or EngineConfig(), **overrides)
        except TypeError as e:
            raise InvalidArgument(f"unknown engine option: {e}") from None
        self.config = config
        if executor is None:
            if model is None:
                from kvmem.engine.weights import random_model

                model = random_model("tiny", seed=config.seed)
            executor = ModelExecutor(model, config.attention_impl, config.fp8_headroom)
        self.executor = executor
        self.clock: Clock = clock or WallClock()
        self.tokenizer: Tokenizer = tokenizer or ByteTokenizer()
        self.eos_token_ids = tuple(executor.eos_token_ids) or tuple(self.tokenizer.eos_token_ids)
        ctx = executor.max_model_len
        if config.max_model_len is not None and not 0 < config.max_model_len <= ctx:
            raise InvalidArgument(f"max_model_len must be in 1..{ctx}, got {config.max_model_len}")
        self.max_model_len = config.max_model_len or ctx
        self.policy = make_policy(config.policy, **dict(config.policy_options))
        c = config
        sched_cfg = SchedulerConfig(
            c.max_num_seqs, c.max_num_batched_tokens, c.chunked_prefill, c.preemption, c.watermark
        )
        self._owns_allocator = allocator is None
        if allocator is None:
            options = dict(config.backend_options)
            options.setdefault("device", config.device or executor.device)
            spec = executor.kv_spec(config.kv_format)
            allocator = create_allocator(
                config.backend, spec, num_tokens=config.num_kv_tokens, **options
            )
        self.allocator: KVAllocator = allocator
        try:  # SwapUnavailable for preemption='swap' on a backend that does not declare swap
            self.scheduler = Scheduler(allocator, self.policy, sched_cfg, executor.uses_kv)
            executor.prepare(allocator.spec)
        except KVError:
            if self._owns_allocator:
                allocator.close()
            raise
        self.kv_capacity_tokens = self.allocator.stats().capacity_tokens
        self._generator = torch.Generator().manual_seed(config.seed)
        self._requests: dict[str, Request] = {}
        self._ids: set[str] = set()
        self._inbox: list[tuple[str, Any]] = []
        self._inbox_lock = threading.Lock()
        self._wake = threading.Event()  # set by add/abort/priority: an idle loop looks again
        self._step_lock = threading.RLock()
        self._counter = itertools.count()
        self.finished: deque[Request] = deque(maxlen=config.finished_history)
        self.num_steps = 0
        self.num_aborted = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self._first_step_time: float | None = None
        self.migrations = Migrations()
        self.handoffs = Handoffs()  # a prefill role's requests leaving for decode instances
        keeps = allocator.capabilities.keep_on_host and config.role != "prefill"
        self.sessions = Sessions(self.scheduler, keeps)

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: torch.dtype | None = None, **overrides: Any
    ) -> Engine:
        """An engine on a local checkpoint directory (config.json, safetensors, tokenizer.json).

        The tokenizer is the directory's ``tokenizer.json`` when there is one,
        else the byte tokenizer; nothing is fetched from the network.
        """
        from kvmem.engine.tokenizer import load_tokenizer
        from kvmem.engine.weights import load_model

        model = load_model(path, dtype=dtype)
        tok = load_tokenizer(path, tuple(model.config.eos_token_ids))
        return cls(model, tokenizer=tok, **overrides)

    # ------------------------------------------------------------------ input
    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        tenant: Hashable = "default",
        priority: int = 0,
        arrival_time: float | None = None,
        on_output: OutputCallback | None = None,
        output_len_hint: int | None = None,
        cache_salt: Hashable = None,
        fork_from: str | None = None,
        session_id: str | None = None,
    ) -> str:
        """Queue a request; return its id. Thread-safe.

        ``tenant`` is who the ``fair`` policy accounts the request to;
        ``cache_salt`` keeps its prefix-cache entries apart from other
        salts' (pass the tenant to isolate tenants); ``output_len_hint`` is
        the true output length, for oracle predictors in trace replays.

        ``fork_from`` names a request in the engine with the same prompt
        (parallel sampling, as for OpenAI's ``n``): on backends that declare
        ``fork`` this one is forked from it when its prompt is computed, so
        the prompt is prefilled once and its KV held once; otherwise it runs
        on its own. Either way it samples from the same logits as a request
        of its own would, so with its own ``seed`` its tokens are the same.

        ``session_id`` makes the request a turn of a conversation
        (:mod:`kvmem.engine.sessions`): on backends that declare
        ``keep_on_host`` its KV is parked on the host when it finishes, and
        the session's next request computes only the tokens past it. Its
        tokens are those of the same request without a session.

        Raises :class:`InvalidRequest` (nothing queued, nothing else
        affected) for an empty prompt, token ids outside the vocabulary, a
        prompt that leaves no room for output within ``max_model_len``, a
        prompt larger than the whole KV capacity, a ``session_id`` that is
        not a non-empty string or is given with ``fork_from``; and
        :class:`~kvmem.engine.sessions.SessionBusy` (an InvalidRequest) while
        another request of the session is in the engine.
        """
        return self._add(
            prompt,
            params,
            request_id=request_id,
            tenant=tenant,
            priority=priority,
            arrival_time=arrival_time,
            on_output=on_output,
            output_len_hint=output_len_hint,
            cache_salt=cache_salt,
            fork_from=fork_from,
            session_id=session_id,
        ).request_id

    def _add(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        fork_from: str | None = None,
        session_id: str | None = None,
        **fields: Any,
    ) -> Request:
        """``add_request``, returning the queued Request (``fields``: more Request fields)."""
        params = params if params is not None else SamplingParams()
        ids = prompt_token_ids(self, prompt, params)
        check_priority(priority)
        sid = None if session_id is None else check_session_id(session_id)
        if sid is not None and fork_from is not None:
            raise InvalidRequest("a request forked from another (fork_from) has no session_id")
        keep = sid is not None and self.sessions.keeps
        with self._inbox_lock:
            rid = request_id if request_id is not None else f"req-{next(self._counter)}"
            if not isinstance(rid, str) or not rid:
                raise InvalidRequest("request_id must be a non-empty string")
            if rid in self._ids:
                raise InvalidRequest(f"request id {rid!r} is already in the engine")
            if fork_from is not None and fork_from not in self._ids:
                raise InvalidRequest(f"fork_from: no request {fork_from!r} in the engine")
            if sid is not None:
                self.sessions.claim(sid, rid, self._ids)
            req = Request(
                request_id=rid,
                prompt_token_ids=ids,
                params=params,
                priority=priority,
                arrival_time=self.clock.now() if arrival_time is None else float(arrival_time),
                session_id=sid,
                seq_id=None if sid is None else session_seq_id(sid),
                keep_kv=keep,
                **fields,
            )
            req.metrics.arrival_time = req.arrival_time
            req.metrics.num_prompt_tokens = len(ids)
            if params.seed is not None:
                req.generator = torch.Generator().manual_seed(params.seed)
            if self.config.detokenize:
                req.decoder = IncrementalDecoder(self.tokenizer)
            self._ids.add(rid)
            self._inbox.append(("add", (req, fork_from)))
        self._wake.set()
        return req

    def abort(self, request_id: str) -> bool:
        """End a request and free its KV (now, or when the step in flight ends). Thread-safe.

        Returns False if no such request is in the engine.
        """
        with self._inbox_lock:
            if request_id not in self._ids:
                return False
            self._inbox.append(("abort", request_id))
        self._drain_now()
        return True

    def end_session(self, session_id: str) -> bool:
        """End a session (:mod:`kvmem.engine.sessions`): free its parked KV. Thread-safe.

        The KV is freed now, or when the step in flight ends; a request of
        the session still in the engine runs on but parks nothing. Returns
        whether the session was known (a request in the engine, or KV parked
        that was not evicted meanwhile). InvalidRequest for an id that is
        not a non-empty string.
        """
        sid = check_session_id(session_id)
        with self._inbox_lock:
            known = self.sessions.is_known(sid)
            self._inbox.append(("end_session", sid))
        self._drain_now()
        return known

    def parked_sessions(self) -> list[str]:
        """The sessions whose KV is parked on the host now, oldest first. Thread-safe."""
        with self._step_lock:
            return self.sessions.parked(list(self._requests.values()))

    def _drain_now(self) -> None:
        """Run the inbox now if no step is in flight (else the step's end does)."""
        self._wake.set()
        if self._step_lock.acquire(blocking=False):
            try:
                outputs: _Pending = []
                self._drain(outputs)
                self._deliver(outputs)
            finally:
                self._step_lock.release()

    def set_priority(self, request_id: str, priority: int) -> bool:
        """Change a request's priority from the next step on (``fair`` preempts on it)."""
        check_priority(priority)
        with self._inbox_lock:
            if request_id not in self._ids:
                return False
            self._inbox.append(("priority", (request_id, priority)))
        self._wake.set()
        return True

    def _drain(self, outputs: _Pending) -> None:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
        for kind, arg in inbox:
            if kind == "add":
                req, parent = arg
                if parent is not None:
                    req.fork_of = self._requests.get(parent)
                self._requests[req.request_id] = req
                self.scheduler.add(req)
            elif kind == "end_session":
                rid = self.sessions.in_flight.get(arg)
                self.sessions.end(arg, None if rid is None else self._requests.get(rid))
            elif kind == "abort":
                r = self._requests.get(arg)
                if r is not None and not r.finished:
                    self.num_aborted += 1
                    self.scheduler.remove(r)
                    self._finish(r, "abort", outputs, [])
            else:
                rid, prio = arg
                if rid in self._requests:
                    self._requests[rid].priority = prio

    # ------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and one forward pass; return (and stream) the outputs."""
        with self._step_lock:
            outputs: _Pending = []
            self._drain(outputs)
            plan = self.scheduler.schedule()
            for r, reason, err in plan.ended:
                self._finish(r, reason, outputs, [], None, err)
            if plan.chunks:
                self._run(plan, outputs)
            elif not plan.ended:
                self.scheduler.wait_for_swaps(_IDLE_SWAP_WAIT_S)
            self._drain(outputs)
            if self.migrations.active:
                self.migrations.advance(self)
        self._deliver(outputs)  # first tokens stream before their hand-over
        if self.handoffs.busy:
            with self._step_lock:
                self.handoffs.advance(self)
        return [o for _, o in outputs]

    def _run(self, plan: SchedulerOutput, outputs: _Pending) -> None:
        chunks = plan.chunks
        now = self.clock.now()
        if self._first_step_time is None:
            self._first_step_time = now
        for c in chunks:
            if c.request.metrics.first_scheduled_time is None:
                c.request.metrics.first_scheduled_time = now
        logits = self.executor.execute(chunks, plan.kv)
        self.num_steps += 1
        for c in chunks:
            if not c.is_decode:
                self.prompt_tokens += c.num_tokens
                self.policy.on_served(c.request, c.num_tokens, 0)
        rows = read_logits(chunks, logits, self.scheduler.forks_due)
        news: list[tuple[Request, int, str, str | None, TokenLogprob | None]] = []
        if rows.samplers:
            reqs = [r for r, _ in rows.samplers]
            toks, lps = sample_requests(logits, rows.samplers, self._generator)
            t = self.clock.now()
            for r, tok, lp in zip(reqs, toks, lps, strict=True):
                r.token_ids.append(tok)
                r.metrics.token_times.append(t)
                self.generation_tokens += 1
                self.policy.on_served(r, 0, 1)
                reason = stop_reason(r, tok, self.eos_token_ids, self.max_model_len)
                text, stopped = advance_text(r, tok, final=reason is not None)
                news.append((r, tok, text, "stop" if stopped else reason, lp))
        self.scheduler.update(
            chunks,
            [r for r, _, _, reason, _ in news if reason is None],
            [r for r, _, _, reason, _ in news if reason is not None] + rows.scored,
            rows.forked,
        )
        for r in rows.scored:
            self._finish(r, "length", outputs, [])
        for r, tok, text, reason, lp in news:
            lpl = None if lp is None else [lp]
            if reason is None:
                outputs.append((r, r.output([tok], text, logprobs=lpl)))
            else:
                self._finish(r, reason, outputs, [tok], text, logprobs=lpl)

    def _finish(
        self,
        r: Request,
        reason: str,
        outputs: _Pending,
        toks: list[int],
        text: str | None = None,
        error: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        """Record that ``r`` (already out of the scheduler, its KV freed) has finished."""
        if text is None:
            text, _ = advance_text(r, None, final=True)
        r.status = RequestStatus.FINISHED
        r.finish_reason = reason
        r.metrics.finish_time = self.clock.now()
        self._requests.pop(r.request_id, None)
        self.sessions.finished(r, reason)
        with self._inbox_lock:
            self._ids.discard(r.request_id)
            self.sessions.release(r)
        self.finished.append(r)
        outputs.append((r, r.output(toks, text, True, reason, error, logprobs)))

    @staticmethod
    def _deliver(outputs: _Pending) -> None:
        for r, o in outputs:
            if r.on_output is None:
                continue
            try:
                r.on_output(o)
            except Exception:
                log.exception("output callback of request %s raised", o.request_id)

    def _lookup(self, rid: str) -> Request | None:
        r = self._requests.get(rid)
        if r is None:
            for f in reversed(self.finished):
                if f.request_id == rid:
                    return f
        return r

    # ------------------------------------------------------------ conveniences
    def has_unfinished(self) -> bool:
        """True while any request is queued or running (or a hand-off is left to settle)."""
        with self._inbox_lock:
            return bool(self._ids) or self.handoffs.busy

    # ----------------------------------------------------------------- metrics
    def metrics(self) -> EngineMetrics:
        """A snapshot of queues, KV memory and throughput. Thread-safe."""
        with self._step_lock:
            s = self.allocator.stats()
            now = self.clock.now()
            sched = self.scheduler
            span = now - self._first_step_time if self._first_step_time is not None else 0.0
            return EngineMetrics(
                time=now,
                num_running=len(sched.running),
                num_waiting=len(sched.waiting) + len(sched.loading),
                num_swapped=len(sched.swapped),
                num_finished=len(self.finished),
                num_aborted=self.num_aborted,
                num_steps=self.num_steps,
                num_preemptions=sched.num_preemptions,
                prompt_tokens=self.prompt_tokens,
                generation_tokens=self.generation_tokens,
                tokens_per_s=self.generation_tokens / span if span > 0 else 0.0,
                num_parked_sessions=len(self.sessions.parked(list(self._requests.values()))),
                **kv_fields(s),
            )

    def migrate(self, request_id: str, transport: Any, dst: int, **options: Any) -> Any:
        """Start moving a running request live to rank ``dst`` (:mod:`kvmem.engine.handover`)."""
        with self._step_lock:
            r = self._requests.get(request_id)
            if r is not None and r.seq_id != request_id:
                raise InvalidArgument(f"request {request_id!r} runs in a session: it stays here")
            return self.migrations.start(self, request_id, transport, dst, **options)

    def accept_migration(self, transport: Any, src: int, **options: Any) -> str | None:
        """Receive a request from rank ``src`` (blocks); its id once it runs here, else None.

        Options of :func:`kvmem.engine.handover.accept`: ``timeout``, ``on_output``,
        ``decide(request_id) -> bool`` (run a complete copy whose source fell silent?)."""
        return accept(self, transport, src, **options)

    def request(self, request_id: str) -> Request | None:
        """A live or recently finished request's state (its ``metrics`` included)."""
        with self._step_lock:
            return self._lookup(request_id)

    def close(self) -> None:
        """Release the allocator's memory."""
        with self._step_lock:
            self.allocator.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Engine", "EngineConfig"]
