"""The transport: issue-order matching, NCCL-only operations, no host staging on NCCL."""

from __future__ import annotations

import queue
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from kvmem.distributed.transport import PeerFailure, Transport
from kvmem.errors import InvalidArgument
from tests.distributed.dist_harness import run_world

ROOT = Path(__file__).resolve().parents[2]


class _Work:
    def __init__(self, fn: Any = None) -> None:
        self.fn = fn

    def wait(self, timeout: timedelta | None = None) -> bool:
        if self.fn is not None:
            self.fn(timeout.total_seconds() if timeout else None)
        return True


class FakeGroup:
    """An NCCL-like group in one process: FIFO per (src, dst) pair, tags ignored, only the
    operations NCCL has (no any-source receive); records every tensor it is handed."""

    def __init__(self, rank: int, size: int, pipes: dict, name: str) -> None:
        self._rank, self._size, self._pipes, self._name = rank, size, pipes, name
        self.sent: list[torch.Tensor] = []

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def name(self) -> str:
        return self._name

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> _Work:
        (t,) = tensors
        self.sent.append(t)
        self._pipes[(self._rank, dst)].put(t)  # the very tensor, as a device send would read it
        return _Work()

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> _Work:
        (t,) = tensors

        def fill(timeout: float | None) -> None:
            try:
                got = self._pipes[(src, self._rank)].get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(f"Timed out waiting {timeout} s") from None
            if got.shape != t.shape or got.dtype != t.dtype:
                raise AssertionError("frames matched out of order")
            t.copy_(got)

        return _Work(fill)

    def barrier(self) -> _Work:
        return _Work()

    def recv_anysource(self, *args: Any) -> None:
        raise AssertionError("NCCL has no any-source receive")


def _world(name: str) -> list[FakeGroup]:
    pipes = {(a, b): queue.Queue() for a in range(2) for b in range(2)}
    return [FakeGroup(r, 2, pipes, name) for r in range(2)]


def test_nccl_path_sends_tensors_from_their_device_and_only_metadata_on_the_host():
    data, ctl = _world("nccl"), _world("gloo")
    a = Transport(data[0], 2.0, control=ctl[0], device="cpu")
    b = Transport(data[1], 2.0, control=ctl[1], device="cpu")
    assert a.backend == "nccl" and not a.packed
    g = torch.Generator().manual_seed(1)
    big = torch.randn(64, 8, 16, generator=g)
    small = torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g)
    for i in range(3):  # several frames: matched by issue order, tags ignored
        a.wait_sent(a.send(1, 7 + i, ("step", i), [big + i, small]))
    for i in range(3):
        f = b.recv(0)
        assert f.kind == 7 + i and f.meta == ("step", i)
        assert torch.equal(f.tensors[0], big + i) and torch.equal(f.tensors[1], small)
    # the data group got the tensors themselves (no host copy); the control group no tensor bytes
    sent = a.send(1, 1, "x", [big])
    assert data[0].sent[-1].data_ptr() == big.data_ptr()
    assert all(t.numel() * t.element_size() < big.numel() for t in ctl[0].sent)
    a.wait_sent(sent)
    assert torch.equal(b.recv(0).tensors[0], big)


def test_a_receive_that_waits_too_long_is_a_peer_failure_and_sticks():
    data, ctl = _world("nccl"), _world("gloo")
    b = Transport(data[1], 0.2, control=ctl[1], device="cpu")
    with pytest.raises(PeerFailure, match="rank 0 did not answer within 0.2 s"):
        b.recv(0)
    with pytest.raises(PeerFailure):
        b.send(0, 1, None)


def test_an_nccl_group_without_a_gloo_control_group_is_refused():
    with pytest.raises(InvalidArgument, match="control group"):
        Transport(_world("nccl")[0], 1.0)


def test_no_any_source_receive_or_private_source_rank_in_the_package():
    for path in (ROOT / "kvmem").rglob("*.py"):
        text = path.read_text()
        assert ".recv_anysource" not in text and "._source_rank" not in text, path


def _ping_pong(rank: int, world: int) -> dict[str, Any]:
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=10))  # a user's group
    t = Transport(group, 10.0)
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4) * (rank + 1)
    out: dict[str, Any] = {}
    if rank == 0:
        sent = t.send(1, 3, {"hello": 1}, [x])
        f = t.recv(1)
        t.wait_sent(sent)
        out["got"] = f.tensors[0].tolist()
        out["meta"] = f.meta
    else:
        f = t.recv(0)
        t.wait_sent(t.send(0, 4, ("back", f.meta), [f.tensors[0] * 10]))
    threading.Event().wait(0.1)
    t.barrier("end")
    return out


def test_two_gloo_ranks_exchange_frames_on_a_user_group():
    r0, _ = run_world(_ping_pong, 2, deadline=60)
    assert r0["meta"] == ("back", {"hello": 1})
    assert r0["got"] == (torch.arange(12.0).reshape(3, 4) * 10).tolist()
