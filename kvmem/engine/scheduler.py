"""The scheduler: which requests run this step, how many tokens each, who is preempted.

Each step forms one batch under a token budget (Sarathi-Serve's stall-free
batching)::

    budget = max_num_batched_tokens
    1. running decodes, 1 token each              (never stalled by prefills)
    2. running prefills, a chunk each             (what the budget leaves)
    3. waiting requests, admitted in policy order (a first chunk each)

    step k:   [d d d d | prefill A 0..250 ]          budget 256
    step k+1: [d d d d | prefill A 250..500 ]        decodes keep their pace
    step k+2: [d d d d d | prefill A 500..600 | B 0..150 ]

The scheduler is the one owner of allocator calls. Each step::

    schedule()   add (prefix-cache hits are skipped, not recomputed), reserve,
                 preempt (free or swap_out), swap_in; then the batch's layout
                 and the layers' KV, handed to the executor as ``StepKV``
    ... the engine runs the forward pass and samples ...
    update()     commit every chunk's KV, append the sampled tokens of
                 requests that go on, free the finished ones

A request's progress (``num_computed``) is the allocator's
(:meth:`~kvmem.allocator.KVAllocator.seq_info`), never a copy. When
``reserve`` raises OutOfKVMemory, the running request with the largest
policy key that is not yet in this step's batch is preempted, possibly the
requester itself:

- ``recompute``: ``free`` it; it waits, and on readmission ``add`` finds
  its full pages in the prefix cache unless they were evicted meanwhile;
- ``swap``: ``swap_out``; readmission ``swap_in`` runs while other
  requests compute, and the request rejoins once its handle is done.

A policy that preempts (priorities in ``fair``, ``isrtf`` with a ratio) may
also displace running requests for a better waiting one when seats or KV
are short; a waiting request is counted at its next chunk plus one
allocation unit (``allocator.granularity``) of headroom. A request that
alone exceeds the whole KV capacity ends with finish reason ``"length"``.
Preemption by swap needs a backend declaring the ``swap`` capability.

Cache tiers: when ``add`` finds prefix pages in a host or disk tier, the
allocator loads them asynchronously (``allocator.pending_transfer``). The
request then waits in ``loading``, out of every step (any call naming it
would wait for the load), while the others run; once the load is done it
rejoins the waiting queue and is admitted as usual. Its prefix hit
(``metrics.prompt_cached_tokens``) is what the allocator reports once the
load has settled, so pages that failed to load are not counted.

Parallel sampling: a request added with ``fork_of`` (another request with
the same prompt that has not generated yet) waits beside that one instead
of in the queue, on backends that declare ``fork``. In the ``update`` of the
step that computes the prompt's last token, it is forked from it
(``allocator.fork``: every page of the prompt shared copy-on-write) and
joins the running requests with its first sampled token; the engine samples
that token from the same logits row. It may briefly take the running count
above ``max_num_seqs``. Without ``fork``, or if its parent leaves first, it
is queued as a request of its own (the prefix cache, where there is one,
still finds the prompt's full pages)::

    step k:     parent  [p0 p1 ... p99]  -> samples t0          children wait
    update k:   commit parent; fork -> c1, c2, c3 (pages of p0..p99 shared)
                append t0 / t0' / t0'' / t0''' to each
    step k+1:   [parent d | c1 d | c2 d | c3 d]                 four decodes

Sessions (:mod:`kvmem.engine.sessions`): a request runs under its
``seq_id``, its own id or its session's sequence. A session's sequence is
registered with ``resume`` (its parked KV comes back like a tier load, the
request waiting in ``loading`` meanwhile), a request with ``keep_kv`` is
freed with ``keep_on_host=True`` when it finishes, and one whose parked KV
came back but does not fit parks it again rather than dropping it.
Preemption frees or swaps a session's sequence as any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from kvmem.allocator import KVAllocator, SwapHandle
from kvmem.engine.errors import SwapUnavailable
from kvmem.engine.policies import Policy
from kvmem.engine.request import Request, RequestStatus
from kvmem.engine.steps import ScheduledChunk, SchedulerOutput, StepKV
from kvmem.errors import InvalidArgument, KVError, OutOfKVMemory, UnknownSequence

PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits and the preemption mode.

    ``max_num_seqs`` caps requests holding KV (running); ``max_num_batched_tokens``
    is the per-step token budget; with ``chunked_prefill=False`` a prompt is
    only scheduled whole (the unchunked baseline: make the budget at least
    the longest prompt). A waiting request is admitted only if its whole
    remaining prompt fits with ``watermark`` (a fraction of the KV capacity)
    to spare, unless nothing is running: headroom for running requests'
    decodes, so admissions do not immediately force preemptions (vLLM's
    watermark, 1%).
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 256
    chunked_prefill: bool = True
    preemption: str = "recompute"
    watermark: float = 0.01

    def __post_init__(self) -> None:
        if not 0 <= self.watermark < 1:
            raise InvalidArgument(f"watermark must be in [0, 1), got {self.watermark!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidArgument(f"{name} must be a positive int, got {v!r}")
        if self.preemption not in PREEMPTION_MODES:
            raise InvalidArgument(
                f"unknown preemption mode {self.preemption!r}; known: {', '.join(PREEMPTION_MODES)}"
            )


class Scheduler:
    """Forms batches over the waiting, running and swapped requests."""

    def __init__(
        self,
        allocator: KVAllocator,
        policy: Policy,
        config: SchedulerConfig,
        builds_kv: bool = True,
    ) -> None:
        if config.preemption == "swap" and not allocator.capabilities.swap:
            raise SwapUnavailable(
                f"preemption='swap' is unavailable: {type(allocator).__name__} does not "
                "declare the swap capability; use preemption='recompute'"
            )
        self.allocator = allocator
        #: Whether plans carry the step's layout and layers (not for an executor that reads no KV).
        self.builds_kv = builds_kv
        self.policy = policy
        self.config = config
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        #: Admitted requests whose prefix pages are loading from a cache tier (see the doc).
        self.loading: list[Request] = []
        self.num_preemptions = 0
        self._kv_epoch = 0  # counts releases: free KV only grows when one happens
        self._blocked: dict[str, int] = {}  # request id -> epoch its admission failed in
        self._watermark = int(config.watermark * allocator.stats().capacity_tokens)
        self._seq = 0
        #: Parent request id -> requests waiting to fork from it once its prompt is computed.
        self._forks: dict[str, list[Request]] = {}
        #: Requests whose sequence came back from its session's parked copy (see ``_register``).
        self._resumed: set[str] = set()

    # ------------------------------------------------------------- membership
    def requests(self) -> list[Request]:
        """Every request in the scheduler (those waiting to fork included)."""
        forks = [c for cs in self._forks.values() for c in cs]
        return self.running + self.waiting + self.swapped + self.loading + forks

    def add(self, request: Request) -> None:
        """Queue a new request; one with ``fork_of`` waits to fork (see the module doc)."""
        self._seq += 1
        request.seq_no = self._seq
        request.status = RequestStatus.WAITING
        self.policy.on_arrival(request, self.requests())
        parent = request.fork_of
        if (
            parent is not None
            and self.allocator.capabilities.fork
            and parent.num_output_tokens == 0
            and parent.prompt_token_ids == request.prompt_token_ids
            and (parent in self.running or parent in self.waiting)
        ):
            self._forks.setdefault(parent.request_id, []).append(request)
            return
        request.fork_of = None
        self.waiting.append(request)

    def adopt(self, request: Request) -> None:
        """Take a running request whose sequence is already in the allocator (migrated here).

        A session's request (handed over from a prefill instance) parks its KV
        here when it finishes, if the backend keeps KV on the host.
        """
        if request.session_id is not None:
            request.keep_kv = self.allocator.capabilities.keep_on_host
        self._seq += 1
        request.seq_no = self._seq
        self.policy.on_arrival(request, self.requests())
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def forks_due(self, chunk: ScheduledChunk) -> list[Request]:
        """The requests to fork from the chunk's request in this step's ``update``.

        Those waiting on it, once the chunk computes the last prompt token.
        """
        r = chunk.request
        if not chunk.samples or r.num_output_tokens:
            return []
        return list(self._forks.get(r.request_id, ()))

    def remove(self, request: Request, park: bool = False) -> None:
        """Take a request out (finished or aborted) and release its KV (``park``: keep it on
        the host for its session's next turn, see :mod:`kvmem.engine.sessions`)."""
        for q in (self.running, self.waiting, self.swapped, self.loading):
            if request in q:
                q.remove(request)
        self._unfork(request)
        self._blocked.pop(request.request_id, None)
        self._release(request, park)

    def _unfork(self, r: Request) -> None:
        """``r`` leaves or forks: requests waiting to fork from it queue on their own."""
        for child in self._forks.pop(r.request_id, []):
            child.fork_of = None
            self.waiting.append(child)
        parent = r.fork_of
        if parent is not None:
            waiting = self._forks.get(parent.request_id, [])
            if r in waiting:
                waiting.remove(r)
                if not waiting:
                    del self._forks[parent.request_id]

    def _end(self, r: Request, reason: str, error: str | None, out: SchedulerOutput) -> None:
        """End ``r`` from within ``schedule`` (it has left every queue): free its KV, report it."""
        self._unfork(r)
        self._blocked.pop(r.request_id, None)
        self._release(r)
        out.ended.append((r, reason, error))

    def is_parked(self, seq_id: Hashable) -> bool:
        """Whether ``seq_id`` is registered and out on the host (a session's parked KV)."""
        try:
            return self.allocator.seq_info(seq_id).swapped
        except UnknownSequence:
            return False

    def free_parked(self, seq_id: Hashable) -> bool:
        """Free a parked sequence (no request may hold it); False if none is parked."""
        if not self.is_parked(seq_id):
            return False
        self.allocator.free(seq_id)
        return True

    def _release(self, r: Request, park: bool = False) -> None:
        self._resumed.discard(r.request_id)
        if r.swap_handle is not None:
            with contextlib.suppress(Exception):  # the KV is being dropped anyway
                r.swap_handle.wait()
            r.swap_handle = None
        if r.kv is not None:
            self.allocator.free(r.seq_id, keep_on_host=park)
            r.kv = None
            self._kv_epoch += 1

    # ----------------------------------------------------------------- update
    def update(
        self,
        chunks: Sequence[ScheduledChunk],
        appended: Sequence[Request],
        finished: Sequence[Request],
        forked: Sequence[Request] = (),
    ) -> None:
        """The one bookkeeping pass after a step's forward: commit, fork, append, free.

        Every chunk's KV is committed; each request in ``forked`` (from
        :meth:`forks_due`) is forked from its parent and runs; each request
        in ``appended`` has its last token (the one just sampled) appended;
        each in ``finished`` leaves the scheduler and its KV is freed.
        """
        alloc = self.allocator
        if chunks:
            alloc.commit_many([c.request.seq_id for c in chunks], [c.num_tokens for c in chunks])
        for c in chunks:
            c.request.metrics.num_computed_tokens += c.num_tokens
        for child in forked:
            parent = child.fork_of
            if parent is None:
                raise InvalidArgument(f"request {child.request_id} has nothing to fork from")
            alloc.fork(parent.seq_id, child.seq_id)
            self._unfork(child)
            child.kv = alloc
            child.status = RequestStatus.RUNNING
            child.metrics.num_cached_tokens += child.num_prompt_tokens
            child.prompt_logprobs = list(parent.prompt_logprobs)
            self.running.append(child)
        if appended:
            alloc.append_many([r.seq_id for r in appended], [r.token_ids[-1:] for r in appended])
        for r in finished:
            self.remove(r, park=r.keep_kv)

    # -------------------------------------------------------------- preemption
    def _preempt(self, r: Request, out: SchedulerOutput) -> None:
        self.running.remove(r)
        r.metrics.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(r)
        if self.config.preemption == "swap":
            try:
                r.swap_handle = self.allocator.swap_out([r.seq_id])
                r.status = RequestStatus.SWAPPED
                self.swapped.append(r)
                self._kv_epoch += 1  # its device pages come free once the copy lands
                return
            except OutOfKVMemory:
                pass  # host pool full: fall back to recompute
        self._release(r)
        r.status = RequestStatus.WAITING
        self.waiting.append(r)

    def _victim(self, r: Request, scheduled: set[int]) -> Request:
        """The running request not yet in the batch with the largest key (``r`` included)."""
        cands = [
            x for x in self.running if x is r or (id(x) not in scheduled and x.swap_handle is None)
        ]
        return max(cands, key=self.policy.key)

    def _reserve(self, r: Request, n: int, scheduled: set[int], out: SchedulerOutput) -> bool:
        """Reserve ``n`` slots for ``r``, preempting as needed; False if ``r`` lost its seat."""
        while True:
            try:
                self.allocator.reserve(r.seq_id, n)
                return True
            except OutOfKVMemory:
                victim = self._victim(r, scheduled)
                if victim is r and all(x is r for x in self.running):
                    self.running.remove(r)
                    self._end(r, "length", None, out)
                    return False
                self._preempt(victim, out)
                if victim is r:
                    return False

    def _priority_preempt(self, out: SchedulerOutput) -> None:
        """Let better waiting requests displace running ones when seats or KV are short."""
        queue = sorted(self.waiting + self.swapped, key=self.policy.key)
        if not queue:
            return
        seats = self.config.max_num_seqs - len(self.running)
        free = self.allocator.stats().free_tokens
        for w in queue:
            need = w.num_to_compute
            if self.config.chunked_prefill:
                need = min(need, self.config.max_num_batched_tokens)
            need += self.allocator.granularity
            while seats <= 0 or free < need:
                victims = [x for x in self.running if x.swap_handle is None]
                if not victims:
                    return
                victim = max(victims, key=self.policy.key)
                if not self.policy.preempts(w, victim):
                    return
                # A swapped-out victim's pages stay held until its copy lands,
                # so count what it held rather than re-reading the stats.
                held = self.allocator.seq_info(victim.seq_id).capacity
                self._preempt(victim, out)
                seats += 1
                free += held
            seats -= 1
            free -= need

    # ---------------------------------------------------------------- swap-in
    def _poll_swaps(self, out: SchedulerOutput) -> None:
        for r in list(self.running):
            h = r.swap_handle
            if h is not None and h.done():
                r.swap_handle = None
                try:
                    h.wait()
                except Exception as e:  # the KV stays on the host: end this request only
                    self.running.remove(r)
                    self._end(r, "error", f"swap-in failed: {e}", out)
        for r in list(self.swapped):
            if r.swap_handle is not None and r.swap_handle.done():
                self._land_swap_out(r)

    def wait_for_swaps(self, timeout: float) -> None:
        """Block up to ``timeout`` s for a swap in flight (a step found nothing to run).

        Without this, a loop that steps back to back would spin while copies
        run, competing with the copy thread. The copy's outcome is taken by
        the next ``schedule``.
        """
        for r in (*self.running, *self.swapped, *self.loading):
            h = r.swap_handle if r.swap_handle is not None else self._load_handle(r)
            if h is not None and not h.done():
                with contextlib.suppress(Exception):  # TimeoutError or the copy's own error
                    h.wait(timeout)
                return

    # ------------------------------------------------------------ tier loads
    def _load_handle(self, r: Request) -> SwapHandle | None:
        """The tier load in flight for ``r``'s sequence, or None (never waits)."""
        pending = getattr(self.allocator, "pending_transfer", None)
        return None if pending is None or r.kv is None else pending(r.seq_id)

    def _poll_loads(self) -> None:
        """Requests whose tier load is done rejoin the waiting queue."""
        for r in list(self.loading):
            h = self._load_handle(r)
            if h is None or h.done():
                self.loading.remove(r)
                self._settled(r)
                self.waiting.append(r)

    def _settled(self, r: Request) -> None:
        """``r``'s prefix hit has settled: count what the allocator holds for it."""
        hit = self.allocator.seq_info(r.seq_id).num_computed
        r.metrics.num_cached_tokens += hit
        if r.metrics.prompt_cached_tokens is None:
            r.metrics.prompt_cached_tokens = hit

    def _land_swap_out(self, r: Request) -> bool:
        """Wait for ``r``'s swap-out; False if it failed and ``r`` runs again instead."""
        h = r.swap_handle
        if h is None:
            return True
        r.swap_handle = None
        try:
            h.wait()
        except Exception:
            if self.allocator.seq_info(r.seq_id).swapped:
                return True  # the allocator counts it swapped out all the same
            # The allocator put the sequence back: its KV is intact on the device.
            self.swapped.remove(r)
            r.status = RequestStatus.RUNNING
            self.running.append(r)
            return False
        self._kv_epoch += 1
        return True

    def _swap_in(self, r: Request) -> bool:
        if not self._land_swap_out(r):  # its swap-out must land first
            return True
        try:
            r.swap_handle = self.allocator.swap_in([r.seq_id])
        except OutOfKVMemory:
            return False
        self.swapped.remove(r)
        r.status = RequestStatus.RUNNING
        self.running.append(r)
        return True

    # --------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """Plan one step: reserve KV for every chunk in the returned batch."""
        out = SchedulerOutput()
        cfg = self.config
        self._poll_swaps(out)
        self._poll_loads()
        if self.policy.can_preempt:
            self._priority_preempt(out)
        budget = cfg.max_num_batched_tokens
        scheduled: set[int] = set()
        ready = sorted((r for r in self.running if r.swap_handle is None), key=self.policy.key)
        todo = [(r, r.num_to_compute) for r in ready]
        decodes = [x for x in todo if x[1] == 1]
        prefills = [x for x in todo if x[1] > 1]
        order = decodes + prefills
        head = decodes[: max(budget, 0)]
        if head:  # every decode's slot in one call; the loop below preempts when it fails
            try:
                self.allocator.reserve_many([r.seq_id for r, _ in head], 1)
            except OutOfKVMemory:
                pass
            else:
                for r, left in head:
                    out.chunks.append(ScheduledChunk(r, r.num_tokens - left, 1))
                    scheduled.add(id(r))
                budget -= len(head)
                order = decodes[len(head) :] + prefills
        for r, left in order:
            if budget <= 0:
                break
            if r.status is not RequestStatus.RUNNING or r not in self.running:
                continue  # preempted as a victim earlier in this loop
            n = min(left, budget)
            if not cfg.chunked_prefill and n < left:
                continue
            if self._reserve(r, n, scheduled, out):
                out.chunks.append(ScheduledChunk(r, r.num_tokens - left, n))
                scheduled.add(id(r))
                budget -= n
        self._admit(budget, scheduled, out)
        if out.chunks and self.builds_kv:
            out.kv = self._step_kv(out.chunks)
        return out

    def _register(self, r: Request, salt: Hashable) -> None:
        """Register ``r``'s sequence: ``add``, or ``resume`` for a session's sequence.

        ``resume`` takes a parked copy back when ``r``'s tokens extend it
        (else it drops the copy and adds). A request whose sequence came back
        that way and then fails admission parks it again instead of freeing it.
        """
        alloc = self.allocator
        if r.seq_id == r.request_id:
            alloc.add(r.seq_id, r.token_ids, cache_salt=salt)
            return
        parked = self.is_parked(r.seq_id)
        if alloc.resume(r.seq_id, r.token_ids, cache_salt=salt) and parked:
            self._resumed.add(r.request_id)

    def _step_kv(self, chunks: Sequence[ScheduledChunk]) -> StepKV:
        alloc = self.allocator
        layout = alloc.layout([(c.request.seq_id, c.num_tokens) for c in chunks])
        return StepKV(layout, tuple(alloc.layer(i) for i in range(alloc.spec.num_layers)))

    def _admit(self, budget: int, scheduled: set[int], out: SchedulerOutput) -> None:
        cfg = self.config
        seats = cfg.max_num_seqs - len(self.running) - len(self.loading)
        for r in sorted(self.waiting + self.swapped, key=self.policy.key):
            if seats <= 0 or budget <= 0:
                break
            if r.status is RequestStatus.SWAPPED:
                if not self._swap_in(r):
                    break
                seats -= 1
                continue
            if self._blocked.get(r.request_id) == self._kv_epoch:
                break  # it did not fit, and no KV has been released since
            if r.kv is None:
                # Prompt logprobs need the logits of every prompt position: a salt of
                # its own keeps other requests' cached pages from standing in for them.
                scoring = r.params.prompt_logprobs is not None and r.num_output_tokens == 0
                salt = ("prompt-logprobs", r.request_id) if scoring else r.cache_salt
                try:
                    self._register(r, salt)
                except OutOfKVMemory:
                    break
                except KVError as e:
                    self.waiting.remove(r)
                    self._end(r, "error", str(e), out)
                    continue
                r.kv = self.allocator
                h = self._load_handle(r)
                if h is not None and not h.done():
                    self.waiting.remove(r)  # out of the steps until its load is done
                    self.loading.append(r)
                    seats -= 1
                    continue
                self._settled(r)
            n = min(r.num_to_compute, budget)
            fits = cfg.chunked_prefill or n == r.num_to_compute  # unchunked: wait for room
            if fits and self.running and self._watermark:
                need = r.num_to_compute + self._watermark
                fits = self.allocator.can_reserve({r.seq_id: need})
            try:
                if not fits:
                    raise OutOfKVMemory("no room to admit")
                self.allocator.reserve(r.seq_id, n)
            except OutOfKVMemory:
                self._release(r, park=r.request_id in self._resumed)
                if cfg.chunked_prefill or n == r.num_to_compute:
                    self._blocked[r.request_id] = self._kv_epoch
                break
            self._blocked.pop(r.request_id, None)
            self.waiting.remove(r)
            r.status = RequestStatus.RUNNING
            self.running.append(r)
            out.chunks.append(ScheduledChunk(r, r.num_computed, n))
            scheduled.add(id(r))
            budget -= n
            seats -= 1


__all__ = [
    "PREEMPTION_MODES",
    "ScheduledChunk",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "StepKV",
]
