"""Shared fixtures: build any registered backend small enough for tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvmem import KVAllocator, KVSpec, available_backends, create_allocator

#: Constructor options per backend, for small test allocators. A backend
#: that needs options beyond num_tokens/device adds its entry here.
BACKEND_OPTIONS: dict[str, dict[str, Any]] = {
    "paged": {"page_size": 4},
    "paged-tiered": {"page_size": 4},
    "grouped": {"page_size": 4, "max_group_pages": 4},
    # without a process group the sharded backend runs as a world of one;
    # tests/distributed runs the contract tests again on 2 ranks
    "sharded": {"page_size": 4, "rblock_size": 8, "attention_impl": "reference"},
    # smallest host pages (with the suite's specs a page group holds 4 tokens, so a
    # 48-token pool has room for 12 sequences); no map-ahead thread, so that stats()
    # snapshots are stable
    "vmem": {"page_bytes": 4096, "max_seqs": 64, "max_seq_len": 16384, "map_ahead": False},
}

#: The suite's pools must hold at least this many sequences at once on every backend
#: (tests/conformance/test_contract.py checks it), so that sharing, eviction and
#: out-of-memory paths are reached with several sequences live.
MIN_CONCURRENT_SEQS = 4

#: Backends the shared suite does not build in-process (they need a process group).
MULTIPROCESS_BACKENDS: set[str] = set()


def conformance_backends() -> list[str]:
    """Registered backends the in-process conformance suite runs on."""
    return [b for b in available_backends() if b not in MULTIPROCESS_BACKENDS]


def make_allocator(kind: str, spec: KVSpec, num_tokens: int, **options: Any) -> KVAllocator:
    """A small allocator of ``kind`` on the CPU."""
    opts = {**BACKEND_OPTIONS.get(kind, {}), **options}
    return create_allocator(kind, spec, num_tokens=num_tokens, device="cpu", **opts)


@pytest.fixture(params=conformance_backends())
def backend(request: pytest.FixtureRequest) -> str:
    """Each in-process backend in turn."""
    return str(request.param)


def small_spec() -> KVSpec:
    """2 layers, 2 KV heads, head dim 64, fp32: 1 KiB per token and layer, so that one 4 KiB
    host page of the vmem backend holds 4 tokens, as a page of the paged backend does."""
    return KVSpec(2, 2, 64, dtype=torch.float32)


@pytest.fixture
def spec() -> KVSpec:
    """The suite's spec (:func:`small_spec`)."""
    return small_spec()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU tests where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
