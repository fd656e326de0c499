"""Scheduling policies on the Azure conversation trace, in simulated time.

The real engine and scheduler run with a simulated executor
(:class:`kvmem.engine.simulate.SimulatedExecutor`): every step costs
``fixed + prefill * prefill_tokens + decode_kv * (KV tokens the decode rows
read)`` seconds of a simulated clock, so every policy is measured on
identical work and the figures do not depend on how busy this machine is.
KV memory is a real paged allocator on the meta device (bookkeeping only).

Modelled deployment: Llama-2-13B in fp16 on one A100-40GB.

- ``fixed`` 17 ms: a step reads all 26 GB of weights once at 1.55 TB/s;
- ``prefill`` 0.15 ms/token: 2 x 13 GFLOP per token at ~170 TFLOP/s
  (55% of the 312 TFLOP/s peak);
- ``decode_kv`` 0.53 us per context token: a decode row's attention reads
  every cached token of its sequence, 0.8 MB each (40 layers x 40 heads x
  128 x 2 x 2 bytes) at 1.55 TB/s; a row of the trace's mean context
  (~1,260 tokens) costs ~0.65 ms, a 8K-token one 4.3 ms;
- KV capacity 15,000 tokens: 40 GB - 26 GB of weights - ~1.5 GB of
  activations leaves ~12.3 GB, at 0.8 MB per token.

Arrivals and lengths come from the Azure conversation trace through
:func:`kvmem.traces.load_or_synthesize` (prompts clipped to 8,192 tokens;
without the file, synthetic requests with its length statistics). Trace
timestamps are rescaled to the offered load, a fraction of the engine's
capacity: requests per second that FCFS completes when the whole window is
queued at once (between the 10th and 90th percentile completions).

Scenarios:

1. policies at loads 0.7, 0.9, 1.0 and 1.25 (mean and P99 of JCT and
   TTFT): ``fcfs``; plain ``isrtf`` (ELIS, ``slack=None``) with an oracle, a
   noisy oracle (log-normal error calibrated to R^2 = 0.85) and a learned
   predictor (trained on trace rows outside the replayed window; the trace
   has lengths only, so its one feature is the prompt length, see
   :class:`kvmem.engine.predictors.LearnedPredictor`); and ``isrtf`` with
   its starvation guard (virtual deadlines, the default ``slack``; see
   :mod:`kvmem.engine.policies`) with each predictor. The headline load is
   1.0: plain ISRTF's gain there comes with a P99 JCT several times FCFS's
   (long jobs starve), which the guard is meant to remove;
2. Sarathi chunk budgets 128..2048 tokens per step against unchunked
   prefill (whole prompts in one step), FCFS at load 1.0;
3. the guard's ``slack`` from 60 to 200 at load 1.0 (oracle), to show
   how the mean and the tail trade against each other around the default;
4. fairness: one heavy tenant offering 1.5x the capacity by itself among
   four light tenants (5% each): per-tenant service and P99 TTFT, ``fcfs``
   against ``fair`` (VTC counters).

Run: ``python -m bench.scheduling [--quick]``.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import console, print_table, progress, results_dir, save_results
from kvmem import KVSpec
from kvmem.engine import Engine, SimClock, SimulatedExecutor
from kvmem.engine.policies import DEFAULT_SLACK
from kvmem.engine.predictors import LearnedPredictor, NoisyOraclePredictor, r2_score
from kvmem.engine.request import Request
from kvmem.engine.simulate import CostModel, TraceRequest, replay
from kvmem.traces import load_or_synthesize

SPEC = KVSpec(40, 40, 128, torch.float16)  # Llama-2-13B
COST = CostModel(fixed=17e-3, prefill=0.15e-3, decode=0.0, decode_kv=0.53e-6)
KV_TOKENS = 15_000
MAX_PROMPT = 8192
BUDGET = 512  # Sarathi token budget of the policy and fairness runs
BUDGETS = (128, 256, 512, 1024, 2048)
LOADS = (0.7, 0.9, 1.0, 1.25)  # offered loads of the policy runs, fractions of capacity
HEADLINE_LOAD = 1.0
SLACKS = (60.0, 90.0, 100.0, 110.0, 120.0, 140.0, 200.0)  # guard sensitivity, at HEADLINE_LOAD
HEAVY = 1.5  # the heavy tenant's offered load in the fairness scenario
WINDOW_START = 10_000  # replayed rows start here; rows before it train the learned predictor


@dataclass(frozen=True)
class Row:
    """One trace row: arrival offset (s), prompt and output tokens."""

    t: float
    prompt: int
    output: int


def read_trace(n: int, seed: int) -> tuple[list[Row], str]:
    """The Azure conversation trace (at least ``n`` rows), or a synthetic one like it."""
    trace, source = load_or_synthesize("azure_conv", None, seed=seed)
    if len(trace) < n:
        trace, source = load_or_synthesize("azure_conv", n, seed=seed)
    rows = [Row(t, max(1, min(p, MAX_PROMPT)), max(1, o)) for t, p, o in trace]
    return rows, source


def at_rate(rows: list[Row], rate: float) -> list[TraceRequest]:
    """The rows with arrival times rescaled to ``rate`` requests per second on average."""
    t0 = rows[0].t
    span = rows[-1].t - t0
    scale = (len(rows) - 1) / span / rate if span > 0 else 0.0
    return [TraceRequest((r.t - t0) * scale, r.prompt, r.output) for r in rows]


def simulate(
    trace: list[TraceRequest], seed: int = 0, **engine_kw: Any
) -> tuple[list[Request], Engine]:
    """Replay ``trace`` through the engine with the simulated executor."""
    clock = SimClock()
    ex = SimulatedExecutor(SPEC, clock, COST, max_model_len=32768)
    opts: dict[str, Any] = dict(
        backend="paged",
        backend_options={"device": "meta", "page_size": 16},
        num_kv_tokens=KV_TOKENS,
        detokenize=False,
        max_num_seqs=256,
        max_num_batched_tokens=BUDGET,
    )
    opts.update(engine_kw)
    eng = Engine(executor=ex, clock=clock, **opts)
    return replay(eng, clock, trace, seed=seed), eng


def summary(reqs: list[Request]) -> dict[str, float]:
    """Mean and P99 of JCT, TTFT and time between tokens (all gaps pooled), in seconds."""
    jct = np.array([r.metrics.jct for r in reqs], dtype=float)
    ttft = np.array([r.metrics.ttft for r in reqs], dtype=float)
    gaps = [g for r in reqs for g in r.metrics.tbt]
    tbt = np.array(gaps if gaps else [0.0])
    return {
        "mean_jct": float(jct.mean()),
        "p99_jct": float(np.percentile(jct, 99)),
        "mean_ttft": float(ttft.mean()),
        "p99_ttft": float(np.percentile(ttft, 99)),
        "mean_tbt": float(tbt.mean()),
        "p99_tbt": float(np.percentile(tbt, 99)),
    }


def capacity(rows: list[Row]) -> float:
    """Requests per second FCFS completes with the whole window queued at t = 0.

    Measured between the 10th and the 90th percentile completion, so that
    neither the ramp-up nor the drain (a few long requests running alone)
    counts.
    """
    trace = [TraceRequest(0.0, r.prompt, r.output) for r in rows]
    reqs, _ = simulate(trace)
    done = np.sort([r.metrics.finish_time for r in reqs])
    lo, hi = int(0.1 * len(done)), int(0.9 * len(done))
    return (hi - lo) / float(done[hi] - done[lo])


def fairness_trace(rows: list[Row], cap: float, n: int, seed: int) -> list[TraceRequest]:
    """A heavy tenant at HEAVY x capacity and four light ones at 0.05 x each, Poisson arrivals."""
    rng = np.random.default_rng(seed)
    rates = {"heavy": HEAVY * cap, **{f"light{i}": 0.05 * cap for i in range(4)}}
    duration = n / sum(rates.values())
    out: list[TraceRequest] = []
    for tenant, rate in rates.items():
        t = 0.0
        while True:
            t += float(rng.exponential(1 / rate))
            if t > duration:
                break
            r = rows[int(rng.integers(len(rows)))]
            out.append(TraceRequest(t, r.prompt, r.output, tenant))
    return out


def tenant_table(reqs: list[Request], horizon: float) -> dict[str, dict[str, float]]:
    """Per tenant: requests, output tokens served per second until ``horizon``, TTFT mean/P99."""
    out: dict[str, dict[str, float]] = {}
    for tenant in sorted({str(r.tenant) for r in reqs}):
        mine = [r for r in reqs if r.tenant == tenant]
        ttft = np.array([r.metrics.ttft for r in mine], dtype=float)
        served = sum(sum(1 for t in r.metrics.token_times if t <= horizon) for r in mine)
        out[tenant] = {
            "requests": float(len(mine)),
            "tokens_per_s": served / horizon,
            "mean_ttft": float(ttft.mean()),
            "p99_ttft": float(np.percentile(ttft, 99)),
        }
    return out


def light_p99_ttft(reqs: list[Request]) -> float:
    """P99 TTFT over every light tenant's requests."""
    return float(np.percentile([r.metrics.ttft for r in reqs if r.tenant != "heavy"], 99))


