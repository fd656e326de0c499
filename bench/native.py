"""Native batched primitives against their Python versions, side by side in one run.

Each figure times the same work both ways, interleaved repetition by
repetition (the machine is shared and its speed drifts), and reports medians:

* ``copy``: ``n`` copies of 64 bytes between two uint8 pools: one
  ``copy_`` each (the Python path, and what kvmem's swap did before) against
  one :func:`kvmem.native.copy_segments` call. ``copy_overhead_us_per_call``
  is the native time per copy (what a copy costs beyond its bytes).
* ``swap``: a Llama-3-8B-like request (32 layers of 64 KiB in a 2 MiB page
  row, block-major pool, pages scattered in the device pool) copied to a host
  pool: per page per layer (vLLM 0.x's swap), per page row, against one
  contiguous copy of the same bytes (the limit). Single-threaded, like the
  swap benchmark; ``perpage_swap_frac_of_limit`` is limit time / native
  per-page-per-layer time.
* ``host map``: mapping memfd pages into a reserved range and unmapping
  them (PROT_NONE back): a ctypes ``mmap`` per page (the host vmem driver's
  loop) against one native call; per page.
* ``layout``: :func:`kvmem.native.layout_arrays` for a decode step of 256
  sequences (1 new token each, 1-4K tokens of KV, 16-token pages), numpy
  against native; the arrays only, not the allocator's per-sequence loop.
* ``prefix hash``: keys of a 12K-token prompt's 16-token pages: the paged
  backend's ``hash((previous hash, tuple(page)))`` loop, the numpy version of
  :func:`kvmem.native.page_keys`, and the native one (from a Python list,
  as the allocator holds tokens); ns per prompt token. For scale,
  ``paged_add_commit_ns_per_token`` is the whole prompt through a paged
  allocator (add, reserve, commit, free) on the meta device, and
  ``paged_add_commit_python_ns_per_token`` the same on the Python path.
* ``decode step``: ``bench.alloc``'s scenario 1 (256 sequences, Azure-trace
  lengths, churn) with the batched calls, its steps interleaved on two
  allocators: one with the native path (layout arrays, page hashes, the
  block-table batch passes), one with every operation's Python version (as
  under ``KVMEM_NATIVE=0``, through :func:`kvmem.native.python_only`);
  ``us_per_seq_step`` and ``us_per_seq_step_python``, medians over steps.

Run: ``python -m bench.native [--quick]``; writes bench/results/native.json and native.png.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import git_commit
from kvmem import native

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {
    "copy_overhead_us_per_call": ("<=", 0.5),
    "host_map_us_per_page": ("<=", 2.0),
    "layout_us_256_seqs": ("<=", 50.0),
    "prefix_hash_ns_per_token": ("<=", 30.0),
    "perpage_swap_frac_of_limit": (">=", 0.9),
    "us_per_seq_step": ("<=", 2.0),
}


def side_by_side(fns: dict[str, Callable[[], Any]], reps: int, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, the functions interleaved each repetition."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm up
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_copy(n: int, reps: int) -> dict[str, float]:
    src = torch.randint(0, 256, (n, 256), dtype=torch.uint8)
    dst = torch.zeros(n, 256, dtype=torch.uint8)
    perm = np.random.default_rng(0).permutation(n)
    segs = np.stack([perm * 256, np.arange(n) * 256, np.full(n, 64)], axis=1)
    s, d = src.view(-1), dst.view(-1)
    pairs = segs.tolist()

    def loop() -> None:
        for a, b, k in pairs:
            d[b : b + k].copy_(s[a : a + k])

    t = side_by_side(
        {
            "python": loop,
            "native_fallback": lambda: native.copy_segments(src, dst, segs, native=False),
            "native": lambda: native.copy_segments(src, dst, segs),
        },
        reps,
    )
    return {
        "copy_overhead_us_per_call": t["native"] / n * 1e6,
        "copy_python_us_per_call": t["python"] / n * 1e6,
        "copy_fallback_us_per_call": t["native_fallback"] / n * 1e6,
        "copy_calls": n,
        "copy_speedup": t["python"] / t["native"],
    }


def bench_swap(pages: int, reps: int) -> dict[str, float]:
    layers, lb = 32, 64 * 1024
    row = layers * lb
    dev = torch.randint(0, 256, (2 * pages, row), dtype=torch.uint8)
    host = torch.zeros(pages, row, dtype=torch.uint8)
    src_pages = np.random.default_rng(1).permutation(2 * pages)[:pages]
    runs = np.stack([src_pages, np.arange(pages), np.ones(pages, dtype=np.int64)], axis=1)
    contiguous = dev[:pages]
    one = np.array([[0, 0, pages * row]])
    per_layer = native.runs_to_segments(runs, row, lb)
    per_row = native.runs_to_segments(runs, row)
    per_layer_list = per_layer.tolist()
    s, d = dev.view(-1), host.view(-1)

    def python_per_layer() -> None:
        for a, b, k in per_layer_list:
            d[b : b + k].copy_(s[a : a + k])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = side_by_side(
            {
                "limit": lambda: host.copy_(contiguous),
                "native_per_layer": lambda: native.copy_segments(dev, host, per_layer, threads=1),
                "limit_native": lambda: native.copy_segments(dev, host, one, threads=1),
                "python_per_layer": python_per_layer,
                "native_per_row": lambda: native.copy_segments(dev, host, per_row, threads=1),
            },
            reps,
        )
    finally:
        torch.set_num_threads(threads)
    limit = min(t["limit"], t["limit_native"])
    nbytes = pages * row
    return {
        "perpage_swap_frac_of_limit": limit / t["native_per_layer"],
        "perpage_swap_frac_of_limit_python": limit / t["python_per_layer"],
        "perrow_swap_frac_of_limit": limit / t["native_per_row"],
        "swap_limit_gbps": nbytes / limit / 1e9,
        "swap_pages": pages,
        "swap_copies_per_layer_mode": len(per_layer),
    }


def bench_host_map(pages: int, reps: int) -> dict[str, float]:
    if not hasattr(os, "memfd_create"):
        return {}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_int64]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = 64 * 1024
    fd = os.memfd_create("kvmem-bench", os.MFD_CLOEXEC)
    os.ftruncate(fd, pages * size)
    length = pages * size
    base = libc.mmap(None, length, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000, -1, 0)
    addrs = base + np.arange(pages, dtype=np.int64)[::-1].copy() * size
    offs = np.arange(pages, dtype=np.int64) * size
    res: dict[str, list[float]] = {k: [] for k in ("py_map", "py_unmap", "nat_map", "nat_unmap")}
    try:
        for _ in range(reps):
            for tag, nat in (("py", False), ("nat", None)):
                t0 = time.perf_counter()
                assert (
                    native.host_map_pages(fd, base, length, addrs, offs, size, native=nat)[1] == 0
                )
                t1 = time.perf_counter()
                assert native.host_unmap_pages(base, length, addrs, size, native=nat)[1] == 0
                t2 = time.perf_counter()
                res[f"{tag}_map"].append((t1 - t0) / pages)
                res[f"{tag}_unmap"].append((t2 - t1) / pages)
    finally:
        libc.munmap(base, length)
        os.close(fd)
    m = {k: statistics.median(v) * 1e6 for k, v in res.items()}
    return {
        "host_map_us_per_page": m["nat_map"],
        "host_unmap_us_per_page": m["nat_unmap"],
        "host_map_python_us_per_page": m["py_map"],
        "host_unmap_python_us_per_page": m["py_unmap"],
        "host_map_pages": pages,
    }


def bench_layout(reps: int) -> dict[str, float]:
    rng = np.random.default_rng(2)
    b, ps = 256, 16
    seq = rng.integers(1024, 4096, b).astype(np.int32)
    q = np.ones(b, dtype=np.int32)
    width = int(((seq + ps - 1) // ps).max()) + 4
    table = rng.integers(0, 100_000, (b, width)).astype(np.int32)
    t = side_by_side(
        {
            "python": lambda: native.layout_arrays(table, seq, q, ps, native=False),
            "native": lambda: native.layout_arrays(table, seq, q, ps),
        },
        reps,
        inner=20,
    )
    return {
        "layout_us_256_seqs": t["native"] * 1e6,
        "layout_python_us_256_seqs": t["python"] * 1e6,
        "layout_speedup": t["python"] / t["native"],
    }


def bench_prefix_hash(reps: int) -> dict[str, float]:
    n, ps = 12 * 1024, 16
    toks = np.random.default_rng(3).integers(0, 128_000, n).tolist()

    def paged_keys() -> list[int]:  # kvmem/backends/paged.py _key_of + hash, per page
        hashes: list[int] = []
        root = hash(None)
        for i in range(n // ps):
            hashes.append(hash((hashes[i - 1] if i else root, tuple(toks[i * ps : (i + 1) * ps]))))
        return hashes

    from kvmem import KVSpec, create_allocator

    alloc = create_allocator("paged", KVSpec(1, 1, 8), num_tokens=n + ps, device="meta")

    salt = iter(range(10**9))

    def paged_add() -> None:  # a new prompt through the allocator: add, reserve, commit, free
        alloc.add("p", toks, cache_salt=next(salt))  # a fresh salt: a cache miss every time
        alloc.reserve("p", n)
        alloc.commit("p", n)
        alloc.free("p")

    def paged_add_python() -> None:
        with native.python_only():
            paged_add()

    t = side_by_side(
        {
            "paged_add": paged_add,
            "paged_add_python": paged_add_python,
            "paged": paged_keys,
            "numpy": lambda: native.page_keys(toks, ps, native=False),
            "native": lambda: native.page_keys(toks, ps),
        },
        reps,
    )
    return {
        "paged_add_commit_python_ns_per_token": t["paged_add_python"] / n * 1e9,
        "prefix_hash_ns_per_token": t["native"] / n * 1e9,
        "prefix_hash_numpy_ns_per_token": t["numpy"] / n * 1e9,
        "prefix_hash_paged_ns_per_token": t["paged"] / n * 1e9,
        "paged_add_commit_ns_per_token": t["paged_add"] / n * 1e9,
        "prefix_hash_tokens": n,
    }


def bench_decode(steps: int) -> dict[str, float]:
    """bench.alloc's scenario 1 with the batched calls: native against the Python path."""
    from bench.alloc import DecodeRun, trace_prompts

    batch = 256
    prompts = trace_prompts(steps * 4 + batch, 0)
    runs = {"native": DecodeRun(prompts, batch, True), "python": DecodeRun(prompts, batch, True)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(steps):
        for k in ("native", "python") if i % 2 else ("python", "native"):
            if k == "python":
                with native.python_only():
                    times[k].append(runs[k].step())
            else:
                times[k].append(runs[k].step())
    for r in runs.values():
        r.alloc.check_integrity()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "us_per_seq_step": med["native"],
        "us_per_seq_step_python": med["python"],
        "us_per_seq_step_speedup": med["python"] / med["native"],
        "decode_steps": steps,
        "decode_batch": batch,
    }


