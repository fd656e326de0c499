"""Requests from the rank owning a sequence to the ranks holding its rBlocks.

A request is ``(meta, tensors)`` for :meth:`Holder.handle
<kvmem.distributed.holder.Holder.handle>`; this rank's own request runs
directly, the others go through the :class:`~kvmem.distributed.comm.Channel`
and run on their ranks meanwhile::

    owner rank 0                      rank 1 holder        rank 2 holder
    post {1: req1, 2: req2} ────────▶ handle(req1)         handle(req2)
    handle(req0) locally
    collect                  ◀──────── reply1 ◀──────────── reply2

Also the closing barrier, through the store every rank shares.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvmem.distributed.comm import Channel, PeerFailure
from kvmem.distributed.holder import Holder
from kvmem.errors import KVError

__all__ = ["Calls", "failed_ranks"]

Requests = Mapping[int, tuple[Any, Sequence[torch.Tensor]]]


def failed_ranks(results: Mapping[int, Any]) -> set[int]:
    """Ranks whose result is an error."""
    return {r for r, v in results.items() if isinstance(v, KVError)}


class Calls:
    """Runs holder requests of one rank: its own directly, the others' over ``channel``."""

    def __init__(self, rank: int, channel: Channel | None, holder: Holder) -> None:
        self.rank = rank
        self.channel = channel
        self.holder = holder

    def many(self, requests: Requests) -> dict[int, Any]:
        """Run each ``{rank: (meta, tensors)}`` request; results or errors, by rank.

        Every request runs even if another fails; a KVError is returned in
        place of that rank's result. PeerFailure is raised.
        """
        remote = {r: (m, list(t)) for r, (m, t) in requests.items() if r != self.rank}
        pending = self.channel.post(remote) if remote and self.channel else None
        out: dict[int, Any] = {}
        try:
            if self.rank in requests:
                meta, tensors = requests[self.rank]
                try:
                    out[self.rank] = self.holder.handle(self.rank, meta, list(tensors))
                except PeerFailure:
                    raise
                except KVError as e:
                    out[self.rank] = e
        finally:  # the replies are always taken, so the channel stays in step
            if pending is not None:
                assert self.channel is not None
                out.update(self.channel.collect(pending, raise_errors=False))
        return out

    def one(self, rank: int, meta: Any, tensors: Sequence[torch.Tensor] = ()) -> Any:
        """Run one request on ``rank``; its result, or its error raised."""
        res = self.many({rank: (meta, tensors)})[rank]
        if isinstance(res, KVError):
            raise res
        return res

    def barrier(self, store: Any, name: str, world_size: int) -> None:
        """Wait until every rank has arrived at ``name``; a dead or stopped peer is reported.

        Unbounded on purpose (the others may have work left); liveness comes
        from the heartbeat, which records a PeerFailure that is raised here.
        """
        assert self.channel is not None
        store.add(f"barrier/{name}", 1)
        pause = 0.002
        while int(store.add(f"barrier/{name}", 0)) < world_size:
            self.channel.check()
            time.sleep(pause)
            pause = min(0.1, pause * 2)
