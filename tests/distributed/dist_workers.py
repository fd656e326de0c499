"""What each rank runs in the multi-process tests (see dist_harness.run_world).

Rank 0 owns the sequences and runs every check; the other ranks hold rBlocks
for it and wait in ``close`` (or in a barrier of the default group when they
inspect their own memory afterwards). Results are plain Python values.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

from kvmem import KVSpec, OutOfKVMemory, create_allocator
from kvmem import attention as kernels
from kvmem.distributed import PeerFailure, ShardedAllocator, attend

SPEC = KVSpec(2, 2, 16, dtype=torch.float32)
Q_HEADS = 4
RB = 8  # rBlock size in tokens
PAGE = 4


def make_sharded(cap: int, timeout: float = 10.0, **kw: Any) -> ShardedAllocator:
    """A sharded allocator with ``cap`` tokens on this rank."""
    return ShardedAllocator(
        SPEC,
        num_tokens=cap,
        page_size=PAGE,
        rblock_size=RB,
        timeout=timeout,
        attention_impl="reference",
        **kw,
    )


class Mirror:
    """Drives a sharded allocator and a single-process paged reference in lockstep (rank 0)."""

    def __init__(self, alloc: ShardedAllocator, seed: int = 0) -> None:
        self.alloc = alloc
        self.ref = create_allocator("paged", SPEC, num_tokens=4096, page_size=PAGE)
        self.gen = torch.Generator().manual_seed(seed)
        self.max_err = 0.0
        self.step_bytes: list[tuple[int, int]] = []  # (context after step, bytes) per decode step

    def add(self, sid: str, tokens: list[int]) -> None:
        self.alloc.add(sid, tokens)
        self.ref.add(sid, tokens)

    def fork(self, parent: str, child: str) -> None:
        self.alloc.fork(parent, child)
        self.ref.fork(parent, child)

    def free(self, sid: str) -> None:
        self.alloc.free(sid)
        self.ref.free(sid)

    def run(self, sid: str, n: int, token: int | None = None) -> None:
        """Reserve, write and attend ``n`` new tokens of ``sid`` in both; compare every layer."""
        if token is not None:
            self.alloc.append(sid, [token])
            self.ref.append(sid, [token])
        self.alloc.reserve(sid, n)
        self.ref.reserve(sid, n)
        lay = self.ref.layout([(sid, n)])
        before = self.alloc.profile.bytes_sent + self.alloc.profile.bytes_received
        for layer in range(SPEC.num_layers):
            q = torch.randn(n, Q_HEADS, SPEC.head_dim, generator=self.gen)
            k = torch.randn(n, SPEC.num_kv_heads, SPEC.head_dim, generator=self.gen)
            v = torch.randn(n, SPEC.num_kv_heads, SPEC.head_dim, generator=self.gen)
            out, lse = attend(self.alloc, layer, [(sid, n)], q, k, v)
            kernels.write_kv(self.ref.layer(layer), lay, k, v, impl="reference")
            fn = kernels.decode if n == 1 else kernels.prefill
            r_out, r_lse = fn(q, self.ref.layer(layer), lay, impl="reference")
            assert out.dtype == torch.float32 and out.shape == r_out.shape
            err = max((out - r_out).abs().max().item(), (lse - r_lse).abs().max().item())
            self.max_err = max(self.max_err, err)
        if n == 1:
            after = self.alloc.profile.bytes_sent + self.alloc.profile.bytes_received
            self.step_bytes.append((self.alloc.seq_info(sid).num_computed + 1, after - before))
        self.alloc.commit(sid, n)
        self.ref.commit(sid, n)


def group_is_empty(alloc: ShardedAllocator) -> bool:
    """Every rank's free count equals its capacity in the directory."""
    return alloc.directory.free() == alloc.directory.capacities


def local_used_after_barrier(alloc: ShardedAllocator) -> int:
    """Wait for rank 0 to finish (default-group barrier); this rank's local slots in use."""
    dist.barrier()
    used = alloc.local.stats().used_tokens + alloc.holder.held_blocks
    dist.barrier()
    return used


