"""Two engine instances in processes behind the dispatcher; draining one migrates live."""

from __future__ import annotations

import threading

import pytest

from kvmem.cluster import Cluster
from kvmem.engine import Engine, SamplingParams
from tests.cluster.helpers import OPTS, wait

pytestmark = pytest.mark.timeout(180)


def test_requests_spread_finish_once_with_the_reference_tokens_and_a_drain_moves_them():
    prompts = [[1 + i, 2, 3, 4, 5 + i] * 8 for i in range(4)]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    with Engine(**OPTS) as eng:
        ref = [c.output_token_ids for c in eng.generate(prompts, params)]
    got: dict[str, list[int]] = {}
    finished: dict[str, int] = {}
    lock = threading.Lock()

    def collect(out) -> None:
        with lock:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = finished.get(out.request_id, 0) + 1

    with Cluster(2, OPTS, migrate=False) as c:
        for i, p in enumerate(prompts):
            c.add_request(p, params, request_id=f"r{i}", on_output=collect)
        assert {c.owner[f"r{i}"] for i in range(4)} == {0, 1}  # spread by virtual usage
        assert wait(lambda: any(len(v) >= 4 for v in got.values()), 120)
        c.drain(0)
        assert wait(lambda: len(finished) == 4, 150), (got, c.failed_migrations)
        assert c.migrations, c.failed_migrations
        assert all(src == 0 and dst == 1 for _, src, dst in c.migrations)
    assert finished == {f"r{i}": 1 for i in range(4)}
    assert [got[f"r{i}"] for i in range(4)] == ref
