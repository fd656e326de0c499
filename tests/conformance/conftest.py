"""The conformance suite runs on every in-process backend and on the minimal test backend."""

from __future__ import annotations

import pytest

import tests.backends.minimal  # noqa: F401  (registers the "minimal" backend)
from tests.conftest import conformance_backends


@pytest.fixture(params=sorted({*conformance_backends(), "minimal"}))
def backend(request: pytest.FixtureRequest) -> str:
    """Each in-process backend in turn, the minimal one built on KVBackend included."""
    return str(request.param)
