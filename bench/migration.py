"""Live migration (Llumnix) against stop-and-copy; a fleet of 4 instances with and without it.

Part 1, downtime against context length. Two gloo processes on this CPU:
the source holds one request of ``ctx`` tokens in a paged allocator and
decodes it at a fixed step cost (a sleep; one token's KV written per step);
the destination receives it over :class:`kvmem.distributed.Transport`.

- live: :class:`kvmem.transfer.SourceMigration` pre-copies full pages on a
  worker thread while decoding goes on, then stops the request for the
  last page or two (``final_pages=1``, at most 8 stages);
- stop-and-copy: the same protocol with no pre-copy stage: the request
  stops for the whole context.

Downtime is the time the request does not decode (the final stage, from
stopping it to the destination's confirmation); total time is from the
first frame to the hand-over. KV spec: 2 layers x 8 KV heads x 128 dims
x fp16 = 8 KiB per token, 1/16 of Llama-3-8B's 128 KiB (32 layers): the
same bytes per layer and token, fewer layers, so a 32K context is 256 MiB
and fits this machine twice. Decode step cost: 20 ms.

Part 2, a simulated fleet (see :func:`fleet`): 4 instances behind the
dispatcher of :mod:`kvmem.cluster.policy` (Llumnix virtual usage), replaying
a trace at a fixed step cost, with and without the migration policy; P99
TTFT, preemptions and peak fragmentation.

``python -m bench.migration [--quick]``; writes ``bench/results/migration.json``
and ``migration.png``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from bench.common import RESULTS, console, print_table, save_results

SPEC_ARGS = {"num_layers": 2, "num_kv_heads": 8, "head_dim": 128}
STEP_S = 0.020
PAGE = 16
FLEET_SPEEDUP = 2.0


def _spec() -> Any:
    from kvmem import KVSpec

    return KVSpec(**SPEC_ARGS, dtype=torch.float16, kv_format="fp16")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _source(t: Any, ctxs: list[int], reps: int) -> list[dict[str, Any]]:
    from kvmem import create_allocator
    from kvmem.transfer import SourceMigration

    rows = []
    g = torch.Generator().manual_seed(0)
    for ctx in ctxs:
        for mode in ("live", "stop_and_copy"):
            for rep in range(reps):
                alloc = create_allocator("paged", _spec(), num_tokens=ctx + 1024, page_size=PAGE)
                tokens = torch.randint(0, 30000, (ctx,), generator=g).tolist()
                alloc.add("r", tokens)
                alloc.reserve("r", ctx)
                for i in range(alloc.spec.num_layers):  # KV bytes that are not all zero
                    layer = alloc.layer(i)
                    layer.k.view(torch.int16).random_(generator=g)
                    layer.v.view(torch.int16).random_(generator=g)
                alloc.commit("r", ctx)
                stages = 8 if mode == "live" else 0
                mig = SourceMigration(
                    t, 1, alloc, "r", lambda tk=tokens: list(tk), final_pages=1, max_stages=stages
                )
                steps = 0
                while True:  # decode: one step, then the migration moves on
                    time.sleep(STEP_S)
                    tokens.append(1)
                    alloc.append("r", [1])
                    alloc.reserve("r", 1)
                    alloc.commit("r", 1)
                    steps += 1
                    if mig.advance(lambda n=steps: {"steps": n}):
                        break
                s = mig.stats
                rows.append(
                    {
                        "ctx": ctx,
                        "mode": mode,
                        "rep": rep,
                        "downtime_s": s.downtime_s,
                        "total_s": s.total_s,
                        "stages": s.stages,
                        "bytes": s.bytes_copied,
                        "decode_steps_during": steps,
                    }
                )
                alloc.close()
    return rows


def _destination(t: Any, n: int, ctx_max: int) -> None:
    from kvmem import create_allocator
    from kvmem.transfer import receive_migration

    alloc = create_allocator("paged", _spec(), num_tokens=ctx_max + 1024, page_size=PAGE)
    for _ in range(n):
        res = receive_migration(t, 0, alloc, first_wait=600)
        if res is not None:
            alloc.free(res[0])
    alloc.close()


def _rank(rank: int, port: int, ctxs: list[int], reps: int, q: Any) -> None:
    import torch.distributed as dist

    from kvmem.distributed import Transport

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=600),
    )
    t = Transport(dist.distributed_c10d._get_default_group(), 120.0)
    if rank == 0:
        q.put(_source(t, ctxs, reps))
    else:
        _destination(t, 2 * len(ctxs) * reps, max(ctxs))
    dist.barrier()
    os._exit(0)


def downtime(ctxs: list[int], reps: int) -> list[dict[str, Any]]:
    """Part 1: run the two processes; the source's rows."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, ctxs, reps, q)) for r in range(2)]
    for p in procs:
        p.start()
    rows = q.get(timeout=1800)
    for p in procs:
        p.join(60)
    return rows