# ---------------------------------------------------------------- 2 ranks
def two_ranks_lend_fork_free(rank: int, world: int) -> dict[str, Any]:
    """Prefill + decode vs the reference; lending; a cross-rank copy-on-write; free empties all."""
    alloc = make_sharded(64)  # 8 rBlocks per rank
    out: dict[str, Any] = {}
    if rank == 0:
        m = Mirror(alloc)
        m.add("p", list(range(1, 61)))
        for n in (24, 24, 12):  # 60 tokens: rank 0's 8 rBlocks, the last one half full
            m.run("p", n)
        out["placement_p_60"] = alloc.placement_of("p")
        m.fork("p", "c")
        m.run("c", 1, token=7)  # rBlock 7 is shared and rank 0 is full: copied to rank 1
        out["placement_c"] = alloc.placement_of("c")
        for t in range(10):
            m.run("p", 1, token=100 + t)  # the 5th step opens rBlock 8, lent by rank 1
        m.alloc.append("p", list(range(20)))
        m.ref.append("p", list(range(20)))
        m.run("p", 20)  # a prefill chunk written on, and attending over, both ranks
        for t in range(3):
            m.run("c", 1, token=200 + t)
        alloc.check_integrity()
        out["placement_p"] = alloc.placement_of("p")
        st = alloc.stats()
        out["lent_borrowed"] = (st.extra["lent_tokens"], st.extra["borrowed_tokens"])
        out["max_err"] = m.max_err
        m.free("p")
        m.free("c")
        alloc.check_integrity()
        out["group_empty"] = group_is_empty(alloc)
        out["used_after_free"] = alloc.stats().used_tokens
        alloc.add("x", [3] * 70)  # rank 0's 8 rBlocks, then one on rank 1
        alloc.reserve("x", 70)
        lay = alloc.layout([("x", 70)])
        out["x_layout"] = {
            "placement": alloc.placement_of("x"),
            "seq_lens": lay.seq_lens.tolist(),
            "query_start_loc": lay.query_start_loc.tolist(),
            "slots": lay.slot_mapping.tolist(),
        }
        alloc.free("x")
    out["local_used"] = local_used_after_barrier(alloc)
    alloc.close()
    return out


def two_ranks_lender_refusal(rank: int, world: int) -> dict[str, Any]:
    """Both ranks own sequences; a full lender is refused before any message is sent."""
    alloc = make_sharded(32)  # 4 rBlocks per rank
    out: dict[str, Any] = {}
    if rank == 1:
        alloc.add("mine", [1] * 32)
        alloc.reserve("mine", 32)  # rank 1 fills its own memory
        out["own_placement"] = alloc.placement_of("mine")
    dist.barrier()
    if rank == 0:
        alloc.add("s", [1] * 40)
        alloc.reserve("s", 32)
        before = (alloc.stats(), alloc.seq_info("s"), alloc.traffic().messages)
        try:
            alloc.reserve("s", 40)
            out["refused"] = False
        except OutOfKVMemory as e:
            out["refused"] = True
            out["message"] = str(e)
        out["unchanged"] = (alloc.stats(), alloc.seq_info("s"), alloc.traffic().messages) == before
        alloc.check_integrity()
    dist.barrier()
    if rank == 1:
        alloc.free("mine")
    dist.barrier()
    if rank == 0:
        alloc.reserve("s", 40)  # now rank 1 lends its rBlock
        out["placement"] = alloc.placement_of("s")
        alloc.check_integrity()
        alloc.free("s")
        out["group_empty"] = group_is_empty(alloc)
    alloc.close()
    return out


# ---------------------------------------------------------------- 4 ranks
def four_ranks_long_context(rank: int, world: int) -> dict[str, Any]:
    """A context over 3x one rank's capacity, spread over 4 ranks; then "spread" placement."""
    cap = 64
    alloc = make_sharded(cap)
    out: dict[str, Any] = {"cap": cap}
    if rank == 0:
        m = Mirror(alloc, seed=1)
        m.add("long", list(range(200)))
        for n in (48, 48, 48, 48, 8):
            m.run("long", n)
        for t in range(8):
            m.run("long", 1, token=t)
        out["context"] = alloc.seq_info("long").num_computed
        out["placement"] = alloc.placement_of("long")
        out["step_bytes"] = m.step_bytes
        out["max_err"] = m.max_err
        alloc.check_integrity()
        m.free("long")
        out["group_empty"] = group_is_empty(alloc)
    out["local_used"] = local_used_after_barrier(alloc)
    alloc.close()

    spread = make_sharded(cap, placement="spread")
    if rank == 0:
        m = Mirror(spread, seed=2)
        m.add("s", list(range(40)))
        m.run("s", 40)
        m.run("s", 1, token=1)
        out["spread_placement"] = spread.placement_of("s")
        out["spread_err"] = m.max_err
        m.free("s")
        out["spread_empty"] = group_is_empty(spread)
    spread.close()
    return out


