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

from kvmem.engine.clock import SimClock
from kvmem.engine.executor import Executor
from kvmem.engine.request import Request, SamplingParams
from kvmem.engine.scheduler import ScheduledChunk, StepKV
from kvmem.errors import InvalidArgument
from kvmem.spec import KVSpec

if TYPE_CHECKING:
    from kvmem.engine.engine import Engine


@dataclass(frozen=True)
class CostModel:
    """Seconds per step: weights, prefill compute, and the KV every decode row reads.

    ::

        step = fixed + prefill * prefill_tokens + decode * decode_rows
                     + decode_kv * (context tokens of every decode row, summed)

    Decode is memory-bound: each decode row's attention reads every cached
    token of its sequence, so a batch of long contexts costs more than one
    of short contexts with the same number of rows. The defaults model a
    Llama-2-7B in fp16 on one A100-80GB:

    - ``fixed`` 7 ms: every step reads all 13.5 GB of weights once at about
      2 TB/s, whatever the batch (plus launch and scheduling overheads);
    - ``prefill`` 0.15 ms per token: 2 x 6.7 GFLOP per token at about 90
      TFLOP/s achieved (compute-bound; a chunk's attention over earlier
      context adds under 5% at these lengths and is left out);
    - ``decode`` 0: a decode row's weight reads are in ``fixed``, its
      matmul FLOPs are negligible beside them;
    - ``decode_kv`` 0.25 us per context token: 0.5 MB of KV per token
      (32 layers x 32 heads x 128 x 2 x 2 bytes) read at 2 TB/s.
    """

    fixed: float = 7e-3
    prefill: float = 0.15e-3
    decode: float = 0.0
    decode_kv: float = 0.25e-6

    def __post_init__(self) -> None:
        for name in ("fixed", "prefill", "decode", "decode_kv"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise InvalidArgument(f"cost {name} must be a number >= 0, got {v!r}")

    def step_time(self, prefill_tokens: int, decode_rows: int, decode_context: int = 0) -> float:
        """Duration of one step; ``decode_context`` is the KV tokens the decode rows read."""
        return (
            self.fixed
            + self.prefill * prefill_tokens
            + self.decode * decode_rows
            + self.decode_kv * decode_context
        )


class SimulatedExecutor(Executor):
    """Advances ``clock`` by the cost model; returns constant logits (and reads no KV)."""

    uses_kv = False

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

    def execute(self, chunks: Sequence[ScheduledChunk], kv: StepKV | None) -> torch.Tensor:
        """Charge the step's cost to the clock (a decode row reads its whole context)."""
        rows = [c for c in chunks if c.is_decode]
        prefill = sum(c.num_tokens for c in chunks) - len(rows)
        context = sum(c.start + c.num_tokens for c in rows)
        dt = self.cost.step_time(prefill, len(rows), context)
        self.clock.advance(dt)
        self.busy_time += dt
        return torch.zeros(sum(c.num_logit_rows for c in chunks), 1)


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
