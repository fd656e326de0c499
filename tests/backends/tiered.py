"""The paged backend with small host and disk tiers, for the conformance suite.

Its tiers are a few pages each, so the suite's workloads push evicted prefix
pages down to host memory and disk and load them back; every check of the
suite (KV values after each step, ``check_integrity`` of the tiers, no page
leaked) then covers the tiers too.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from typing import Any

from kvmem.allocator import register_backend
from kvmem.backends.paged import PagedAllocator
from kvmem.spec import KVSpec

#: One directory for every test allocator's disk tier (each makes its own subdirectory).
DISK_DIR = tempfile.mkdtemp(prefix="kvmem-test-tiers-")
atexit.register(shutil.rmtree, DISK_DIR, ignore_errors=True)


@register_backend("paged-tiered")
class TieredPaged(PagedAllocator):
    """``paged`` with a 16-token host tier and a 32-token disk tier unless told otherwise.

    The device pool is capped at 24 tokens (6 pages of 4), so that cached pages
    are evicted, and found again below the device, within a short workload.
    """

    def __init__(self, spec: KVSpec, **options: Any) -> None:
        if options.get("num_tokens") is not None:
            options["num_tokens"] = min(options["num_tokens"], 24)
        options.setdefault("host_cache_tokens", 16)
        options.setdefault("disk_cache_dir", DISK_DIR)
        options.setdefault("disk_cache_tokens", 32)
        options.setdefault("tier_write_policy", "write_through")
        super().__init__(spec, **options)
