"""Swaps in flight while the main thread keeps allocating, writing, committing and freeing.

Many rounds of: swap some sequences out or in without waiting, then run
engine-like steps on others (add, reserve, lay out, write KV, commit, free,
finish with keep_on_host, resume). Every KV write first checks the
sequence's existing KV (kvmodel), every swapped-in sequence must match the
digest taken before it left, and the allocator's invariants must hold
throughout. The test is bounded in time (a deadlock fails it).
"""

from __future__ import annotations

import random

import pytest
import torch

from kvmem import KVSpec, OutOfKVMemory
from tests.conformance.kvmodel import check_kv, write_step
from tests.conftest import make_allocator
from tests.swap.util import HOST_POOL_BACKENDS, digest

SPEC = KVSpec(4, 2, 64, dtype=torch.float32)  # 4 KiB per token


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", HOST_POOL_BACKENDS)
def test_swaps_in_flight_while_others_allocate_commit_and_free(kind, seed=1234):
    rng = random.Random(seed)
    a = make_allocator(kind, SPEC, 1024, host_num_tokens=768)
    tokens: dict[str, list[int]] = {}
    on_host: dict[str, str] = {}  # swapped out: digest at swap-out
    parked: set[str] = set()
    handles = []
    overlapped = 0
    next_id = 0

    def new_seq() -> None:
        nonlocal next_id
        next_id += 1
        sid = f"s{next_id}"
        toks = [rng.randrange(50) for _ in range(rng.randrange(2, 40))]
        cached = a.add(sid, toks)
        tokens[sid] = toks
        try:
            a.reserve(sid, len(toks) - cached)
            write_step(a, [(sid, len(toks) - cached)], tokens)
        except OutOfKVMemory:
            pass

    def resident() -> list[str]:
        return [s for s in tokens if s not in on_host and s not in parked]

    for _ in range(200):
        op = rng.random()
        if op < 0.2 and resident():  # swap out, no wait
            sids = rng.sample(resident(), min(len(resident()), rng.randrange(1, 4)))
            digests = {s: digest(a, s) for s in sids}
            try:
                handles.append(a.swap_out(sids))
            except OutOfKVMemory:
                continue
            on_host.update(digests)
        elif op < 0.35 and on_host:  # swap in, no wait
            sids = rng.sample(sorted(on_host), min(len(on_host), rng.randrange(1, 3)))
            try:
                handles.append(a.swap_in(sids))
            except OutOfKVMemory:
                continue
            for s in sids:  # naming them waits for the copy: their KV must be back
                assert digest(a, s) == on_host.pop(s), f"KV of {s} corrupted by swap"
        elif op < 0.45 or not tokens:
            new_seq()
        elif op < 0.55 and resident():
            sid = rng.choice(resident())
            if rng.random() < 0.5:
                a.free(sid)
                del tokens[sid]
            else:  # finished, kept on the host for a next turn
                a.free(sid, keep_on_host=True)
                parked.add(sid)
        elif op < 0.6 and parked:
            sid = rng.choice(sorted(parked))
            parked.discard(sid)
            if sid not in a.seq_ids():  # evicted from the host pool
                del tokens[sid]
                continue
            tokens[sid] = tokens[sid] + [rng.randrange(50)]
            try:
                n = a.resume(sid, tokens[sid])
            except OutOfKVMemory:
                parked.add(sid)
                tokens[sid].pop()
                continue
            lay = (a.reserve(sid, 1), a.layout([(sid, 1)]))[1]
            check_kv(a, lay, 0, tokens[sid][:n])
        else:  # a decode step over every resident sequence with room
            if a.stats().extra["swaps_in_flight"]:
                overlapped += 1
            batch = []
            for sid in resident():
                info = a.seq_info(sid)
                if info.num_tokens == info.num_computed:
                    tokens[sid].append(rng.randrange(50))
                    a.append(sid, tokens[sid][-1:])
                try:
                    a.reserve(sid, 1)
                except OutOfKVMemory:
                    continue
                batch.append((sid, 1))
            if batch:
                write_step(a, batch, tokens)
        if rng.random() < 0.2:
            a.check_integrity()
    for h in handles:
        h.wait(timeout=10)
    a.check_integrity()
    assert overlapped > 0, "no decode step ran while a swap was in flight"
    for sid in list(tokens):
        if sid in a.seq_ids():
            a.free(sid)
    a.check_integrity()
    st = a.stats()
    assert st.used_tokens == 0 and st.swapped_tokens == 0 and st.extra["host_used_tokens"] == 0
    a.close()
