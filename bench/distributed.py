"""Sharded KV on 1, 2 and 4 gloo ranks (CPU): longest context, step time split, bytes per step.

One run spawns 4 processes on 127.0.0.1 and measures every configuration
side by side, each rank's KV capacity capped at ``--capacity`` tokens:

- 1 rank (a group of one), 2 ranks, 4 ranks with ``"local_first"``
  placement (the owner's memory first, then memory lent by the others), and
  4 ranks with ``"spread"`` placement (rBlocks dealt round-robin);
- rank 0 owns one sequence and grows it by prefill chunks, attention
  computed over the whole context each time (random queries and KV: the
  model does not matter here), until no rank has room; after each chunk it
  runs a few decode steps and records the time split of distributed
  attention (send the query, own partial attention, gather the holders'
  partials, merge) and the bytes sent and received per decode step, summed
  over layers;
- the longest context served is the sequence's length when the next
  ``reserve`` raises OutOfKVMemory; the last decode step is checked against
  dense attention over the whole context.

Figures: ``context_ratio_4_ranks`` (longest context with 4 ranks over 1
rank) and ``bytes_per_step_growth`` (bytes per decode step at the longest
context over the shortest measured context, 4 ranks, ``"spread"``: every
point spans all 4 ranks, so it isolates growth with context length);
``bytes_per_step_growth_local_first`` is the same over the local-first
points that span all 4 ranks. The per-point curves are in ``curves``.

Bytes per step depend on the holder ranks and on whether the new token's
slot is remote (its K/V then travels with the query), never on the context
length. So that points differ only in context length, a chunk plus the
decode steps after it is a whole number of rBlock cycles (4 ranks x rBlock
tokens): every point's decode steps write at the same offset of the cycle.

Run: ``python -m bench.distributed [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.common import console, print_table, save_results

if TYPE_CHECKING:
    from kvmem.distributed.directory import Placement

WORLD = 4
CONFIGS: list[tuple[str, int, Placement]] = [  # name, ranks, placement
    ("1_rank", 1, "local_first"),
    ("2_ranks", 2, "local_first"),
    ("4_ranks", 4, "local_first"),
    ("4_ranks_spread", 4, "spread"),
]
LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 2, 2, 8, 64


def grow_and_measure(alloc: Any, chunk: int, steps: int, tick: Any) -> dict[str, Any]:
    """Rank 0: grow one sequence to the group's capacity, measuring decode steps on the way."""
    import torch

    from kvmem import OutOfKVMemory
    from kvmem.distributed import decode, prefill

    g = torch.Generator().manual_seed(0)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []

    def qkv(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.randn(n, Q_HEADS, HEAD_DIM, generator=g),
            torch.randn(n, KV_HEADS, HEAD_DIM, generator=g),
            torch.randn(n, KV_HEADS, HEAD_DIM, generator=g),
        )

    def known(upto: int) -> None:
        info = alloc.seq_info("seq")
        if upto > info.num_tokens:
            alloc.append("seq", [1] * (upto - info.num_tokens))

    def room() -> int:
        """Slots the sequence can still reach: its own slack plus every free rBlock."""
        held = len(alloc.placement_of("seq")) * alloc.rblock_size
        return alloc.stats().free_tokens + held - alloc.seq_info("seq").num_computed

    def run_prefill(n: int) -> None:
        known(alloc.seq_info("seq").num_computed + n)
        alloc.reserve("seq", n)
        for layer in range(LAYERS):
            q, k, v = qkv(n)
            prefill(alloc, layer, "seq", q, k, v)
            if layer == 0:
                keys.append(k)
                values.append(v)
        alloc.commit("seq", n)

    def run_decode() -> tuple[torch.Tensor, torch.Tensor]:
        known(alloc.seq_info("seq").num_computed + 1)
        alloc.reserve("seq", 1)
        for layer in range(LAYERS):
            q, k, v = qkv(1)
            out, _ = decode(alloc, layer, ["seq"], q, k, v)
            if layer == 0:
                keys.append(k)
                values.append(v)
                last = (q, out)
        alloc.commit("seq", 1)
        return last

    alloc.add("seq", [1])
    points: list[dict[str, float]] = []
    last = None
    while (n := min(chunk, room() - steps)) > 0:
        run_prefill(n)
        samples = []
        for _ in range(steps):
            p = alloc.profile
            p.reset()
            last = run_decode()
            samples.append(
                (p.send_s, p.local_s, p.gather_s, p.merge_s, p.bytes_sent + p.bytes_received)
            )
        med = np.median(np.array(samples), axis=0)
        points.append(
            {
                "context": alloc.seq_info("seq").num_computed,
                "holders": len(set(alloc.placement_of("seq"))),
                "send_ms": 1e3 * med[0],
                "local_ms": 1e3 * med[1],
                "gather_ms": 1e3 * med[2],
                "merge_ms": 1e3 * med[3],
                "bytes": float(med[4]),
            }
        )
        tick()
    while room() > 0:  # the last few slots, one decode step each
        last = run_decode()
    longest = alloc.seq_info("seq").num_computed
    try:  # nothing more fits anywhere
        known(longest + 1)
        alloc.reserve("seq", 1)
        full = False
    except OutOfKVMemory:
        full = True
    err = float("nan")
    if last is not None:
        q, out = last
        kk = torch.cat(keys).repeat_interleave(Q_HEADS // KV_HEADS, dim=1)
        vv = torch.cat(values).repeat_interleave(Q_HEADS // KV_HEADS, dim=1)
        s = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(HEAD_DIM)
        dense = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv)
        err = (dense - out).abs().max().item()
    placement = alloc.placement_of("seq")
    alloc.free("seq")
    return {
        "longest": longest,
        "full": full,
        "points": points,
        "max_err": err,
        "blocks_per_rank": [placement.count(r) for r in range(max(placement) + 1)],
    }


def worker(rank: int, port: int, args: argparse.Namespace, q: Any) -> None:
    """One of the 4 processes: every configuration in turn; rank 0 reports."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    from kvmem.distributed import ShardedAllocator

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=600),
        )
        groups = {n: dist.new_group(list(range(n)), backend="gloo") for n in (1, 2, 4)}
        from kvmem import KVSpec

        spec = KVSpec(LAYERS, KV_HEADS, HEAD_DIM, dtype=torch.float32)
        results: dict[str, Any] = {}
        for name, n, placement in CONFIGS:
            if rank < n:
                alloc = ShardedAllocator(
                    spec,
                    num_tokens=args.capacity,
                    page_size=16,
                    rblock_size=args.rblock,
                    group=groups[n],
                    placement=placement,
                    timeout=120.0,
                    attention_impl="reference",
                )
                if rank == 0:
                    t0 = time.perf_counter()
                    res = grow_and_measure(
                        alloc, args.chunk, args.steps, lambda n=name: q.put(("tick", n))
                    )
                    res["seconds"] = time.perf_counter() - t0
                    results[name] = res
                alloc.close()
            dist.barrier()
        if rank == 0:
            q.put(("done", results))
    except BaseException:
        q.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
    q.close()
    q.join_thread()
    os._exit(0)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Spawn the 4 ranks, follow rank 0's progress, return its results."""
    import socket

    import torch.multiprocessing as mp
    from rich.progress import Progress

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, args, q), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    total = sum(n * args.capacity // args.chunk + 1 for _, n, _ in CONFIGS)
    deadline = time.monotonic() + args.deadline
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("growing sequences", total=total)
            while time.monotonic() < deadline:
                try:
                    kind, payload = q.get(timeout=1.0)
                except Exception:
                    if not any(p.is_alive() for p in procs):
                        raise RuntimeError("every rank exited without results") from None
                    continue
                if kind == "tick":
                    bar.update(task, advance=1, description=f"{payload}")
                elif kind == "error":
                    raise RuntimeError(payload)
                else:
                    return dict(payload)
        raise RuntimeError(f"no results within {args.deadline:g} s")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def figures(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The flat figures of the JSON."""
    figs: dict[str, Any] = {
        "capacity_tokens_per_rank": args.capacity,
        "rblock_tokens": args.rblock,
        "layers": LAYERS,
        "q_heads": Q_HEADS,
        "kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
    }
    for name, _, _ in CONFIGS:
        figs[f"longest_context_{name}"] = res[name]["longest"]
        figs[f"max_abs_err_{name}"] = res[name]["max_err"]
    base = res["1_rank"]["longest"]
    figs["context_ratio_2_ranks"] = res["2_ranks"]["longest"] / base
    figs["context_ratio_4_ranks"] = res["4_ranks"]["longest"] / base
    spread = res["4_ranks_spread"]["points"]
    figs["bytes_per_step_growth"] = spread[-1]["bytes"] / spread[0]["bytes"]
    figs["bytes_per_step_shortest"] = spread[0]["bytes"]
    figs["bytes_per_step_longest"] = spread[-1]["bytes"]
    figs["bytes_per_step_contexts"] = [spread[0]["context"], spread[-1]["context"]]
    full = [p for p in res["4_ranks"]["points"] if p["holders"] == 4]
    figs["bytes_per_step_growth_local_first"] = (
        full[-1]["bytes"] / full[0]["bytes"] if full else float("nan")
    )
    for name, _, _ in CONFIGS:
        p = res[name]["points"][-1]
        for part in ("send", "local", "gather", "merge"):
            figs[f"{part}_ms_{name}"] = p[f"{part}_ms"]
    figs["curves"] = {name: res[name]["points"] for name, _, _ in CONFIGS}
    figs["blocks_per_rank"] = {name: res[name]["blocks_per_rank"] for name, _, _ in CONFIGS}
    return figs


def plot(figs: dict[str, Any], path: Path) -> None:
    """Longest context, bytes per step against context, time split at the longest context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _, _ in CONFIGS]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    a.bar(names, [figs[f"longest_context_{n}"] for n in names], color="C0")
    a.axhline(figs["capacity_tokens_per_rank"], color="C7", ls="--", label="one rank's capacity")
    a.set_ylabel("longest context served (tokens)")
    a.set_title(f"context ratio 4 ranks / 1 rank: {figs['context_ratio_4_ranks']:.2f}")
    a.legend()
    a.tick_params(axis="x", rotation=20)
    for i, n in enumerate(names):
        pts = figs["curves"][n]
        b.plot(
            [p["context"] for p in pts],
            [p["bytes"] for p in pts],
            "o-",
            color=f"C{i}",
            label=n,
            ms=9 - 2 * i,
            lw=2.5 - 0.5 * i,
        )
    b.set_xlabel("context (tokens)")
    b.set_ylabel("bytes per decode step (all layers)")
    b.set_title(f"bytes/step growth, 4 ranks: {figs['bytes_per_step_growth']:.3f}")
    b.legend()
    parts = ["send", "local", "gather", "merge"]
    bottom = np.zeros(len(names))
    for j, part in enumerate(parts):
        vals = np.array([figs[f"{part}_ms_{n}"] for n in names])
        c.bar(names, vals, bottom=bottom, color=f"C{j}", label=part)
        bottom += vals
    c.set_ylabel("ms per decode step at the longest context")
    c.set_title("distributed attention time split (2 shared cores)")
    c.legend()
    c.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (under a minute on CPU)")
    ap.add_argument("--capacity", type=int, help="KV tokens per rank")
    ap.add_argument("--rblock", type=int, default=32, help="tokens per rBlock")
    ap.add_argument("--chunk", type=int, help="prefill chunk (tokens)")
    ap.add_argument("--steps", type=int, help="decode steps measured per point")
    ap.add_argument("--deadline", type=float, default=900.0, help="give up after (s)")
    args = ap.parse_args()
    args.capacity = args.capacity or (256 if args.quick else 1024)
    args.steps = args.steps or (3 if args.quick else 7)
    # every point's decode steps at the same offset in the rBlock cycle of 4 ranks
    cycle = WORLD * args.rblock
    args.chunk = args.chunk or (cycle if args.quick else 2 * cycle) - args.steps
    res = measure(args)
    figs = figures(res, args)
    rows = []
    for name, _, _ in CONFIGS:
        r = res[name]
        p = r["points"][-1]
        rows.append(
            [
                name,
                r["longest"],
                int(p["bytes"]),
                p["send_ms"],
                p["local_ms"],
                p["gather_ms"],
                p["merge_ms"],
                r["max_err"],
            ]
        )
    print_table(
        f"{args.capacity} KV tokens per rank; per decode step at the longest context (ms)",
        ["config", "longest", "bytes", "send", "local", "gather", "merge", "|err|"],
        rows,
    )
    print_table(
        "headline figures",
        ["figure", "value", "target"],
        [
            ["context_ratio_4_ranks", figs["context_ratio_4_ranks"], ">= 3.8"],
            ["bytes_per_step_growth", figs["bytes_per_step_growth"], "<= 1.05"],
            ["bytes_per_step_growth_local_first", figs["bytes_per_step_growth_local_first"], ""],
        ],
    )
    path = save_results("distributed", figs, quick=args.quick)
    plot(figs, path.with_suffix(".png"))
    console.print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