def machine() -> dict[str, Any]:
    """What ran the benchmark."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), cpu)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "native": str(native.status()),
    }


def plot(fig: dict[str, Any], path: Path) -> None:
    """One panel per operation: Python against native, log time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("copy, us per copy", "copy_python_us_per_call", "copy_overhead_us_per_call"),
        ("host map, us per page", "host_map_python_us_per_page", "host_map_us_per_page"),
        ("host unmap, us per page", "host_unmap_python_us_per_page", "host_unmap_us_per_page"),
        ("layout, us per 256 seqs", "layout_python_us_256_seqs", "layout_us_256_seqs"),
        ("prefix keys, ns per token", "prefix_hash_paged_ns_per_token", "prefix_hash_ns_per_token"),
        ("decode step, us per seq", "us_per_seq_step_python", "us_per_seq_step"),
    ]
    panels = [p for p in panels if p[1] in fig]
    f, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.4))
    for ax, (title, py, nat) in zip(axes, panels, strict=False):
        vals = [fig[py], fig[nat]]
        ax.bar(["Python", "native"], vals, color=["#999999", "#1f77b4"])
        ax.set_yscale("log")
        ax.set_ylim(min(vals) / 3, max(vals) * 3)
        for x, v in enumerate(vals):
            ax.text(x, v * 1.15, f"{v:.3g}", ha="center", fontsize=8)
        ax.set_title(title, fontsize=9)
    ax = axes[-1]
    ax.bar(
        ["per layer\nPython", "per layer\nnative", "per row\nnative"],
        [
            fig["perpage_swap_frac_of_limit_python"],
            fig["perpage_swap_frac_of_limit"],
            fig["perrow_swap_frac_of_limit"],
        ],
        color=["#999999", "#1f77b4", "#2ca02c"],
    )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_title("swap, fraction of one copy", fontsize=9)
    f.suptitle(f"kvmem native vs Python ({fig['machine']['cpu']})", fontsize=10)
    f.tight_layout()
    f.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run every figure, print a table, write the JSON and the plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, smaller sizes")
    ap.add_argument("--out", default=str(RESULTS), help="directory for native.json/.png")
    args = ap.parse_args(argv)
    st = native.status()
    print(f"native path: {st}")
    reps = 7 if args.quick else 31
    fig: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("copy", lambda: bench_copy(1024, reps)),
        ("swap", lambda: bench_swap(16 if args.quick else 64, max(5, reps // 3))),
        ("host map", lambda: bench_host_map(512, reps)),
        ("layout", lambda: bench_layout(reps)),
        ("prefix hash", lambda: bench_prefix_hash(reps)),
        ("decode step", lambda: bench_decode(60 if args.quick else 1000)),
    ]
    for i, (name, fn) in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {name}...", file=sys.stderr, flush=True)
        fig.update(fn())
    fig["native_enabled"] = st.enabled
    fig["quick"] = args.quick
    fig["command"] = "python -m bench.native" + (" --quick" if args.quick else "")
    fig["commit"] = git_commit()
    fig["machine"] = machine()
    print(f"{'figure':<36}{'value':>12}  target")
    for k, v in fig.items():
        if isinstance(v, float):
            op, goal = TARGETS.get(k, ("", None))
            met = "" if goal is None else (v <= goal if op == "<=" else v >= goal)
            mark = "" if goal is None else f"{op} {goal} {'met' if met else 'NOT met'}"
            print(f"{k:<36}{v:>12.3f}  {mark}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "native.json").write_text(json.dumps(fig, indent=2) + "\n")
    plot(fig, out / "native.png")
    print(f"wrote {out / 'native.json'} and {out / 'native.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
