"""Scheduling policies on the Azure conversation trace, in simulated time.

The real engine and scheduler run with a simulated executor
(:class:`kvmem.engine.simulate.SimulatedExecutor`): every step costs
``fixed + prefill * prefill_tokens + decode * decode_rows`` seconds of a
simulated clock, so every policy is measured on identical work and the
figures do not depend on how busy this machine is. KV memory is a real
paged allocator on the meta device (bookkeeping only, no bytes).

Modelled deployment: Llama-2-13B in fp16 on one A100-40GB.

- ``fixed`` 17 ms: a step reads all 26 GB of weights once at 1.55 TB/s;
- ``prefill`` 0.15 ms/token: 2 x 13 GFLOP per token at ~170 TFLOP/s
  (55% of the 312 TFLOP/s peak);
- ``decode`` 0.65 ms per decode row: the row reads its KV, 0.8 MB per
  context token (40 layers x 40 heads x 128 x 2 x 2 bytes), ~1,260 tokens
  on this trace, i.e. ~1 GB at 1.55 TB/s;
- KV capacity 15,000 tokens: 40 GB - 26 GB of weights - ~1.5 GB of
  activations leaves ~12.3 GB, at 0.8 MB per token.

Arrivals and lengths come from ``../shared/traces/azure_llm_2023_conv.csv``
(prompts clipped to 8,192 tokens), read by a minimal CSV reader here; with
no trace, a synthetic one with the same length statistics (lognormal:
prompt median 1,020 / mean 1,155, output median 129 / mean 211; Poisson
arrivals). Trace timestamps are rescaled to the offered load, given as a
fraction of the engine's capacity: requests per second that FCFS completes
when the whole window is queued at once (between the 10th and 90th
percentile completions).

Scenarios:

1. policies at the stated load: ``fcfs`` and ``isrtf`` (ELIS) with an
   oracle, a noisy oracle (log-normal error calibrated to R^2 = 0.85) and a
   learned predictor (trained on trace rows outside the replayed window; the
   trace has lengths only, so its one feature is the prompt length, see
   :class:`kvmem.engine.predictors.LearnedPredictor`);
2. Sarathi chunk budgets 128..2048 tokens per step against unchunked
   prefill (whole prompts in one step);
3. fairness: one heavy tenant offering the whole capacity by itself among
   four light tenants (5% each): per-tenant service and P99 TTFT, ``fcfs``
   against ``fair`` (VTC counters).

Run: ``python bench/scheduling.py [--quick]``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, console, print_table, progress, save_results, trace_path  # noqa: E402
from kvmem import KVSpec  # noqa: E402
from kvmem.engine import Engine, SimClock, SimulatedExecutor  # noqa: E402
from kvmem.engine.predictors import LearnedPredictor, NoisyOraclePredictor, r2_score  # noqa: E402
from kvmem.engine.request import Request  # noqa: E402
from kvmem.engine.simulate import CostModel, TraceRequest, replay  # noqa: E402

SPEC = KVSpec(40, 40, 128, torch.float16)  # Llama-2-13B
COST = CostModel(fixed=17e-3, prefill=0.15e-3, decode=0.65e-3)
KV_TOKENS = 15_000
MAX_PROMPT = 8192
BUDGET = 512  # Sarathi token budget of the policy and fairness runs
BUDGETS = (128, 256, 512, 1024, 2048)
LOAD = 1.25  # offered load of the policy runs, a fraction of capacity
HEAVY = 1.5  # the heavy tenant's offered load in the fairness scenario
WINDOW_START = 10_000  # replayed rows start here; rows before it train the learned predictor


@dataclass(frozen=True)
class Row:
    """One trace row: arrival offset (s), prompt and output tokens."""

    t: float
    prompt: int
    output: int


def read_trace(seed: int) -> tuple[list[Row], str]:
    """The Azure conversation trace, or a synthetic one with its statistics."""
    path = trace_path("azure_llm_2023_conv.csv")
    if path is not None:
        with path.open() as f:
            rows = list(csv.DictReader(f))
        ts = [datetime.fromisoformat(r["TIMESTAMP"][:26]).timestamp() for r in rows]
        t0 = ts[0]
        out = [
            Row(
                t - t0,
                max(1, min(int(r["ContextTokens"]), MAX_PROMPT)),
                max(1, int(r["GeneratedTokens"])),
            )
            for t, r in zip(ts, rows, strict=True)
        ]
        return out, "azure_llm_2023_conv.csv"
    rng = np.random.default_rng(seed)
    n = 20_000
    t = np.cumsum(rng.exponential(1 / 5.5, n))
    p = np.clip(rng.lognormal(math.log(1020), 0.499, n), 1, MAX_PROMPT).astype(int)
    o = np.clip(rng.lognormal(math.log(129), 0.992, n), 1, 2000).astype(int)
    return [Row(float(a), int(b), int(c)) for a, b, c in zip(t, p, o, strict=True)], "synthetic"


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


def plot(fig_data: dict[str, Any], path: Path) -> None:
    """Three panels: JCT per policy, P99 TBT per chunk budget, P99 TTFT per tenant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    pol = fig_data["policies"]
    names = list(pol)
    x = np.arange(len(names))
    ax[0].bar(x - 0.2, [pol[k]["mean_jct"] for k in names], 0.4, label="mean")
    ax[0].bar(x + 0.2, [pol[k]["p99_jct"] for k in names], 0.4, label="P99")
    ax[0].set_xticks(x, names, rotation=15)
    ax[0].set_ylabel("job completion time (s)")
    ax[0].set_title(f"policies at load {fig_data['load']:.2f}")
    ax[0].legend()
    bud = fig_data["budgets"]
    labels = list(bud)
    ax[1].bar(labels, [bud[k]["p99_tbt"] * 1e3 for k in labels], color="tab:orange")
    ax[1].set_ylabel("P99 time between tokens (ms)")
    ax[1].set_title("Sarathi chunk budget (tokens/step)")
    ten = fig_data["tenants"]
    tenants = list(ten["fcfs"])
    x = np.arange(len(tenants))
    ax[2].bar(x - 0.2, [ten["fcfs"][t]["p99_ttft"] for t in tenants], 0.4, label="fcfs")
    ax[2].bar(x + 0.2, [ten["fair"][t]["p99_ttft"] for t in tenants], 0.4, label="fair (VTC)")
    ax[2].set_xticks(x, tenants)
    ax[2].set_yscale("log")
    ax[2].set_ylabel("P99 TTFT (s)")
    ax[2].set_title("one heavy tenant among light ones")
    ax[2].legend(loc="center left", fontsize=8)
    fig.suptitle("kvmem engine scheduling, simulated Llama-2-13B on A100-40GB, Azure conv trace")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Run every scenario, print tables, write bench/results/scheduling.{json,png}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short window (under a minute)")
    ap.add_argument("--requests", type=int, default=None, help="replayed requests")
    ap.add_argument("--load", type=float, default=LOAD, help="offered load / capacity")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.requests or (250 if args.quick else 2000)
    wall = time.perf_counter()
    rows, source = read_trace(args.seed)
    window = rows[WINDOW_START : WINDOW_START + n] if len(rows) >= WINDOW_START + n else rows[-n:]
    train = rows[:WINDOW_START] if len(rows) >= WINDOW_START + n else rows[:-n]
    out_lens = [r.output for r in window]

    noisy = NoisyOraclePredictor.calibrated(out_lens, r2=0.85, seed=args.seed)
    learned = LearnedPredictor.fit([r.prompt for r in train], [r.output for r in train])
    learned_r2 = r2_score(
        np.array(out_lens), np.array([learned.predict_total(r.prompt) for r in window])
    )

    jobs: list[tuple[str, str, dict[str, Any]]] = [("capacity", "", {})]
    jobs += [("policy", "fcfs", {"policy": "fcfs"})]
    for name, pred in (("oracle", "oracle"), ("noisy", noisy), ("learned", learned)):
        jobs.append(
            ("policy", f"isrtf_{name}", {"policy": "isrtf", "policy_options": {"predictor": pred}})
        )
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
    sweep = (0.9, 1.1) if args.quick else (0.7, 0.8, 0.9, 1.0, 1.1, 1.4, 1.6)
    for ld in sweep:
        jobs += [
            ("sweep", f"{ld}/fcfs", {"policy": "fcfs"}),
            ("sweep", f"{ld}/isrtf", {"policy": "isrtf"}),
        ]

    cap = rate = 0.0
    trace: list[TraceRequest] = []
    policies: dict[str, dict[str, float]] = {}
    budgets: dict[str, dict[str, float]] = {}
    fair_runs: dict[str, list[Request]] = {}
    fair_trace: list[TraceRequest] = []
    sweep_res: dict[str, float] = {}
    preemptions: dict[str, int] = {}
    for kind, name, kw in progress(jobs, total=len(jobs), desc="simulating"):
        if kind == "capacity":
            cap = capacity(window)
            rate = args.load * cap
            trace = at_rate(window, rate)
            fair_trace = fairness_trace(window, cap, n, args.seed)
            continue
        if kind == "sweep":
            lds, pol = name.split("/")
            reqs, _ = simulate(at_rate(window, float(lds) * cap), **kw)
            sweep_res[name] = summary(reqs)["mean_jct"]
            continue
        reqs, eng = simulate(fair_trace if kind == "fair" else trace, seed=args.seed, **kw)
        preemptions[f"{kind}/{name}"] = eng.metrics().num_preemptions
        if kind == "policy":
            policies[name] = summary(reqs)
            if name == "fcfs":
                budgets[str(BUDGET)] = policies[name]
        elif kind == "budget":
            budgets[name] = summary(reqs)
        else:
            fair_runs[name] = reqs

    horizon = max(t.arrival for t in fair_trace)
    tenants = {k: tenant_table(v, horizon) for k, v in fair_runs.items()}
    budgets = {k: budgets[k] for k in [*(str(b) for b in BUDGETS), "unchunked"]}
    base = policies["fcfs"]["mean_jct"]
    figures: dict[str, Any] = {
        "isrtf_oracle_jct_vs_fcfs": policies["isrtf_oracle"]["mean_jct"] / base,
        "isrtf_noisy_jct_vs_fcfs": policies["isrtf_noisy"]["mean_jct"] / base,
        "isrtf_learned_jct_vs_fcfs": policies["isrtf_learned"]["mean_jct"] / base,
        "chunked_p99_tbt_vs_unchunked": budgets[str(BUDGET)]["p99_tbt"]
        / budgets["unchunked"]["p99_tbt"],
        "fair_light_tenant_p99_ttft_vs_fcfs": light_p99_ttft(fair_runs["fair"])
        / light_p99_ttft(fair_runs["fcfs"]),
        "load": args.load,
        "capacity_req_per_s": cap,
        "arrival_rate_req_per_s": rate,
        "requests": n,
        "trace": source,
        "chunk_budget": BUDGET,
        "noisy_sigma": noisy.sigma,
        "noisy_r2": noisy.r2(out_lens),
        "learned_r2": learned_r2,
        "learned_feature": "prompt length (8 quantile bins), mean residual output length",
        "cost_fixed_s": COST.fixed,
        "cost_prefill_s_per_token": COST.prefill,
        "cost_decode_s_per_row": COST.decode,
        "kv_capacity_tokens": KV_TOKENS,
        "simulated": "Llama-2-13B fp16 on one A100-40GB (cost model, simulated time)",
    }
    for pol, s in policies.items():
        for k, v in s.items():
            figures[f"{pol}_{k}_s"] = v
    for bud, s in budgets.items():
        figures[f"budget_{bud}_p99_tbt_s"] = s["p99_tbt"]
        figures[f"budget_{bud}_mean_ttft_s"] = s["mean_ttft"]
        figures[f"budget_{bud}_mean_jct_s"] = s["mean_jct"]
    for pol, tab in tenants.items():
        for t, s in tab.items():
            figures[f"fairness_{pol}_{t}_p99_ttft_s"] = s["p99_ttft"]
            figures[f"fairness_{pol}_{t}_tokens_per_s"] = s["tokens_per_s"]
    for key, jct in sweep_res.items():
        lds, pol = key.split("/")
        figures[f"sweep_load_{lds}_{pol}_mean_jct_s"] = jct
    for ld in sweep:
        figures[f"sweep_load_{ld}_isrtf_oracle_jct_vs_fcfs"] = (
            sweep_res[f"{ld}/isrtf"] / sweep_res[f"{ld}/fcfs"]
        )
    for k, v in preemptions.items():
        figures[f"preemptions_{k.replace('/', '_')}"] = v

    print_table(
        f"policies, load {args.load} ({rate:.2f} req/s of {cap:.2f}), {n} requests, {source}",
        ["policy", "mean JCT", "P99 JCT", "mean TTFT", "P99 TTFT", "P99 TBT", "JCT / fcfs"],
        [
            [
                k,
                s["mean_jct"],
                s["p99_jct"],
                s["mean_ttft"],
                s["p99_ttft"],
                s["p99_tbt"],
                s["mean_jct"] / base,
            ]
            for k, s in policies.items()
        ],
    )
    unch = budgets["unchunked"]["p99_tbt"]
    print_table(
        "Sarathi chunk budgets (fcfs)",
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
    if sweep:
        print_table(
            "load sweep: isrtf (oracle) mean JCT / fcfs",
            ["load", "ratio"],
            [[ld, figures[f"sweep_load_{ld}_isrtf_oracle_jct_vs_fcfs"]] for ld in sweep],
        )
    targets = {
        "isrtf_oracle_jct_vs_fcfs": 0.8,
        "isrtf_noisy_jct_vs_fcfs": 0.85,
        "chunked_p99_tbt_vs_unchunked": 0.5,
        "fair_light_tenant_p99_ttft_vs_fcfs": 0.5,
    }
    print_table(
        "headline figures",
        ["figure", "value", "target"],
        [
            [k, figures[k], f"<= {targets[k]}" if k in targets else "reported"]
            for k in (
                "isrtf_oracle_jct_vs_fcfs",
                "isrtf_noisy_jct_vs_fcfs",
                "isrtf_learned_jct_vs_fcfs",
                "chunked_p99_tbt_vs_unchunked",
                "fair_light_tenant_p99_ttft_vs_fcfs",
            )
        ],
    )
    figures["wall_s"] = time.perf_counter() - wall
    path = save_results("scheduling", figures)
    plot(
        {"policies": policies, "budgets": budgets, "tenants": tenants, "load": args.load},
        RESULTS / "scheduling.png",
    )
    console.print(f"wrote {path} and scheduling.png in {figures['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
