"""Disaggregated prefill/decode end to end: the tiny model on CPU processes, 1 prefill + 1 decode.

A :class:`kvmem.cluster.Cluster` with one prefill and one decode instance
(spawned processes, gloo) serves several requests with long-ish prompts at
once; ``max_num_batched_tokens=32`` chunks every prompt, so each request's
KV can move page by page while its later chunks compute. Measured from the
prefill side's hand-off statistics:

- ``transfer_overlap_frac``: the fraction of the KV bytes moved while the
  prompt was still being prefilled (stages sent before the first token was
  sampled; the rest moves with the hand-over, after it);
- bytes moved, stages per request, prefix positions the decode side
  already held, the time from BEGIN to the hand-over and of the final
  stage (the prefill engine's loop waits for it);

and at the front: whether every request's greedy tokens equal a colocated
engine's (``token_identical``), time to first token and to the last token.
Without ``quick`` the same requests also run on two colocated instances
(``Cluster(2)``) in the same run, the two set-ups alternating over three
rounds (the machine is shared: the time figures are medians over rounds),
for the latency ratios (same process count; the colocated pair prefills
on both instances, the disaggregated pair on one).

The tiny model's prefill chunk takes a millisecond or two on a CPU while a
hand-off frame costs milliseconds of Python (pickling, a worker thread, the
GIL), so the overlap here is a floor: with a real model a chunk takes tens
of milliseconds and a frame the same.

``run_e2e(quick)`` returns the figures (``bench.disagg`` calls it);
``python -m bench.disagg_e2e [--quick]`` prints them and writes
``bench/results/disagg_e2e.json`` and ``disagg_e2e.png``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

ROUNDS = 3
OPTS: dict[str, Any] = {
    "attention_impl": "reference",
    "num_kv_tokens": 8192,
    "seed": 0,
    "max_num_batched_tokens": 16,
}


def _prompts(quick: bool) -> list[list[int]]:
    lengths = (160, 300, 220, 400) if quick else (160, 300, 220, 400, 260, 500, 340, 180)
    out = [[(31 * i + 7 * j) % 250 + 1 for j in range(n)] for i, n in enumerate(lengths)]
    out.append(out[0] + [9] * 40)  # a prefix hit at the prefill side
    return out


class _Timeline:
    """Each request's tokens, first-output and finish times at the front."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.first: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.lock = threading.Lock()

    def __call__(self, out: Any) -> None:
        now = time.perf_counter()
        with self.lock:
            self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.new_token_ids:
                self.first.setdefault(out.request_id, now)
            if out.finished:
                self.done[out.request_id] = now


def _serve(n: int, prefill: int, prompts: list[list[int]], params: Any) -> dict[str, Any]:
    from kvmem.cluster import Cluster

    tl = _Timeline()
    with Cluster(n, OPTS, prefill=prefill, migrate=False) as c:
        up = time.monotonic() + 120
        while any(m is None for m in c.metrics) and time.monotonic() < up:
            time.sleep(0.05)  # every instance is up and has reported
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            c.add_request(p, params, request_id=f"r{i}", on_output=tl)
        end = time.monotonic() + 600
        while len(tl.done) < len(prompts) and time.monotonic() < end:
            time.sleep(0.02)
        handoffs = list(c.handoffs)
    ids = [f"r{i}" for i in range(len(prompts))]
    return {
        "tokens": [tl.tokens.get(r, []) for r in ids],
        "ttft": [tl.first[r] - t0 for r in ids if r in tl.first],
        "latency": [tl.done[r] - t0 for r in ids if r in tl.done],
        "handoffs": handoffs,
    }


def run_e2e(quick: bool) -> dict[str, Any]:
    """Serve the requests on 1 prefill + 1 decode instance (and, unless ``quick``, on 2
    colocated ones, alternating over ``ROUNDS`` rounds); the figures of the module docstring
    (time figures: the median over rounds of each round's mean)."""
    from kvmem.engine import Engine, SamplingParams

    prompts = _prompts(quick)
    params = SamplingParams(max_tokens=16 if quick else 32, temperature=0.0, ignore_eos=True)
    with Engine(**OPTS) as eng:
        ref = [c.output_token_ids for c in eng.generate(prompts, params)]
    modes = [(2, 1, "disagg")] + ([] if quick else [(2, 0, "colocated")])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for *_, name in modes}
    for k in range(1 if quick else ROUNDS):
        for n, prefill, name in modes if k % 2 == 0 else modes[::-1]:
            runs[name].append(_serve(n, prefill, prompts, params))
    stats = [s for run in runs["disagg"] for *_, s in run["handoffs"]]
    moved = sum(s.bytes_copied for s in stats)
    out: dict[str, Any] = {
        "requests": len(prompts),
        "prompt_tokens": sum(len(p) for p in prompts),
        "max_num_batched_tokens": OPTS["max_num_batched_tokens"],
        "rounds": len(runs["disagg"]),
        "handoffs": len(stats),
        "token_identical": all(run["tokens"] == ref for run in runs["disagg"]),
        "transfer_overlap_frac": sum(s.bytes_early for s in stats) / moved if moved else 0.0,
        "kv_bytes_moved_per_round": moved // len(runs["disagg"]),
        "stages_per_request": statistics.mean(s.stages for s in stats) if stats else 0.0,
        "decode_side_cached_tokens": sum(s.tokens_cached for s in stats) // len(runs["disagg"]),
        "handoff_s_mean": statistics.mean(s.total_s for s in stats) if stats else 0.0,
        # the prefill engine's loop waits for the last stage and the decode side's confirmation
        "final_stage_s_mean": statistics.mean(s.downtime_s for s in stats) if stats else 0.0,
    }
    for name, rs in runs.items():
        if name != "disagg":
            out[f"{name}_token_identical"] = all(run["tokens"] == ref for run in rs)
        for stat in ("ttft", "latency"):
            means = [statistics.mean(run[stat]) for run in rs if run[stat]]
            out[f"{name}_{stat}_s_mean"] = statistics.median(means) if means else None
    if not quick:
        for stat in ("ttft", "latency"):
            out[f"{stat}_ratio_disagg_over_colocated"] = (
                out[f"disagg_{stat}_s_mean"] / out[f"colocated_{stat}_s_mean"]
            )
    return out


def _plot(figures: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    moved = figures["kv_bytes_moved_per_round"] / 2**20
    early = moved * figures["transfer_overlap_frac"]
    ax[0].bar(["during prefill", "at hand-over"], [early, moved - early])
    ax[0].set_title("KV moved (MiB)")
    modes = [m for m in ("disagg", "colocated") if figures.get(f"{m}_ttft_s_mean") is not None]
    for k, stat in enumerate(("ttft", "latency")):
        vals = [figures[f"{m}_{stat}_s_mean"] for m in modes]
        ax[1].bar([x + 0.4 * k for x in range(len(modes))], vals, width=0.4, label=stat)
    ax[1].set_xticks(
        [x + 0.2 for x in range(len(modes))], ["1 prefill + 1 decode", "2 colocated"][: len(modes)]
    )
    ax[1].set_title("mean time per request (s)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.disagg_e2e [--quick]``."""
    from bench.common import print_table, results_dir, save_results

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer, shorter requests; no baseline")
    args = p.parse_args(argv)
    figures = run_e2e(args.quick)
    print_table(
        "disaggregated prefill/decode, end to end (tiny model, CPU processes)",
        ["figure", "value"],
        [[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in figures.items()],
    )
    save_results("disagg_e2e", figures, args.quick)
    _plot(figures, results_dir() / "disagg_e2e.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
