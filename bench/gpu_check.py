"""One command for a GPU machine: every GPU test, then the GPU halves of the benchmarks.

``python -m bench.gpu_check`` runs, in order and each in its own process:

1. ``pytest -m gpu`` (every test marked ``gpu``: Triton kernels at Llama
   shapes against the reference, FP8 tensor-core queries, FlashInfer, the
   CUDA VMM driver and vmem on CUDA, swap round trips with pinned memory);
2. ``python -m bench.attention --quick``: decode bandwidth, fp8 and int4
   speedups over fp16, Triton against FlashInfer, the two pool layouts;
3. ``python -m bench.swap --quick``: copy modes on a CUDA pool with pinned
   host memory, bandwidth, and a decode-like kernel's slowdown during a swap;
4. ``python -m bench.vmem --quick``: CUDA VMM map/unmap latency beside the
   host driver's, and the allocator-side decode step.

The benchmarks write into ``bench/results/gpu/`` (``KVMEM_BENCH_RESULTS``),
the tests' outcome goes to ``bench/results/gpu/pytest.json``, and
``bench/results/gpu/summary.json`` gathers every step's exit status, time
and headline figures. Each step has its own time limit and the whole run a
budget (``--budget-s``, default 450 s), so it ends within 8 minutes on an
H100/H200; a step that runs out of budget is reported as skipped.

On a machine without CUDA it lists what it would run (the commands and the
GPU tests, found by reading the test files) and exits 0.

Run: ``python -m bench.gpu_check [--budget-s S] [--dry-run]``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import RESULTS, RESULTS_ENV, console, print_table, provenance

ROOT = RESULTS.parent.parent
OUT = RESULTS / "gpu"


@dataclass(frozen=True)
class Step:
    """One command of the check, its time limit, and the results file it writes."""

    name: str
    argv: tuple[str, ...]
    timeout_s: float
    results: str
    #: Figures of the results file shown in the summary.
    headline: tuple[str, ...] = ()


STEPS: tuple[Step, ...] = (
    Step(
        "tests",
        ("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs"),
        240,
        "pytest.json",
    ),
    Step(
        "attention",
        ("-m", "bench.attention", "--quick"),
        120,
        "attention.json",
        (
            "fp16_decode_bw_frac",
            "fp8_vs_fp16_speedup",
            "int4_vs_fp16_speedup",
            "triton_vs_flashinfer_fp16",
        ),
    ),
    Step(
        "swap",
        ("-m", "bench.swap", "--quick", "--max-gib", "8"),
        120,
        "swap.json",
        (
            "gpu_grouped_frac_of_pinned_bw",
            "gpu_grouped_vs_vllm0_speedup",
            "gpu_grouped_vs_paged_runs_speedup",
            "gpu_8K_decode_slowdown_during_swap",
        ),
    ),
    Step(
        "vmem",
        ("-m", "bench.vmem", "--quick"),
        90,
        "vmem.json",
        ("cuda_page_bytes", "cuda_first_map_us", "cuda_map_us", "cuda_unmap_us"),
    ),
)


def gpu_tests(root: Path = ROOT) -> list[str]:
    """``file::function`` of every test marked ``gpu``, read from the test files (no import).

    A function counts when a decorator or the module's ``pytestmark``
    mentions ``mark.gpu``.
    """
    found: list[str] = []
    for path in sorted((root / "tests").rglob("test_*.py")):
        text = path.read_text()
        if "mark.gpu" not in text:
            continue
        tree = ast.parse(text)
        module_gpu = any(
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
            and "mark.gpu" in ast.unparse(node.value)
            for node in tree.body
        )
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                marks = " ".join(ast.unparse(d) for d in node.decorator_list)
                if module_gpu or "mark.gpu" in marks:
                    found.append(f"{path.relative_to(root)}::{node.name}")
    return found


def command(step: Step) -> list[str]:
    """The argv of ``step`` with this interpreter."""
    return [sys.executable, *step.argv]


def pytest_outcome(output: str) -> dict[str, Any]:
    """Counts from pytest's last summary line, and the failed or erroring node ids."""
    counts: dict[str, Any] = {}
    lines = [ln for ln in output.splitlines() if ln.strip()]
    summary = lines[-1] if lines else ""
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", summary):
        counts[what.rstrip("s") if what == "errors" else what] = int(n)
    counts["failing"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)
    counts["summary"] = summary
    return counts


def run_step(step: Step, budget_s: float, out: Path) -> dict[str, Any]:
    """Run one step within ``min(step.timeout_s, budget_s)``; its record for the summary."""
    limit = min(step.timeout_s, budget_s)
    rec: dict[str, Any] = {"command": " ".join(["python", *step.argv]), "limit_s": limit}
    if limit < 10:
        return {**rec, "status": "skipped: out of time budget"}
    env = {**os.environ, RESULTS_ENV: str(out), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            command(step), cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit
        )
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    rec["seconds"] = time.perf_counter() - t0
    rec["returncode"] = rc
    rec["status"] = "timed out" if rc is None else "ok" if rc == 0 else "failed"
    rec["output_tail"] = output[-3000:]
    (out / f"{step.name}.log").write_text(output)
    if step.name == "tests":
        res = pytest_outcome(output)
        (out / step.results).write_text(json.dumps({**res, **provenance(False)}, indent=2) + "\n")
        rec.update({k: v for k, v in res.items() if k != "summary"})
    else:
        path = out / step.results
        if path.exists():
            figs = json.loads(path.read_text())
            rec["figures"] = {k: figs.get(k) for k in step.headline}
    return rec


def main(argv: list[str] | None = None) -> int:
    """Run the check on a GPU (exit 1 if any step fails), or list it on a CPU (exit 0)."""
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=450.0, help="time for all steps together")
    ap.add_argument("--dry-run", action="store_true", help="list the steps and tests; run nothing")
    args = ap.parse_args(argv)
    tests = gpu_tests()
    has_cuda = torch.cuda.is_available()
    if args.dry_run or not has_cuda:
        why = "dry run" if args.dry_run else "no CUDA device: nothing run"
        console.print(f"bench.gpu_check ({why}); on a GPU it would run, in order:")
        for s in STEPS:
            console.print(f"  [{s.timeout_s:.0f} s] python {' '.join(s.argv)}  -> {s.results}")
        console.print(f"GPU tests ({len(tests)} functions, parametrized cases not counted):")
        for t in tests:
            console.print(f"  {t}")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    records: dict[str, Any] = {}
    for step in STEPS:
        left = args.budget_s - (time.perf_counter() - t_start)
        console.print(f"[bold]{step.name}[/]: python {' '.join(step.argv)}")
        records[step.name] = rec = run_step(step, left, OUT)
        console.print(f"  {rec['status']} in {rec.get('seconds', 0.0):.0f} s")
    total = time.perf_counter() - t_start
    summary = {
        "device": torch.cuda.get_device_name(0),
        "total_s": total,
        "gpu_tests": tests,
        "steps": records,
        **provenance(False),
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = []
    for name, rec in records.items():
        figs = rec.get("figures") or {
            k: rec[k] for k in ("passed", "failed", "skipped", "error") if k in rec
        }
        shown = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figs.items()
        )
        rows.append([name, rec["status"], rec.get("seconds", 0.0), shown])
    print_table(
        f"bench.gpu_check on {summary['device']}: {total:.0f} s",
        ["step", "status", "s", "figures"],
        rows,
    )
    console.print(f"wrote {OUT / 'summary.json'}")
    return 0 if all(r["status"] == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
