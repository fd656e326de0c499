"""Discrete-event simulation of N serving instances, colocated or disaggregated (DistServe).

Requests come from a trace ``(arrival_s, prompt_tokens, output_tokens)``;
nothing runs a model: every step of an instance lasts what the cost model
(:class:`kvmem.engine.simulate.CostModel`) says, on a simulated clock, so
the figures do not depend on the machine running the simulation. KV memory
is counted in tokens per instance (no allocator: a goodput search replays
a trace thousands of times; :mod:`kvmem.cluster.simulate` keeps real
allocators for fragmentation, which does not matter here).

Colocated (Sarathi-Serve), each of N instances::

    step = [ every running decode: 1 token ] + [ prefill chunks, FCFS, up to the budget ]
           budget = token_budget - decode rows   (decodes are never stalled)

Disaggregated, P prefill and D decode instances::

    arrival -> prefill instance (FCFS, whole prompts batched up to prefill_batch_tokens)
            -> first token (TTFT ends); the KV stays there until a decode
               instance has room for the whole request
            -> transfer of prompt x kv_bytes_per_token at ``bandwidth`` B/s over
               the prefill instance's link (one transfer at a time per link, FIFO)
            -> decode instance (continuous batching of decodes) until the last token

Both modes dispatch with :func:`kvmem.cluster.policy.pick_instance` (Llumnix
virtual usage: the instance with the most KV not held or claimed by queued
requests). Admission reserves a request's whole KV (prompt + output tokens)
at once, on both sides of a disaggregated pair as on a colocated instance,
so nothing is ever preempted; at most ``max_seqs`` requests run per
instance. The first token comes from the prefill (the step holding a
prompt's last chunk); TPOT is ``(last token - first token) / (output - 1)``
and so includes a disaggregated request's transfer and wait for the decode
side (DistServe's definitions); a one-token request meets any TPOT.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvmem.cluster.policy import Load, pick_instance
from kvmem.engine.simulate import CostModel
from kvmem.errors import InvalidArgument

Trace = Sequence[tuple[float, int, int]]


@dataclass(frozen=True)
class SLO:
    """Service-level objectives: time to first token and time per output token (s)."""

    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class Deployment:
    """What every instance has: KV room, bytes per KV token, batch limits."""

    kv_capacity_tokens: int = 400_000
    kv_bytes_per_token: int = 131_072
    max_seqs: int = 256
    prefill_batch_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in (
            "kv_capacity_tokens",
            "kv_bytes_per_token",
            "max_seqs",
            "prefill_batch_tokens",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgument(f"{name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class RooflineCost(CostModel):
    """:class:`CostModel` with weight reads overlapped with compute (a sensitivity check).

    ``step = max(fixed + decode_kv * context, prefill * tokens + decode * rows)``:
    memory time and compute time overlap instead of adding up, which is how a
    GPU runs a step; the plain model charges a prefill chunk the weight read on
    top of its compute, which favours few large prefill batches.
    """

    def step_time(self, prefill_tokens: int, decode_rows: int, decode_context: int = 0) -> float:
        """Duration of one step: the larger of its memory time and its compute time."""
        memory = self.fixed + self.decode_kv * decode_context
        return max(memory, self.prefill * prefill_tokens + self.decode * decode_rows)


@dataclass
class SimResult:
    """Per-request outcome of one replay (NaN where the request never got that far)."""

    ttft_s: np.ndarray
    tpot_s: np.ndarray
    stopped_early: bool = False

    def attainment(self, slo: SLO) -> float:
        """Share of requests that met both SLOs (unfinished requests did not)."""
        ok = (self.ttft_s <= slo.ttft_s) & (self.tpot_s <= slo.tpot_s)
        return float(np.mean(ok)) if len(ok) else 1.0


class _Req:
    __slots__ = ("i", "arrival", "prompt", "output", "left", "first", "finish_k")

    def __init__(self, i: int, arrival: float, prompt: int, output: int) -> None:
        self.i, self.arrival, self.prompt, self.output = i, arrival, prompt, output
        self.left = prompt
        self.first = math.nan
        self.finish_k = 0

    @property
    def kv(self) -> int:
        return self.prompt + self.output


class _Sim:
    """The event loop and the per-request record shared by both modes."""

    def __init__(self, trace: Trace, cost: CostModel, dep: Deployment, stop: SLO | None) -> None:
        if not trace:
            raise InvalidArgument("empty trace")
        self.cost, self.dep, self.stop = cost, dep, stop
        self.reqs = [
            _Req(i, float(a), max(1, int(p)), max(1, int(o))) for i, (a, p, o) in enumerate(trace)
        ]
        for r in self.reqs:
            if r.kv > dep.kv_capacity_tokens:
                raise InvalidArgument(
                    f"request {r.i} needs {r.kv} KV tokens, more than one instance"
                )
        n = len(self.reqs)
        self.ttft = np.full(n, math.nan)
        self.tpot = np.full(n, math.nan)
        self.max_failed = n if stop is None else math.floor(0.1 * n)
        self.failed = 0
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self.seq = itertools.count()

    def at(self, t: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), fn, arg))

    def first_token(self, r: _Req) -> None:
        r.first = self.now
        self.ttft[r.i] = self.now - r.arrival
        if self.stop is not None and self.ttft[r.i] > self.stop.ttft_s:
            self.failed += 1
        if r.output == 1:
            self.tpot[r.i] = 0.0

    def finish(self, r: _Req) -> None:
        self.tpot[r.i] = (self.now - r.first) / (r.output - 1)
        stop = self.stop
        if stop is not None and self.ttft[r.i] <= stop.ttft_s and self.tpot[r.i] > stop.tpot_s:
            self.failed += 1

    def run(self, arrive: Callable[[_Req], None]) -> SimResult:
        for r in self.reqs:
            self.at(r.arrival, arrive, r)
        while self.events:
            self.now, _, fn, arg = heapq.heappop(self.events)
            fn(arg)
            if self.failed > self.max_failed:
                return SimResult(self.ttft, self.tpot, stopped_early=True)
        return SimResult(self.ttft, self.tpot)


class _Decoder:
    """Continuous batching of decodes: finish step numbers in a heap, the context summed."""

    def __init__(self, sim: _Sim) -> None:
        self.sim = sim
        self.heap: list[tuple[int, int, _Req]] = []
        self.k = 0  # decode steps done
        self.context = 0  # KV tokens the decode rows read per step
        self.used = 0  # KV tokens reserved
        self.busy = False

    def join(self, r: _Req) -> None:
        """``r`` has its first token and decodes from the next step on."""
        heapq.heappush(self.heap, (self.k + r.output - 1, r.i, r))
        self.context += r.prompt + 1

    def decoded(self, rows: int) -> int:
        """The step's ``rows`` decodes are done; finish those at their last token."""
        self.k += 1
        self.context += rows
        freed = 0
        while self.heap and self.heap[0][0] <= self.k:
            r = heapq.heappop(self.heap)[2]
            self.context -= r.kv
            self.used -= r.kv
            self.sim.finish(r)
            freed += 1
        return freed


