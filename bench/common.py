"""Shared plumbing of the benchmark scripts: machine info, results, tables, progress."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
T = TypeVar("T")
console = Console()


def machine_info() -> dict[str, Any]:
    """Where the figures were measured."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def save_results(name: str, figures: Mapping[str, Any]) -> Path:
    """Write ``bench/results/<name>.json``: the flat figures plus a ``machine`` entry."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**figures, "machine": machine_info()}, indent=2) + "\n")
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


def trace_path(name: str) -> Path | None:
    """``../shared/traces/<name>`` next to the project, if it exists."""
    p = Path(__file__).resolve().parent.parent.parent / "shared" / "traces" / name
    return p if p.exists() else None
