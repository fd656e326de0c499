"""The conformance suite runs on every in-process backend, the minimal test backend, and paged
with host and disk tiers."""

from __future__ import annotations

import pytest

import tests.backends.minimal  # noqa: F401  (registers the "minimal" backend)
import tests.backends.tiered  # noqa: F401  (registers "paged-tiered": paged with host and disk tiers)
from tests.conftest import conformance_backends


@pytest.fixture(params=sorted({*conformance_backends(), "minimal", "paged-tiered"}))
def backend(request: pytest.FixtureRequest) -> str:
    """Each in-process backend in turn, the minimal one and paged with tiers included."""
    return str(request.param)