# ---------------------------------------------------------------- every rank an owner
def three_owners_at_once(rank: int, world: int) -> dict[str, Any]:
    """Each rank owns a sequence spread over all ranks; all run attention at the same time."""
    alloc = make_sharded(64, placement="spread")
    m = Mirror(alloc, seed=10 + rank)
    sid = f"seq-{rank}"
    m.add(sid, list(range(40)))
    dist.barrier()  # start together: requests cross in every direction
    for n in (16, 24):
        m.run(sid, n)
    for t in range(12):
        m.run(sid, 1, token=t)
    m.fork(sid, "kid")
    m.run("kid", 1, token=99)
    m.run(sid, 1, token=98)
    extra = alloc.stats().extra
    out = {
        "placement": alloc.placement_of(sid),
        "max_err": m.max_err,
        "lent_borrowed": (extra["lent_tokens"], extra["borrowed_tokens"]),
    }
    dist.barrier()  # every rank still holds its rBlocks: check against every holder
    alloc.check_integrity()
    dist.barrier()
    m.free(sid)
    m.free("kid")
    dist.barrier()
    out["group_empty"] = group_is_empty(alloc)
    out["local_used"] = alloc.local.stats().used_tokens + alloc.holder.held_blocks
    alloc.close()
    return out


# ---------------------------------------------------------------- faults
def rank_fails(rank: int, world: int, how: str, timeout: float) -> dict[str, Any]:
    """Rank 1 dies (``how="die"``) or stops (``"stop"``) mid-run and rank 0 must fail cleanly;
    or rank 0, the owner, dies (``"owner_dies"``) while rank 1 waits in ``close``."""
    alloc = make_sharded(32, timeout=timeout)
    out: dict[str, Any] = {}
    if rank == 0:
        m = Mirror(alloc)
        m.add("s", list(range(48)))
        m.run("s", 48)  # rBlocks on both ranks
        out["placement"] = alloc.placement_of("s")
    dist.barrier()
    if how == "owner_dies":
        if rank == 0:
            time.sleep(0.5)
            os._exit(3)
        t0 = time.monotonic()
        try:
            alloc.close()
            out["error"] = None
        except PeerFailure as e:
            out["error"] = str(e)
        out["elapsed"] = time.monotonic() - t0
        return out
    if rank == 1:
        if how == "die":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(0.3)
    t0 = time.monotonic()
    try:
        m.run("s", 1, token=5)
        out["error"] = None
    except PeerFailure as e:
        out["error"] = str(e)
    out["elapsed"] = time.monotonic() - t0
    try:
        alloc.seq_info("s")
        out["later_call"] = "worked"
    except PeerFailure:
        out["later_call"] = "PeerFailure"
    t1 = time.monotonic()
    with contextlib.suppress(PeerFailure):
        alloc.close()
    out["close_s"] = time.monotonic() - t1
    return out


# ---------------------------------------------------------------- conformance
def conformance_two_ranks(rank: int, world: int, names: list[str]) -> dict[str, Any]:
    """Rank 0 runs contract tests against "sharded" while rank 1 lends memory.

    Rank 0 keeps a quarter of each test's capacity and rank 1 the rest, so
    the group has exactly the capacity the test asked for. Before building
    its k-th allocator rank 0 publishes the capacity under ``cap/k``; rank 1
    builds its part with the rest and closes it with rank 0.
    """
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:
        k = 0
        while True:
            total = int(store.get(f"cap/{k}"))
            k += 1
            if total < 0:
                return {"allocators": k - 1}
            if total == 0:  # rank 0's build fails before any collective step
                continue
            rest = total - max(RB, total // 4 // RB * RB)
            a = ShardedAllocator(SPEC, num_tokens=rest, page_size=PAGE, rblock_size=RB)
            a.close()

    import tests.conformance.test_contract as contract
    import tests.conftest as conftest

    counter = {"k": 0}
    real = conftest.make_allocator

    def split(kind: str, spec: KVSpec, num_tokens: int, **options: Any) -> Any:
        store.set(f"cap/{counter['k']}", str(max(num_tokens, 0)))
        counter["k"] += 1
        if num_tokens <= 0:
            return real(kind, spec, num_tokens, **options)
        mine = max(RB, num_tokens // 4 // RB * RB)
        return real(kind, spec, mine, **options)

    contract.make_allocator = split
    values = {"backend": ["sharded"], "spec": [conftest.small_spec()]}
    passed: list[str] = []
    failed: dict[str, str] = {}
    for name in names:
        fn = getattr(contract, name)
        params = dict(values)
        for mark in getattr(fn, "pytestmark", []):
            if mark.name == "parametrize":
                params[mark.args[0]] = list(mark.args[1])
        argnames = list(inspect.signature(fn).parameters)
        try:
            for combo in itertools.product(*(params[a] for a in argnames)):
                fn(*combo)
            passed.append(name)
        except BaseException as e:  # report, keep going so rank 1 stays in step
            failed[name] = f"{type(e).__name__}: {e}"
    store.set(f"cap/{counter['k']}", "-1")
    return {"passed": passed, "failed": failed, "allocators": counter["k"]}