class _Colocated(_Decoder):
    def __init__(self, sim: _Sim, budget: int) -> None:
        super().__init__(sim)
        self.budget = budget
        self.waiting: deque[_Req] = deque()
        self.waiting_kv = 0
        self.prefilling: deque[_Req] = deque()

    def load(self) -> Load:
        running = len(self.heap) + len(self.prefilling)
        return Load(self.sim.dep.kv_capacity_tokens, self.used, self.waiting_kv, running)

    def start(self) -> None:
        if self.busy:
            return
        dep = self.sim.dep
        rows = len(self.heap)
        room = self.budget - rows
        chunks: list[tuple[_Req, int]] = []
        context = self.context
        for r in self.prefilling:
            if room <= 0:
                break
            c = min(r.left, room)
            chunks.append((r, c))
            context += r.prompt - r.left
            room -= c
        while room > 0 and self.waiting and rows + len(self.prefilling) < dep.max_seqs:
            r = self.waiting[0]
            if self.used + r.kv > dep.kv_capacity_tokens:
                break
            self.waiting.popleft()
            self.waiting_kv -= r.kv
            self.used += r.kv
            self.prefilling.append(r)
            c = min(r.left, room)
            chunks.append((r, c))
            room -= c
        if not rows and not chunks:
            return
        self.busy = True
        tokens = sum(c for _, c in chunks)
        dt = self.sim.cost.step_time(tokens, rows, context)
        self.sim.at(self.sim.now + dt, self.done, (rows, chunks))

    def done(self, arg: tuple[int, list[tuple[_Req, int]]]) -> None:
        rows, chunks = arg
        self.busy = False
        if rows:
            self.decoded(rows)
        for r, c in chunks:
            r.left -= c
            if r.left == 0:
                self.prefilling.remove(r)
                self.sim.first_token(r)
                if r.output == 1:
                    self.used -= r.kv
                else:
                    self.join(r)
        self.start()


