"""Allocator cost per decode step, and prefix-cache hit rate, for the paged backend.

Scenario 1 (decode-heavy): 256 running sequences with prompt and output
lengths from the Azure conversation trace. Each step every running sequence
appends its sampled token, reserves one slot, the whole batch gets one
layout, and every sequence commits; finished sequences are freed and new
ones admitted (their prompt joins the next step's batch as a prefill). The
figure is wall time of a step (those allocator calls and the loop's own
minimal bookkeeping; not the making of new prompts' token lists, which a
tokenizer does) per sequence-step: the median over steps (robust to
other processes on a shared machine), with mean and P90.

``us_per_seq_step`` makes each step with the batched calls, one call per kind
for the whole batch (``append_many``, ``reserve_many``, ``layout``,
``commit_many``); ``us_per_seq_step_single`` makes the same steps with the
single calls, one per sequence (``append``, ``reserve``, ``commit``). The two
run side by side on two allocators fed the same requests, their steps
interleaved (alternating which goes first), so machine load hits both alike.

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


class DecodeRun:
    """One paged allocator through scenario 1, stepped with batched or single calls."""

    def __init__(self, prompts: list[tuple[np.ndarray, int]], batch: int, batched: bool) -> None:
        self.alloc = create_allocator(
            "paged", LLAMA3_8B, num_tokens=4 * 1024 * 1024, page_size=PAGE, device="meta"
        )
        self.batched = batched
        self._prompts = iter(prompts)
        # in admission order: seq -> its batch entry (seq, 1), made once as an engine keeps it
        self.decoding: dict[int, tuple[int, int]] = {}
        self.new: list[tuple[int, int]] = []  # admitted since the last step: (seq, prompt length)
        self._ends: dict[int, list[int]] = {}  # step -> sequences that finish in it
        self.step_no = -1
        self._next_id = 0
        for _ in range(batch):
            self._admit()

    def _next_prompt(self) -> tuple[list[int], int]:
        arr, out = next(self._prompts)
        return arr.tolist(), out

    def _admit(self, prompt: tuple[list[int], int] | None = None) -> None:
        toks, out = self._next_prompt() if prompt is None else prompt
        sid = self._next_id
        self._next_id += 1
        cached = self.alloc.add(sid, toks)
        self.new.append((sid, len(toks) - cached))
        self._ends.setdefault(self.step_no + max(out, 1), []).append(sid)

    def step(self) -> float:
        """One step; µs of wall time per sequence in it."""
        alloc = self.alloc
        # the prompts admitted in this step, made lists (as a tokenizer hands them over) before
        # the clock starts: that is not the allocator's work
        ready = [self._next_prompt() for _ in self._ends.get(self.step_no + 1, ())]
        t0 = time.perf_counter()
        self.step_no += 1
        new, self.new = self.new, []
        dec = list(self.decoding)
        if self.batched:
            new_ids, new_counts = [sid for sid, _ in new], [n for _, n in new]
            if new:
                alloc.reserve_many(new_ids, new_counts)
            if dec:
                alloc.append_many(dec, [[1]] * len(dec))
                alloc.reserve_many(dec, 1)
            ids, counts = dec + new_ids, [1] * len(dec) + new_counts
            work = [*self.decoding.values(), *new]
            alloc.layout(work)
            alloc.commit_many(ids, counts)
        else:
            for sid, n in new:
                alloc.reserve(sid, n)
            for sid in dec:
                alloc.append(sid, [1])
                alloc.reserve(sid, 1)
            work = [*self.decoding.values(), *new]
            alloc.layout(work)
            for sid, n in work:
                alloc.commit(sid, n)
        for sid, _ in new:
            self.decoding[sid] = (sid, 1)
        for sid in self._ends.pop(self.step_no, ()):
            del self.decoding[sid]
            alloc.free(sid)
            self._admit(ready.pop(0))
        return 1e6 * (time.perf_counter() - t0) / len(work)


def side_by_side_steps(runs: dict[str, DecodeRun], steps: int, desc: str) -> dict[str, np.ndarray]:
    """Step every run ``steps`` times, interleaved, the order alternating; µs per seq-step."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for i in progress(range(steps), total=steps, desc=desc):
        for k in names if i % 2 else names[::-1]:
            times[k].append(runs[k].step())
    for r in runs.values():
        r.alloc.check_integrity()
    return {k: np.array(v) for k, v in times.items()}


def trace_prompts(n: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """``n`` random prompts (token arrays) with (prompt, output) lengths from the trace.

    :class:`DecodeRun` makes each a list when it admits it, as a tokenizer hands
    a new request's tokens over: millions of token ints made up front would sit
    cold in memory, which no serving engine's new prompt does.
    """
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 32000, p), o) for p, o in trace_lengths(n, seed)]


def decode_heavy(steps: int, batch: int, seed: int) -> dict[str, float]:
    """Per-sequence-step cost of append + reserve + layout + commit, with churn: batched calls
    against single calls, side by side."""
    prompts = trace_prompts(steps * 4 + batch, seed)
    runs = {
        "batched": DecodeRun(prompts, batch, batched=True),
        "single": DecodeRun(prompts, batch, batched=False),
    }
    t = side_by_side_steps(runs, steps, "decode steps")
    st = runs["batched"].alloc.stats()
    med = {k: float(np.median(v)) for k, v in t.items()}
    return {
        "us_per_seq_step": med["batched"],
        "us_per_seq_step_mean": float(t["batched"].mean()),
        "us_per_seq_step_p90": float(np.percentile(t["batched"], 90)),
        "us_per_seq_step_single": med["single"],
        "us_per_seq_step_single_mean": float(t["single"].mean()),
        "us_per_seq_step_single_p90": float(np.percentile(t["single"], 90)),
        "batched_speedup": med["single"] / med["batched"],
        "ms_per_step": med["batched"] * batch / 1e3,
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
    a.bar(
        ["single calls", "batched calls", "target"],
        [figs["us_per_seq_step_single"], figs["us_per_seq_step"], 2.0],
        color=["C1", "C0", "C7"],
    )
    a.set_ylabel("µs per sequence-step (median)")
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
