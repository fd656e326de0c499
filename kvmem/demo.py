"""A synthetic serving workload replayed through an allocator and the attention kernels.

Requests with shared system prompts arrive, are admitted while their prompt
fits, prefill in chunks, decode one token per step, and leave. Every step
writes real K/V through ``write_kv`` and runs attention over the batch's
layout, so the run exercises the whole memory path; the table printed as it
goes shows how the KV memory is used.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from kvmem import KVSpec, create_allocator
from kvmem.attention import prefill, write_kv


@dataclass
class _Req:
    rid: int
    prompt: list[int]
    output_len: int
    generated: int = 0


def _requests(n: int, rng: random.Random) -> list[_Req]:
    systems = [[rng.randrange(1000) for _ in range(rng.choice((64, 128, 192)))] for _ in range(3)]
    reqs = []
    for i in range(n):
        user = [rng.randrange(1000) for _ in range(rng.randint(8, 96))]
        reqs.append(_Req(i, rng.choice(systems) + user, rng.randint(8, 48)))
    return reqs


def run(
    backend: str = "paged",
    num_requests: int = 48,
    num_tokens: int = 4096,
    chunk: int = 256,
    seed: int = 0,
    console: Console | None = None,
) -> dict[str, float]:
    """Replay the workload; print a live table; return the final figures."""
    console = console or Console()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=32, dtype=torch.float32)
    q_heads = 4
    waiting = _requests(num_requests, rng)
    running: list[_Req] = []
    done = steps = tokens = preempted = 0
    t0 = time.perf_counter()
    table = Table(title=f"kvmem demo: {backend} backend, {num_tokens} KV slots")
    for col in ("step", "running", "waiting", "done", "KV used", "cached", "prefix hits", "tok/s"):
        table.add_column(col, justify="right")
    bar = Progress(TextColumn("requests"), BarColumn(), MofNCompleteColumn(), console=console)
    task = bar.add_task("requests", total=num_requests)
    with create_allocator(backend, spec, num_tokens=num_tokens) as alloc, Live(
        Group(table, bar), console=console, refresh_per_second=8
    ):
        while waiting or running:
            while waiting and len(running) < 32:
                r = waiting[0]
                alloc.add(r.rid, r.prompt)
                if not alloc.can_reserve({r.rid: min(chunk, len(r.prompt))}):
                    alloc.free(r.rid)
                    break
                running.append(waiting.pop(0))
            batch, budget = [], chunk
            for r in running:
                info = alloc.seq_info(r.rid)
                n = min(info.num_tokens - info.num_computed, max(budget, 1))
                if n <= 0 or not alloc.can_reserve({r.rid: n}):
                    continue
                alloc.reserve(r.rid, n)
                batch.append((r.rid, n))
                budget -= n
            if not batch:  # memory is full: preempt the newest request, recompute it later
                victim = running.pop()
                alloc.free(victim.rid)
                victim.generated = 0
                waiting.insert(0, victim)
                preempted += 1
                if not running:
                    raise RuntimeError("KV capacity too small for a single request")
                continue
            lay = alloc.layout(batch)
            n_new = lay.num_tokens
            for i in range(spec.num_layers):
                k = torch.randn(n_new, spec.num_kv_heads, spec.head_dim)
                write_kv(alloc.layer(i), lay, k, torch.randn_like(k))
                prefill(torch.randn(n_new, q_heads, spec.head_dim), alloc.layer(i), lay)
            finished = []
            for rid, n in batch:
                alloc.commit(rid, n)
                tokens += n
            for r in running:
                info = alloc.seq_info(r.rid)
                if info.num_computed == info.num_tokens:  # prompt done: sample the next token
                    if r.generated == r.output_len:
                        finished.append(r)
                    else:
                        alloc.append(r.rid, [rng.randrange(1000)])
                        r.generated += 1
            for r in finished:
                alloc.free(r.rid)
                running.remove(r)
                done += 1
                bar.update(task, completed=done)
            steps += 1
            if steps % 10 == 0 or not (waiting or running):
                st = alloc.stats()
                table.add_row(
                    str(steps), str(len(running)), str(len(waiting)), str(done),
                    f"{st.usage:.0%}", f"{st.cached_tokens / st.capacity_tokens:.0%}",
                    f"{st.prefix_hit_rate:.0%}", f"{tokens / (time.perf_counter() - t0):.0f}",
                )
        alloc.check_integrity()
        st = alloc.stats()
    console.print()
    return {"steps": steps, "requests": done, "tokens": tokens, "preempted": preempted,
            "prefix_hit_rate": st.prefix_hit_rate, "used_after": st.used_tokens}
