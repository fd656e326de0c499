"""Fixtures of the engine tests: one torch thread, per-backend options.

``backend`` (every in-process backend) comes from tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

# The tiny model's ops take microseconds; extra threads only contend on shared cores.
torch.set_num_threads(1)

#: Engine-sized options for backends whose defaults do not suit the tests' small pools.
ENGINE_BACKEND_OPTIONS: dict[str, dict[str, Any]] = {
    "paged": {"page_size": 16},
}


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
