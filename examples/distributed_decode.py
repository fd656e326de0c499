"""Serve one sequence longer than any single rank can hold: its KV sharded over N processes.

    python -m torch.distributed.run --nproc-per-node 4 examples/distributed_decode.py

(``torchrun`` is the same launcher.) Every rank builds a ``"sharded"``
allocator with room for ``--capacity`` tokens of KV. Rank 0 owns one
sequence of ``capacity * (N - 0.5)`` prompt tokens: it prefills the prompt
in chunks and decodes ``--steps`` tokens, with random queries and KV (the
point is memory, not a model). Its rBlocks fill its own memory first, then
memory the other ranks lend; each step the other ranks compute attention
over the rBlocks they hold and rank 0 merges the partial results. The last
step is checked against dense attention over the whole context, and rank 0
prints where the rBlocks lie.
"""

from __future__ import annotations

import argparse
import math
from datetime import timedelta

import torch
import torch.distributed as dist

import kvmem
from kvmem.distributed import decode, prefill


def runs(ranks: list[int]) -> list[tuple[int, int, int]]:
    """``(first, last, rank)`` for each run of consecutive rBlocks on one rank."""
    out: list[tuple[int, int, int]] = []
    for i, r in enumerate(ranks):
        if out and out[-1][2] == r:
            out[-1] = (out[-1][0], i, r)
        else:
            out.append((i, i, r))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capacity", type=int, default=256, help="KV tokens each rank can hold")
    p.add_argument("--rblock", type=int, default=32, help="tokens per rBlock")
    p.add_argument("--chunk", type=int, default=128, help="prefill chunk, tokens")
    p.add_argument("--steps", type=int, default=16, help="decode steps")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a peer")
    args = p.parse_args()

    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    spec = kvmem.KVSpec(num_layers=2, num_kv_heads=2, head_dim=32, dtype=torch.float32)
    alloc = kvmem.create_allocator(
        "sharded",
        spec,
        num_tokens=args.capacity,
        page_size=16,
        rblock_size=args.rblock,
        timeout=args.timeout,
        attention_impl="reference",
    )
    if rank == 0:
        serve(alloc, spec, world, args)
    alloc.close()  # collective: the other ranks serve rank 0 until it gets here
    dist.destroy_process_group()


def serve(alloc: kvmem.KVAllocator, spec: kvmem.KVSpec, world: int, args: argparse.Namespace):
    """Rank 0: prefill and decode one long sequence, check it, print where it lies."""
    prompt = int(args.capacity * (world - 0.5)) if world > 1 else args.capacity // 2
    q_heads, d = 4, spec.head_dim
    g = torch.Generator().manual_seed(0)
    keys, values = [], []  # layer 0's K/V, for the dense check
    alloc.add("seq", list(range(prompt)))
    done = 0
    while done < prompt:
        n = min(args.chunk, prompt - done)
        alloc.reserve("seq", n)
        for layer in range(spec.num_layers):
            q = torch.randn(n, q_heads, d, generator=g)
            k, v = torch.randn(n, 2, d, generator=g), torch.randn(n, 2, d, generator=g)
            prefill(alloc, layer, "seq", q, k, v)
            if layer == 0:
                keys.append(k)
                values.append(v)
        alloc.commit("seq", n)
        done += n
    alloc.profile.reset()
    for t in range(args.steps):
        alloc.append("seq", [t])
        alloc.reserve("seq", 1)
        for layer in range(spec.num_layers):
            q = torch.randn(1, q_heads, d, generator=g)
            k, v = torch.randn(1, 2, d, generator=g), torch.randn(1, 2, d, generator=g)
            out, _ = decode(alloc, layer, ["seq"], q, k, v)
            if layer == 0:
                keys.append(k)
                values.append(v)
                last_q, last_out = q, out
        alloc.commit("seq", 1)

    kk = torch.cat(keys).repeat_interleave(q_heads // 2, dim=1)
    vv = torch.cat(values).repeat_interleave(q_heads // 2, dim=1)
    p = torch.softmax(torch.einsum("qhd,khd->hqk", last_q, kk) / math.sqrt(d), dim=-1)
    err = (torch.einsum("hqk,khd->qhd", p, vv) - last_out).abs().max().item()

    context = alloc.seq_info("seq").num_computed
    prof = alloc.profile
    print(f"{world} ranks, {args.capacity} KV tokens each; one sequence of {context} tokens")
    print(f"({context / args.capacity:.2f}x one rank's capacity), rBlocks of {args.rblock} tokens:")
    for first, last, r in runs(alloc.placement_of("seq")):  # type: ignore[attr-defined]
        span = f"rBlocks {first}-{last}" if last > first else f"rBlock {first}"
        tokens = f"tokens {first * args.rblock}-{min(context, (last + 1) * args.rblock) - 1}"
        owner = "owner" if r == 0 else "lent"
        print(f"  {span:<16} {tokens:<18} on rank {r} ({owner})")
    st = alloc.stats()
    print(f"group: {st.used_tokens} of {st.capacity_tokens} token slots in use")
    calls = max(prof.calls, 1)
    ms = 1e3 * (prof.send_s + prof.local_s + prof.gather_s + prof.merge_s) / calls
    sent = (prof.bytes_sent + prof.bytes_received) / calls
    print(f"decode: {ms:.2f} ms and {sent:.0f} bytes per layer and step")
    print(f"last step vs dense attention over all {context} tokens: max |error| = {err:.2e}")
    alloc.free("seq")


if __name__ == "__main__":
    main()
