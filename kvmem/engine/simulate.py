"""Simulated execution: step times from a cost model, on a simulated clock.

The scheduling benchmark replays a trace through the real engine and
scheduler with this executor in place of the model, so that policies are
compared on identical work and the result does not depend on the load of
the machine running it. Sampling returns token 0 (requests replayed from a
trace use ``ignore_eos`` and stop at their trace length).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvmem.allocator import KVAllocator
from kvmem.engine.clock import SimClock
from kvmem.engine.executor import Executor
from kvmem.engine.request import Request, SamplingParams
from kvmem.engine.scheduler import ScheduledChunk
from kvmem.spec import KVSpec

if TYPE_CHECKING:
    from kvmem.engine.engine import Engine


@dataclass(frozen=True)
class CostModel:
    """Seconds per step: ``fixed + prefill * prefill_tokens + decode * decode_tokens``.

    The defaults model a Llama-2-7B in fp16 on one A100-80GB:

    - ``fixed`` 7 ms: every step reads all 13.5 GB of weights once at about
      2 TB/s, whatever the batch (plus launch and scheduling overheads);
    - ``prefill`` 0.15 ms per token: 2 x 6.7 GFLOP per token at about 90
      TFLOP/s achieved (compute-bound);
    - ``decode`` 0.3 ms per token: each decode row reads its own KV, 0.5 MB
      per context token, about 1,200 tokens on the Azure conversation trace,
      i.e. 0.6 GB at 2 TB/s (memory-bound).
    """

    fixed: float = 7e-3
    prefill: float = 0.15e-3
    decode: float = 0.3e-3

    def step_time(self, prefill_tokens: int, decode_tokens: int) -> float:
        """Duration of one step."""
        return self.fixed + self.prefill * prefill_tokens + self.decode * decode_tokens


class SimulatedExecutor(Executor):
    """Advances ``clock`` by the cost model; returns constant logits."""

    def __init__(
        self,
        spec: KVSpec,
        clock: SimClock,
        cost: CostModel | None = None,
        max_model_len: int = 32768,
    ) -> None:
        self.spec = spec
        self.clock = clock
        self.cost = cost or CostModel()
        self.max_model_len = max_model_len
        self.vocab_size = 1
        self.eos_token_ids = ()
        self.busy_time = 0.0

    def kv_spec(self, kv_format: str = "auto", **options: object) -> KVSpec:
        """The spec given at construction (``kv_format`` is ignored)."""
        return self.spec

    def execute(self, chunks: Sequence[ScheduledChunk], allocator: KVAllocator) -> torch.Tensor:
        """Charge the step's cost to the clock."""
        decode = sum(1 for c in chunks if c.is_decode)
        prefill = sum(c.num_tokens for c in chunks) - decode
        dt = self.cost.step_time(prefill, decode)
        self.clock.advance(dt)
        self.busy_time += dt
        return torch.zeros(sum(1 for c in chunks if c.samples), 1)


@dataclass(frozen=True)
class TraceRequest:
    """One request of a replayed trace: when it arrives and how long it is."""

    arrival: float
    prompt_len: int
    output_len: int
    tenant: str = "default"
    priority: int = 0


def replay(
    engine: Engine,
    clock: SimClock,
    trace: Sequence[TraceRequest],
    seed: int = 0,
    on_step: Callable[[], None] | None = None,
) -> list[Request]:
    """Feed ``trace`` to ``engine`` at its arrival times; step until all finish; return them.

    Prompts are random token ids (no accidental prefix sharing); outputs
    run to exactly ``output_len`` tokens (``ignore_eos``), which the
    requests also carry as ``output_len_hint`` for oracle predictors. When
    the engine is idle the clock jumps to the next arrival.
    """
    rng = np.random.default_rng(seed)
    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival)
    ids: list[str] = []
    i = 0
    while i < len(order) or engine.has_unfinished():
        while i < len(order) and trace[order[i]].arrival <= clock.now():
            t = trace[order[i]]
            ids.append(
                engine.add_request(
                    rng.integers(0, 32000, t.prompt_len).tolist(),
                    SamplingParams(max_tokens=t.output_len, ignore_eos=True),
                    tenant=t.tenant,
                    priority=t.priority,
                    arrival_time=t.arrival,
                    output_len_hint=t.output_len,
                )
            )
            i += 1
        if not engine.has_unfinished():
            clock.advance_to(trace[order[i]].arrival)
            continue
        engine.step()
        if on_step is not None:
            on_step()
    done = {r.request_id: r for r in engine.finished}
    return [done[x] for x in ids]


__all__ = ["CostModel", "SimulatedExecutor", "TraceRequest", "replay"]
