"""A simulated fleet: N instances' allocators behind the dispatcher, replaying a trace.

Time advances in decode steps of ``step_s`` simulated seconds; every
instance steps at once. The KV bookkeeping is real (one kvmem allocator per
instance, a small KV spec); the model is not run. Per step and instance:

1. admit queued requests in arrival order while ``reserve(prompt + 1)``
   fits (the prompt is prefilled in that step; its first token ends the
   step: TTFT = end of step - arrival);
2. every other running request decodes one token (``reserve(1)``); one that
   cannot is preempted by recompute (the latest admitted running request is
   freed and queued again at the front; counted);
3. with migration on, :func:`~kvmem.cluster.policy.plan_migrations` pairs
   loaded and free instances and the source's longest-running request moves,
   KV and all, with :func:`kvmem.transfer.copy_sequence` (live migration's
   downtime is a few milliseconds, below one step, so the move is instant
   here; its cost is measured by ``bench/migration.py``).

*Fragmentation* (Llumnix's): free KV of the fleet that cannot serve a
queued request, as a share of fleet capacity: at a step where some
instance's first queued request does not fit where it is queued, the free
tokens of the other instances. The figure reported is its peak.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kvmem.allocator import KVAllocator, create_allocator
from kvmem.cluster.policy import Load, pick_instance, plan_migrations
from kvmem.errors import OutOfKVMemory
from kvmem.spec import KVSpec
from kvmem.transfer import copy_sequence

_SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float16, kv_format="fp16")


@dataclass
class _Req:
    rid: int
    arrival: float
    prompt: int
    output: int
    tokens: list[int] = field(default_factory=list)
    generated: int = 0
    first_token: float | None = None


@dataclass
class FleetResult:
    """Figures of one fleet run."""

    ttft_s: list[float]
    preemptions: int
    migrations: int
    peak_fragmentation: float
    steps: int

    def p99_ttft(self) -> float:
        """P99 time to first token (s)."""
        return float(np.percentile(self.ttft_s, 99))


def _token(r: _Req) -> int:
    """Every token of a request is its own id: requests share no prefix."""
    return r.rid + 1


class _Instance:
    def __init__(self, capacity: int, page_size: int) -> None:
        self.kv: KVAllocator = create_allocator(
            "paged", _SPEC, num_tokens=capacity, page_size=page_size
        )
        self.capacity = self.kv.stats().capacity_tokens
        self.queue: deque[_Req] = deque()
        self.running: list[_Req] = []

    def load(self, migrating: bool = False) -> Load:
        demand = sum(r.prompt + r.generated + 1 for r in self.queue)
        used = self.kv.stats().used_tokens
        return Load(self.capacity, used, demand, len(self.running), migrating=migrating)


def simulate_fleet(
    trace: Sequence[tuple[float, int, int]],
    instances: int = 4,
    capacity: int = 8192,
    page_size: int = 16,
    step_s: float = 0.02,
    migrate: bool = True,
    max_steps: int = 1_000_000,
) -> FleetResult:
    """Replay ``trace`` (arrival s, prompt tokens, output tokens) on the fleet."""
    fleet = [_Instance(capacity, page_size) for _ in range(instances)]
    pending = deque(
        _Req(i, a, max(1, min(p, capacity // 2)), max(1, min(o, capacity // 4)))
        for i, (a, p, o) in enumerate(sorted(trace))
    )
    ttft: list[float] = []
    preemptions = migrations = 0
    peak_frag = 0.0
    now = 0.0
    done = 0
    steps = 0
    try:
        while done < len(trace) and steps < max_steps:
            while pending and pending[0].arrival <= now:
                r = pending.popleft()
                fleet[pick_instance([f.load() for f in fleet])].queue.append(r)
            for inst in fleet:
                preemptions += _step(inst, now + step_s, ttft)
            for inst in fleet:
                for r in [r for r in inst.running if r.generated >= r.output]:
                    inst.running.remove(r)
                    inst.kv.free(r.rid)
                    done += 1
            peak_frag = max(peak_frag, _fragmentation(fleet))
            if migrate:
                migrations += _migrate(fleet)
            now += step_s
            steps += 1
    finally:
        for inst in fleet:
            inst.kv.close()
    return FleetResult(ttft, preemptions, migrations, peak_frag, steps)


def _step(inst: _Instance, end: float, ttft: list[float]) -> int:
    preempted = 0
    for r in list(inst.running):
        if r not in inst.running:
            continue
        while True:
            try:
                inst.kv.reserve(r.rid, 1)
                break
            except OutOfKVMemory:
                victim = inst.running[-1]
                inst.running.remove(victim)
                inst.kv.free(victim.rid)
                inst.queue.appendleft(victim)
                preempted += 1
                if victim is r:
                    break
        if r in inst.running:
            inst.kv.append(r.rid, [_token(r)])
            inst.kv.commit(r.rid, 1)
            r.generated += 1
    while inst.queue:
        r = inst.queue[0]
        n = r.prompt + r.generated
        hit = inst.kv.add(r.rid, [_token(r)] * n)
        try:
            inst.kv.reserve(r.rid, n - hit + 1)
        except OutOfKVMemory:
            inst.kv.free(r.rid)
            break
        if n > hit:
            inst.kv.commit(r.rid, n - hit)
        inst.kv.append(r.rid, [_token(r)])
        inst.queue.popleft()
        inst.running.append(r)
        if r.first_token is None:
            r.first_token = end
            ttft.append(end - r.arrival)
            r.generated = max(r.generated, 1)
    return preempted


def _fragmentation(fleet: list[_Instance]) -> float:
    total = sum(f.capacity for f in fleet)
    worst = 0
    for i, inst in enumerate(fleet):
        if inst.queue:
            head = inst.queue[0].prompt + inst.queue[0].generated + 1
            if inst.kv.stats().free_tokens < head:
                worst = max(
                    worst, sum(f.kv.stats().free_tokens for j, f in enumerate(fleet) if j != i)
                )
    return worst / total


def _migrate(fleet: list[_Instance]) -> int:
    moved = 0
    for s, d in plan_migrations([f.load() for f in fleet]):
        src, dst = fleet[s], fleet[d]
        r = max(src.running, key=lambda q: q.generated)
        n = src.kv.seq_info(r.rid).num_tokens
        try:
            copy_sequence(src.kv, r.rid, [_token(r)] * n, dst.kv)
        except OutOfKVMemory:
            continue
        src.running.remove(r)
        src.kv.free(r.rid)
        dst.running.append(r)
        moved += 1
    return moved


__all__ = ["FleetResult", "simulate_fleet"]