def run_job(
    trace: list[TraceRequest], seed: int, horizon: float, kw: dict[str, Any]
) -> dict[str, Any]:
    """One simulation (in a worker process): its summary, preemptions and per-tenant table."""
    reqs, eng = simulate(trace, seed=seed, **kw)
    out: dict[str, Any] = {
        "summary": summary(reqs),
        "preemptions": eng.metrics().num_preemptions,
    }
    if any(r.tenant != "default" for r in reqs):
        out["tenants"] = tenant_table(reqs, horizon)
        out["light_p99_ttft"] = light_p99_ttft(reqs)
    return out


def policy_jobs(noisy: NoisyOraclePredictor, learned: LearnedPredictor) -> dict[str, dict]:
    """Engine options of every policy compared at each load."""
    jobs: dict[str, dict[str, Any]] = {"fcfs": {"policy": "fcfs"}}
    preds: dict[str, Any] = {"oracle": "oracle", "noisy": noisy, "learned": learned}
    for name, pred in preds.items():
        opts = {"predictor": pred, "slack": None}
        jobs[f"isrtf_{name}"] = {"policy": "isrtf", "policy_options": opts}
    for name, pred in preds.items():
        label = "isrtf_guarded" if name == "oracle" else f"isrtf_guarded_{name}"
        jobs[label] = {"policy": "isrtf", "policy_options": {"predictor": pred}}
    return jobs


