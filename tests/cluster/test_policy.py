"""The dispatcher's choices: virtual usage counts queued demand; migration pairs."""

from __future__ import annotations

import pytest

from kvmem.cluster import Load, pick_instance, plan_migrations
from kvmem.errors import InvalidArgument


def test_queued_demand_counts_before_admission():
    # instance 0 holds less KV but has a large queued prompt: instance 1 is freer
    loads = [Load(8192, 1000, 6000), Load(8192, 3000, 0)]
    assert loads[0].freeness == 1192 and loads[1].freeness == 5192
    assert pick_instance(loads) == 1
    assert pick_instance([Load(100, 0), Load(100, 0)]) == 0  # ties: lowest index
    assert pick_instance([Load(100, 0, draining=True), Load(100, 90)]) == 1
    with pytest.raises(InvalidArgument):
        pick_instance([])


def test_migrations_go_from_overloaded_or_draining_to_the_freest():
    loads = [Load(100, 90, 40, running=3), Load(100, 10), Load(100, 50), Load(100, 95, 20, 2)]
    assert plan_migrations(loads) == [(0, 1), (3, 2)]
    # a busy instance takes no part; nothing runs: nothing to move; draining is a source
    assert plan_migrations([Load(100, 90, 40, 3, migrating=True), Load(100, 0)]) == []
    assert plan_migrations([Load(100, 90, 40, 0), Load(100, 0)]) == []
    assert plan_migrations([Load(100, 10, 0, 1, draining=True), Load(100, 0)]) == [(0, 1)]
    assert plan_migrations([Load(100, 10, 0, 1), Load(100, 0)]) == []  # nobody is short
