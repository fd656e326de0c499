"""Prefill and decode instances in one fleet (DistServe): what each instance process sets up.

With ``prefill = P`` of ``n`` instances, ranks ``0..P-1`` run ``prefill``
engines and ranks ``P..n-1`` ``decode`` engines. Each (prefill, decode)
pair gets a gloo group of its own, so a dead decode instance breaks only
its own pairs (gloo closes a group's connections once a wait on it fails)::

    front: add(rid, prompt, d) ──▶ prefill p: Engine.add_request + handoffs.route(rid, pair(p, d))
                                   p ── KV, page by page, over pair (p, d) ──▶ decode d
    outputs: the first token from p, the rest from d (ordered by token start at the front)
    reports: ("handed", p, rid, d, stats) from p; ("accepted", d, rid) from d

Every process creates every pair's group, in the same order (``new_group``
is collective over the default group).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from kvmem.distributed.transport import Transport


def role_of(rank: int, prefill: int) -> str:
    """The engine role of instance ``rank`` in a fleet whose first ``prefill`` ranks prefill."""
    if not prefill:
        return "colocated"
    return "prefill" if rank < prefill else "decode"


def pair_transports(rank: int, size: int, prefill: int, timeout: float) -> dict[int, Transport]:
    """This instance's transport to each peer of the other role, by the peer's rank.

    On each pair's two-rank group the prefill instance is rank 0 and the
    decode instance rank 1. Call in every instance (collective).
    """
    import torch.distributed as dist

    out: dict[int, Transport] = {}
    for p in range(prefill):
        for d in range(prefill, size):
            group = dist.new_group([p, d], backend="gloo", timeout=timedelta(seconds=timeout))
            if rank == p:
                out[d] = Transport(group, timeout)
            elif rank == d:
                out[p] = Transport(group, timeout)
    return out


def start_acceptors(
    engine: Any,
    pairs: dict[int, Transport],
    on_output: Callable[[Any], None],
    on_accepted: Callable[[str], None],
    decide: Callable[[int, str], bool],
) -> list[threading.Thread]:
    """On a decode instance: one thread per prefill peer taking its hand-offs in (daemons)."""
    from kvmem.engine.roles import serve_handoffs

    def run(src: int, transport: Transport) -> None:
        serve_handoffs(
            engine,
            transport,
            0,
            on_output=on_output,
            on_accepted=on_accepted,
            decide=lambda rid: decide(src, rid),
        )

    threads = [
        threading.Thread(target=run, args=(p, t), name=f"kvmem-accept-{p}", daemon=True)
        for p, t in sorted(pairs.items())
    ]
    for t in threads:
        t.start()
    return threads


__all__ = ["pair_transports", "role_of", "start_acceptors"]
