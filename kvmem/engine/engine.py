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
through it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from kvmem.allocator import KVAllocator, create_allocator
from kvmem.engine.clock import Clock, WallClock
from kvmem.engine.config import EngineConfig
from kvmem.engine.errors import InvalidRequest
from kvmem.engine.executor import Executor, ModelExecutor
from kvmem.engine.handover import Migrations, accept
from kvmem.engine.metrics import EngineMetrics, kv_fields
from kvmem.engine.model import LlamaModel
from kvmem.engine.policies import make_policy
from kvmem.engine.request import (
    Completion,
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
from kvmem.engine.stopping import advance_text, stop_reason
from kvmem.engine.tokenizer import ByteTokenizer, IncrementalDecoder, Tokenizer
from kvmem.errors import InvalidArgument, KVError

log = logging.getLogger(__name__)
_Pending = list[tuple[Request, RequestOutput]]
#: How long a step with nothing to run waits for a swap copy in flight.
_IDLE_SWAP_WAIT_S = 0.005
#: The longest an idle serve loop sleeps before looking at its stop condition again.
_IDLE_WAIT_S = 0.05


class Engine:
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

        Raises :class:`InvalidRequest` (nothing queued, nothing else
        affected) for an empty prompt, token ids outside the vocabulary, a
        prompt that leaves no room for output within ``max_model_len``, or a
        prompt larger than the whole KV capacity.
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
        ).request_id

    def _add(
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
    ) -> Request:
        """``add_request``, returning the queued Request."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise InvalidRequest("a prompt is a string or a sequence of token ids") from None
        if not ids:
            raise InvalidRequest("the prompt is empty")
        vocab = self.executor.vocab_size
        if self.config.detokenize and (min(ids) < 0 or max(ids) >= vocab):
            raise InvalidRequest(f"prompt token ids must be in 0..{vocab - 1}")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; the model's context is {self.max_model_len} "
                "and must leave room for at least one generated token"
            )
        if len(ids) > self.kv_capacity_tokens:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens, more than the whole KV capacity "
                f"({self.kv_capacity_tokens} tokens)"
            )
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequest(f"priority must be an int, got {priority!r}")
        with self._inbox_lock:
            rid = request_id if request_id is not None else f"req-{next(self._counter)}"
            if not isinstance(rid, str) or not rid:
                raise InvalidRequest("request_id must be a non-empty string")
            if rid in self._ids:
                raise InvalidRequest(f"request id {rid!r} is already in the engine")
            if fork_from is not None and fork_from not in self._ids:
                raise InvalidRequest(f"fork_from: no request {fork_from!r} in the engine")
            req = Request(
                request_id=rid,
                prompt_token_ids=ids,
                params=params,
                tenant=tenant,
                priority=priority,
                arrival_time=self.clock.now() if arrival_time is None else float(arrival_time),
                output_len_hint=output_len_hint,
                on_output=on_output,
                cache_salt=cache_salt,
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
        self._wake.set()
        if self._step_lock.acquire(blocking=False):
            try:
                outputs: _Pending = []
                self._drain(outputs)
                self._deliver(outputs)
            finally:
                self._step_lock.release()
        return True

    def set_priority(self, request_id: str, priority: int) -> bool:
        """Change a request's priority from the next step on (``fair`` preempts on it)."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequest(f"priority must be an int, got {priority!r}")
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
        with self._inbox_lock:
            self._ids.discard(r.request_id)
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

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Run ``prompts`` to completion (stepping the engine here); results in prompt order."""
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequest(f"{len(plist)} sampling params for {len(prompts)} prompts")
        done: set[str] = set()

        def track(o: RequestOutput) -> None:
            if o.finished:
                done.add(o.request_id)

        reqs: list[Request] = []
        try:
            for p, sp in zip(prompts, plist, strict=True):
                reqs.append(self._add(p, sp, on_output=track))
        except KVError:
            for r in reqs:
                self.abort(r.request_id)
            raise
        while any(r.request_id not in done for r in reqs):
            self.step()
        return [r.completion() for r in reqs]

    def stream(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> Iterator[RequestOutput]:
        """Add one request and yield its outputs as steps run (stepping the engine here)."""
        box: deque[RequestOutput] = deque()
        self.add_request(prompt, params, on_output=box.append, **kwargs)
        while True:
            if not box:
                self.step()
            while box:
                o = box.popleft()
                yield o
                if o.finished:
                    return

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Step until ``until()`` is true (default: until no request is left)."""
        self._loop(until or (lambda: not self.has_unfinished()))

    def serve_forever(
        self,
        stop: threading.Event,
        idle_sleep: float = _IDLE_WAIT_S,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Step until ``stop`` is set; when idle, sleep until a request arrives.

        Meant for a background thread (a server's), while other threads call
        ``add_request``, ``abort`` and ``set_priority`` (which wake it). An
        idle loop looks at ``stop`` at least every ``idle_sleep`` seconds. A
        step that raises ends the loop, unless ``on_error`` is given: then it
        gets the exception and the loop goes on.
        """
        self._loop(stop.is_set, idle_sleep, on_error)

    def _loop(
        self,
        done: Callable[[], bool],
        idle_sleep: float = _IDLE_WAIT_S,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """The one serve loop: step while there is work, sleep while there is none."""
        while not done():
            if not self.has_unfinished():
                self._wake.wait(idle_sleep)
                self._wake.clear()
                continue
            steps = self.num_steps
            try:
                outs = self.step()
            except Exception as e:
                if on_error is None:
                    raise
                on_error(e)
                continue
            if outs or self.num_steps != steps:
                time.sleep(0)  # let other threads (a server's event loop) take the GIL
            else:
                time.sleep(0.001)  # nothing could be scheduled: do not spin

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
                **kv_fields(s),
            )

    def migrate(self, request_id: str, transport: Any, dst: int, **options: Any) -> Any:
        """Start moving a running request live to rank ``dst`` (:mod:`kvmem.engine.handover`)."""
        with self._step_lock:
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
