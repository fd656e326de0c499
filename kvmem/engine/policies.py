"""Scheduling policies: the order in which requests get memory and compute.

A policy gives every request a sort key (smaller is served first); the
scheduler admits waiting requests in key order, schedules running ones in
key order, and picks the largest key as the victim when memory runs out.
A policy may also let a waiting request preempt a running one.

- ``fcfs``: arrival order.
- ``isrtf`` (ELIS): iterative shortest remaining time first. The key is the
  predicted remaining output tokens, re-predicted every ``k`` generated
  tokens and counted down in between. With ``preempt_ratio`` set, a waiting
  request whose prediction is below ``preempt_ratio`` times a running
  request's preempts it when no seat is free.

  Plain shortest-first starves long jobs: under sustained load a stream of
  short arrivals always sorts ahead of them. The starvation guard (on by
  default) orders requests by a virtual deadline instead::

      deadline = arrival_step + slack * sqrt(predicted remaining tokens)

  where ``arrival_step`` is the arrival time in engine steps. A later
  arrival ``j`` goes before ``i`` only if ``arrival_j - arrival_i <
  slack * (sqrt(R_i) - sqrt(R_j))``: a request with ``R`` tokens to go can
  be overtaken only by requests that arrive within ``slack * sqrt(R)``
  steps after it, so its wait is bounded, and the bound grows with the
  square root of its length, not linearly (a 1000-token job is overtaken
  by the next ``32 * slack`` steps of arrivals at most, a 10-token job by
  ``3 * slack``). Among requests that arrive close together the shortest
  still goes first. Running requests count their remaining tokens down, so
  their deadlines only move earlier. ``slack=None`` is plain ISRTF.
  The step time is not configured: the policy measures it on the engine's
  own clock, from the gaps between consecutive tokens of the requests it is
  told about (a running mean that ignores gaps over ten times the mean,
  i.e. preemptions).
- ``fair``: per-tenant virtual token counters (VTC): serve the tenant that
  has received the least weighted service (``w_prompt`` per prompt token
  computed, ``w_output`` per token generated); a tenant returning from idle
  is lifted to the smallest counter among active tenants, so idling banks
  no credit. Priorities come first and may change at run time; a waiting
  request of higher priority preempts the lowest-priority running one
  (FastSwitch's priority preemption).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable
from typing import Any

from kvmem.engine.predictors import LengthPredictor, OraclePredictor, make_predictor
from kvmem.engine.request import Request
from kvmem.errors import InvalidArgument


class Policy(ABC):
    """Orders requests; optionally lets a waiting request preempt a running one."""

    name: str = "policy"

    @property
    def can_preempt(self) -> bool:
        """Whether :meth:`preempts` can ever be true (the scheduler skips the check if not)."""
        return False

    @abstractmethod
    def key(self, request: Request) -> tuple[float, ...]:
        """Sort key: smaller keys are served first."""

    def preempts(self, waiting: Request, running: Request) -> bool:
        """Whether ``waiting`` may take the place of ``running`` (default: never)."""
        return False

    def on_arrival(self, request: Request, active: Iterable[Request]) -> None:  # noqa: B027
        """A request entered the engine; ``active`` are the others in it (default: nothing)."""

    def on_served(  # noqa: B027
        self, request: Request, prompt_tokens: int, output_tokens: int
    ) -> None:
        """``request`` got ``prompt_tokens`` of KV computed and ``output_tokens`` generated."""


class FCFS(Policy):
    """First come, first served."""

    name = "fcfs"

    def key(self, request: Request) -> tuple[float, ...]:
        """Arrival time, then arrival order."""
        return (request.arrival_time, request.seq_no)


#: Default ``slack`` of :class:`ISRTF` (engine steps per square-root token).
DEFAULT_SLACK = 110.0


class ISRTF(Policy):
    """Shortest predicted remaining output first, re-predicted every ``k`` tokens.

    ``slack`` (engine steps per square-root token, > 0; None turns the
    starvation guard off) sets the virtual deadlines described in the
    module docstring. The default was chosen on the scheduling benchmark
    (``python -m bench.scheduling``): the largest slack whose P99 JCT stays
    within 1.3x FCFS's at load 1.0.
    """

    name = "isrtf"

    #: Weight of a new gap in the running mean of the step time.
    STEP_EMA = 0.05

    def __init__(
        self,
        predictor: LengthPredictor | str | None = None,
        k: int = 32,
        preempt_ratio: float | None = None,
        slack: float | None = DEFAULT_SLACK,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise InvalidArgument(f"isrtf k must be a positive int, got {k!r}")
        if preempt_ratio is not None and not 0 < preempt_ratio <= 1:
            raise InvalidArgument(f"preempt_ratio must be in (0, 1], got {preempt_ratio}")
        if slack is not None and (
            isinstance(slack, bool) or not isinstance(slack, (int, float)) or not slack > 0
        ):
            raise InvalidArgument(f"isrtf slack must be a number > 0 or None, got {slack!r}")
        if isinstance(predictor, str):
            predictor = make_predictor(predictor)
        self.predictor = predictor if predictor is not None else OraclePredictor()
        self.k = k
        self.preempt_ratio = preempt_ratio
        self.slack = None if slack is None else float(slack)
        #: Running mean of the engine's step time (s), None until a gap has been seen.
        self.step_time: float | None = None
        self._t0: float | None = None  # the first arrival seen: ages are counted from it

    def _predict(self, request: Request) -> None:
        request.predicted_remaining = max(float(self.predictor.predict_remaining(request)), 0.0)
        request.predicted_at = request.num_output_tokens

    def remaining(self, request: Request) -> float:
        """The last prediction minus the tokens generated since."""
        return request.predicted_remaining - (request.num_output_tokens - request.predicted_at)

    def deadline(self, request: Request) -> float:
        """``arrival_step + slack * sqrt(remaining)``, the first element of :meth:`key`.

        The remaining tokens alone while the guard is off, and before the
        first step time is measured (the order is then the same).
        """
        rem = max(self.remaining(request), 0.0)
        if self.slack is None or self.step_time is None or self._t0 is None:
            return rem
        arrival_step = (request.arrival_time - self._t0) / self.step_time
        return arrival_step + self.slack * math.sqrt(rem)

    def key(self, request: Request) -> tuple[float, ...]:
        """The virtual deadline (guard on) or the predicted remaining tokens, then arrival."""
        return (self.deadline(request), request.arrival_time, request.seq_no)

    @property
    def can_preempt(self) -> bool:
        """Only with ``preempt_ratio``."""
        return self.preempt_ratio is not None

    def preempts(self, waiting: Request, running: Request) -> bool:
        """Only with ``preempt_ratio``: a much shorter job displaces a long one."""
        if self.preempt_ratio is None:
            return False
        return self.remaining(waiting) < self.preempt_ratio * self.remaining(running)

    def on_arrival(self, request: Request, active: Iterable[Request]) -> None:
        """First prediction; the first arrival is step 0 of the deadlines."""
        if self._t0 is None:
            self._t0 = request.arrival_time
        self._predict(request)

    def observe_step(self, gap: float) -> None:
        """Fold one gap between consecutive tokens of a request into :attr:`step_time`."""
        if not gap > 0:
            return
        if self.step_time is None:
            self.step_time = gap
        elif gap <= 10 * self.step_time:
            self.step_time += self.STEP_EMA * (gap - self.step_time)

    def on_served(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        """Measure the step time; re-predict once ``k`` tokens have come since the last one."""
        if not output_tokens:
            return
        times = request.metrics.token_times
        if len(times) >= 2:
            self.observe_step(times[-1] - times[-2])
        if request.num_output_tokens - request.predicted_at >= self.k:
            self._predict(request)


class Fair(Policy):
    """Virtual token counters per tenant (VTC), under run-time priorities (FastSwitch)."""

    name = "fair"

    def __init__(self, w_prompt: float = 1.0, w_output: float = 2.0) -> None:
        if w_prompt < 0 or w_output < 0 or w_prompt + w_output == 0:
            raise InvalidArgument("VTC weights must be >= 0 and not both 0")
        self.w_prompt = w_prompt
        self.w_output = w_output
        self.counters: dict[Hashable, float] = {}

    def key(self, request: Request) -> tuple[float, ...]:
        """Higher priority first, then the tenant with least service, then arrival."""
        c = self.counters.get(request.tenant, 0.0)
        return (-request.priority, c, request.arrival_time, request.seq_no)

    @property
    def can_preempt(self) -> bool:
        """Priorities preempt."""
        return True

    def preempts(self, waiting: Request, running: Request) -> bool:
        """A strictly higher priority preempts."""
        return waiting.priority > running.priority

    def on_arrival(self, request: Request, active: Iterable[Request]) -> None:
        """Lift a tenant returning from idle to the least counter among active tenants."""
        tenants = {r.tenant for r in active if r is not request}
        if request.tenant in tenants:
            return
        live = [self.counters.get(t, 0.0) for t in tenants]
        own = self.counters.get(request.tenant, 0.0)
        self.counters[request.tenant] = max(own, min(live)) if live else own

    def on_served(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        """Charge the tenant for the service."""
        c = self.counters.get(request.tenant, 0.0)
        charge = self.w_prompt * prompt_tokens + self.w_output * output_tokens
        self.counters[request.tenant] = c + charge


POLICIES: dict[str, type[Policy]] = {"fcfs": FCFS, "isrtf": ISRTF, "fair": Fair}


def make_policy(name: str | Policy, **options: Any) -> Policy:
    """A policy by name (``fcfs``, ``isrtf``, ``fair``) with its options, or a given instance."""
    if isinstance(name, Policy):
        return name
    if name not in POLICIES:
        raise InvalidArgument(f"unknown scheduling policy {name!r}; known: {', '.join(POLICIES)}")
    try:
        return POLICIES[name](**options)
    except TypeError as e:
        raise InvalidArgument(f"bad options for policy {name!r}: {e}") from None


__all__ = ["DEFAULT_SLACK", "FCFS", "ISRTF", "POLICIES", "Fair", "Policy", "make_policy"]
