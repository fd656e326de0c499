"""Run a function on N gloo ranks (spawned processes on 127.0.0.1) and collect what each returns.

Each rank (a forked process, spawned where fork is missing) initialises
the default process group on a free port, calls
``fn(rank, world_size, *args)`` and reports its result (or its traceback);
a rank that does not report within ``deadline`` seconds is killed and
reported as ``None``. Ranks exit with ``os._exit`` so that no teardown can
hang a test.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, q: Any, pg_timeout: float):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=pg_timeout),
        )
        res: tuple[str, Any] = ("ok", fn(rank, world, *args))
    except BaseException:
        res = ("error", traceback.format_exc())
    q.put((rank, res))
    q.close()
    q.join_thread()
    sys.stdout.flush()
    os._exit(0)


def run_world(
    fn: Callable,
    world: int,
    *args: Any,
    deadline: float = 60.0,
    pg_timeout: float = 20.0,
    need: tuple[int, ...] | None = None,
) -> list[Any]:
    """``fn``'s result on each rank (None for a rank that died or hung); raises on an error.

    Stops waiting once the ranks in ``need`` (default: all) have reported.
    """
    need_set = set(range(world) if need is None else need)
    # fork: the ranks start in milliseconds from the already-imported test process
    # (torch uses one thread in them); spawn where fork does not exist
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, fn, args, q, pg_timeout), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    end = time.monotonic() + deadline
    while not need_set <= set(results) and time.monotonic() < end:
        try:
            rank, res = q.get(timeout=0.2)
        except Exception:
            if all(not p.is_alive() for p in procs) and q.empty():
                break
            continue
        results[rank] = res
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    errors = [f"rank {r}:\n{res[1]}" for r, res in sorted(results.items()) if res[0] == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r][1] if r in results else None for r in range(world)]
