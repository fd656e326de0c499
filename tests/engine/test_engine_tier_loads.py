"""Requests whose prefix loads from a cache tier do not hold up the batch."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from kvmem.engine import Engine, SamplingParams, random_model
from kvmem.tiers.store import DiskTier

PS = 16
GREEDY = SamplingParams(max_tokens=3, temperature=0.0)
LONG = SamplingParams(max_tokens=24, temperature=0.0)
TARGET = "".join(chr(97 + (7 * i) % 26) for i in range(5 * PS + 1))
FILLERS = ["".join(chr(65 + (3 * i + k) % 26) for i in range(13 * PS)) for k in range(2)]
DECODER = "Once upon a time,"


@pytest.fixture(scope="module")
def model() -> Any:
    return random_model("tiny", seed=0)


def _run(engine: Engine, prompt: str, params: SamplingParams) -> list[int]:
    rid = engine.add_request(prompt, params)
    out: list[int] = []
    while engine.has_unfinished():
        out += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
    return out


def _engine(model: Any, **tiers: Any) -> Engine:
    return Engine(
        model,
        num_kv_tokens=16 * PS,
        max_num_seqs=4,
        max_num_batched_tokens=256,
        backend_options={"page_size": PS, **tiers},
    )


def test_a_slow_tier_load_does_not_stall_decodes(
    model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    reads = threading.Event()
    read_all = DiskTier._read_all

    def slow_read_all(*args: Any) -> Any:
        reads.set()
        gate.wait(30)  # a slow disk: the read finishes once the test opens the gate
        return read_all(*args)

    monkeypatch.setattr(DiskTier, "_read_all", staticmethod(slow_read_all))

    ref = _engine(model)
    want_target = _run(ref, TARGET, GREEDY)
    want_decoder = _run(ref, DECODER, LONG)

    eng = _engine(model, disk_cache_dir=tmp_path, disk_cache_tokens=64 * PS)
    alloc = eng.allocator
    assert _run(eng, TARGET, GREEDY) == want_target
    for f in FILLERS:  # they take every device page: TARGET's pages go down to disk
        _run(eng, f, GREEDY)
    alloc._tiers.disk.flush()  # type: ignore[attr-defined]
    assert alloc.stats().extra["tier_disk_used_bytes"] > 0

    dec = eng.add_request(DECODER, LONG)
    toks: dict[str, list[int]] = {dec: []}
    while not toks[dec]:
        for o in eng.step():
            toks[dec] += o.new_token_ids
    tgt = eng.add_request(TARGET, GREEDY)
    toks[tgt] = []
    steps_while_loading = 0
    for _ in range(6):
        for o in eng.step():
            toks[o.request_id] += o.new_token_ids
        handle = alloc.pending_transfer(tgt)
        assert handle is not None and not handle.done()
        assert [r.request_id for r in eng.scheduler.loading] == [tgt]
        steps_while_loading += 1
    assert reads.is_set()
    assert len(toks[dec]) == 1 + steps_while_loading  # one token per step, never stalled
    assert toks[tgt] == []
    gate.set()
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id] += o.new_token_ids
        alloc.check_integrity()
    assert toks[tgt] == want_target
    assert toks[dec] == want_decoder
    req = eng.request(tgt)
    assert req is not None
    assert req.metrics.prompt_cached_tokens == (len(TARGET) - 1) // PS * PS
    assert alloc.stats().extra["tier_disk_hit_pages"] == (len(TARGET) - 1) // PS
    assert alloc.stats().used_tokens == 0


def test_a_failed_tier_load_is_not_counted_as_cached(
    model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = _engine(model)
    want = _run(ref, TARGET, GREEDY)
    eng = _engine(model, disk_cache_dir=tmp_path, disk_cache_tokens=64 * PS)
    _run(eng, TARGET, GREEDY)
    for f in FILLERS:
        _run(eng, f, GREEDY)
    disk = eng.allocator._tiers.disk  # type: ignore[attr-defined]
    disk.flush()
    second = next(k for k in disk.lru_keys() if k[1] == tuple(TARGET[PS : 2 * PS].encode()))
    disk.file(disk.get(second)).write_bytes(b"not a page")
    tgt = eng.add_request(TARGET, GREEDY)
    got: list[int] = []
    while eng.has_unfinished():
        got += [t for o in eng.step() if o.request_id == tgt for t in o.new_token_ids]
    assert got == want
    req = eng.request(tgt)
    assert req is not None and req.metrics.prompt_cached_tokens == PS  # only the first page