class _Prefiller:
    def __init__(self, sim: _Disagg) -> None:
        self.sim = sim
        self.queue: deque[_Req] = deque()
        self.queued = 0
        self.used = 0
        self.busy = False
        self.link_free = 0.0

    def load(self) -> Load:
        return Load(self.sim.dep.kv_capacity_tokens, self.used, self.queued, int(self.busy))

    def start(self) -> None:
        if self.busy:
            return
        dep = self.sim.dep
        batch: list[_Req] = []
        tokens = 0
        while self.queue:
            r = self.queue[0]
            if batch and tokens + r.prompt > dep.prefill_batch_tokens:
                break
            if self.used + r.prompt > dep.kv_capacity_tokens:
                break
            self.queue.popleft()
            self.queued -= r.prompt
            self.used += r.prompt
            tokens += r.prompt
            batch.append(r)
        if batch:
            self.busy = True
            self.sim.at(self.sim.now + self.sim.cost.step_time(tokens, 0, 0), self.done, batch)

    def done(self, batch: list[_Req]) -> None:
        self.busy = False
        for r in batch:
            self.sim.first_token(r)
            if r.output == 1:
                self.used -= r.prompt
            else:
                self.sim.held.append((r, self))
        self.sim.place()
        self.start()


class _DecodeOnly(_Decoder):
    def __init__(self, sim: _Disagg) -> None:
        super().__init__(sim)
        self.disagg = sim
        self.arrived: list[_Req] = []
        self.seqs = 0  # running, arrived and in transfer

    def load(self) -> Load:
        return Load(self.sim.dep.kv_capacity_tokens, self.used, 0, self.seqs)

    def fits(self, r: _Req) -> bool:
        dep = self.sim.dep
        return self.seqs < dep.max_seqs and self.used + r.kv <= dep.kv_capacity_tokens

    def start(self) -> None:
        if self.busy:
            return
        for r in self.arrived:
            self.join(r)
        self.arrived.clear()
        rows = len(self.heap)
        if rows:
            self.busy = True
            dt = self.sim.cost.step_time(0, rows, self.context)
            self.sim.at(self.sim.now + dt, self.done, rows)

    def done(self, rows: int) -> None:
        self.busy = False
        freed = self.decoded(rows)
        self.seqs -= freed
        if freed:
            self.disagg.place()
        self.start()


class _Disagg(_Sim):
    def __init__(
        self,
        trace: Trace,
        prefill: int,
        decode: int,
        bandwidth: float,
        cost: CostModel,
        dep: Deployment,
        stop: SLO | None,
    ) -> None:
        super().__init__(trace, cost, dep, stop)
        self.bandwidth = bandwidth
        self.prefillers = [_Prefiller(self) for _ in range(prefill)]
        self.decoders = [_DecodeOnly(self) for _ in range(decode)]
        self.held: deque[tuple[_Req, _Prefiller]] = deque()

    def arrive(self, r: _Req) -> None:
        p = self.prefillers[pick_instance([p.load() for p in self.prefillers])]
        p.queue.append(r)
        p.queued += r.prompt
        p.start()

    def place(self) -> None:
        """Start transfers, oldest prefill first, while some decode instance has room."""
        while self.held:
            r, src = self.held[0]
            fit = [d for d in self.decoders if d.fits(r)]
            if not fit:
                return
            self.held.popleft()
            dst = fit[pick_instance([d.load() for d in fit])]
            dst.used += r.kv
            dst.seqs += 1
            if self.bandwidth <= 0:
                continue  # never arrives: holds both sides' KV forever
            start = max(self.now, src.link_free)
            src.link_free = start + r.prompt * self.dep.kv_bytes_per_token / self.bandwidth
            self.at(src.link_free, self.transferred, (r, src, dst))

    def transferred(self, arg: tuple[_Req, _Prefiller, _DecodeOnly]) -> None:
        r, src, dst = arg
        src.used -= r.prompt
        src.start()
        dst.arrived.append(r)
        dst.start()


