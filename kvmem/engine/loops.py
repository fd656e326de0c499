"""The ways to drive an engine's steps: ``generate``, ``stream``, ``run``, ``serve_forever``.

:class:`Loops` is a base of :class:`~kvmem.engine.engine.Engine`; every
method here only adds requests and calls ``step``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kvmem.engine.errors import InvalidRequest
from kvmem.engine.request import Completion, Request, RequestOutput, SamplingParams
from kvmem.errors import KVError

#: The longest an idle serve loop sleeps before looking at its stop condition again.
IDLE_WAIT_S = 0.05


class Loops:
    """Stepping an engine to completion, as a stream, or as a server's loop."""

    if TYPE_CHECKING:
        num_steps: int
        _wake: threading.Event

        add_request: Callable[..., str]
        _add: Callable[..., Request]

        def step(self) -> list[RequestOutput]: ...
        def has_unfinished(self) -> bool: ...
        def abort(self, request_id: str) -> bool: ...

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Run ``prompts`` to completion (stepping the engine here); results in prompt order."""
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequest(f"{len(plist)} sampling params for {len(prompts)} prompts")
        done: set[str] = set()

        def track(o: RequestOutput) -> None:
            if o.finished:
                done.add(o.request_id)

        reqs: list[Request] = []
        try:
            for p, sp in zip(prompts, plist, strict=True):
                reqs.append(self._add(p, sp, on_output=track))
        except KVError:
            for r in reqs:
                self.abort(r.request_id)
            raise
        while any(r.request_id not in done for r in reqs):
            self.step()
        return [r.completion() for r in reqs]

    def stream(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> Iterator[RequestOutput]:
        """Add one request and yield its outputs as steps run (stepping the engine here)."""
        box: deque[RequestOutput] = deque()
        self.add_request(prompt, params, on_output=box.append, **kwargs)
        while True:
            if not box:
                self.step()
            while box:
                o = box.popleft()
                yield o
                if o.finished:
                    return

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Step until ``until()`` is true (default: until no request is left)."""
        self._loop(until or (lambda: not self.has_unfinished()))

    def serve_forever(
        self,
        stop: threading.Event,
        idle_sleep: float = IDLE_WAIT_S,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Step until ``stop`` is set; when idle, sleep until a request arrives.

        Meant for a background thread (a server's), while other threads call
        ``add_request``, ``abort`` and ``set_priority`` (which wake it). An
        idle loop looks at ``stop`` at least every ``idle_sleep`` seconds. A
        step that raises ends the loop, unless ``on_error`` is given: then it
        gets the exception and the loop goes on.
        """
        self._loop(stop.is_set, idle_sleep, on_error)

    def _loop(
        self,
        done: Callable[[], bool],
        idle_sleep: float = IDLE_WAIT_S,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """The one serve loop: step while there is work, sleep while there is none."""
        while not done():
            if not self.has_unfinished():
                self._wake.wait(idle_sleep)
                self._wake.clear()
                continue
            steps = self.num_steps
            try:
                outs = self.step()
            except Exception as e:
                if on_error is None:
                    raise
                on_error(e)
                continue
            if outs or self.num_steps != steps:
                time.sleep(0)  # let other threads (a server's event loop) take the GIL
            else:
                time.sleep(0.001)  # nothing could be scheduled: do not spin


__all__ = ["IDLE_WAIT_S", "Loops"]
