"""Fixtures of the native-operation tests: which paths to run."""

from __future__ import annotations

import pytest

from kvmem import native


def paths() -> list[bool]:
    """The paths to check: always Python, and native when the extension is in use."""
    return [False, True] if native.enabled() else [False]


@pytest.fixture(params=[False, True], ids=["python", "native"])
def path(request: pytest.FixtureRequest) -> bool:
    """``native=`` argument of the operation under test."""
    if request.param and not native.enabled():
        pytest.skip(f"native extension not in use: {native.status().reason}")
    return bool(request.param)


needs_native = pytest.mark.skipif(
    "not __import__('kvmem.native').native.enabled()", reason="native extension not in use"
)