def simulate_colocated(
    trace: Trace,
    instances: int,
    token_budget: int,
    cost: CostModel,
    deployment: Deployment | None = None,
    stop: SLO | None = None,
) -> SimResult:
    """Replay ``trace`` on ``instances`` colocated instances with chunked prefill.

    With ``stop``, the replay ends as soon as more than 10% of the requests
    have missed it (the result then says ``stopped_early``; the requests not
    reached count as missing).
    """
    if instances < 1 or token_budget < 1:
        raise InvalidArgument("instances and token_budget must be >= 1")
    sim = _Sim(trace, cost, deployment or Deployment(), stop)
    fleet = [_Colocated(sim, token_budget) for _ in range(instances)]

    def arrive(r: _Req) -> None:
        inst = fleet[pick_instance([f.load() for f in fleet])]
        inst.waiting.append(r)
        inst.waiting_kv += r.kv
        inst.start()

    return sim.run(arrive)


def simulate_disagg(
    trace: Trace,
    prefill: int,
    decode: int,
    bandwidth: float,
    cost: CostModel,
    deployment: Deployment | None = None,
    stop: SLO | None = None,
) -> SimResult:
    """Replay ``trace`` on ``prefill`` prefill and ``decode`` decode instances.

    ``bandwidth`` is each prefill instance's KV link in bytes per second (0:
    transfers never finish). ``stop`` as in :func:`simulate_colocated`.
    """
    if prefill < 1 or decode < 1 or not bandwidth >= 0:
        raise InvalidArgument("need prefill >= 1, decode >= 1 and bandwidth >= 0")
    sim = _Disagg(trace, prefill, decode, bandwidth, cost, deployment or Deployment(), stop)
    return sim.run(sim.arrive)


def at_rate(trace: Trace, rate: float) -> list[tuple[float, int, int]]:
    """The trace with its arrival times scaled so that it offers ``rate`` requests/s."""
    span = trace[-1][0] - trace[0][0] if len(trace) >= 2 else 0.0
    if span <= 0 or not rate > 0:
        raise InvalidArgument("need two or more requests over a positive span, and rate > 0")
    k = span / (len(trace) - 1) * rate
    return [((a - trace[0][0]) / k, p, o) for a, p, o in trace]


def max_rate(
    replay: Callable[[Trace, SLO | None], SimResult],
    trace: Trace,
    slo: SLO,
    start: float = 1.0,
    target: float = 0.9,
    rel_tol: float = 0.01,
    min_rate: float = 1e-3,
    ceiling: float = 1e6,
) -> float:
    """The highest rate (requests/s) at which ``target`` of the requests meet ``slo``.

    Doubles or halves from ``start`` to bracket it, then bisects to
    ``rel_tol``; 0.0 if even ``min_rate`` misses, ``ceiling``
    if that still meets it. ``replay(trace, stop)`` runs one simulation.
    """

    def ok(rate: float) -> bool:
        return replay(at_rate(trace, rate), slo).attainment(slo) >= target

    lo, hi = 0.0, start
    while ok(hi):
        if hi >= ceiling:
            return ceiling
        lo, hi = hi, min(2 * hi, ceiling)
    if lo == 0.0:
        lo = hi / 2
        while not ok(lo):
            hi, lo = lo, lo / 2
            if lo < min_rate:
                return 0.0
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


__all__ = [
    "SLO",
    "Deployment",
    "RooflineCost",
    "SimResult",
    "at_rate",
    "max_rate",
    "simulate_colocated",
    "simulate_disagg",
]