def plot(fig_data: dict[str, Any], path: Path) -> None:
    """Four panels: mean and P99 JCT / FCFS per load, P99 TBT per budget, P99 TTFT per tenant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(20, 4.4))
    by_load = fig_data["by_load"]
    loads = sorted(by_load)
    names = [k for k in by_load[loads[0]] if k != "fcfs"]
    for panel, stat, title in ((0, "mean_jct", "mean JCT"), (1, "p99_jct", "P99 JCT")):
        for k in names:
            ys = [by_load[ld][k][stat] / by_load[ld]["fcfs"][stat] for ld in loads]
            ax[panel].plot(loads, ys, marker="o", label=k, ls="--" if "guarded" in k else "-")
        ax[panel].axhline(1.0, color="grey", lw=0.8)
        ax[panel].set_xlabel("offered load / capacity")
        ax[panel].set_ylabel(f"{title} / FCFS")
        ax[panel].set_title(f"{title} relative to FCFS")
    ax[1].set_yscale("log")
    ax[0].legend(fontsize=7)
    bud = fig_data["budgets"]
    labels = list(bud)
    ax[2].bar(labels, [bud[k]["p99_tbt"] * 1e3 for k in labels], color="tab:orange")
    ax[2].set_ylabel("P99 time between tokens (ms)")
    ax[2].set_title("Sarathi chunk budget (tokens/step)")
    ten = fig_data["tenants"]
    tenants = list(ten["fcfs"])
    x = np.arange(len(tenants))
    ax[3].bar(x - 0.2, [ten["fcfs"][t]["p99_ttft"] for t in tenants], 0.4, label="fcfs")
    ax[3].bar(x + 0.2, [ten["fair"][t]["p99_ttft"] for t in tenants], 0.4, label="fair (VTC)")
    ax[3].set_xticks(x, tenants)
    ax[3].set_yscale("log")
    ax[3].set_ylabel("P99 TTFT (s)")
    ax[3].set_title("one heavy tenant among light ones")
    ax[3].legend(loc="center left", fontsize=8)
    fig.suptitle("kvmem engine scheduling, simulated Llama-2-13B on A100-40GB, Azure conv trace")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Run every scenario, print tables, write bench/results/scheduling.{json,png}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short window (about a minute)")
    ap.add_argument("--requests", type=int, default=None, help="replayed requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="simulations run at once (processes)")
    args = ap.parse_args()
    n = args.requests or (200 if args.quick else 2000)
    loads = (0.9, HEADLINE_LOAD) if args.quick else LOADS
    wall = time.perf_counter()
    rows, source = read_trace(WINDOW_START + n, args.seed)
    window = rows[WINDOW_START : WINDOW_START + n]
    train = rows[:WINDOW_START]
    out_lens = [r.output for r in window]

    noisy = NoisyOraclePredictor.calibrated(out_lens, r2=0.85, seed=args.seed)
    learned = LearnedPredictor.fit([r.prompt for r in train], [r.output for r in train])
    learned_r2 = r2_score(
        np.array(out_lens), np.array([learned.predict_total(r.prompt) for r in window])
    )
    pol_jobs = policy_jobs(noisy, learned)
    jobs: list[tuple[str, str, dict[str, Any]]] = [
        ("load", f"{ld}/{name}", kw) for ld in loads for name, kw in pol_jobs.items()
    ]
    for c in () if args.quick else SLACKS:
        if c != DEFAULT_SLACK:
            opts = {"predictor": "oracle", "slack": c}
            jobs.append(("slack", f"{c:g}", {"policy": "isrtf", "policy_options": opts}))
    for b in BUDGETS:
        if b != BUDGET:
            jobs.append(("budget", str(b), {"max_num_batched_tokens": b}))
    jobs.append(
        (
            "budget",
            "unchunked",
            {"chunked_prefill": False, "max_num_batched_tokens": MAX_PROMPT + 256},
        )
    )
    jobs += [("fair", "fcfs", {"policy": "fcfs"}), ("fair", "fair", {"policy": "fair"})]

    by_load: dict[float, dict[str, dict[str, float]]] = {ld: {} for ld in loads}
    budgets: dict[str, dict[str, float]] = {}
    preemptions: dict[str, int] = {}
    cap = capacity(window)
    fair_trace = fairness_trace(window, cap, n, args.seed)
    horizon = max(t.arrival for t in fair_trace)
    todo: list[tuple[str, str, list[TraceRequest], dict[str, Any]]] = []
    for kind, name, kw in jobs:
        if kind == "load":
            trace = at_rate(window, float(name.split("/")[0]) * cap)
        elif kind in ("budget", "slack"):
            trace = at_rate(window, HEADLINE_LOAD * cap)
        else:
            trace = fair_trace
        todo.append((kind, name, trace, kw))
    tenants: dict[str, dict[str, dict[str, float]]] = {}
    light: dict[str, float] = {}
    slacks: dict[float, dict[str, float]] = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_job, t, args.seed, horizon, kw) for _, _, t, kw in todo]
        for (kind, name, _, _), fut in zip(
            todo, progress(futures, total=len(futures), desc="simulating"), strict=True
        ):
            res = fut.result()
            preemptions[f"{kind}_{name.replace('/', '_')}"] = res["preemptions"]
            if kind == "load":
                lds, pol = name.split("/")
                by_load[float(lds)][pol] = res["summary"]
                if float(lds) == HEADLINE_LOAD and pol == "fcfs":
                    budgets[str(BUDGET)] = res["summary"]
            elif kind == "budget":
                budgets[name] = res["summary"]
            elif kind == "slack":
                slacks[float(name)] = res["summary"]
            else:
                tenants[name], light[name] = res["tenants"], res["light_p99_ttft"]

    budgets = {k: budgets[k] for k in [*(str(b) for b in BUDGETS), "unchunked"]}
    figures: dict[str, Any] = {}
    for ld, pols in by_load.items():
        base = pols["fcfs"]
        for pol, s in pols.items():
            for k, v in s.items():
                figures[f"load_{ld}_{pol}_{k}_s"] = v
            if pol != "fcfs":
                for stat in ("mean_jct", "p99_jct", "mean_ttft", "p99_ttft"):
                    tag = stat.removeprefix("mean_")
                    figures[f"load_{ld}_{pol}_{tag}_vs_fcfs"] = s[stat] / base[stat]
    head = by_load[HEADLINE_LOAD]
    headline: dict[str, Any] = {"headline_load": HEADLINE_LOAD}
    for pol in head:
        if pol != "fcfs":
            headline[f"{pol}_jct_vs_fcfs"] = head[pol]["mean_jct"] / head["fcfs"]["mean_jct"]
            headline[f"{pol}_p99_jct_vs_fcfs"] = head[pol]["p99_jct"] / head["fcfs"]["p99_jct"]
    headline.update(
        {
            "chunked_p99_tbt_vs_unchunked": budgets[str(BUDGET)]["p99_tbt"]
            / budgets["unchunked"]["p99_tbt"],
            "fair_light_tenant_p99_ttft_vs_fcfs": light["fair"] / light["fcfs"],
        }
    )
    figures = {
        **headline,
        "loads": list(loads),
        "capacity_req_per_s": cap,
        "requests": n,
        "trace": source,
        "chunk_budget": BUDGET,
        "isrtf_guarded_slack": DEFAULT_SLACK,
        "noisy_sigma": noisy.sigma,
        "noisy_r2": noisy.r2(out_lens),
        "learned_r2": learned_r2,
        "learned_feature": "prompt length (8 quantile bins), mean residual output length",
        "cost_fixed_s": COST.fixed,
        "cost_prefill_s_per_token": COST.prefill,
        "cost_decode_s_per_row": COST.decode,
        "cost_decode_s_per_context_token": COST.decode_kv,
        "kv_capacity_tokens": KV_TOKENS,
        "simulated": "Llama-2-13B fp16 on one A100-40GB (cost model, simulated time)",
        **figures,
    }
    if not args.quick:
        slacks[DEFAULT_SLACK] = head["isrtf_guarded"]
        for c in sorted(slacks):
            for stat, tag in (("mean_jct", "jct"), ("p99_jct", "p99_jct")):
                ratio = slacks[c][stat] / head["fcfs"][stat]
                figures[f"slack_{c:g}_{tag}_vs_fcfs"] = ratio
    for bud, s in budgets.items():
        figures[f"budget_{bud}_p99_tbt_s"] = s["p99_tbt"]
        figures[f"budget_{bud}_mean_ttft_s"] = s["mean_ttft"]
        figures[f"budget_{bud}_mean_jct_s"] = s["mean_jct"]
    for pol, tab in tenants.items():
        for t, s in tab.items():
            figures[f"fairness_{pol}_{t}_p99_ttft_s"] = s["p99_ttft"]
            figures[f"fairness_{pol}_{t}_tokens_per_s"] = s["tokens_per_s"]
    for k, v in preemptions.items():
        figures[f"preemptions_{k}"] = v

    for ld, pols in by_load.items():
        base = pols["fcfs"]
        print_table(
            f"policies at load {ld} ({ld * cap:.2f} req/s of {cap:.2f}), {n} requests, {source}",
            [
                "policy",
                "mean JCT",
                "P99 JCT",
                "mean TTFT",
                "P99 TTFT",
                "JCT / fcfs",
                "P99 JCT / fcfs",
                "P99 TTFT / fcfs",
            ],
            [
                [
                    k,
                    s["mean_jct"],
                    s["p99_jct"],
                    s["mean_ttft"],
                    s["p99_ttft"],
                    s["mean_jct"] / base["mean_jct"],
                    s["p99_jct"] / base["p99_jct"],
                    s["p99_ttft"] / base["p99_ttft"],
                ]
                for k, s in pols.items()
            ],
        )
    unch = budgets["unchunked"]["p99_tbt"]
    print_table(
        f"Sarathi chunk budgets (fcfs, load {HEADLINE_LOAD})",
        ["budget", "mean TTFT", "mean JCT", "mean TBT", "P99 TBT", "P99 TBT / unchunked"],
        [
            [k, s["mean_ttft"], s["mean_jct"], s["mean_tbt"], s["p99_tbt"], s["p99_tbt"] / unch]
            for k, s in budgets.items()
        ],
    )
    print_table(
        f"fairness: heavy tenant at {HEAVY} x capacity, four light at 0.05 x",
        ["tenant", "fcfs tok/s", "fair tok/s", "fcfs P99 TTFT", "fair P99 TTFT"],
        [
            [
                t,
                tenants["fcfs"][t]["tokens_per_s"],
                tenants["fair"][t]["tokens_per_s"],
                tenants["fcfs"][t]["p99_ttft"],
                tenants["fair"][t]["p99_ttft"],
            ]
            for t in tenants["fcfs"]
        ],
    )
    if len(slacks) > 1:
        print_table(
            f"guard slack (isrtf, oracle, load {HEADLINE_LOAD}; default {DEFAULT_SLACK:g})",
            ["slack", "mean JCT / fcfs", "P99 JCT / fcfs"],
            [
                [c, figures[f"slack_{c:g}_jct_vs_fcfs"], figures[f"slack_{c:g}_p99_jct_vs_fcfs"]]
                for c in sorted(slacks)
            ],
        )
    targets = {
        "isrtf_oracle_jct_vs_fcfs": "<= 0.8",
        "isrtf_noisy_jct_vs_fcfs": "<= 0.85",
        "isrtf_guarded_jct_vs_fcfs": "<= 0.85",
        "isrtf_guarded_p99_jct_vs_fcfs": "<= 1.3",
        "chunked_p99_tbt_vs_unchunked": "<= 0.5",
        "fair_light_tenant_p99_ttft_vs_fcfs": "<= 0.5",
    }
    print_table(
        f"headline figures (policies at load {HEADLINE_LOAD})",
        ["figure", "value", "target"],
        [[k, v, targets.get(k, "reported")] for k, v in headline.items()],
    )
    figures["wall_s"] = time.perf_counter() - wall
    path = save_results("scheduling", figures, quick=args.quick)
    plot(
        {"by_load": by_load, "budgets": budgets, "tenants": tenants},
        results_dir() / "scheduling.png",
    )
    console.print(f"wrote {path} and scheduling.png in {figures['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
