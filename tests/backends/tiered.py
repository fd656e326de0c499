"""The paged backend with small host and disk tiers, for the conformance suite.

Its tiers are a few pages each and written through (every filled page goes
down to host memory and disk), so every check of the suite (KV values after
each step, prefix hits holding the KV of their tokens, ``check_integrity`` of
the tiers, no page leaked) runs with the tiers working underneath.
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
    """``paged`` with a 16-token host tier and a 32-token disk tier, written through."""

    def __init__(self, spec: KVSpec, **options: Any) -> None:
        options.setdefault("host_cache_tokens", 16)
        options.setdefault("disk_cache_dir", DISK_DIR)
        options.setdefault("disk_cache_tokens", 32)
        options.setdefault("tier_write_policy", "write_through")
        super().__init__(spec, **options)
