"""A :class:`~kvmem.cluster.Cluster` behind the interface the server's runner uses.

``kvmem serve --instances N`` builds one engine as usual (its model,
tokenizer and configuration are the template), then starts N instance
processes with the same model, configuration and tokenizer, and serves them
behind one OpenAI endpoint; ``kvmem serve --prefill-instances P
--decode-instances D`` starts P prefill and D decode instances instead (the
first token of each request streams from a prefill instance, the rest from
a decode instance). :class:`ClusterEngine` has the calls
:class:`~kvmem.server.runner.AsyncEngine` makes of an engine (``add_request``,
``abort``, ``end_session``, ``serve_forever``, ``metrics``, and the attributes
the app reads).

``metrics()`` merges the instances' latest metrics (each reports about
four times a second): counts and tokens summed, KV usage over the sums, the
prefix hit rate weighted by the prompt tokens each instance was offered.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from kvmem.cluster.fleet import Cluster
from kvmem.engine import Engine, EngineMetrics, SamplingParams
from kvmem.engine.errors import InvalidRequest


class ClusterEngine:
    """N copies of ``template`` in processes, served as one engine (see the module docstring)."""

    def __init__(self, template: Engine, n: int, migrate: bool = True, prefill: int = 0) -> None:
        self.template = template
        self.config = template.config
        self.tokenizer = template.tokenizer
        self.max_model_len = template.max_model_len
        self.allocator = template.allocator
        self.kv_capacity_tokens = template.kv_capacity_tokens
        model = getattr(template.executor, "model", None)
        options = {"model": model, "config": template.config, "tokenizer": template.tokenizer}
        self.cluster = Cluster(n, options, migrate=migrate, prefill=prefill)

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        on_output: Callable[[Any], None] | None = None,
        fork_from: str | None = None,
        tenant: Hashable = "default",
        priority: int = 0,
        session_id: str | None = None,
    ) -> str:
        """Dispatch a request to an instance (``fork_from`` runs it on its own; ``session_id``
        makes it a turn of that session, see :meth:`Cluster.add_request`).

        Raises :class:`InvalidRequest` before anything is sent for an empty
        prompt, one that fills the context, or one that no instance could
        hold (with disaggregation: the prompt and its first token on a decode
        instance)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens; the context is shorter")
        need = len(ids) + (1 if self.cluster.prefill else 0)
        if need > self.kv_capacity_tokens:
            where = "a decode instance's" if self.cluster.prefill else "an instance's"
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; {where} whole KV capacity is "
                f"{self.kv_capacity_tokens} tokens, too few for it and its first generated token"
            )
        return self.cluster.add_request(
            ids,
            params or SamplingParams(),
            request_id=request_id,
            on_output=on_output,
            session_id=session_id,
        )

    def end_session(self, session_id: str) -> bool:
        """Free a session's parked KV wherever it is; whether the cluster knew it."""
        return self.cluster.end_session(session_id)

    def abort(self, request_id: str) -> bool:
        """Abort a request wherever it runs."""
        return self.cluster.abort(request_id)

    def serve_forever(
        self,
        stop: threading.Event,
        idle_sleep: float = 0.05,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """The instances run on their own; wait for ``stop``, then stop them."""
        stop.wait()
        self.cluster.close()

    def metrics(self) -> EngineMetrics:
        """The instances' metrics merged (the template's until one has reported)."""
        got = [m for m in self.cluster.metrics if m is not None]
        return merge_metrics(got) if got else self.template.metrics()


_MAX_FIELDS = ("time", "kv_page_size")
_RATIO_FIELDS = ("kv_usage", "prefix_cache_hit_rate")


def merge_metrics(parts: Sequence[EngineMetrics]) -> EngineMetrics:
    """One fleet's metrics from its instances' (see the module docstring)."""
    if not parts:
        raise InvalidRequest("no instance metrics to merge")
    out: dict[str, Any] = {}
    for f in dataclasses.fields(EngineMetrics):
        vals = [getattr(m, f.name) for m in parts]
        if f.name == "kv_extra":
            extra: dict[str, float] = {}
            for v in vals:
                for k, x in v.items():
                    extra[k] = extra.get(k, 0.0) + float(x)
            out[f.name] = extra
        elif f.name in _MAX_FIELDS:
            out[f.name] = max(vals)
        elif f.name not in _RATIO_FIELDS:
            out[f.name] = sum(vals)
    cap = out["kv_capacity_tokens"]
    out["kv_usage"] = out["kv_used_tokens"] / cap if cap else 0.0
    prompts = sum(m.prompt_tokens + m.prefix_cache_hit_tokens for m in parts)
    out["prefix_cache_hit_rate"] = (
        sum(m.prefix_cache_hit_rate * (m.prompt_tokens + m.prefix_cache_hit_tokens) for m in parts)
        / prompts
        if prompts
        else 0.0
    )
    return EngineMetrics(**out)


__all__ = ["ClusterEngine", "merge_metrics"]
