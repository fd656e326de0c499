"""Shared fixtures of the engine tests: one torch thread, per-backend options."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvmem import available_backends

# The tiny model's ops are microseconds long; extra threads only contend on shared cores.
torch.set_num_threads(1)

#: Engine-sized options for backends whose defaults do not fit the tests' small pools.
ENGINE_BACKEND_OPTIONS: dict[str, dict[str, Any]] = {
    "paged": {"page_size": 16},
}


def backend_options(config: pytest.Config, name: str) -> dict[str, Any]:
    """Constructor options for ``name``: the suite's BACKEND_OPTIONS (tests/conftest.py), then ours.

    Capacity options are dropped: each test sets the engine's ``num_kv_tokens``.
    """
    opts: dict[str, Any] = {}
    for plugin in config.pluginmanager.get_plugins():
        shared = getattr(plugin, "BACKEND_OPTIONS", None)
        if isinstance(shared, dict) and isinstance(shared.get(name), dict):
            opts.update(shared[name])
            break
    opts.update(ENGINE_BACKEND_OPTIONS.get(name, {}))
    for k in ("num_tokens", "num_bytes", "spec"):
        opts.pop(k, None)
    return opts


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``backend`` over every registered backend."""
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", available_backends())
