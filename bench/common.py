"""Shared plumbing of the benchmarks: machine info, provenance, results, tables, progress.

Every benchmark is a module run as ``python -m bench.<name>``; each writes
``bench/results/<name>.json`` through :func:`save_results`, which records
where and how the figures were made: the machine, the exact command, the git
commit of the code measured (with ``+dirty`` when the tree had uncommitted
changes) and whether it was a ``--quick`` run.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
#: Environment variable naming another results directory (``bench.gpu_check`` sets it).
RESULTS_ENV = "KVMEM_BENCH_RESULTS"
T = TypeVar("T")
#: Wide when not a terminal, so that logged tables keep every column.
console = Console() if sys.stdout.isatty() else Console(width=200)


def machine_info() -> dict[str, Any]:
    """Where the figures were measured."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # other jobs on a shared machine: absolute times are noise, ratios less so
        "loadavg_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return info


def git_commit() -> str | None:
    """The commit checked out, with ``+dirty`` if tracked files changed (bench/results aside:
    a run writes there); None outside git."""
    root = RESULTS.parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def command_line() -> str:
    """The command that is running, as one would type it (``python -m bench.<name> ...``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        argv = ["python", "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]]
    else:
        argv = ["python", *sys.argv]
    traces = os.environ.get("KVMEM_TRACES")
    prefix = f"KVMEM_TRACES={shlex.quote(traces)} " if traces else ""
    return prefix + shlex.join(argv)


#: The commit when the benchmark started (edits made while it runs do not count).
START_COMMIT = git_commit()


def provenance(quick: bool) -> dict[str, Any]:
    """The entries every results file carries: quick, command, commit, machine."""
    return {
        "quick": bool(quick),
        "command": command_line(),
        "commit": START_COMMIT,
        "machine": machine_info(),
    }


def results_dir() -> Path:
    """Where results go: ``$KVMEM_BENCH_RESULTS`` if set, else ``bench/results``."""
    env = os.environ.get(RESULTS_ENV)
    out = Path(env) if env else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_results(name: str, figures: Mapping[str, Any], quick: bool) -> Path:
    """Write ``<results_dir>/<name>.json``: the flat figures plus :func:`provenance`."""
    out = results_dir()
    path = out / f"{name}.json"
    body = {**figures, **provenance(quick)}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def progress(items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """A progress bar over ``items`` (quiet when stdout is not a terminal)."""
    yield from track(items, total=total, description=desc, console=console, transient=True)


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """Print rows as a table."""
    table = Table(title=title)
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*(f"{c:.4g}" if isinstance(c, float) else str(c) for c in r))
    console.print(table)
