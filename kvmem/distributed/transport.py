"""Point-to-point messages between known peers of a torch.distributed group, gloo or NCCL.

A *frame* is ``(kind, meta, tensors)``: a small int, any picklable metadata
and a list of tensors. Frames between two ranks are matched by issue order
only: the receiver always names its source and nothing relies on ``tag``
(NCCL ignores it). So that independent streams cannot cross, a frame's
parts are posted together under a per-destination lock, and on the
receiving side one thread reads each source's frames in order::

    gloo group (data = control)          NCCL data group + gloo control group
    ctl: header [kind, n]                ctl:  header [kind, n]
    ctl: n bytes: meta + tensor bytes    ctl:  n bytes: meta + tensor specs
                                         data: each tensor, sent from its device

On gloo the tensors travel packed into the control payload (gloo only sends
host tensors; a device tensor is copied to the host there and only there).
On NCCL only the metadata is on the host: each tensor is sent from the
device it lives on and received into a tensor allocated on this rank's
device. Only operations both backends support are used: ``send``, ``recv``
from a known source, ``barrier``; never ``recv_anysource``.

Every wait is bounded. A peer whose connection closes (a dead process) or
that does not answer within ``timeout`` seconds is a :class:`PeerFailure`;
the first one is kept, and every later call raises it again (gloo closes
every connection of a group once a wait on it times out, so the group is
unusable afterwards anyway).
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kvmem.errors import InvalidArgument, KVError

_ALIGN = 16
_TAG = 0  # never relied upon: NCCL ignores tags, frames match in issue order


class PeerFailure(KVError):
    """Another rank died or did not answer within the timeout; the group is unusable.

    Raised by every later call of the object that saw it. The message names
    the rank and what was being waited for.
    """


def _pad(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _specs(tensors: Sequence[torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    return [(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in tensors]


def encode(meta: Any, tensors: Sequence[torch.Tensor], with_data: bool = True) -> torch.Tensor:
    """One uint8 host tensor holding ``meta`` (pickled), the tensors' specs and, with
    ``with_data``, their bytes (each 16-byte aligned)."""
    head = pickle.dumps((meta, _specs(tensors)), protocol=pickle.HIGHEST_PROTOCOL)
    parts = [len(head).to_bytes(8, "little"), head, bytes(_pad(8 + len(head)) - 8 - len(head))]
    if with_data:
        for t in tensors:
            raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            parts += [raw, bytes(_pad(len(raw)) - len(raw))]
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def _head(buf: torch.Tensor) -> tuple[Any, list[tuple[str, tuple[int, ...]]], int]:
    n = int.from_bytes(buf[:8].numpy().tobytes(), "little")
    meta, specs = pickle.loads(buf[8 : 8 + n].numpy().tobytes())
    return meta, specs, _pad(8 + n)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def decode(buf: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
    """Inverse of :func:`encode` (with data); the tensors are views into ``buf``."""
    meta, specs, off = _head(buf)
    out: list[torch.Tensor] = []
    for dtype_name, shape in specs:
        dtype = getattr(torch, dtype_name)
        size = _numel(shape) * dtype.itemsize
        out.append(buf[off : off + size].view(dtype).reshape(shape))
        off += _pad(size)
    return meta, out


def group_backend(group: Any) -> str:
    """The backend name of a process group (``"gloo"``, ``"nccl"``, ...)."""
    try:
        return str(dist.get_backend(group))
    except (RuntimeError, ValueError, AttributeError):
        return str(group.name())


def control_group_for(group: Any, timeout: float) -> Any:
    """A gloo group over the same ranks as ``group``, for the metadata beside an NCCL group.

    Collective over the default group (``dist.new_group`` is)."""
    ranks = dist.get_process_group_ranks(group)
    return dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=timeout))


@dataclass
class Frame:
    """A received frame: its kind, metadata, tensors and bytes on the wire."""

    kind: int
    meta: Any
    tensors: list[torch.Tensor]
    nbytes: int


@dataclass
class Sent:
    """The posted parts of one frame (kept alive until waited on)."""

    dst: int
    works: list[tuple[Any, torch.Tensor]] = field(default_factory=list)
    nbytes: int = 0


class Transport:
    """Framed point-to-point messages with known peers over ``group`` (see the module docstring).

    ``group`` carries the tensors; ``control`` (a gloo group over the same
    ranks) carries headers and metadata; it defaults to ``group`` itself,
    which must then be gloo. ``device`` is where received tensors are placed
    on NCCL (default: the current CUDA device). ``timeout`` bounds every
    wait (seconds).
    """

    def __init__(
        self,
        group: Any,
        timeout: float,
        *,
        control: Any = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        self.group = group
        self.backend = backend or group_backend(group)
        if control is None:
            if self.backend != "gloo":
                raise InvalidArgument(
                    f"a {self.backend} data group needs a gloo control group beside it "
                    "(control=, see control_group_for)"
                )
            control = group
        self.control = control
        self.rank: int = group.rank()
        self.size: int = group.size()
        if control.rank() != self.rank or control.size() != self.size:
            raise InvalidArgument("the control group must have the data group's ranks")
        self.packed = control is group
        if device is None:
            device = "cpu" if self.packed else torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        self.timeout = float(timeout)
        self._send_locks = {r: threading.Lock() for r in range(self.size)}
        self._failure: PeerFailure | None = None

    # ------------------------------------------------------------ failures
    @property
    def failure(self) -> PeerFailure | None:
        """The first failure seen, or None."""
        return self._failure

    def check(self) -> None:
        """Raise the recorded failure, if any."""
        if self._failure is not None:
            raise self._failure

    def record_failure(self, err: PeerFailure) -> PeerFailure:
        """Keep ``err`` unless a failure was recorded before; return the one kept."""
        if self._failure is None:
            self._failure = err
        return self._failure

    def fail(self, what: str, why: str) -> PeerFailure:
        """Record (first one wins) and return a PeerFailure of this rank."""
        return self.record_failure(PeerFailure(f"rank {self.rank}: {what}: {why}"))

    def _peer_failure(
        self, e: BaseException, what: str, peer: int | None, timeout: float
    ) -> PeerFailure:
        text = str(e)
        who = f"rank {peer}" if peer is not None else "a peer"
        if "Timed out" in text or "Application timeout" in text:
            why = f"{who} did not answer within {timeout:g} s"
        elif "closed by peer" in text or "reset by peer" in text or "Broken pipe" in text:
            why = f"{who} closed its connection (did the process die?)"
        else:
            why = f"{who}: {text.splitlines()[0] if text else type(e).__name__}"
        return self.fail(what, why)

    def wait(self, work: Any, what: str, peer: int | None, timeout: float | None = None) -> None:
        """Wait for one posted operation, at most ``timeout`` (default: the transport's)."""
        t = self.timeout if timeout is None else timeout
        try:
            work.wait(timedelta(seconds=t))
        except RuntimeError as e:
            # a long wait that "timed out" was cut short by another wait's timeout
            raise self._peer_failure(e, what, peer, min(t, self.timeout)) from None

    def _start(self, op: Callable[..., Any], args: tuple, what: str, peer: int | None) -> Any:
        try:
            return op(*args)
        except RuntimeError as e:
            raise self._peer_failure(e, what, peer, self.timeout) from None

    # --------------------------------------------------------------- frames
    def send(self, dst: int, kind: int, meta: Any, tensors: Sequence[torch.Tensor] = ()) -> Sent:
        """Post every part of one frame to ``dst``; no waiting (see :meth:`wait_sent`)."""
        self.check()
        if dst == self.rank or not 0 <= dst < self.size:
            raise InvalidArgument(f"rank {self.rank} cannot send to rank {dst}")
        payload = encode(meta, tensors, with_data=self.packed)
        data = [] if self.packed else [self._on_device(t) for t in tensors]
        hdr = torch.tensor([kind, int(payload.numel())], dtype=torch.int64)
        sent = Sent(dst, nbytes=16 + int(payload.numel()))
        what = "sending"
        with self._send_locks[dst]:
            for t, g in [(hdr, self.control), (payload, self.control)] + [
                (t, self.group) for t in data
            ]:
                if t.numel() == 0:
                    continue
                sent.works.append((self._start(g.send, ([t], dst, _TAG), what, dst), t))
        sent.nbytes += sum(t.numel() * t.element_size() for t in data)
        return sent

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device != self.device:
            t = t.to(self.device)
        return t.contiguous()

    def wait_sent(self, sent: Sent, what: str = "sending") -> None:
        """Wait until every part of ``sent`` was taken by its receiver."""
        for w, _ in sent.works:
            self.wait(w, what, sent.dst)
        sent.works.clear()

    def recv(self, src: int, what: str = "receiving", first_wait: float | None = None) -> Frame:
        """Receive the next frame from ``src``; ``first_wait`` bounds the wait for its header
        (default: the timeout), the rest is bounded by the timeout."""
        self.check()
        hdr = torch.empty(2, dtype=torch.int64)
        w = self._start(self.control.recv, ([hdr], src, _TAG), what, src)
        self.wait(w, what, src, first_wait)
        kind, n = (int(x) for x in hdr.tolist())
        if n == 0:
            return Frame(kind, None, [], 16)
        buf = torch.empty(n, dtype=torch.uint8)
        self.wait(self._start(self.control.recv, ([buf], src, _TAG), what, src), what, src)
        if self.packed:
            meta, tensors = decode(buf)
            return Frame(kind, meta, tensors, 16 + n)
        meta, specs, _ = _head(buf)
        tensors = []
        nbytes = 16 + n
        for dtype_name, shape in specs:
            t = torch.empty(shape, dtype=getattr(torch, dtype_name), device=self.device)
            if t.numel():
                self.wait(self._start(self.group.recv, ([t], src, _TAG), what, src), what, src)
            tensors.append(t)
            nbytes += t.numel() * t.element_size()
        return Frame(kind, meta, tensors, nbytes)

    def barrier(self, what: str) -> None:
        """A barrier over the control group, bounded by the timeout."""
        self.check()
        work = self._start(self.control.barrier, (), what, None)
        self.wait(work, what, None)


__all__ = [
    "Frame",
    "PeerFailure",
    "Sent",
    "Transport",
    "control_group_for",
    "decode",
    "encode",
    "group_backend",
]
