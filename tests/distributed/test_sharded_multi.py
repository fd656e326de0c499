"""The sharded backend on 2 and 4 gloo ranks (spawned processes on 127.0.0.1).

Each test spawns its ranks with dist_harness.run_world, which kills any rank
still running at the test's deadline; the allocators' own waits are bounded
by their ``timeout`` (10 s here, 3 s in the fault tests).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tests.conformance.test_contract as contract
from tests.distributed import dist_workers as w
from tests.distributed.dist_harness import free_port, run_world

pytestmark = pytest.mark.timeout(120)
TOL = 1e-5  # fp32, against the single-process paged backend with the reference kernels


def test_two_ranks_lend_fork_and_free_match_the_reference():
    r0, r1 = run_world(w.two_ranks_lend_fork_free, 2, deadline=90)
    assert r0["max_err"] <= TOL
    assert r0["placement_p_60"] == [0] * 8  # the owner's own memory first
    # the fork's shared, half-full rBlock 7 was copied to rank 1 (rank 0 was full)
    assert r0["placement_c"] == [0] * 7 + [1]
    assert r0["placement_p"] == [0] * 8 + [1] * 4  # grown on memory lent by rank 1
    assert r0["lent_borrowed"] == (0, 5 * w.RB)
    assert r0["group_empty"] and r0["used_after_free"] == 0
    assert r0["local_used"] == 0 and r1["local_used"] == 0
    x = r0["x_layout"]  # rank 0's layout of a sequence that spills onto rank 1
    assert x["placement"] == [0] * 8 + [1]
    assert x["seq_lens"] == [64] and x["query_start_loc"] == [0, 70]
    assert all(s >= 0 for s in x["slots"][:64]) and len(set(x["slots"][:64])) == 64
    assert x["slots"][64:] == [-1] * 6


def test_a_lender_without_room_is_refused_before_any_message():
    r0, r1 = run_world(w.two_ranks_lender_refusal, 2, deadline=90)
    assert r1["own_placement"] == [1] * 4
    assert r0["refused"] and "rank 1: 0" in r0["message"]
    assert r0["unchanged"]  # stats, sequence and message count all as before
    assert r0["placement"] == [0] * 4 + [1]
    assert r0["group_empty"]


def test_four_ranks_serve_three_times_one_ranks_capacity():
    res = run_world(w.four_ranks_long_context, 4, deadline=110)
    r0 = res[0]
    assert r0["context"] >= 3 * r0["cap"]
    assert r0["placement"] == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 2
    assert r0["max_err"] <= TOL
    sizes = {b for _, b in r0["step_bytes"]}
    assert len(sizes) == 1 and sizes.pop() > 0  # same bytes per decode step as context grows
    assert r0["group_empty"] and all(r["local_used"] == 0 for r in res)
    assert r0["spread_placement"] == [0, 1, 2, 3, 0, 1]
    assert r0["spread_err"] <= TOL and r0["spread_empty"]


def test_three_owners_borrow_from_each_other_at_once():
    res = run_world(w.three_owners_at_once, 3, deadline=90)
    for r in res:
        assert sorted(set(r["placement"])) == [0, 1, 2]  # spread over every rank
        assert r["max_err"] <= TOL
        assert r["lent_borrowed"][0] > 0 and r["lent_borrowed"][1] > 0
        assert r["group_empty"] and r["local_used"] == 0


def test_a_follower_waiting_in_close_learns_that_the_owner_died():
    timeout = 3.0
    r1 = run_world(w.rank_fails, 2, "owner_dies", timeout, deadline=60, need=(1,))[1]
    assert r1["error"] is not None and "rank 0" in r1["error"]
    assert r1["elapsed"] < timeout + 3.0


@pytest.mark.parametrize("how", ["die", "stop"])
def test_a_failed_rank_gives_a_clear_error_within_the_timeout(how):
    timeout = 3.0
    r0 = run_world(w.rank_fails, 2, how, timeout, deadline=60, need=(0,))[0]
    assert r0["placement"] == [0] * 4 + [1] * 2
    assert r0["error"] is not None and "rank 1" in r0["error"]
    if how == "die":
        assert "closed its connection" in r0["error"]
        assert r0["elapsed"] < timeout
    else:
        assert f"did not answer within {timeout:g} s" in r0["error"]
        assert timeout * 0.5 < r0["elapsed"] < timeout + 3.0
    assert r0["later_call"] == "PeerFailure"
    assert r0["close_s"] < 1.0


def test_conformance_contract_on_two_ranks():
    names = sorted(n for n in dir(contract) if n.startswith("test_"))
    r0, r1 = run_world(w.conformance_two_ranks, 2, names, deadline=110)
    assert r0["failed"] == {}
    assert r0["passed"] == names
    assert r1["allocators"] == r0["allocators"] > 0


def test_the_example_serves_a_sequence_longer_than_one_rank_under_torchrun():
    root = Path(__file__).resolve().parents[2]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(root / "examples" / "distributed_decode.py"),
        "--capacity",
        "64",
        "--rblock",
        "16",
        "--chunk",
        "32",
        "--steps",
        "4",
        "--timeout",
        "20",
    ]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=100, env=env, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "one sequence of 100 tokens" in out and "(1.56x one rank's capacity)" in out
    assert "on rank 0 (owner)" in out and "on rank 1 (lent)" in out
    err = float(re.search(r"max \|error\| = (\S+)", out).group(1))
    assert err < 1e-5
