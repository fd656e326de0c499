"""Allocator cost per decode step, and prefix-cache hit rate, for the paged backend.

Scenario 1 (decode-heavy): 256 running sequences with prompt and output
lengths from the Azure conversation trace. Each step every running sequence
appends its sampled token, reserves one slot, the whole batch gets one
layout, and every sequence commits; finished sequences are freed and new
ones admitted (their prompt joins the step's batch as a prefill). The figure
is wall time of those allocator calls per sequence-step: the median over
steps (robust to other processes on a shared machine), with mean and P90.

Scenario 2 (prefix cache): requests share a few system prompts (Zipf-like
popularity) and half of them are follow-up turns of an earlier conversation
(previous prompt + its answer + a new message). Reports the measured hit rate
and the hit rate of an unbounded cache (the most any prefix cache can get).

Run: ``python -m bench.alloc [--quick]``.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np

from bench.common import console, print_table, progress, save_results
from kvmem import KVSpec, create_allocator
from kvmem.traces import sample_lengths

LLAMA3_8B = KVSpec(32, 8, 128)
PAGE = 16


def trace_lengths(n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` (prompt, output) token lengths from the Azure conversation trace (or its twin)."""
    return sample_lengths("azure_conv", n, seed)[0]


def decode_heavy(steps: int, batch: int, seed: int) -> dict[str, float]:
    """Per-sequence-step cost of append + reserve + layout + commit, with churn."""
    rng = np.random.default_rng(seed)
    prompts = iter(
        [(rng.integers(0, 32000, p).tolist(), o) for p, o in trace_lengths(steps * 4 + batch, seed)]
    )
    alloc = create_allocator(
        "paged", LLAMA3_8B, num_tokens=4 * 1024 * 1024, page_size=PAGE, device="meta"
    )
    running: dict[int, int] = {}  # seq -> output tokens still to generate
    prefill: dict[int, int] = {}
    next_id = 0

    def admit() -> None:
        nonlocal next_id
        toks, o = next(prompts)
        alloc.add(next_id, toks)
        prefill[next_id] = len(toks)
        running[next_id] = o
        next_id += 1

    for _ in range(batch):
        admit()
    seq_steps = 0
    per_step: list[float] = []  # µs per sequence in each step
    for _ in progress(range(steps), total=steps, desc="decode steps"):
        t0 = time.perf_counter()
        work = []
        for sid in running:
            n = prefill.pop(sid, 0)
            if n:
                alloc.reserve(sid, n)
                work.append((sid, n))
            else:
                alloc.append(sid, [1])
                alloc.reserve(sid, 1)
                work.append((sid, 1))
        alloc.layout(work)
        for sid, n in work:
            alloc.commit(sid, n)
        done = [sid for sid in running if running[sid] <= 1]
        for sid in running:
            running[sid] -= 1
        for sid in done:
            del running[sid]
            alloc.free(sid)
            admit()
        per_step.append(1e6 * (time.perf_counter() - t0) / len(work))
        seq_steps += len(work)
    alloc.check_integrity()
    st = alloc.stats()
    times = np.array(per_step)
    return {
        "us_per_seq_step": float(np.median(times)),
        "us_per_seq_step_mean": float(times.mean()),
        "us_per_seq_step_p90": float(np.percentile(times, 90)),
        "ms_per_step": float(np.median(times)) * batch / 1e3,
        "batch": batch,
        "steps": steps,
        "kv_usage_end": st.usage,
    }


def prefix_workload(n_requests: int, seed: int) -> dict[str, float]:
    """Hit rate of the prefix cache against an unbounded cache on the same requests."""
    rng = random.Random(seed)
    systems = [[rng.randrange(32000) for _ in range(rng.randint(256, 2048))] for _ in range(16)]
    weights = [1 / (i + 1) for i in range(len(systems))]
    lengths = trace_lengths(n_requests, seed + 1)
    spec = LLAMA3_8B
    alloc = create_allocator("paged", spec, num_tokens=512 * 1024, page_size=PAGE, device="meta")
    seen: set[int] = set()
    ideal_hits = total = 0
    history: list[list[int]] = []
    live: list[int] = []
    for i in progress(range(n_requests), total=n_requests, desc="prefix requests"):
        p, o = lengths[i]
        if history and rng.random() < 0.5:
            base = rng.choice(history)  # next turn of an earlier conversation
        else:
            base = rng.choices(systems, weights)[0]
        prompt = base + [rng.randrange(32000) for _ in range(min(p, 1024))]
        # unbounded cache: count leading full pages seen before (never the last token)
        h, hits = 0, 0
        for j in range((len(prompt) - 1) // PAGE):
            h = hash((h, tuple(prompt[j * PAGE : (j + 1) * PAGE])))
            if h not in seen:
                break
            hits += PAGE
        ideal_hits += hits
        total += len(prompt)
        cached = alloc.add(i, prompt)
        alloc.reserve(i, len(prompt) - cached + o)
        alloc.commit(i, len(prompt) - cached)
        out = [rng.randrange(32000) for _ in range(o)]
        alloc.append(i, out)
        alloc.commit(i, o)
        full = prompt + out
        h = 0
        for j in range(len(full) // PAGE):
            h = hash((h, tuple(full[j * PAGE : (j + 1) * PAGE])))
            seen.add(h)
        history.append(full)
        live.append(i)
        if len(live) > 32:
            alloc.free(live.pop(0))
    alloc.check_integrity()
    st = alloc.stats()
    return {
        "prefix_hit_rate": st.prefix_hit_rate,
        "prefix_hit_rate_unbounded": ideal_hits / total,
        "prefix_requests": n_requests,
    }


def plot(figs: dict[str, float], path: Path) -> None:
    """Bar chart of the two scenarios' headline figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(["measured", "target"], [figs["us_per_seq_step"], 5.0], color=["C0", "C7"])
    a.set_ylabel("µs per sequence-step")
    a.set_title(f"paged allocator, batch {figs['batch']}")
    b.bar(
        ["kvmem paged", "unbounded cache"],
        [figs["prefix_hit_rate"], figs["prefix_hit_rate_unbounded"]],
        color=["C0", "C7"],
    )
    b.set_ylim(0, 1)
    b.set_title("prefix-cache hit rate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (under a minute on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    steps, reqs = (300, 600) if args.quick else (3000, 5000)
    figs = {**decode_heavy(steps, 256, args.seed), **prefix_workload(reqs, args.seed)}
    print_table(
        "bench/alloc.py: paged backend", ["figure", "value"], [[k, v] for k, v in figs.items()]
    )
    path = save_results("alloc", figs, quick=args.quick)
    plot(figs, path.with_suffix(".png"))
    console.print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
