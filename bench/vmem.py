"""vmem driver and decode-step costs: map/unmap latency per page, and vmem vs paged per step.

Scenario 1, driver latency. For page sizes 4 KiB, 64 KiB and 2 MiB, the host
driver (memfd + mmap) maps ``--pages`` pages into a reserved range and
unmaps them: the first map of a page (which also allocates its memory),
unmap, and a map of a page already used. Mean microseconds per page, the
median of ``--reps`` rounds. The CUDA driver is measured the same way where
a GPU and cuda-python are present.

Scenario 2, decode-step overhead. ``--batch`` sequences decode ``--steps``
tokens after a prompt; the timed allocator step is, for every sequence,
``append + reserve(1)``, then one ``layout`` of the batch, then ``commit``
for every sequence. Prompt lengths are staggered so that every step has
some sequences crossing into a new page. Compared side by side: paged
(16-token pages) and vmem with the same 16 tokens per page (4 KiB host
pages backed up front, a KV spec of 32 layers x 1 head x 64 dims, fp16, no
prefix caching on either), with mapping ahead on and off. With mapping
ahead, the worker either catches up on the prompts' pages before the timed
steps (``vmem_ahead``, the figure the issue's target is about) or maps them
during the first timed steps (``vmem_ahead_cold``); the page groups mapped
during the timed steps, by the worker and by the steps, are counted. Steps
run back to back, and with pauses between steps (``--gaps-ms``) standing in for the
model's forward pass (not timed), which is when a map-ahead worker does its
work. With the native extension the worker's mmaps run on a native thread at
``SCHED_IDLE`` priority: on a machine whose other cores are busy, it maps
only when the step's thread waits (in a gap, or for a page it needs). One untimed run of each kind warms the process up first; then
``--reps`` rounds run every kind once each, in alternating order, so that
the machine's noise falls on all kinds alike. Overheads against paged are
given on the median step and on the mean step (all rounds' steps pooled),
and as the median over rounds of each round's ratio of mean steps (a
round's kinds ran back to back, so one noisy minute moves its ratio less).

Scenario 3, long decode: ``--long-batch`` sequences decode
``--long-steps`` tokens back to back, far past the pages the worker maps
before timing, so that in the timed steps the worker keeps mapping (its
figures end in ``_long``). vm.max_map_count bounds batch x length here.

Run: ``python -m bench.vmem [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import console, print_table, progress, save_results
from kvmem import KVAllocator, KVSpec, create_allocator
from kvmem.backends.vmem import VMemAllocator
from kvmem.backends.vmem.driver import VMemDriver
from kvmem.backends.vmem.host import HostDriver

KIB = 1024
SPEC = KVSpec(32, 1, 64, dtype=torch.float16)  # 256 bytes per token per layer


def driver_latency(
    make: type[VMemDriver] | Any,
    page_bytes: int,
    pages: int,
    reps: int,
) -> dict[str, float]:
    """Mean µs per page of first map, unmap and re-map (median over rounds)."""
    first, unmap, remap = [], [], []
    for _ in range(reps):
        drv = make()
        base = drv.reserve(pages * page_bytes)
        handles = [drv.create(page_bytes) for _ in range(pages)]
        addrs = [base + i * page_bytes for i in range(pages)]
        t0 = time.perf_counter()
        for a, h in zip(addrs, handles, strict=True):
            drv.map(a, page_bytes, h)
        t1 = time.perf_counter()
        for a in addrs:
            drv.unmap(a, page_bytes)
        t2 = time.perf_counter()
        for a, h in zip(addrs, reversed(handles), strict=True):
            drv.map(a, page_bytes, h)
        t3 = time.perf_counter()
        for a in addrs:
            drv.unmap(a, page_bytes)
        for h in handles:
            drv.release(h)
        drv.free_range(base, pages * page_bytes)
        drv.close()
        first.append((t1 - t0) / pages)
        unmap.append((t2 - t1) / pages)
        remap.append((t3 - t2) / pages)
    return {
        "first_map_us": 1e6 * statistics.median(first),
        "unmap_us": 1e6 * statistics.median(unmap),
        "map_us": 1e6 * statistics.median(remap),
    }


def make_alloc(kind: str, batch: int, max_len: int) -> KVAllocator:
    """A paged allocator (``kind="paged"``) or a host vmem one (``vmem_sync``, ``vmem_ahead``)."""
    num_tokens = batch * max_len
    if kind == "paged":
        return create_allocator(
            "paged", SPEC, num_tokens=num_tokens, page_size=16, prefix_caching=False
        )
    return make_vmem(kind.startswith("vmem_ahead"), batch, max_len)


def make_vmem(map_ahead: bool, batch: int, max_len: int) -> VMemAllocator:
    """A host vmem allocator for ``batch`` sequences of up to ``max_len`` tokens."""
    # pages backed when created, as cuMemCreate does: mapping is then the only driver cost
    return VMemAllocator(
        SPEC,
        num_tokens=batch * max_len,
        page_bytes=4 * KIB,
        max_seqs=batch,
        max_seq_len=max_len,
        map_ahead=map_ahead,
        driver=HostDriver(prealloc=True),
        prefix_caching=False,  # as the paged baseline: the step's own costs only
    )


def decode_run(
    kind: str,
    batch: int,
    prompt: int,
    steps: int,
    gap_s: float,
) -> tuple[list[float], dict[str, float]]:
    """Seconds per allocator-side decode step for one fresh allocator, and mapping counts.

    Kinds: ``paged``; ``vmem_ahead`` (the worker catches up before the
    timed steps); ``vmem_ahead_cold`` (timing starts right after the
    prompts, while the worker maps their first chunks); ``vmem_sync``. The
    counts are page groups mapped during the timed steps by the worker
    (``worker_groups``) and by the steps themselves (``step_groups``).
    """
    max_len = prompt + steps + 64
    vm = make_vmem(kind.startswith("vmem_ahead"), batch, max_len) if kind != "paged" else None
    a = vm if vm is not None else make_alloc(kind, batch, max_len)
    sids = list(range(batch))
    for sid in sids:  # staggered prompts: page crossings spread over the steps
        n = prompt + (sid * 37) % 64
        a.add(sid, [1] * n)
        a.reserve(sid, n)
        a.commit(sid, n)
    if vm is not None and kind != "vmem_ahead_cold":  # the worker catches up before timing
        vm.wait_map_ahead(10)
    before = a.stats().extra
    out = []
    batch_ones = [(sid, 1) for sid in sids]
    for _ in range(steps):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        for sid in sids:
            a.append(sid, [1])
            a.reserve(sid, 1)
        a.layout(batch_ones)
        for sid in sids:
            a.commit(sid, 1)
        out.append(time.perf_counter() - t0)
    a.check_integrity()
    after = a.stats().extra
    a.close()
    counts = {"worker_groups": 0.0, "step_groups": 0.0}
    if vm is not None:
        worker = after["map_ahead_groups"] - before["map_ahead_groups"]
        mapped = (after["map_calls"] - before["map_calls"]) / SPEC.num_layers
        counts = {"worker_groups": worker, "step_groups": mapped - worker}
    return out, counts


KINDS = ("paged", "vmem_ahead", "vmem_ahead_cold", "vmem_sync")


def decode_overhead(
    batch: int,
    prompt: int,
    steps: int,
    reps: int,
    gap_s: float,
    suffix: str,
) -> dict[str, float]:
    """Step times per allocator kind over interleaved rounds; figure names end in ``suffix``.

    ``<kind>_step_us`` is the median step, ``_step_mean_us`` the mean (every
    round's steps pooled), ``_step_p90_us`` / ``_step_p99_us`` percentiles;
    ``<kind>_overhead`` and ``<kind>_mean_overhead`` compare the median and
    the mean with paged's; ``<kind>_round_mean_overhead`` is the median over
    rounds of the round's mean-step ratio.
    """
    kinds = list(KINDS)
    times: dict[str, list[list[float]]] = {k: [] for k in kinds}
    counts = {k: {"worker_groups": 0.0, "step_groups": 0.0} for k in kinds}
    rounds = [k for r in range(reps) for k in (kinds if r % 2 == 0 else kinds[::-1])]
    label = "back to back" if not gap_s else f"{gap_s * 1e3:g} ms gap"
    for kind in kinds:  # warm-up: first-call costs (imports, native loads) land on no kind
        decode_run(kind, batch, prompt, min(steps, 20), gap_s)
    for kind in progress(rounds, total=len(rounds), desc=f"decode ({label})"):
        t, c = decode_run(kind, batch, prompt, steps, gap_s)
        times[kind].append(t)
        for name, v in c.items():
            counts[kind][name] += v / reps
    pooled = {k: np.concatenate(v) for k, v in times.items()}
    figs: dict[str, float] = {}
    for k in kinds[1:]:  # page groups mapped during a run's timed steps, by whom
        figs[f"{k}_worker_groups"] = counts[k]["worker_groups"]
        figs[f"{k}_step_groups"] = counts[k]["step_groups"]
    for k in kinds:
        figs[f"{k}_step_us"] = 1e6 * float(np.median(pooled[k]))
        figs[f"{k}_step_mean_us"] = 1e6 * float(np.mean(pooled[k]))
        figs[f"{k}_step_p90_us"] = 1e6 * float(np.percentile(pooled[k], 90))
        figs[f"{k}_step_p99_us"] = 1e6 * float(np.percentile(pooled[k], 99))
    for k in kinds[1:]:
        figs[f"{k}_overhead"] = figs[f"{k}_step_us"] / figs["paged_step_us"] - 1
        figs[f"{k}_mean_overhead"] = figs[f"{k}_step_mean_us"] / figs["paged_step_mean_us"] - 1
        ratios = [np.mean(a) / np.mean(p) for a, p in zip(times[k], times["paged"], strict=True)]
        figs[f"{k}_round_mean_overhead"] = float(np.median(ratios)) - 1
    return {k + suffix: v for k, v in figs.items()}


def plot(figs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    sizes = ["4k", "64k", "2m"]
    x = np.arange(len(sizes))
    for i, what in enumerate(("first_map", "map", "unmap")):
        a.bar(x + (i - 1) * 0.25, [figs[f"host_{s}_{what}_us"] for s in sizes], 0.25, label=what)
    a.set_xticks(x, [f"{s} page" for s in sizes])
    a.set_ylabel("µs per page (log)")
    a.set_yscale("log")
    a.set_title("host driver (memfd + mmap)")
    a.legend()
    names = list(KINDS)
    gaps = figs["gaps_ms"]
    w = 0.8 / len(gaps)
    for i, g in enumerate(gaps):
        suffix = f"_gap{g:g}ms" if g else ""
        x = np.arange(len(names)) + (i - (len(gaps) - 1) / 2) * w
        bars = b.bar(
            x,
            [figs[f"{n}_step_us{suffix}"] for n in names],
            w,
            label=f"{g:g} ms gap" if g else "back to back",
        )
        means = [figs[f"{n}_step_mean_us{suffix}"] for n in names]
        b.scatter(x, means, marker="_", s=200, color=bars.patches[0].get_facecolor(), zorder=3)
    b.set_xticks(np.arange(len(names)), [n.replace("_", "\n", 1) for n in names])
    b.set_ylabel(f"µs per allocator step (batch {figs['batch']}, log)")
    b.set_yscale("log")
    b.set_title("decode-step cost: median (bars), mean (dashes)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (under a minute on CPU)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument(
        "--long-batch", type=int, default=8, help="sequences of the long decode (scenario 3)"
    )
    ap.add_argument(
        "--long-steps", type=int, default=None, help="its steps (default 3000; 1000 with --quick)"
    )
    ap.add_argument(
        "--gaps-ms",
        default=None,
        help="pauses between steps standing in for the forward pass, comma list "
        "(default 0,2,10; 0,5 with --quick)",
    )
    args = ap.parse_args()
    steps = args.steps or (100 if args.quick else 180)  # 4 KiB pages: vm.max_map_count caps it
    long_steps = args.long_steps or (1000 if args.quick else 3000)
    reps = args.reps or (3 if args.quick else 9)
    gaps = [float(g) for g in (args.gaps_ms or ("0,5" if args.quick else "0,2,10")).split(",")]
    figs: dict[str, Any] = {
        "batch": args.batch,
        "prompt": args.prompt,
        "steps": steps,
        "reps": reps,
        "gaps_ms": gaps,
        "tokens_per_page": 4 * KIB // SPEC.bytes_per_token_layer,
        "layers": SPEC.num_layers,
    }
    for label, pb, pages in (("4k", 4 * KIB, 1024), ("64k", 64 * KIB, 256), ("2m", 2 << 20, 32)):
        for k, v in driver_latency(HostDriver, pb, pages, reps).items():
            figs[f"host_{label}_{k}"] = v
    if torch.cuda.is_available():
        try:
            from kvmem.backends.vmem.cuda import CudaDriver

            gran = CudaDriver("cuda").granularity
            for k, v in driver_latency(lambda: CudaDriver("cuda"), gran, 64, reps).items():
                figs[f"cuda_{k}"] = v
            figs["cuda_page_bytes"] = gran
        except Exception as e:  # reported, not fatal: the host figures still stand
            figs["cuda"] = f"not run: {e}"
    else:
        figs["cuda"] = "not run: no CUDA device"
    for g in gaps:
        suffix = f"_gap{g:g}ms" if g else ""
        figs.update(decode_overhead(args.batch, args.prompt, steps, reps, g / 1e3, suffix))
    figs["long_batch"], figs["long_steps"] = args.long_batch, long_steps
    figs.update(decode_overhead(args.long_batch, args.prompt, long_steps, reps, 0.0, "_long"))
    rows = [
        [
            f"host {s} page",
            figs[f"host_{s}_first_map_us"],
            figs[f"host_{s}_map_us"],
            figs[f"host_{s}_unmap_us"],
        ]
        for s in ("4k", "64k", "2m")
    ]
    print_table("driver: µs per page", ["", "first map", "map", "unmap"], rows)
    scenarios = [(g, f"_gap{g:g}ms" if g else "", args.batch) for g in gaps]
    for g, suffix, batch in [*scenarios, (0.0, "_long", args.long_batch)]:
        table = []
        for name, label in (
            ("paged", "paged"),
            ("vmem_ahead", "vmem, map ahead"),
            ("vmem_ahead_cold", "vmem, map ahead, cold"),
            ("vmem_sync", "vmem, no map ahead"),
        ):
            row: list[Any] = [label, figs[f"{name}_step_us{suffix}"]]
            row.append(0.0 if name == "paged" else figs[f"{name}_overhead{suffix}"])
            row.append(figs[f"{name}_step_mean_us{suffix}"])
            for what in ("mean_overhead", "round_mean_overhead"):
                row.append(0.0 if name == "paged" else figs[f"{name}_{what}{suffix}"])
            row.append(figs[f"{name}_step_p99_us{suffix}"])
            table.append(row)
        what = f"{g:g} ms gap" if g else "back to back"
        if suffix == "_long":
            what += f", {long_steps} steps"
        print_table(
            f"allocator decode step, batch {batch}, {what} (µs; overheads vs paged)",
            ["", "median", "overhead", "mean", "overhead", "per-round", "p99"],
            table,
        )
    path = save_results("vmem", figs, quick=args.quick)
    plot(figs, path.with_suffix(".png"))
    console.print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
