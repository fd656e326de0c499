"""Attention over sharded sequences: partial states on every holder, merged on the owner.

For one layer and a batch of sequences this rank owns, with ``n`` new
tokens each (``n = 1``: decode; more: a prefill chunk)::

    owner                      holder rank r (one request, one reply per step)
    ─────                      ───────────────────────────────────────────────
    post (q, new K/V it holds) ─▶ write its new K/V, then for every query: decode
    own partial (overlaps)        over the slots it holds at or before the query
    collect partials          ◀── (out, lse) [tokens, heads, ...]
    merge_states, in rank order

The request to a holder carries the queries of the new tokens and the K/V of
the new tokens whose slot it holds: its size depends on the batch, never on
the context length. Causality across ranks comes for free: each holder only
counts the slots at or before each query's position, and the merge of
normalised partials by their LSEs is exact.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

from kvmem import attention as kernels
from kvmem.errors import InvalidArgument


@dataclasses.dataclass
class StepProfile:
    """Where distributed attention spent its time and bytes, summed over calls.

    ``send_s``: posting and handing over the requests (queries, new K/V);
    ``local_s``: this rank's own partial attention (overlaps the remote ones);
    ``gather_s``: waiting for and receiving the holders' partials;
    ``merge_s``: merging the partials; ``remote_s``: the holders' own compute,
    as they report it (the largest per call). Bytes count requests sent and
    replies received by this rank.
    """

    calls: int = 0
    send_s: float = 0.0
    local_s: float = 0.0
    gather_s: float = 0.0
    merge_s: float = 0.0
    remote_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0

    def reset(self) -> None:
        """Zero every figure."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default)


def attend(
    alloc: Any,
    layer: int,
    batch: Sequence[tuple[Hashable, int]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the new tokens' K/V and attend their queries over each whole sharded sequence.

    ``alloc`` is a sharded allocator (``create_allocator("sharded", ...)``)
    and owns every sequence of ``batch`` (``[(seq_id, num_new_tokens)]``,
    slots reserved; commit afterwards as with any backend). ``q`` is
    ``[tokens, q_heads, head_dim]`` and ``k``/``v`` ``[tokens, kv_heads,
    head_dim]``, the batch's new tokens in order. Returns ``(out, lse)``:
    ``out`` in ``q``'s dtype, ``lse`` the natural-log LSE in float32
    (float64 for float64 queries), as :func:`kvmem.attention.prefill`.
    """
    plan = alloc.attention_plan(batch)
    spec = alloc.spec
    total = sum(p1 - p0 for _, p0, p1, _ in plan)
    if q.dim() != 3 or q.shape[0] != total or q.shape[2] != spec.head_dim:
        raise InvalidArgument(f"q must be [{total}, heads, {spec.head_dim}], got {tuple(q.shape)}")
    if q.shape[1] % spec.num_kv_heads:
        raise InvalidArgument(f"{q.shape[1]} query heads is not a multiple of {spec.num_kv_heads}")
    kv_shape = (total, spec.num_kv_heads, spec.head_dim)
    if tuple(k.shape) != kv_shape or tuple(v.shape) != kv_shape:
        raise InvalidArgument(
            f"k and v must be {list(kv_shape)}, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if not 0 <= layer < spec.num_layers:
        raise InvalidArgument(f"layer {layer} out of range 0..{spec.num_layers - 1}")

    r_size = alloc.rblock_size
    seqs: dict[int, list[tuple[int, int, int]]] = {}
    q_rows: dict[int, list[np.ndarray]] = {}
    kv_rows: dict[int, list[np.ndarray]] = {}
    off = 0
    for handle, p0, p1, ranks in plan:
        rows = np.arange(off, off + p1 - p0)
        owner_of = np.asarray(ranks, dtype=np.int64)[np.arange(p0, p1) // r_size]
        for r in sorted(set(ranks[: (p1 - 1) // r_size + 1])):
            seqs.setdefault(r, []).append((handle, p0, p1))
            q_rows.setdefault(r, []).append(rows)
            kv_rows.setdefault(r, []).append(rows[owner_of == r])
        off += p1 - p0

    def parts(r: int) -> tuple[np.ndarray, list[torch.Tensor]]:
        qi, ki = np.concatenate(q_rows[r]), np.concatenate(kv_rows[r])
        qt, kt = torch.from_numpy(qi).to(q.device), torch.from_numpy(ki).to(q.device)
        return qi, [q[qt], k[kt], v[kt]]

    prof = alloc.profile
    before = alloc.traffic()
    sent0, recv0, msgs0 = before.bytes_sent, before.bytes_received, before.messages
    t0 = time.perf_counter()
    remote = {r: parts(r) for r in seqs if r != alloc.rank}
    requests = {r: (("attend", layer, scale, seqs[r]), t) for r, (_, t) in remote.items()}
    pending = alloc.channel.post(requests) if requests else None
    t1 = time.perf_counter()
    partials: list[tuple[int, np.ndarray, torch.Tensor, torch.Tensor]] = []
    if alloc.rank in seqs:
        try:
            qi, (qq, kk, vv) = parts(alloc.rank)
            out_l, lse_l, _ = alloc.holder.attend(layer, seqs[alloc.rank], qq, kk, vv, scale)
        except BaseException:
            if pending is not None:  # keep the channel in step: take the replies, drop them
                alloc.channel.collect(pending, raise_errors=False)
            raise
        partials.append((alloc.rank, qi, out_l, lse_l))
    t2 = time.perf_counter()
    remote_s = 0.0
    if pending is not None:
        alloc.channel.finish_sends(pending)
        t3 = time.perf_counter()
        replies = alloc.channel.collect(pending)
        for r, (dt, (out_r, lse_r)) in replies.items():
            partials.append((r, remote[r][0], out_r, lse_r))
            remote_s = max(remote_s, float(dt))
    else:
        t3 = t2
    t4 = time.perf_counter()

    wd = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape, dtype=wd, device=q.device)
    lse = torch.full(q.shape[:2], -torch.inf, dtype=wd, device=q.device)
    for _, rows_r, out_r, lse_r in sorted(partials, key=lambda p: p[0]):
        idx = torch.from_numpy(rows_r).to(q.device)
        out[idx], lse[idx] = kernels.merge_states(
            out[idx], lse[idx], out_r.to(q.device, wd), lse_r.to(q.device, wd)
        )
    t5 = time.perf_counter()

    after = alloc.traffic()
    prof.calls += 1
    prof.send_s += (t1 - t0) + (t3 - t2)
    prof.local_s += t2 - t1
    prof.gather_s += t4 - t3
    prof.merge_s += t5 - t4
    prof.remote_s += remote_s
    prof.bytes_sent += after.bytes_sent - sent0
    prof.bytes_received += after.bytes_received - recv0
    prof.messages += after.messages - msgs0
    return out.to(q.dtype), lse


def decode(
    alloc: Any,
    layer: int,
    seq_ids: Sequence[Hashable],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of one layer: one new token per sequence (see :func:`attend`)."""
    return attend(alloc, layer, [(s, 1) for s in seq_ids], q, k, v, scale)


def prefill(
    alloc: Any,
    layer: int,
    seq_id: Hashable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of ``len(q)`` new tokens of one sequence, causal (see :func:`attend`)."""
    return attend(alloc, layer, [(seq_id, int(q.shape[0]))], q, k, v, scale)


__all__ = ["StepProfile", "attend", "decode", "prefill"]
