"""The conformance suite runs on every in-process backend, the minimal test backend, and paged
and vmem with host and disk tiers."""

from __future__ import annotations

import pytest

import tests.backends.minimal  # noqa: F401  (registers the "minimal" backend)
import tests.backends.tiered  # noqa: F401  (registers "paged-tiered" and "vmem-tiered")
from tests.conftest import conformance_backends

#: The backends with cache tiers (tests/backends/tiered.py).
TIERED = ("paged-tiered", "vmem-tiered")


@pytest.fixture(params=sorted({*conformance_backends(), "minimal", *TIERED}))
def backend(request: pytest.FixtureRequest) -> str:
    """Each in-process backend in turn, the minimal one and the tiered ones included."""
    return str(request.param)