def _median(rows: list[dict[str, Any]], ctx: int, mode: str, key: str) -> float:
    return float(np.median([r[key] for r in rows if r["ctx"] == ctx and r["mode"] == mode]))


def _plot(ctxs: list[int], rows: list[dict[str, Any]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("live", "stop_and_copy"):
        ax[0].plot(
            ctxs, [1e3 * _median(rows, c, mode, "downtime_s") for c in ctxs], "o-", label=mode
        )
        ax[1].plot(ctxs, [1e3 * _median(rows, c, mode, "total_s") for c in ctxs], "o-", label=mode)
    for a, title in zip(ax, ("downtime (ms)", "total migration time (ms)"), strict=True):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("context (tokens)")
        a.set_title(title)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def fleet_figures(quick: bool) -> dict[str, Any]:
    """Part 2: the fleet with and without migration, on the same trace."""
    from kvmem.cluster.simulate import simulate_fleet
    from kvmem.traces import load_or_synthesize

    n = 400 if quick else 3000
    trace, source = load_or_synthesize("azure_conv", n)
    t0 = trace[0][0]
    # arrivals compressed so that 4 instances of 16K tokens run near their KV limit
    trace = [((a - t0) / FLEET_SPEEDUP, p, o) for a, p, o in trace]
    res = {}
    for mode in (False, True):
        res[mode] = simulate_fleet(trace, instances=4, capacity=16384, migrate=mode)
    rows = [
        [
            name,
            r.p99_ttft(),
            float(np.median(r.ttft_s)),
            r.preemptions,
            r.migrations,
            r.peak_fragmentation,
        ]
        for name, r in (("without migration", res[False]), ("with migration", res[True]))
    ]
    print_table(
        "fleet of 4 (simulated steps of 20 ms)",
        [
            "dispatcher",
            "P99 TTFT s",
            "median TTFT s",
            "preemptions",
            "migrations",
            "peak fragmentation",
        ],
        rows,
    )
    return {
        "fleet_trace": source,
        "fleet_requests": n,
        "fleet_arrival_speedup": FLEET_SPEEDUP,
        "p99_ttft_without_migration_s": res[False].p99_ttft(),
        "p99_ttft_with_migration_s": res[True].p99_ttft(),
        "p99_ttft_with_vs_without_migration": res[True].p99_ttft() / res[False].p99_ttft(),
        "preemptions_without_migration": res[False].preemptions,
        "preemptions_with_migration": res[True].preemptions,
        "migrations": res[True].migrations,
        "peak_fragmentation_without_migration": res[False].peak_fragmentation,
        "peak_fragmentation_with_migration": res[True].peak_fragmentation,
    }


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both parts, print the tables, write the results."""
    ap = argparse.ArgumentParser(prog="python -m bench.migration", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1K-8K contexts, one repetition")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    ctxs = [1024, 4096, 8192] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768]
    reps = 1 if args.quick else args.reps
    rows = downtime(ctxs, reps)
    table = []
    for c in ctxs:
        live, sc = (_median(rows, c, m, "downtime_s") for m in ("live", "stop_and_copy"))
        table.append(
            [
                c,
                1e3 * live,
                1e3 * sc,
                sc / live,
                1e3 * _median(rows, c, "live", "total_s"),
                1e3 * _median(rows, c, "stop_and_copy", "total_s"),
            ]
        )
    print_table(
        "downtime vs context (ms, median)",
        ["ctx", "live", "stop&copy", "ratio", "live total", "s&c total"],
        table,
    )
    big, small = ctxs[-1], ctxs[0]
    figures: dict[str, Any] = {
        "command": (
            f"KVMEM_TRACES={os.environ['KVMEM_TRACES']} " if "KVMEM_TRACES" in os.environ else ""
        )
        + " ".join(["python -m bench.migration", *(argv or sys.argv[1:])]),
        "commit": _commit(),
        "quick": args.quick,
        "spec": {
            **SPEC_ARGS,
            "dtype": "fp16",
            "bytes_per_token": 8192,
            "note": "1/16 of Llama-3-8B per token: 2 of its 32 layers",
        },
        "decode_step_s": STEP_S,
        # named for the full run's 1K..32K; --quick measures them at its own contexts
        "downtime_contexts": [small, big],
        "downtime_ratio_32k": _median(rows, big, "stop_and_copy", "downtime_s")
        / _median(rows, big, "live", "downtime_s"),
        "downtime_growth_1k_to_32k": _median(rows, big, "live", "downtime_s")
        / _median(rows, small, "live", "downtime_s"),
        "downtime_rows": rows,
    }
    figures.update(fleet_figures(args.quick))
    RESULTS.mkdir(parents=True, exist_ok=True)
    _plot(ctxs, rows, RESULTS / "migration.png")
    path = save_results("migration", figures, args.quick)
    console.print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
