"""Disaggregated prefill/decode between two engines in gloo processes."""

from __future__ import annotations

import pytest

from kvmem.engine import Engine
from kvmem.engine.roles import serve_handoffs
from kvmem.errors import InvalidArgument
from tests.distributed.dist_harness import run_world
from tests.transfer import disagg_workers as w

pytestmark = pytest.mark.timeout(150)
IDS = [f"r{i}" for i in range(len(w.PROMPTS))] + ["turn"]


def test_decode_continues_each_prompt_with_the_colocated_tokens_and_pages_move_early():
    r0, r1 = run_world(w.prefill_decode, 2, deadline=120)
    ref = r0["reference"]
    assert sorted(r0["handed"]) == sorted(IDS) and not r0["failed"] and not r0["local"]
    assert sorted(r1["taken"]) == sorted(IDS)
    for rid in IDS:
        # the first token streams from the prefill side, the rest from the decode side
        assert r0["tokens"][rid] == ref[rid][:1], rid
        assert r1["tokens"][rid] == ref[rid][1:], rid
        assert r0["finished"].get(rid) is None and r1["finished"][rid] == 1
    # the second turn found the first turn's prompt in the prefill side's prefix cache
    assert r0["cached"]["turn"] >= len(w.PROMPTS[0]) // 16 * 16
    # ... and the decode side held its pages from the first turn: they were not sent again
    assert r0["turn_cached"] >= len(w.PROMPTS[0]) // 16 * 16
    # prompts of several chunks: some of their KV moved while later chunks computed
    assert 0 < r0["bytes_early"] < r0["bytes"]
    assert r0["used_after"] == 0 and r1["used_after"] == 0 and r0["left"] == (0, 0, 0)


def test_a_decode_side_without_room_holds_requests_back_at_the_prefill_side():
    # room for one request at a time: the others wait at the prefill side, KV kept
    cap = len(w.PROMPTS[2]) + w.MAX_TOKENS + 16
    r0, r1 = run_world(w.prefill_decode, 2, "", 10.0, cap, deadline=120)
    ref = r0["reference"]
    assert sorted(r0["handed"]) == sorted(IDS) and not r0["local"]
    assert any("OutOfKVMemory" in why for _, _, why in r0["failed"])
    for rid in IDS:
        assert r0["tokens"][rid] + r1["tokens"][rid] == ref[rid], rid
        assert r1["finished"][rid] == 1
    assert r1["peak"] <= cap
    assert r0["used_after"] == 0 and r1["used_after"] == 0 and r0["left"] == (0, 0, 0)


def test_a_decode_side_dying_mid_transfer_leaves_every_request_to_finish_once_at_prefill():
    r0, _ = run_world(w.prefill_decode, 2, "decode_dies", 3.0, deadline=120, need=(0,))
    ref = r0["reference"]
    assert not r0["handed"] and r0["failed"]
    assert sorted(r0["local"]) == sorted(IDS)
    for rid in IDS:
        assert r0["tokens"][rid] == ref[rid] and r0["finished"][rid] == 1, rid
    assert r0["used_after"] == 0 and r0["left"] == (0, 0, 0)


def test_a_request_aborted_during_its_transfer_leaves_nothing_on_either_side():
    r0, r1 = run_world(w.prefill_decode, 2, "abort", deadline=120)
    ref = r0["reference"]
    assert r0["aborted_mid_transfer"]
    assert r0["finished"]["r2"] == 1 and "r2" not in r0["handed"] and "r2" not in r1["taken"]
    assert "r2" not in r1["tokens"]
    for rid in (r for r in IDS if r != "r2"):
        assert r0["tokens"][rid] + r1["tokens"][rid] == ref[rid], rid
    assert r0["used_after"] == 0 and r1["used_after"] == 0 and r0["left"] == (0, 0, 0)


def test_roles_are_checked():
    with pytest.raises(InvalidArgument, match="role"):
        Engine(role="both")
    with Engine(num_kv_tokens=256, attention_impl="reference") as eng:
        rid = eng.add_request([1, 2, 3])
        with pytest.raises(InvalidArgument, match="prefill"):
            eng.handoffs.route(eng, rid, None, 1)  # type: ignore[arg-type]
    with Engine(num_kv_tokens=256, attention_impl="reference", role="prefill") as eng:
        rid = eng.add_request([1, 2, 3])
        with pytest.raises(InvalidArgument, match="no request"):
            eng.handoffs.route(eng, "nope", None, 1)  # type: ignore[arg-type]
        eng.handoffs.route(eng, rid, None, 1)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="already"):
            eng.handoffs.route(eng, rid, None, 1)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="decode engine"):
            serve_handoffs(eng, None, 0)  # type: ignore[arg-type]
