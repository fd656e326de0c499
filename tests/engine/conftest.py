"""Shared fixtures of the engine tests: one torch thread, per-backend options, a checked runner."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from kvmem import available_backends
from kvmem.engine import Engine, SamplingParams

# The tiny model's ops take microseconds; extra threads only contend on shared cores.
torch.set_num_threads(1)

#: Engine-sized options for backends whose defaults do not suit the tests' small pools.
ENGINE_BACKEND_OPTIONS: dict[str, dict[str, Any]] = {
    "paged": {"page_size": 16},
}

#: Prompts of different lengths (bytes = tokens), some sharing a prefix.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog, again and again and again.",
    "KV",
    "The quick brown fox jumps over the lazy dog, then sleeps.",
    "Once upon a time, in a land of paged memory,",
    "0123456789 abcdefghij",
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``backend`` over every registered backend."""
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", available_backends())


@pytest.fixture
def backend_options(pytestconfig: pytest.Config) -> Callable[[str], dict[str, Any]]:
    """Options for a backend: the suite's BACKEND_OPTIONS (tests/conftest.py), then ours.

    Capacity options are dropped: each test sets the engine's ``num_kv_tokens``.
    """

    def get(name: str) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        for plugin in pytestconfig.pluginmanager.get_plugins():
            shared = getattr(plugin, "BACKEND_OPTIONS", None)
            if isinstance(shared, dict) and isinstance(shared.get(name), dict):
                opts.update(shared[name])
                break
        opts.update(ENGINE_BACKEND_OPTIONS.get(name, {}))
        for k in ("num_tokens", "num_bytes", "spec"):
            opts.pop(k, None)
        return opts

    return get


def run_checked(
    engine: Engine, prompts: Sequence[str], params: SamplingParams
) -> list[list[int]]:
    """Generate, checking the allocator's integrity after every step and that nothing leaks."""
    ids = [engine.add_request(p, params) for p in prompts]
    toks: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            toks[o.request_id].extend(o.new_token_ids)
        engine.allocator.check_integrity()
    stats = engine.allocator.stats()
    assert stats.used_tokens == 0 and stats.num_seqs == 0, "KV leaked"
    return [toks[i] for i in ids]
