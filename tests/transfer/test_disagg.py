"""Disaggregated prefill/decode between two engines in gloo processes."""

from __future__ import annotations

import threading
import time

import pytest

from kvmem.distributed.transport import PeerFailure
from kvmem.engine import Engine
from kvmem.engine.roles import serve_handoffs
from kvmem.errors import InvalidArgument
from kvmem.transfer.live import COMMIT
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


class _SilentPeer:
    """A transport whose peer takes frames but never answers: each answer's wait hangs
    until ``release`` (a stuck connection, as a wait that does not end would leave it)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.failure: PeerFailure | None = None
        self.release = threading.Event()
        self.kinds: list[int] = []

    def send(self, dst: int, kind: int, meta: object, tensors: object = ()) -> None:
        if self.failure is not None:
            raise self.failure
        self.kinds.append(kind)

    def recv(self, src: int, what: str = "", first_wait: float | None = None) -> None:
        self.release.wait()
        raise PeerFailure("released")

    def wait_sent(self, sent: object, what: str = "") -> None:
        return None

    def fail(self, what: str, why: str) -> PeerFailure:
        self.failure = self.failure or PeerFailure(f"{what}: {why}")
        return self.failure


def _serve_locally(peer: _SilentPeer, mark_dead: bool) -> tuple[dict, dict, list]:
    col = w.Collector()
    with w.make_engine("prefill") as eng:
        for i, p in enumerate(w.PROMPTS[:2]):
            eng.add_request(p, w.params(), request_id=f"r{i}", on_output=col)
            eng.handoffs.route(eng, f"r{i}", peer, 1)  # type: ignore[arg-type]
        end = time.monotonic() + 60
        while eng.has_unfinished() and time.monotonic() < end:
            eng.step()
            if mark_dead and eng.handoffs.active:
                eng.handoffs.peer_failed(peer, "instance 1 died")  # type: ignore[arg-type]
        left = (eng.handoffs.busy, eng.allocator.stats().used_tokens)
    peer.release.set()
    assert left == (False, 0)
    return col.tokens, col.finished, eng.handoffs.local


@pytest.mark.parametrize("mark_dead", [False, True], ids=["stuck", "dead"])
def test_a_hand_off_stuck_on_its_peer_ends_in_bounded_time_and_decodes_at_prefill(mark_dead):
    ref = w.reference()
    peer = _SilentPeer(timeout=0.3)
    tokens, finished, local = _serve_locally(peer, mark_dead)
    assert sorted(local) == ["r0", "r1"]
    assert finished == {"r0": 1, "r1": 1}
    assert tokens == {rid: ref[rid] for rid in ("r0", "r1")}
    assert COMMIT not in peer.kinds  # nothing was handed over
    assert peer.failure is not None  # no frame goes out behind the stuck one
