"""Prometheus metrics of the server, named ``kvmem:*`` as vLLM names its ``vllm:*``.

Engine state (queues, KV memory, preemptions, token counters, prefix-cache
hit rate) is read from :meth:`Engine.metrics` at scrape time by a custom
collector, so counters are the engine's own. Request latencies are observed
by the server as tokens are delivered: time to first token from admission
to the first token, inter-token latency between consecutive deliveries,
time per output token and end-to-end latency per finished request. Every
metric lives in the server's own :class:`CollectorRegistry`, so several
servers (tests) never share state.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvmem.engine import EngineMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
_E2E_BUCKETS = (
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    60.0,
    120.0,
)


class _EngineCollector:
    """Turns the latest :class:`EngineMetrics` snapshot into Prometheus families."""

    def __init__(self, model_name: str, bytes_per_token: int) -> None:
        self.model_name = model_name
        self.bytes_per_token = bytes_per_token
        self.snapshot: EngineMetrics | None = None

    def collect(self) -> Iterator[Metric]:
        m = self.snapshot
        if m is None:
            return
        label = ["model_name"]
        value = [self.model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"kvmem:{name}", doc, labels=label)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"kvmem:{name}", doc, labels=label)
            c.add_metric(value, v)
            return c

        yield gauge(
            "num_requests_running", "Requests holding KV and being computed.", m.num_running
        )
        yield gauge(
            "num_requests_waiting",
            "Requests queued in the engine (new or preempted).",
            m.num_waiting,
        )
        yield gauge(
            "num_requests_swapped", "Requests preempted by swap (KV in host memory).", m.num_swapped
        )
        yield gauge(
            "num_sessions_parked",
            "Sessions whose KV is parked on the host for their next turn.",
            m.num_parked_sessions,
        )
        yield gauge(
            "kv_cache_usage_perc", "Fraction of KV capacity held by requests (0..1).", m.kv_usage
        )
        yield gauge("kv_cache_used_tokens", "KV slots held by requests.", m.kv_used_tokens)
        yield gauge("kv_cache_capacity_tokens", "KV slots in the pool.", m.kv_capacity_tokens)
        yield gauge(
            "kv_cache_cached_tokens",
            "Free KV slots holding reusable prefix KV.",
            m.kv_cached_tokens,
        )
        yield gauge(
            "kv_cache_used_bytes",
            "Bytes of KV held by requests.",
            m.kv_used_tokens * self.bytes_per_token,
        )
        yield gauge(
            "kv_swapped_tokens", "KV slots swapped out to host memory.", m.kv_swapped_tokens
        )
        yield gauge(
            "kv_swapped_bytes",
            "Bytes of KV swapped out to host memory.",
            m.kv_swapped_tokens * self.bytes_per_token,
        )
        yield gauge(
            "prefix_cache_hit_rate",
            "Fraction of prompt tokens offered to the allocator found in its prefix cache.",
            m.prefix_cache_hit_rate,
        )
        yield from _tier_families(m, self.model_name)
        yield counter("num_preemptions", "Preemptions (recompute or swap).", m.num_preemptions)
        yield counter(
            "prompt_tokens", "Prompt tokens computed (recomputation included).", m.prompt_tokens
        )
        yield counter("generation_tokens", "Tokens generated.", m.generation_tokens)
        yield counter("engine_steps", "Engine steps (forward passes).", m.num_steps)
        yield counter("num_aborted_requests", "Requests aborted in the engine.", m.num_aborted)


class ServerMetrics:
    """The server's Prometheus registry and the metrics it observes."""

    def __init__(self, model_name: str, bytes_per_token: int) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.engine = _EngineCollector(model_name, bytes_per_token)
        self.registry.register(self.engine)
        r, ln = self.registry, ["model_name"]
        self.ttft = Histogram(
            "kvmem:time_to_first_token_seconds",
            "Time from admission to the first output token.",
            ln,
            buckets=_TTFT_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.itl = Histogram(
            "kvmem:inter_token_latency_seconds",
            "Time between consecutive output tokens of a request.",
            ln,
            buckets=_ITL_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.tpot = Histogram(
            "kvmem:request_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            ln,
            buckets=_ITL_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.e2e = Histogram(
            "kvmem:e2e_request_latency_seconds",
            "Time from admission to the last token.",
            ln,
            buckets=_E2E_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.success = Counter(
            "kvmem:request_success",
            "Requests finished, by reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.rejected = Counter(
            "kvmem:request_rejected",
            "Requests refused before admission, by HTTP status.",
            ["model_name", "status"],
            registry=r,
        )
        self.disconnected = Counter(
            "kvmem:request_client_disconnects",
            "Requests aborted because their client went away.",
            ln,
            registry=r,
        ).labels(model_name)
        self.in_flight = Gauge(
            "kvmem:server_requests_in_flight",
            "Requests admitted and not yet finished.",
            ln,
            registry=r,
        ).labels(model_name)
        self.queued = Gauge(
            "kvmem:server_queue_size",
            "Admitted requests still waiting for their first token (bounded by --max-queue).",
            ln,
            registry=r,
        ).labels(model_name)

    def render(self, snapshot: EngineMetrics | None) -> bytes:
        """The Prometheus text exposition, with the engine part taken from ``snapshot``."""
        self.engine.snapshot = snapshot
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "ServerMetrics"]


_TIERS = ("device", "host", "disk")
_DIRECTIONS = (
    "device_to_host",
    "device_to_disk",
    "host_to_disk",
    "host_to_device",
    "disk_to_device",
)


def _tier_families(m: EngineMetrics, model_name: str) -> Iterator[Metric]:
    """Prefix-cache hits per tier and bytes moved between tiers (from ``kv_extra``'s ``tier_*``)."""
    extra = m.kv_extra
    hits = CounterMetricFamily(
        "kvmem:prefix_cache_hit_tokens",
        "Prompt tokens found in the prefix cache, by the tier that held them.",
        labels=["model_name", "tier"],
    )
    for tier in _TIERS:
        if tier == "device":
            v = float(m.prefix_cache_hit_tokens)
        else:
            v = extra.get(f"tier_{tier}_hit_pages", 0.0) * m.kv_page_size
        hits.add_metric([model_name, tier], v)
    yield hits
    moved = CounterMetricFamily(
        "kvmem:kv_tier_bytes",
        "Bytes of KV copied between the device and the cache tiers, by direction.",
        labels=["model_name", "direction"],
    )
    for d in _DIRECTIONS:
        moved.add_metric([model_name, d], extra.get(f"tier_bytes_{d}", 0.0))
    yield moved
    loads = GaugeMetricFamily(
        "kvmem:kv_tier_loads_in_flight",
        "Prefix loads from the cache tiers not yet done.",
        labels=["model_name"],
    )
    loads.add_metric([model_name], extra.get("tier_loads_in_flight", 0.0))
    yield loads
    failed = CounterMetricFamily(
        "kvmem:kv_tier_load_failed_pages",
        "Pages that failed to load from a cache tier (computed again instead).",
        labels=["model_name"],
    )
    failed.add_metric([model_name], extra.get("tier_load_failed_pages", 0.0))
    yield failed
