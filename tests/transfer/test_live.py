"""Live migration between two engines in gloo processes: same tokens, faults lose nothing."""

from __future__ import annotations

import pytest

from tests.distributed.dist_harness import run_world
from tests.transfer import live_workers as w

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("src", "dst", "fmt", "at_step"),
    [
        ("paged", "paged", "fp32", 3),
        ("paged", "vmem", "fp32", 4),
        ("grouped", "paged", "fp8", 6),
        ("vmem", "grouped", "fp8", 8),
    ],
)
def test_greedy_tokens_are_the_same_with_and_without_migration(src, dst, fmt, at_step):
    r0, r1 = run_world(w.migrate_once, 2, src, dst, fmt, at_step, deadline=100)
    assert r0["handed_over"] and not r0["failed"], r0
    # a pre-copy stage, then the final one (vmem's allocation unit holds the whole context)
    assert r0["stages"] >= (1 if src == "vmem" else 2)
    assert r0["tokens"] is None  # the request left the source: it finishes once, at rank 1
    assert r1["accepted"] == "r" and r1["tokens"] == r0["reference"]
    assert len(r1["tokens"]) == w.MAX_TOKENS
    assert r0["used_after"] == 0 and r1["used_after"] == 0


def test_a_destination_killed_mid_migration_leaves_the_request_running_at_the_source():
    r0, _ = run_world(
        w.migrate_once, 2, "paged", "paged", "fp32", 3, "dst_dies", 3.0, deadline=90, need=(0,)
    )
    assert not r0["handed_over"] and r0["failed"]
    assert r0["tokens"] == r0["reference"] and r0["used_after"] == 0


def test_a_source_killed_after_the_hand_over_does_not_stop_the_request():
    _, r1 = run_world(
        w.migrate_once, 2, "paged", "grouped", "fp32", 3, "src_dies", 3.0, deadline=90, need=(1,)
    )
    assert r1["accepted"] == "r"
    assert r1["tokens"] is not None and len(r1["tokens"]) == w.MAX_TOKENS
    assert r1["used_after"] == 0


def test_a_destination_without_room_refuses_and_the_source_keeps_the_request():
    r0, r1 = run_world(w.migrate_once, 2, "paged", "paged", "fp32", 3, "no_room", deadline=90)
    assert not r0["handed_over"] and any("OutOfKVMemory" in f or "needs" in f for f in r0["failed"])
    assert r0["tokens"] == r0["reference"] and r0["used_after"] == 0
    assert r1["accepted"] is None and r1["used_before_run"] == 0 and r1["tokens"] is None


def test_a_source_whose_wait_for_the_prepared_copy_runs_out_keeps_the_request_alone():
    # the destination is alive but slow: the source gives up and decodes on; with no COMMIT
    # the destination drops its complete copy, so the request runs once, at the source
    r0, r1 = run_world(
        w.migrate_once, 2, "paged", "paged", "fp32", 3, "slow_prepare", 3.0, deadline=90
    )
    assert not r0["handed_over"] and r0["failed"]
    assert r0["tokens"] == r0["reference"] and r0["used_after"] == 0
    assert r1["accepted"] is None and r1["tokens"] is None and r1["used_after"] == 0


@pytest.mark.parametrize("run_undecided", [None, False, True])
def test_a_source_dead_between_prepare_and_commit_leaves_the_choice_to_decide(run_undecided):
    _, r1 = run_world(
        w.migrate_once,
        2,
        "paged",
        "paged",
        "fp32",
        3,
        "src_dies_uncommitted",
        3.0,
        run_undecided,
        deadline=90,
        need=(1,),
    )
    assert r1["asked"] == ([] if run_undecided is None else ["r"])
    if run_undecided:  # e.g. a cluster front that saw the source die: the copy runs, once
        assert r1["accepted"] == "r" and len(r1["tokens"]) == w.MAX_TOKENS
    else:  # never run twice: the copy is dropped
        assert r1["accepted"] is None and r1["tokens"] is None
    assert r1["used_after"] == 0
