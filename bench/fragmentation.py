"""KV fragmentation: static reservation (2048, 8192), paged (1, 16, 256), vmem (2 MiB, 64 KiB).

Requests from the Azure LLM conversation trace (``../shared/traces``; else
the synthetic generator with the same length statistics) are replayed
through real kvmem allocators side by side, all on ``device="meta"``
(bookkeeping only, nothing allocated), with a Llama-3-8B-like KV spec
(32 layers, 8 KV heads, head dim 128, fp16: 128 KiB per token).

Scenario 1, fragmentation. Every request is admitted when it arrives (memory
is not the limit here), prefilled in one step, then decodes one token per
step (``--step-ms`` of trace time per step) and is freed when done. Each
step every allocator gets the same calls: ``add + reserve(prompt) +
commit`` on admission, ``append + reserve(1) + commit`` per decode. The
static baselines reserve the maximum length a user would configure, 2048
or 8192 slots, per request up front (the pre-vLLM way; a paged allocator
with 16-token pages holding a full-length reservation). With 2048, as a
server with ``max_model_len=2048`` would, prompts longer than 2047 tokens
are rejected (``static2048_rejected_requests``) and outputs are cut at
2048 tokens in all; every other allocator serves the trace up to 8192
tokens. Sampled along the replay, the physical KV memory each allocator
holds for sequences divides into:

- used: slots holding KV of real tokens (``*_used_frac``),
- reserved: slots the request will fill before it ends (``*_reserved_frac``),
- never used: slots past the request's final length (``*_never_frac``),

as fractions of the total summed over samples. vmem maps physical memory
on demand and, with deferred reclamation, keeps a finished request's pages
mapped under its slot for the next request; those pages are held by no
sequence. Their share of all mapped memory is ``*_idle_mapped_frac``, and
``*_used_of_mapped_frac`` is the share of mapped memory holding real
tokens: the memory vmem takes from the device, not only what sequences
hold. The paged pools are allocated whole up front, so for them the
equivalent is the pool's size, set here to the peak need plus 25%.
2 MiB is the page the stock CUDA driver maps (its VMM granularity); 64 KiB
pages need a driver that gives smaller ones (vAttention's modified driver)
and are shown beside it.

Scenario 2, largest batch in a fixed budget (``--budget-gib`` of KV).
Every request is queued at time 0; each step the running requests decode
(the most recent is preempted by recompute when a reserve fails) and queued
ones are admitted first-come first-served while their prompt fits. The
figure is the mean batch while the queue is not empty (``*_max_batch``),
and its ratio to static reservation.

Run: ``python -m bench.fragmentation [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import console, print_table, progress, save_results
from kvmem import KVAllocator, KVSpec, OutOfKVMemory, create_allocator
from kvmem.traces import load_or_synthesize

LLAMA3_8B = KVSpec(32, 8, 128)
GIB = 1 << 30
GUARD = -1  # sequence id of the admission guard

#: name -> (backend, options); "static<L>" is paged16 reserving L slots per request.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "static2048": ("paged", {"page_size": 16, "prefix_caching": False}),
    "static8192": ("paged", {"page_size": 16, "prefix_caching": False}),
    "paged1": ("paged", {"page_size": 1, "prefix_caching": False}),
    "paged16": ("paged", {"page_size": 16, "prefix_caching": False}),
    "paged256": ("paged", {"page_size": 256, "prefix_caching": False}),
    "vmem2m": ("vmem", {"page_bytes": 2 << 20, "map_ahead": False}),
    "vmem64k": ("vmem", {"page_bytes": 64 << 10, "map_ahead": False}),
}
STATIC = ("static2048", "static8192")


def max_len_of(name: str, max_seq_len: int) -> int:
    """The longest request ``name`` serves: its reservation for a static baseline."""
    return int(name.removeprefix("static")) if name in STATIC else max_seq_len


class Tenant:
    """One allocator and the calls a serving loop makes on it."""

    def __init__(self, name: str, num_bytes: int, max_seq_len: int, max_seqs: int) -> None:
        backend, opts = CONFIGS[name]
        if backend == "vmem":
            opts = {**opts, "max_seq_len": max_seq_len, "max_seqs": max_seqs}
        self.name = name
        self.static = name in STATIC
        self.max_seq_len = max_seq_len
        self.alloc: KVAllocator = create_allocator(
            backend, LLAMA3_8B, num_bytes=num_bytes, device="meta", **opts
        )

    def held(self, sid: int) -> int:
        """Slots the sequence holds: its reservation rounded up to the allocation granularity."""
        g = self.alloc.granularity
        return -(-self.alloc.seq_info(sid).capacity // g) * g

    def admit(self, sid: int, prompt: int) -> None:
        """Register, reserve and prefill a request (raises OutOfKVMemory, changing nothing)."""
        a = self.alloc
        a.add(sid, [1] * prompt)
        try:
            a.reserve(sid, self.max_seq_len if self.static else prompt)
        except OutOfKVMemory:
            a.free(sid)
            raise
        a.commit(sid, prompt)

    def decode(self, sid: int) -> None:
        """One generated token: reserve its slot, append it, write its KV (OOM changes nothing)."""
        a = self.alloc
        a.reserve(sid, 1)
        a.append(sid, [1])
        a.commit(sid, 1)

    def try_admit(self, sid: int, prompt: int, watermark: int) -> bool:
        """Admit if the prompt fits with ``watermark`` tokens to spare (vLLM's admission rule).

        The spare room is asked for on a guard sequence that never holds
        anything, so that it counts against the pool, not the request's length.
        """
        a = self.alloc
        need = self.max_seq_len if self.static else prompt
        if GUARD not in a:
            a.add(GUARD, [1])
        a.add(sid, [1] * prompt)
        if not a.can_reserve({sid: need, GUARD: watermark}):
            a.free(sid)
            return False
        a.reserve(sid, need)
        a.commit(sid, prompt)
        return True

    def free(self, sid: int) -> None:
        self.alloc.free(sid)


Req = tuple[int, int, int, int]  # (id, admission step, prompt, output)


def schedule(
    trace: list[tuple[float, int, int]], step_s: float, max_len: int, reject_long: bool = False
) -> tuple[list[Req], int, int]:
    """Admission step and lengths of every request served within ``max_len`` tokens.

    Outputs are cut so that prompt + output <= ``max_len``; prompts of
    ``max_len`` tokens or more are cut to ``max_len - 1``, or with
    ``reject_long`` the request is dropped. Returns ``(requests, clipped,
    rejected)``.
    """
    reqs = []
    clipped = rejected = 0
    for i, (t, p, o) in enumerate(trace):
        if reject_long and p >= max_len:
            rejected += 1
            continue
        p = max(1, min(p, max_len - 1))
        o = max(1, o)
        if p + o > max_len:
            o = max_len - p
            clipped += 1
        reqs.append((i, int(t / step_s), p, o))
    return reqs, clipped, rejected


def replay_fragmentation(
    workloads: dict[str, list[Req]], max_len: int, sample_every: int
) -> dict[str, float]:
    """Scenario 1: the breakdown of held (and, for vmem, mapped) KV memory, per allocator."""
    figs: dict[str, float] = {}
    for name in CONFIGS:
        reqs = workloads[name]
        mlen = max_len_of(name, max_len)
        by_step: dict[int, list[tuple[int, int, int]]] = {}
        for sid, step, p, o in reqs:
            by_step.setdefault(step, []).append((sid, p, o))
        # memory the allocator needs at the busiest moment, to size a pool that never runs out
        last = max(s for _, s, _, o in reqs) + max(o for *_, o in reqs) + 2
        live = np.zeros(last + 1, dtype=np.int64)
        tokens = np.zeros(last + 1, dtype=np.int64)
        for _, s, p, o in reqs:
            live[s : s + o] += 1
            tokens[s : s + o] += p + o
        peak_live, peak_tokens = int(live.max()), int(tokens.max())
        figs[f"{name}_peak_running"] = peak_live
        need = peak_live * mlen if name in STATIC else peak_tokens + peak_live * 1024
        t0 = time.perf_counter()
        ten = Tenant(name, need * LLAMA3_8B.bytes_per_token * 5 // 4, mlen, peak_live + 8)
        running: dict[int, int] = {}  # sid -> output tokens still to generate
        final: dict[int, int] = {}
        used = reserved = never = idle = 0
        for step in progress(range(last), total=last, desc=name):
            for sid, p, o in by_step.get(step, ()):
                ten.admit(sid, p)
                running[sid] = o
                final[sid] = p + o
            done = []
            for sid in running:
                ten.decode(sid)
                running[sid] -= 1
                if running[sid] == 0:
                    done.append(sid)
            if step % sample_every == 0 and running:
                a = ten.alloc
                held = {sid: ten.held(sid) for sid in running}
                computed = {sid: a.seq_info(sid).num_computed for sid in running}
                u = sum(computed.values())
                r = sum(min(held[s], final[s]) - computed[s] for s in running)
                n = sum(max(0, held[s] - final[s]) for s in running)
                used, reserved, never = used + u, reserved + r, never + n
                if name.startswith("vmem") or step % (50 * sample_every) == 0:
                    st = a.stats()  # the books agree with the allocator's own
                    assert st.used_tokens == sum(held.values()), (name, st.used_tokens)
                    assert st.filled_tokens == u
                    idle += int(st.extra.get("idle_mapped_bytes", 0)) // st.bytes_per_token
            for sid in done:
                del running[sid]
                ten.free(sid)
        ten.alloc.check_integrity()
        total = used + reserved + never
        figs[f"{name}_used_frac"] = used / total
        figs[f"{name}_reserved_frac"] = reserved / total
        figs[f"{name}_never_frac"] = never / total
        if name.startswith("vmem"):
            figs[f"{name}_idle_mapped_frac"] = idle / (total + idle)
            figs[f"{name}_used_of_mapped_frac"] = used / (total + idle)
            st = ten.alloc.stats()
            figs[f"{name}_map_calls"] = st.extra["map_calls"]
            figs[f"{name}_unmap_calls"] = st.extra["unmap_calls"]
        figs[f"{name}_replay_s"] = time.perf_counter() - t0
        ten.alloc.close()
    return figs


def replay_budget(
    workloads: dict[str, list[Req]], max_len: int, budget: int, max_steps: int
) -> dict[str, float]:
    """Scenario 2: mean running batch under a fixed KV budget, all requests queued at 0."""
    figs: dict[str, float] = {}
    max_seqs = budget // LLAMA3_8B.bytes_per_token // 64 + 16  # more slots than can ever run
    for name in CONFIGS:
        reqs = workloads[name]
        ten = Tenant(name, budget, max_len_of(name, max_len), max_seqs)
        watermark = ten.alloc.stats().capacity_tokens // 100
        queue = [(sid, p, o) for sid, _, p, o in reqs]
        queue.reverse()  # pop() takes the earliest
        running: dict[int, list[int]] = {}  # sid -> [prompt incl. generated, output left]
        batches: list[int] = []
        preempted = 0
        for _ in progress(range(max_steps), total=max_steps, desc=f"{name} budget"):
            if not queue and not running:
                break
            for sid in list(running):
                if sid not in running:
                    continue
                while True:
                    try:
                        ten.decode(sid)
                        break
                    except OutOfKVMemory:
                        victim = next(reversed(running))  # latest admitted: recompute later
                        p, o = running.pop(victim)
                        ten.free(victim)
                        queue.append((victim, p, o))
                        preempted += 1
                        if victim == sid:
                            break
                if sid in running:
                    running[sid][0] += 1
                    running[sid][1] -= 1
                    if running[sid][1] == 0:
                        del running[sid]
                        ten.free(sid)
            while queue and ten.try_admit(queue[-1][0], queue[-1][1], watermark):
                sid, p, o = queue.pop()
                running[sid] = [p, o]
            if queue and not running:
                raise RuntimeError(f"{name}: request {queue[-1][0]} can never be admitted")
            if queue:
                batches.append(len(running))
        figs[f"{name}_max_batch"] = float(np.mean(batches)) if batches else 0.0
        figs[f"{name}_peak_batch"] = float(max(batches)) if batches else 0.0
        figs[f"{name}_preemptions"] = preempted
        figs[f"{name}_budget_steps"] = len(batches)
        if name.startswith("vmem"):  # deferred reclamation: few driver calls per request
            ex = ten.alloc.stats().extra
            figs[f"{name}_budget_maps_per_request"] = ex["map_calls"] / len(reqs)
            figs[f"{name}_budget_unmaps_per_request"] = ex["unmap_calls"] / len(reqs)
        ten.alloc.check_integrity()
        ten.alloc.close()
    for name in CONFIGS:
        for base in STATIC:
            if name != base:
                ratio = figs[f"{name}_max_batch"] / figs[f"{base}_max_batch"]
                figs[f"{name}_max_batch_vs_{base}"] = ratio
    return figs


def plot(figs: dict[str, float], path: Path) -> None:
    """Stacked fractions per allocator, and the mean batch in the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(CONFIGS)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
    bottom = np.zeros(len(names))
    idle = np.array([figs.get(f"{n}_idle_mapped_frac", 0.0) for n in names])
    keep = 1 - idle  # shares of mapped memory: the held ones scaled by (1 - idle)
    for part, color in (("used", "C2"), ("reserved", "C1"), ("never", "C3")):
        vals = np.array([figs[f"{n}_{part}_frac"] for n in names]) * keep
        a.bar(names, vals, bottom=bottom, color=color, label=part)
        bottom += vals
    a.bar(names, idle, bottom=bottom, color="C7", label="idle mapped (vmem deferred reclamation)")
    a.set_ylabel("share of held (vmem: mapped) KV memory")
    a.set_title("where KV memory goes")
    a.legend(loc="lower right", fontsize=7)
    a.tick_params(axis="x", rotation=30)
    b.bar(names, [figs[f"{n}_max_batch"] for n in names], color="C0")
    b.set_ylabel("mean running batch")
    b.set_title(f"batch in a {figs['budget_gib']:.0f} GiB KV budget")
    b.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Run both scenarios, print the table, write bench/results/fragmentation.{json,png}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short replay (under a minute on CPU)")
    ap.add_argument("--requests", type=int, default=None, help="requests replayed (default: all)")
    ap.add_argument("--trace", default="azure_conv")
    ap.add_argument("--step-ms", type=float, default=30.0, help="trace time per decode step")
    ap.add_argument("--max-seq-len", type=int, default=8192)
    ap.add_argument("--budget-gib", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.requests or (400 if args.quick else None)
    trace, source = load_or_synthesize(args.trace, n, seed=args.seed)
    step_s = args.step_ms / 1e3
    reqs, clipped, _ = schedule(trace, step_s, args.max_seq_len)
    short, short_clipped, rejected = schedule(trace, step_s, 2048, reject_long=True)
    workloads = {name: short if name == "static2048" else reqs for name in CONFIGS}
    budget = int(args.budget_gib * GIB)
    n_budget = min(len(reqs), 300 if args.quick else 3000)
    budget_ids = {r[0] for r in reqs[:n_budget]}
    budget_loads = {k: [r for r in v if r[0] in budget_ids] for k, v in workloads.items()}
    figs: dict[str, Any] = {
        "trace": source,
        "requests": len(reqs),
        "clipped_requests": clipped,
        "static2048_rejected_requests": rejected,
        "static2048_clipped_requests": short_clipped,
        "step_ms": args.step_ms,
        "max_seq_len": args.max_seq_len,
        "budget_gib": args.budget_gib,
        "budget_requests": n_budget,
        "static2048_budget_requests": len(budget_loads["static2048"]),
        "kv_bytes_per_token": LLAMA3_8B.bytes_per_token,
    }
    figs.update(replay_fragmentation(workloads, args.max_seq_len, sample_every=5))
    figs.update(replay_budget(budget_loads, args.max_seq_len, budget, max_steps=20_000))

    def cell(key: str) -> float | str:
        return figs.get(key, "-")

    rows = [
        [
            name,
            figs[f"{name}_used_frac"],
            figs[f"{name}_reserved_frac"],
            figs[f"{name}_never_frac"],
            cell(f"{name}_idle_mapped_frac"),
            cell(f"{name}_used_of_mapped_frac"),
            figs[f"{name}_max_batch"],
            cell(f"{name}_max_batch_vs_static2048"),
            cell(f"{name}_max_batch_vs_static8192"),
        ]
        for name in CONFIGS
    ]
    print_table(
        f"bench/fragmentation: {source}, {len(reqs)} requests, Llama-3-8B KV "
        f"(static2048 rejects {rejected} long prompts)",
        [
            "allocator",
            "used / held",
            "reserved",
            "never used",
            "idle / mapped",
            "used / mapped",
            f"batch in {args.budget_gib:g} GiB",
            "vs static2048",
            "vs static8192",
        ],
        rows,
    )
    path = save_results("fragmentation", figs, quick=args.quick)
    plot(figs, path.with_suffix(".png"))
    console.print(f"wrote {path} and {path.with_suffix('.png')}")
    if not math.isfinite(figs["vmem2m_max_batch_vs_static8192"]):
        raise SystemExit("no batch measured")


if __name__ == "__main__":
    main()
