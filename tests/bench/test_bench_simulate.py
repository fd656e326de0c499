"""The scheduling benchmark's cost model: a decode row pays for every KV token it reads."""

from __future__ import annotations

import pytest
import torch

from kvmem import InvalidArgument, KVSpec
from kvmem.engine import SimClock, SimulatedExecutor
from kvmem.engine.request import Request, SamplingParams
from kvmem.engine.scheduler import ScheduledChunk
from kvmem.engine.simulate import CostModel


def decode_chunk(context: int) -> ScheduledChunk:
    r = Request(f"r{context}", [1] * (context - 1), SamplingParams())
    r.token_ids.append(7)  # one generated token: its KV is this step's write
    chunk = ScheduledChunk(r, context - 1, 1)
    assert chunk.is_decode
    return chunk


def test_decode_rows_pay_for_their_context_and_prefill_per_token():
    cost = CostModel(fixed=1e-3, prefill=1e-5, decode=2e-4, decode_kv=1e-6)
    clock = SimClock()
    ex = SimulatedExecutor(KVSpec(1, 1, 8, torch.float16), clock, cost)
    prompt = Request("p", [1] * 50, SamplingParams())
    chunks = [decode_chunk(100), decode_chunk(3000), ScheduledChunk(prompt, 0, 50)]
    ex.execute(chunks, None)
    assert clock.now() == pytest.approx(1e-3 + 50 * 1e-5 + 2 * 2e-4 + 3100 * 1e-6)
    before = clock.now()
    ex.execute([decode_chunk(100)], None)
    short = clock.now() - before
    before = clock.now()
    ex.execute([decode_chunk(8000)], None)
    assert clock.now() - before - short == pytest.approx(7900 * 1e-6)


@pytest.mark.parametrize("bad", [{"decode_kv": -1e-6}, {"fixed": float("nan")}, {"decode": True}])
def test_costs_are_non_negative_numbers(bad):
    with pytest.raises(InvalidArgument):
        CostModel(**bad)
