"""Metrics: per request (arrival, first token, every token, finish, preemptions) and per engine.

Times are in the engine clock's seconds (wall time, or simulated time in
the scheduling benchmark). Both records are plain objects that the server
and the benchmarks read directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvmem.allocator import KVStats


@dataclass
class RequestMetrics:
    """Timeline of one request.

    ``token_times[i]`` is when output token ``i`` was sampled; ``ttft`` is
    ``token_times[0] - arrival_time``; ``tbt`` are the gaps between
    consecutive tokens; ``jct`` (job completion time) is ``finish_time -
    arrival_time``.
    """

    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    #: Prompt tokens found in the prefix cache, summed over every admission.
    num_cached_tokens: int = 0
    #: Prompt tokens found in the prefix cache at the first admission, once loads settled.
    prompt_cached_tokens: int | None = None
    #: Tokens whose KV was computed, recomputation after preemption included.
    num_computed_tokens: int = 0

    @property
    def first_token_time(self) -> float | None:
        """When the first output token was sampled."""
        return self.token_times[0] if self.token_times else None

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        t = self.first_token_time
        return None if t is None else t - self.arrival_time

    @property
    def tbt(self) -> list[float]:
        """Times between consecutive output tokens."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def jct(self) -> float | None:
        """Job completion time: arrival to finish."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        """Arrival to first scheduled."""
        t = self.first_scheduled_time
        return None if t is None else t - self.arrival_time


@dataclass(frozen=True)
class EngineMetrics:
    """A snapshot of the engine: queues, KV memory, counters and throughput."""

    time: float
    num_running: int
    num_waiting: int
    num_swapped: int
    num_finished: int
    num_aborted: int
    num_steps: int
    num_preemptions: int
    prompt_tokens: int  # KV entries computed for prompts (recomputation included)
    generation_tokens: int
    tokens_per_s: float  # generated tokens per second since the first step
    kv_capacity_tokens: int
    kv_used_tokens: int
    kv_usage: float  # fraction of capacity held by sequences
    kv_cached_tokens: int
    kv_swapped_tokens: int
    prefix_cache_hit_rate: float
    #: Prompt tokens found in the device prefix cache (the allocator's ``prefix_hits``).
    prefix_cache_hit_tokens: int = 0
    #: Tokens per allocator page (tier hits are counted in pages).
    kv_page_size: int = 1
    #: The allocator's backend figures (``KVStats.extra``; cache tiers as ``tier_*``).
    kv_extra: Mapping[str, float] = field(default_factory=dict)
    #: Sessions whose KV is parked on the host for their next turn (:mod:`kvmem.engine.sessions`).
    num_parked_sessions: int = 0

    def as_dict(self) -> dict[str, float]:
        """The fields as a flat dict (for JSON and Prometheus); ``kv_extra`` keys as they are."""
        out = {k: float(v) for k, v in self.__dict__.items() if k != "kv_extra"}
        out.update({k: float(v) for k, v in self.kv_extra.items()})
        return out


__all__ = ["EngineMetrics", "RequestMetrics"]


def kv_fields(s: KVStats) -> dict[str, Any]:
    """The ``kv_*`` and prefix-cache fields of :class:`EngineMetrics` from allocator stats."""
    return {
        "kv_capacity_tokens": s.capacity_tokens,
        "kv_used_tokens": s.used_tokens,
        "kv_usage": s.usage,
        "kv_cached_tokens": s.cached_tokens,
        "kv_swapped_tokens": s.swapped_tokens,
        "prefix_cache_hit_rate": s.prefix_hit_rate,
        "prefix_cache_hit_tokens": s.prefix_hits,
        "kv_page_size": s.page_size,
        "kv_extra": dict(s.extra),
    }
