"""``kvmem demo`` on the engine: a random-weight model generating for a stream of requests.

Requests share a few system prompts (so the prefix cache has work to do),
arrive a few per step, and generate 8 to 48 tokens each with the ``tiny``
preset; the live display shows the queues and the KV memory every few
steps, the requests finished last, and a progress bar.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from kvmem.engine.engine import Engine
from kvmem.engine.request import Request, SamplingParams
from kvmem.engine.weights import random_model

_SYSTEMS = (
    "You are a helpful assistant. Answer briefly and precisely. ",
    "You are a KV-cache expert. Explain paging, swapping and prefix reuse. ",
    "System: the user is a serving engineer; reply in one short paragraph. ",
)
_TOPICS = ("paged attention", "prefix caching", "chunked prefill", "preemption", "fp8 KV")


def _prompt(rng: random.Random) -> str:
    topic = rng.choice(_TOPICS)
    extra = " ".join(
        rng.choice(("why", "how", "when", "cost", "memory")) for _ in range(rng.randint(1, 12))
    )
    return f"{rng.choice(_SYSTEMS)}User: tell me about {topic}, {extra}?"


def _kv_table(eng: Engine, backend: str, kv_format: str) -> Table:
    m = eng.metrics()
    cap = max(m.kv_capacity_tokens, 1)
    title = (
        f"kvmem engine demo: {backend} backend, {cap} KV slots ({kv_format}), {eng.config.policy}"
    )
    t = Table(title=title)
    for col in (
        "step",
        "running",
        "waiting",
        "done",
        "KV used",
        "cached",
        "prefix hits",
        "preempted",
        "tok/s",
    ):
        t.add_column(col, justify="right")
    t.add_row(
        str(m.num_steps),
        str(m.num_running),
        str(m.num_waiting + m.num_swapped),
        str(m.num_finished),
        f"{m.kv_usage:.0%}",
        f"{m.kv_cached_tokens / cap:.0%}",
        f"{m.prefix_cache_hit_rate:.0%}",
        str(m.num_preemptions),
        f"{m.tokens_per_s:.0f}",
    )
    return t


def _recent_table(done: list[Request]) -> Table:
    t = Table(title="finished last")
    for col in ("request", "prompt", "cached", "output", "TTFT ms", "preempted", "finish"):
        t.add_column(col, justify="right")
    for r in done[-5:]:
        ttft = r.metrics.ttft
        t.add_row(
            r.request_id,
            str(r.num_prompt_tokens),
            str(r.metrics.num_cached_tokens),
            str(r.num_output_tokens),
            f"{ttft * 1e3:.0f}" if ttft is not None else "-",
            str(r.metrics.num_preemptions),
            str(r.finish_reason),
        )
    return t


def run(
    backend: str = "paged",
    num_requests: int = 48,
    num_tokens: int = 4096,
    seed: int = 0,
    console: Console | None = None,
    *,
    kv_format: str = "auto",
    policy: str = "fcfs",
    chunk: int = 64,
    preset: str = "tiny",
    backend_options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Serve ``num_requests`` generated requests on a random ``preset`` model; return the figures.

    Keys: ``requests`` served, ``tokens`` (prompt KV computed + generated),
    ``steps``, ``preempted``, ``prefix_hit_rate``, ``used_after`` (KV slots
    still held at the end: 0 unless something leaked), ``tokens_per_s``.
    """
    console = console or Console()
    rng = random.Random(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small to split across cores
    try:
        eng = Engine(
            random_model(preset, seed=seed),
            backend=backend,
            backend_options=backend_options or {},
            kv_format=kv_format,
            num_kv_tokens=num_tokens,
            policy=policy,
            max_num_batched_tokens=chunk,
            seed=seed,
        )
        done: list[Request] = []
        bar = Progress(TextColumn("requests"), BarColumn(), MofNCompleteColumn(), console=console)
        task = bar.add_task("requests", total=num_requests)

        def finished(o: Any) -> None:
            if o.finished:
                r = eng.request(o.request_id)
                if r is not None:
                    done.append(r)
                bar.update(task, completed=len(done))

        submitted = 0
        t0 = time.perf_counter()
        with Live(console=console, refresh_per_second=8) as live:
            while submitted < num_requests or eng.has_unfinished():
                for _ in range(rng.randint(0, 3)):
                    if submitted < num_requests:
                        params = SamplingParams(
                            max_tokens=rng.randint(8, 48),
                            temperature=rng.choice((0.0, 0.8)),
                            top_p=0.95,
                            seed=seed + submitted,
                        )
                        eng.add_request(_prompt(rng), params, on_output=finished)
                        submitted += 1
                eng.step()
                if eng.num_steps % 4 == 0 or not eng.has_unfinished():
                    live.update(Group(_kv_table(eng, backend, kv_format), _recent_table(done), bar))
        eng.allocator.check_integrity()
        m = eng.metrics()
        elapsed = time.perf_counter() - t0
        eng.close()
    finally:
        torch.set_num_threads(threads)
    return {
        "requests": len(done),
        "tokens": m.prompt_tokens + m.generation_tokens,
        "steps": m.num_steps,
        "preempted": m.num_preemptions,
        "prefix_hit_rate": m.prefix_cache_hit_rate,
        "used_after": m.kv_used_tokens,
        "tokens_per_s": m.generation_tokens / elapsed if elapsed > 0 else 0.0,
    }


__all__ = ["run"]
