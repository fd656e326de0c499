"""Admission headroom is the allocation granularity, not the layout page.

For vmem the layout page is a whole row (``max_seq_len`` tokens): counting
it as headroom made every waiting request look thousands of tokens bigger
than it is, so under ``fair`` priorities running requests were preempted
for memory that was there all along.
"""

from __future__ import annotations

import torch

from kvmem import KVSpec
from kvmem.engine import Engine, SimClock, SimulatedExecutor
from kvmem.engine.simulate import CostModel, TraceRequest, replay
from kvmem.traces import synthetic_trace

#: 4 KiB of KV per token per layer: vmem's 64 KiB physical page holds 16 tokens, paged's page.
SPEC = KVSpec(2, 8, 128, torch.float16)
MAX_LEN = 2048


def fair_trace() -> list[TraceRequest]:
    """Conversation-trace lengths; two tenants, every other request at a higher priority."""
    base = synthetic_trace("azure_conv", 60, seed=3)
    return [
        TraceRequest(t, min(p, MAX_LEN // 2), min(o, 300), tenant=f"t{i % 2}", priority=i % 2)
        for i, (t, p, o) in enumerate(base)
    ]


def replay_fair(backend: str, **options: object) -> Engine:
    clock = SimClock()
    eng = Engine(
        executor=SimulatedExecutor(SPEC, clock, CostModel(0.01, 1e-4, 1e-3), MAX_LEN),
        clock=clock,
        backend=backend,
        backend_options={"device": "meta", **options},
        detokenize=False,
        policy="fair",
        num_kv_tokens=32768,
        max_num_seqs=64,
        max_num_batched_tokens=256,
    )
    trace = fair_trace()
    reqs = replay(eng, clock, trace)
    assert [r.num_output_tokens for r in reqs] == [t.output_len for t in trace]
    assert eng.allocator.stats().used_tokens == 0
    return eng


def test_vmem_under_fair_preempts_no_more_than_paged():
    paged = replay_fair("paged", page_size=16)
    vmem = replay_fair("vmem", max_seq_len=32768)
    assert vmem.allocator.page_size == 32768 and vmem.allocator.granularity == 16
    assert paged.allocator.granularity == 16
    assert vmem.metrics().num_preemptions <= paged.metrics().num_preemptions
