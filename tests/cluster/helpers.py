"""What the cluster tests share: the instances' engine options, a bounded wait, an output
collector."""

from __future__ import annotations

import threading
import time

#: every instance's engine: the tiny random model, reference attention, small chunks
OPTS = {
    "attention_impl": "reference",
    "num_kv_tokens": 1024,
    "seed": 0,
    "max_num_batched_tokens": 32,
}


def wait(cond, deadline: float) -> bool:
    """Whether ``cond()`` became true within ``deadline`` seconds (polled every 50 ms)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


class Collect:
    """An ``on_output`` callback: each request's tokens, its first reported cached-token count,
    and how many times it finished."""

    def __init__(self) -> None:
        self.got: dict[str, list[int]] = {}
        self.cached: dict[str, int] = {}
        self.finished: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, out) -> None:
        with self.lock:
            self.got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.num_cached_tokens is not None:
                self.cached.setdefault(out.request_id, out.num_cached_tokens)
            if out.finished:
                self.finished[out.request_id] = self.finished.get(out.request_id, 0) + 1
