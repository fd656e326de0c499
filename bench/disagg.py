"""Goodput of disaggregated prefill/decode (DistServe) against colocated serving, simulated.

Goodput (DistServe's): the highest request rate at which at least 90% of
the requests meet both the TTFT and the TPOT SLO, divided by the number of
instances (requests/s per instance). The rate is set by scaling the trace's
arrival times (the Azure traces' own bursts kept); it is found by
bisection (:func:`bench.disagg_sim.max_rate`, to 1%). Each replay is the
discrete-event simulation of :mod:`bench.disagg_sim`, on N = 8 instances:

- colocated: every instance runs continuous batching with chunked prefill
  (Sarathi-Serve), token budgets 128 to 2048 per step; the best budget at
  each SLO is the colocated figure (the strongest baseline);
- disaggregated: P prefill + D decode instances, every split P:D with
  P + D = N, KV moved after prefill at 25 GB/s per prefill instance (a
  200 Gb/s RDMA NIC; ``fast``) and at 1.25 GB/s (10 Gb Ethernet; ``slow``).

SLOs: TTFT 0.5 s; TPOT 20 ms (``tight``, about 3x the 6 ms decode-step
floor) or 100 ms (``loose``). The headline ``goodput_disagg_vs_colocated``
is the code trace, tight TPOT, fast link, best P:D against the best
colocated budget; ``goodput_disagg_vs_colocated_conv`` is the same on the
conversation trace.

``transfer_overlap_frac`` comes from a real run (:mod:`bench.disagg_e2e`):
the tiny model on 1 prefill + 1 decode CPU process, the fraction of the KV
bytes moved while the prompt was still being prefilled.

Cost model (:class:`kvmem.engine.simulate.CostModel`), Llama-3-8B in bf16
on one H100-SXM-80GB::

    step = fixed + prefill * prefill tokens + decode * decode rows + decode_kv * KV tokens read

- ``fixed`` 6 ms: every step reads the 16 GB of weights once at ~3 TB/s
  (3.35 TB/s peak), plus ~0.6 ms of launch and scheduling;
- ``prefill`` 32 us per token: 2 x 8e9 FLOP at ~500 TFLOP/s achieved (about
  half the 989 TFLOP/s dense bf16 peak). Prefill attention (quadratic in the
  prompt) is left out: +12% at the code trace's longest prompts (7.4K), less
  below; both modes prefill the same prompts;
- ``decode`` 32 us per decode row: the same 16 GFLOP per token;
- ``decode_kv`` 43.7 ns per KV token read: 128 KiB per token (32 layers x 8
  KV heads x 128 x 2 x 2 bytes) at 3 TB/s. A prefill chunk reads the KV of
  its prompt's earlier chunks, counted the same way;
- per instance: 400K KV tokens (80 GB x 0.9 - 16 GB weights - ~4 GB
  activations = 52 GB), at most 256 running requests; prefill instances
  batch whole prompts up to 2,048 tokens per step.

The sum charges a step its weight read on top of its compute; on a GPU
they overlap. That charge is a larger share of a small colocated chunk than
of a large prefill batch, which favours disaggregation, so the headline is
also given under :class:`~bench.disagg_sim.RooflineCost` (``max`` of memory
and compute time) as ``roofline_*``, and with Poisson arrivals at the same
rates (``poisson_*``) in place of the traces' bursts. The full run also
sweeps the link bandwidth for the headline setting (best split at each).

``python -m bench.disagg [--quick]`` (set ``KVMEM_TRACES`` to the traces'
directory; without the files, synthetic requests with their statistics);
writes ``bench/results/disagg.json`` and ``disagg.png``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import console, print_table, progress, results_dir, save_results
from bench.disagg_sim import (
    SLO,
    Deployment,
    RooflineCost,
    SimResult,
    Trace,
    at_rate,
    max_rate,
    simulate_colocated,
    simulate_disagg,
)
from kvmem.engine.simulate import CostModel
from kvmem.traces import load_or_synthesize, with_poisson_arrivals

KV_BYTES = 32 * 8 * 128 * 2 * 2
COST = CostModel(fixed=6e-3, prefill=32e-6, decode=32e-6, decode_kv=KV_BYTES / 3.0e12)
ROOFLINE = RooflineCost(
    fixed=COST.fixed, prefill=COST.prefill, decode=COST.decode, decode_kv=COST.decode_kv
)
DEPLOYMENT = Deployment(kv_capacity_tokens=400_000, kv_bytes_per_token=KV_BYTES)
SLOS = {"tight": SLO(ttft_s=0.5, tpot_s=0.020), "loose": SLO(ttft_s=0.5, tpot_s=0.100)}
BANDWIDTHS = {"fast": 25e9, "slow": 1.25e9}
SWEEP_GBPS = (0.25, 0.5, 1.25, 2.5, 5.0, 10.0, 25.0, 100.0)
TRACES = {"code": "azure_code", "conv": "azure_conv"}
TARGET = 0.9

Replay = Callable[[Trace, SLO | None], SimResult]


def colocated(instances: int, budget: int, cost: CostModel = COST) -> Replay:
    """A replay of N colocated instances with ``budget`` tokens per step."""
    return lambda trace, stop: simulate_colocated(trace, instances, budget, cost, DEPLOYMENT, stop)


def disagg(prefill: int, decode: int, bandwidth: float, cost: CostModel = COST) -> Replay:
    """A replay of ``prefill`` + ``decode`` instances over a link of ``bandwidth`` B/s."""
    return lambda trace, stop: simulate_disagg(
        trace, prefill, decode, bandwidth, cost, DEPLOYMENT, stop
    )


def goodput(replay: Replay, trace: Trace, slo: SLO, instances: int, start: float) -> float:
    """Requests/s per instance at which :data:`TARGET` of the requests meet ``slo``."""
    return max_rate(replay, trace, slo, start=start * instances, target=TARGET) / instances


def compare(
    trace: Trace,
    slo: SLO,
    n: int,
    budgets: tuple[int, ...],
    bandwidth: float,
    cost: CostModel = COST,
    colocated_best: tuple[int, float] | None = None,
) -> dict[str, Any]:
    """Colocated at every budget and disaggregated at every split: goodputs and the ratio."""
    out: dict[str, Any] = {}
    if colocated_best is None:
        for b in budgets:
            out[f"colocated_budget{b}_goodput"] = goodput(colocated(n, b, cost), trace, slo, n, 1.0)
        best_b = max(budgets, key=lambda b: out[f"colocated_budget{b}_goodput"])
        colocated_best = (best_b, out[f"colocated_budget{best_b}_goodput"])
    out["colocated_budget"], out["colocated_goodput"] = colocated_best
    start = max(colocated_best[1], 0.05)
    splits = {}
    for p in range(1, n):
        splits[p] = goodput(disagg(p, n - p, bandwidth, cost), trace, slo, n, start)
        out[f"p{p}d{n - p}_goodput"] = splits[p]
    best_p = max(splits, key=lambda p: splits[p])
    out["best_split"] = f"{best_p}:{n - best_p}" if splits[best_p] > 0 else None
    out["disagg_goodput"] = splits[best_p]
    out["disagg_vs_colocated"] = splits[best_p] / colocated_best[1] if colocated_best[1] else None
    return out


def curve(trace: Trace, slo: SLO, replays: dict[str, Replay], rates: list[float]) -> dict:
    """SLO attainment of each replay at each rate (full replays, no early stop)."""
    return {
        name: [r(at_rate(trace, x), None).attainment(slo) for x in rates]
        for name, r in replays.items()
    }


def _plot(figs: dict[str, Any], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    splits = list(range(1, n))
    for a, t in zip(ax[0], TRACES, strict=True):
        for slo, color in (("tight", "C0"), ("loose", "C1")):
            for bw, style in (("fast", "o-"), ("slow", "x:")):
                ys = [figs[f"{t}_{slo}_{bw}_p{p}d{n - p}_goodput"] for p in splits]
                a.plot(splits, ys, style, color=color, label=f"disagg, {slo} TPOT, {bw} link")
            a.axhline(
                figs[f"{t}_{slo}_colocated_goodput"],
                color=color,
                ls="--",
                label=f"colocated, {slo} TPOT",
            )
        a.set_xticks(splits, [f"{p}:{n - p}" for p in splits])
        a.set_xlabel("prefill : decode instances")
        a.set_ylabel("goodput (req/s per instance)")
        a.set_title(f"{TRACES[t]}, N = {n}")
        a.legend(fontsize=7)
    c = ax[1][0]
    for name, ys in figs["curve_attainment"].items():
        c.plot(figs["curve_rates_per_instance"], ys, "o-", label=name)
    c.axhline(TARGET, color="gray", ls=":")
    c.set_xlabel("offered rate (req/s per instance)")
    c.set_ylabel("share meeting both SLOs")
    c.set_title("azure_code, tight TPOT, fast link")
    c.legend(fontsize=7)
    b = ax[1][1]
    if figs.get("bandwidth_sweep_gbps"):
        b.plot(figs["bandwidth_sweep_gbps"], figs["bandwidth_sweep_disagg_vs_colocated"], "o-")
        b.axhline(1.0, color="gray", ls=":")
        b.set_xscale("log")
    b.set_xlabel("KV link per prefill instance (GB/s)")
    b.set_ylabel("goodput disagg / colocated")
    b.set_title("azure_code, tight TPOT, best split at each bandwidth")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep, print the tables, write the results and the plot."""
    ap = argparse.ArgumentParser(prog="python -m bench.disagg", description=__doc__)
    ap.add_argument(
        "--quick", action="store_true", help="N=4, 300 requests, 2 budgets, 2 link speeds"
    )
    ap.add_argument("--requests", type=int, default=None, help="requests per trace window")
    args = ap.parse_args(argv)
    quick = args.quick
    n = 4 if quick else 8
    n_req = args.requests or (300 if quick else 6000)
    budgets = (256, 1024) if quick else (128, 256, 512, 1024, 2048)
    t0 = time.perf_counter()
    figs: dict[str, Any] = {
        "instances": n,
        "goodput_definition": f"max req/s per instance with >= {TARGET:.0%} meeting both SLOs",
        "model": "Llama-3-8B bf16 on one H100-SXM-80GB (cost model, simulated time)",
        "cost_fixed_s": COST.fixed,
        "cost_prefill_s_per_token": COST.prefill,
        "cost_decode_s_per_row": COST.decode,
        "cost_decode_kv_s_per_token": COST.decode_kv,
        "kv_bytes_per_token": KV_BYTES,
        "kv_capacity_tokens": DEPLOYMENT.kv_capacity_tokens,
        "max_seqs": DEPLOYMENT.max_seqs,
        "prefill_batch_tokens": DEPLOYMENT.prefill_batch_tokens,
        "colocated_budgets": list(budgets),
        "slo_ttft_s": SLOS["tight"].ttft_s,
        "slo_tpot_tight_s": SLOS["tight"].tpot_s,
        "slo_tpot_loose_s": SLOS["loose"].tpot_s,
        "bandwidth_fast_bytes_per_s": BANDWIDTHS["fast"],
        "bandwidth_slow_bytes_per_s": BANDWIDTHS["slow"],
    }
    traces: dict[str, Trace] = {}
    rows = []
    work = [(t, s, bw) for t in TRACES for s in SLOS for bw in BANDWIDTHS]
    best_colocated: dict[tuple[str, str], tuple[int, float]] = {}
    for t, s, bw in progress(work, desc="sweep"):
        if t not in traces:
            traces[t], figs[f"{t}_trace"] = load_or_synthesize(TRACES[t], n_req)
            figs[f"{t}_requests"] = len(traces[t])
        res = compare(
            traces[t],
            SLOS[s],
            n,
            budgets,
            BANDWIDTHS[bw],
            colocated_best=best_colocated.get((t, s)),
        )
        best_colocated[(t, s)] = (res["colocated_budget"], res["colocated_goodput"])
        for k, v in res.items():
            key = f"{t}_{s}_{k}" if k.startswith("colocated") else f"{t}_{s}_{bw}_{k}"
            figs[key] = v
        rows.append(
            [t, s, bw, res["colocated_goodput"], res["colocated_budget"]]
            + [res["disagg_goodput"], res["best_split"], res["disagg_vs_colocated"]]
        )
    print_table(
        f"goodput, req/s per instance (N = {n}, TTFT {SLOS['tight'].ttft_s} s)",
        ["trace", "TPOT", "link", "colocated", "budget", "disagg", "P:D", "ratio"],
        rows,
    )
    figs["goodput_disagg_vs_colocated"] = figs["code_tight_fast_disagg_vs_colocated"]
    figs["goodput_disagg_vs_colocated_conv"] = figs["conv_tight_fast_disagg_vs_colocated"]
    figs["headline"] = "azure_code, TTFT 0.5 s, TPOT 20 ms, 25 GB/s, best P:D vs best budget"
    figs["headline_best_split"] = figs["code_tight_fast_best_split"]

    sens = []
    for t in progress(TRACES, desc="sensitivity"):
        slo = SLOS["tight"]
        res = compare(traces[t], slo, n, budgets, BANDWIDTHS["fast"], cost=ROOFLINE)
        figs.update({f"roofline_{t}_tight_fast_{k}": v for k, v in res.items()})
        rate = len(traces[t]) / (traces[t][-1][0] - traces[t][0][0])
        poisson = with_poisson_arrivals(list(traces[t]), rate)
        res_p = compare(poisson, slo, n, budgets, BANDWIDTHS["fast"])
        figs.update({f"poisson_{t}_tight_fast_{k}": v for k, v in res_p.items()})
        sens.append([t, res["disagg_vs_colocated"], res["best_split"]])
        sens[-1] += [res_p["disagg_vs_colocated"], res_p["best_split"]]
    print_table(
        "tight TPOT, fast link: disagg / colocated under other assumptions",
        ["trace", "roofline cost", "P:D", "Poisson arrivals", "P:D"],
        sens,
    )

    gbps = [1.25, 25.0] if quick else list(SWEEP_GBPS)
    ratios = []
    code_best = best_colocated[("code", "tight")]
    for g in progress(gbps, desc="bandwidth"):
        res = compare(traces["code"], SLOS["tight"], n, budgets, g * 1e9, colocated_best=code_best)
        ratios.append(res["disagg_vs_colocated"])
    figs["bandwidth_sweep_gbps"] = gbps
    figs["bandwidth_sweep_disagg_vs_colocated"] = ratios
    if gbps:
        print_table(
            "azure_code, tight TPOT: disagg / colocated by link",
            ["GB/s", "ratio"],
            [[g, r] for g, r in zip(gbps, ratios, strict=True)],
        )

    figs["bandwidth_breakeven_gbps"] = next(
        (g for g, r in zip(gbps, ratios, strict=True) if (r or 0.0) >= 1.0), None
    )
    settings = [
        (f"{t}_{s}_{bw}", f"{t}, {s} TPOT, {bw} link")
        for t in TRACES
        for s in SLOS
        for bw in BANDWIDTHS
    ]
    settings += [
        (f"{m}_{t}_tight_fast", f"{t}, tight TPOT, fast link, {m}")
        for m in ("roofline", "poisson")
        for t in TRACES
    ]
    figs["does_not_pay"] = [
        f"{name}: {figs[f'{key}_disagg_vs_colocated'] or 0.0:.2f}"
        for key, name in settings
        if (figs[f"{key}_disagg_vs_colocated"] or 0.0) < 1.0
    ] + [
        f"code, tight TPOT, {g} GB/s link: {r or 0.0:.2f}"
        for g, r in zip(gbps, ratios, strict=True)
        if (r or 0.0) < 1.0
    ]
    console.print("disaggregation does not pay: " + "; ".join(figs["does_not_pay"]))

    b, g = best_colocated[("code", "tight")]
    best_p = int((figs["headline_best_split"] or f"{n // 2}:").split(":")[0])
    base = max(g, 0.05)
    per_inst = [base * f for f in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)]
    att = curve(
        traces["code"],
        SLOS["tight"],
        {
            f"colocated (budget {b})": colocated(n, b),
            f"disagg {best_p}:{n - best_p}": disagg(best_p, n - best_p, BANDWIDTHS["fast"]),
        },
        [x * n for x in per_inst],
    )
    figs["curve_rates_per_instance"] = per_inst
    figs["curve_attainment"] = att
    figs["simulation_wall_s"] = time.perf_counter() - t0

    from bench.disagg_e2e import run_e2e

    e2e = run_e2e(quick)
    figs.update({f"e2e_{k}": v for k, v in e2e.items()})
    figs["transfer_overlap_frac"] = e2e["transfer_overlap_frac"]
    console.print(
        f"end to end (tiny model, 1 prefill + 1 decode process): "
        f"{e2e['transfer_overlap_frac']:.0%} of the KV bytes moved during the prefill, "
        f"token-identical: {e2e['token_identical']}"
    )
    _plot(figs, n, results_dir() / "disagg.png")
    path = save_results("disagg", figs, quick=quick)
    console.print(f"headline: {figs['goodput_disagg_vs_colocated']} ({figs['headline']})")
    console.print(f"wrote {path}")
    return figs


if __name__ == "__main__":
    main()
