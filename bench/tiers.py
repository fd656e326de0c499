"""Tiered prefix cache: hit rate, bytes moved and simulated TTFT of host and disk tiers.

Workload: multi-turn conversations built on the rows of the Azure
conversation trace (``kvmem.traces``; the synthetic generator with the same
length statistics where the file is absent). A row's ``ContextTokens`` is
the whole prompt of its request (history and system prompt included), so
every turn takes one row, its prompt exactly as long as the row's prompt
and its answer as long as the row's output, and every row is used by
exactly one turn (the multiset of prompt lengths is the trace's). Events
are taken in time order (a row's arrival before a follow-up due at the
same time):

* a conversation starts with the earliest unused row (in arrival order), at
  that row's arrival time; its number of turns is drawn geometric (mean 2,
  at most 10; LMSYS-Chat-1M averages about 2);
* one conversation in five draws one of 32 shared system prompts (512
  tokens, Zipf-popular); when the first row's prompt is longer than 512
  tokens, the system prompt is its first 512 tokens and the rest are the
  conversation's own; otherwise the prompt is all its own (no system
  prompt);
* the user thinks between turns for a log-normal time (median 180 s,
  sigma 1.5: a quarter come back within a minute, a tenth after more than
  20 minutes); a follow-up is due that long after the previous turn and
  arrives at its due time (its row's own arrival time is not used);
* a follow-up takes, with ``h`` the previous prompt plus answer, the
  earliest unused row whose prompt ``p`` is longer than ``h``, looking
  through the next 2,000 unused rows (``SEARCH_ROWS``) in arrival order
  from the earliest unused one, which is the first to arrive after the due
  time (every row that arrived by then is used); its prompt is the history
  followed by a new user message of ``p - h`` tokens. Where none of those
  rows fits, the conversation ends there, with fewer turns than drawn (the
  results count these: ``conversations_cut_by_short_prompt``,
  ``cut_share_of_followup_draws``, and ``cuts_near_trace_end`` for those
  that had fewer than 2,000 unused rows left after their due time);
* every token other than a system prompt's is the conversation's own
  (random ids).

So the mean synthesized prompt equals the trace's (``mean_prompt_tokens``,
``trace_mean_prompt_tokens``); the results also give the realized and drawn
``mean_turns_per_conversation``, the share of prompt tokens that are history
(``history_share_of_prompt_tokens``) or a system prompt
(``system_share_of_prompt_tokens``), and how long after its due time a
follow-up's row arrived in the trace (``mean_followup_row_lead_s``).

Replay: turns in arrival order, one at a time (add, prefill, decode, free),
through the paged backend on a Llama-3-8B fp16 KV (128 KiB per token) in
512-token pages, bookkeeping only (``device="meta"``: no bytes move; bytes
moved are counted). The device pool holds N tokens (0.5M, about one GPU's
KV pool; ``--quick``: 64K); below it the backend's cache tiers
(``host_cache_tokens``, ``disk_cache_dir``/``disk_cache_tokens``,
write-back) of 8N and 32N tokens. Configurations side by side on the same
requests:

* ``device_only``: the device prefix cache alone (kvmem's prefix cache without tiers);
* ``host``: device + host tier (8N);
* ``tiered``: device + host (8N) + disk (32N);
* ``unlimited``: a device cache with no capacity limit (the upper bound).

An exact LRU simulation (three ``OrderedDict`` levels, no kvmem code) of the
same capacities replays the same requests; its hit rates must be within 1%
(relative) of the replay's.

TTFT model (stated, not measured): prefill costs 100 us per computed token
(10K tokens/s for an 8B model on one GPU); loading costs 5.2 us per token
from host memory (128 KiB at 25 GB/s over PCIe) and 21.8 us per token from
disk (6 GB/s NVMe); loads are not overlapped with compute (pessimistic for
the tiers). ``ttft_tiered_vs_device_only`` is the ratio of mean TTFTs.

The full run also sweeps N (N/4, N/2, 2N; tiers of 8N and 32N each), since
the tiered-to-device-only ratio depends on how much of the reuse the device
alone already catches.

Run: ``KVMEM_TRACES=../shared/traces python -m bench.tiers [--quick]``.
"""

from __future__ import annotations

import argparse
import heapq
import os
import platform
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import console, git_commit, print_table, progress, save_results
from kvmem import KVSpec, create_allocator
from kvmem.errors import InvalidArgument
from kvmem.tiers import BlockKey
from kvmem.traces import load_or_synthesize

SPEC = KVSpec(32, 8, 128)  # Llama-3-8B, fp16
PAGE = 512
ROOT = hash(("kvmem", None))  # the chain seed of unsalted prompts, as the paged backend's
PREFILL_S_PER_TOKEN = 100e-6
HOST_S_PER_TOKEN = SPEC.bytes_per_token / 25e9
DISK_S_PER_TOKEN = SPEC.bytes_per_token / 6e9
THINK_MEDIAN_S = 180.0
THINK_SIGMA = 1.5
TURN_P = 0.5  # geometric: mean 2 turns (LMSYS-Chat-1M averages about 2)
MAX_TURNS = 10
SYSTEM_PROMPTS = 32
SYSTEM_LEN = 512
SYSTEM_SHARE = 0.2
SEARCH_ROWS = 2000  # unused rows a follow-up looks through for one that fits
UNLIMITED = 1 << 62  # pages: a device cache that never evicts


@dataclass(order=True)
class Turn:
    """One request of a conversation: its full prompt and the answer it generates.

    ``row`` is the index in the trace rows of the row whose lengths the turn
    has; ``history`` how many leading prompt tokens are the conversation's
    previous prompt and answer (0 on a first turn); ``system`` how many are a
    shared system prompt (0 or :data:`SYSTEM_LEN`, first turns only);
    ``drawn`` the number of turns drawn for the conversation (first turns
    only, 0 on follow-ups). ``cut_at`` is set on the last turn of a
    conversation that drew another turn for which no row fitted: the time
    that follow-up was due.
    """

    time: float
    conv: int = field(compare=False)
    prompt: np.ndarray = field(compare=False)  # uint8 token ids
    answer: np.ndarray = field(compare=False)
    row: int = field(default=-1, compare=False)
    history: int = field(default=0, compare=False)
    system: int = field(default=0, compare=False)
    drawn: int = field(default=0, compare=False)
    cut_at: float | None = field(default=None, compare=False)


def fitting_row(used: np.ndarray, prompts: np.ndarray, start: int, h: int, search: int) -> int:
    """The first of the next ``search`` unused positions from ``start`` whose prompt exceeds ``h``.

    ``used`` and ``prompts`` are indexed by position in arrival order;
    returns -1 where none of those rows fits.
    """
    n, left, j, chunk = len(used), search, start, 64
    while j < n and left > 0:
        stop = min(n, j + min(chunk, left))
        free = ~used[j:stop]
        hit = np.flatnonzero(free & (prompts[j:stop] > h))
        if hit.size:
            return j + int(hit[0])
        left -= int(free.sum())
        j, chunk = stop, chunk * 4
    return -1


def conversations(
    rows: list[tuple[float, int, int]], seed: int, search: int = SEARCH_ROWS
) -> list[Turn]:
    """The turns of every conversation built from ``rows``, in arrival order.

    Every row is used by exactly one turn, whose prompt is exactly as long as
    the row's prompt; a follow-up looks for its row among the next
    ``search`` unused rows (the module docstring states the rules). Raises
    :class:`InvalidArgument` for a row whose prompt is shorter than one
    token or a ``search`` below 1.
    """
    bad = next((r for r in rows if r[1] < 1), None)
    if bad is not None:
        raise InvalidArgument(f"every trace row needs a prompt of 1 token or more, got {bad!r}")
    if isinstance(search, bool) or not isinstance(search, int) or search < 1:
        raise InvalidArgument(f"search must be an int of 1 or more, got {search!r}")
    rng = np.random.default_rng(seed)

    def text(n: int) -> np.ndarray:
        return rng.integers(0, 256, n, dtype=np.uint8)

    systems = [text(SYSTEM_LEN) for _ in range(SYSTEM_PROMPTS)]
    zipf = 1.0 / np.arange(1, SYSTEM_PROMPTS + 1)
    zipf /= zipf.sum()
    order = np.argsort(np.array([r[0] for r in rows], dtype=np.float64), kind="stable").tolist()
    prompts = np.array([rows[i][1] for i in order], dtype=np.int64)
    used = np.zeros(len(rows), dtype=bool)  # by position in arrival order
    due: list[tuple[float, int, int, Turn]] = []  # (due time, conv, turns left after it, last)
    turns: list[Turn] = []
    first = conv = 0
    while True:
        while first < len(rows) and used[first]:
            first += 1
        arrival = rows[order[first]][0] if first < len(rows) else float("inf")
        if due and due[0][0] < arrival:
            t, c, left, prev = heapq.heappop(due)
            h = len(prev.prompt) + len(prev.answer)
            pos = fitting_row(used, prompts, first, h, search)
            if pos < 0:
                prev.cut_at = t
                continue
            _, p, o = rows[order[pos]]
            prompt = np.concatenate([prev.prompt, prev.answer, text(p - h)])
            turn = Turn(t, c, prompt, text(max(1, o)), row=order[pos], history=h)
        elif first < len(rows):
            drawn = min(MAX_TURNS, int(rng.geometric(TURN_P)))
            pos, t, c, left = first, arrival, conv, drawn - 1
            conv += 1
            _, p, o = rows[order[pos]]
            if rng.random() < SYSTEM_SHARE and p > SYSTEM_LEN:
                system = systems[int(rng.choice(SYSTEM_PROMPTS, p=zipf))]
                prompt, sys_len = np.concatenate([system, text(p - SYSTEM_LEN)]), SYSTEM_LEN
            else:
                prompt, sys_len = text(p), 0
            turn = Turn(t, c, prompt, text(max(1, o)), row=order[pos], system=sys_len, drawn=drawn)
        else:
            break
        used[pos] = True
        turns.append(turn)
        if left:
            think = float(rng.lognormal(np.log(THINK_MEDIAN_S), THINK_SIGMA))
            heapq.heappush(due, (t + think, c, left - 1, turn))
    turns.sort()
    return turns


def workload_figures(
    turns: list[Turn], rows: list[tuple[float, int, int]], search: int = SEARCH_ROWS
) -> dict[str, Any]:
    """How the synthesized prompts compare with the trace rows they were built from.

    ``conversations_cut_by_short_prompt`` counts the follow-ups for which no
    row fitted (each ends its conversation), ``cuts_near_trace_end`` those of
    them that found fewer unused rows than the search bound after their due
    time; ``mean_followup_row_lead_s`` is how long after a follow-up's due
    time its row arrived in the trace, on average.
    """
    prompt = sum(len(t.prompt) for t in turns)
    convs = len({t.conv for t in turns})
    follow = [t for t in turns if t.history]
    cuts = [t.cut_at for t in turns if t.cut_at is not None]
    times = np.sort(np.array([t.time for t in turns], dtype=np.float64))
    unused = len(times) - np.searchsorted(times, np.array(cuts, dtype=np.float64), side="right")
    lead = [rows[t.row][0] - t.time for t in follow]
    return {
        "mean_prompt_tokens": prompt / max(len(turns), 1),
        "trace_mean_prompt_tokens": sum(r[1] for r in rows) / max(len(rows), 1),
        "history_share_of_prompt_tokens": sum(t.history for t in turns) / max(prompt, 1),
        "system_share_of_prompt_tokens": sum(t.system for t in turns) / max(prompt, 1),
        "mean_turns_per_conversation": len(turns) / max(convs, 1),
        "mean_drawn_turns_per_conversation": sum(t.drawn for t in turns) / max(convs, 1),
        "followup_turns": len(follow),
        "conversations_cut_by_short_prompt": len(cuts),
        "cut_share_of_followup_draws": len(cuts) / max(len(follow) + len(cuts), 1),
        "cuts_near_trace_end": int((unused < search).sum()),
        "followup_search_rows": search,
        "mean_followup_row_lead_s": float(np.mean(lead)) if lead else 0.0,
    }


def page_keys(tokens: np.ndarray, n: int) -> list[BlockKey]:
    """The chained keys of the first ``n`` full pages (the paged backend's)."""
    keys: list[BlockKey] = []
    parent = ROOT
    for i in range(n):
        key = (parent, tuple(tokens[i * PAGE : (i + 1) * PAGE].tolist()))
        keys.append(key)
        parent = hash(key)
    return keys


class BackendCache:
    """Serves turns through the paged backend with its cache tiers (``device="meta"``)."""

    def __init__(self, n: int, host: int, disk: int, where: str) -> None:
        opts: dict[str, Any] = {}
        if host:
            opts["host_cache_tokens"] = host
        if disk:
            opts.update(disk_cache_dir=where, disk_cache_tokens=disk)
        self.alloc = create_allocator(
            "paged", SPEC, num_tokens=n, page_size=PAGE, device="meta", **opts
        )
        self.num = 0

    def _tier_hits(self) -> tuple[float, float]:
        extra = self.alloc.stats().extra
        return extra.get("tier_host_hit_pages", 0.0), extra.get("tier_disk_hit_pages", 0.0)

    def serve(self, turn: Turn) -> tuple[int, int, int]:
        """Prefill and decode ``turn``, then free it; returns (device, host, disk) hit pages."""
        a, sid = self.alloc, self.num
        self.num += 1
        h0, k0 = self._tier_hits()
        a.add(sid, turn.prompt.tolist())
        done = a.seq_info(sid).num_computed  # waits for the loads
        h1, k1 = self._tier_hits()
        a.append(sid, turn.answer.tolist())
        total = len(turn.prompt) + len(turn.answer)
        a.reserve(sid, total - done)
        a.commit(sid, total - 1 - done)  # the last token's KV is never written
        a.free(sid)
        h, k = int(h1 - h0), int(k1 - k0)
        return done // PAGE - h - k, h, k


class ExactLRU:
    """Three LRU levels of page hashes with write-back on eviction; no kvmem code."""

    def __init__(self, device: int, host: int, disk: int) -> None:
        self.cap = [device, host, disk]
        self.levels: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(3)]
        self.free = device

    def _put(self, level: int, h: int) -> None:
        if level >= 3 or not self.cap[level]:
            return
        lv = self.levels[level]
        if h in lv:
            lv.move_to_end(h)
            return
        if len(lv) >= self.cap[level]:
            old, _ = lv.popitem(last=False)
            self._put(level + 1, old)
        lv[h] = None

    def _evict(self, need: int) -> None:
        dev = self.levels[0]
        while self.free < need and dev:
            old, _ = dev.popitem(last=False)
            self.free += 1
            self._put(1, old)

    def _match(self, hashes: list[int]) -> list[int]:
        """The level (1 host, 2 disk) of each leading hash some lower level holds."""
        out = []
        for h in hashes:
            lv = next((i for i in (1, 2) if h in self.levels[i]), None)
            if lv is None:
                break
            out.append(lv)
        return out

    def serve(self, turn: Turn) -> tuple[int, int, int]:
        """Returns (device, host, disk) hit pages, as :meth:`BackendCache.serve`.

        The paged backend's order: the device hit; pages for what the tiers
        hold (evicting, which writes down); the tiers asked again; then
        pages for the rest; pages fill; all are freed, last page first.
        """
        prompt = turn.prompt
        look = [hash(k) for k in page_keys(prompt, (len(prompt) - 1) // PAGE)]
        dev = self.levels[0]
        d = 0
        while d < len(look) and look[d] in dev:
            del dev[look[d]]
            d += 1
        held = d
        hits = [0, 0]
        if d < len(look) and (self.cap[1] or self.cap[2]):
            n = min(len(self._match(look[d:])), self.free + len(dev))
            self._evict(n)
            found = self._match(look[d : d + n])
            for h, lv in zip(look[d:], found, strict=False):
                self.levels[lv].move_to_end(h)
                hits[lv - 1] += 1
            self.free -= len(found)
            held += len(found)
        total = len(prompt) + len(turn.answer)
        need = -(-total // PAGE) - held
        self._evict(need)
        self.free -= need
        held += need
        seq = np.concatenate([prompt, turn.answer])
        full = [hash(k) for k in page_keys(seq, (total - 1) // PAGE)]
        for i in reversed(range(held)):
            if i < len(full) and full[i] not in dev:
                dev[full[i]] = None
            else:
                self.free += 1
        return d, hits[0], hits[1]


def replay(turns: list[Turn], cache: Any, desc: str) -> dict[str, Any]:
    """Serve every turn; hit tokens per tier and TTFT under the cost model."""
    hit = np.zeros((len(turns), 3), dtype=np.int64)
    prompts = np.array([len(t.prompt) for t in turns], dtype=np.int64)
    for i, t in enumerate(progress(turns, desc=desc)):
        hit[i] = cache.serve(t)
    hit *= PAGE
    computed = prompts - hit.sum(axis=1)
    ttft = (
        computed * PREFILL_S_PER_TOKEN + hit[:, 1] * HOST_S_PER_TOKEN + hit[:, 2] * DISK_S_PER_TOKEN
    )
    q = float(prompts.sum())
    return {
        "hit_rate": float(hit.sum()) / q,
        "hit_rate_device": float(hit[:, 0].sum()) / q,
        "hit_rate_host": float(hit[:, 1].sum()) / q,
        "hit_rate_disk": float(hit[:, 2].sum()) / q,
        "ttft_mean_s": float(ttft.mean()),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p90_s": float(np.percentile(ttft, 90)),
    }


def run_config(turns: list[Turn], n: int, host: int, disk: int, name: str) -> dict[str, Any]:
    """Replay through the paged backend with cache tiers of ``host``/``disk`` tokens."""
    with tempfile.TemporaryDirectory() as where:
        cache = BackendCache(n, host, disk, where)
        t0 = time.perf_counter()
        out = replay(turns, cache, name)
        out["seconds"] = time.perf_counter() - t0
        cache.alloc.check_integrity()
        extra = cache.alloc.stats().extra
        out.update({k[5:]: v for k, v in extra.items() if k.startswith("tier_bytes_")})
        cache.alloc.close()
    return out


def plot(figs: dict[str, Any], path: Path) -> None:
    """Hit rate per tier per configuration, and mean TTFT relative to device-only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["device_only", "host", "tiered", "unlimited"]
    sweep = sorted(
        int(k.split("_")[1]) for k in figs if k.startswith("sweep_") and k.endswith("_hit_ratio")
    )
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(16 if sweep else 11, 4))
    a, b = axes[0], axes[1]
    bottom = np.zeros(len(names))
    for tier, color in (("device", "#4c72b0"), ("host", "#55a868"), ("disk", "#c44e52")):
        vals = np.array([figs.get(f"{n}_hit_rate_{tier}", 0.0) for n in names])
        a.bar(names, vals, bottom=bottom, label=tier, color=color)
        bottom += vals
    a.set_ylabel("prefix hit rate (share of prompt tokens)")
    a.set_title(f"hits per tier (device N={figs['device_tokens']:,} tokens)")
    a.legend()
    ratios = [figs[f"{n}_ttft_mean_s"] / figs["device_only_ttft_mean_s"] for n in names]
    b.bar(names, ratios, color="#8172b2")
    b.axhline(1.0, color="k", lw=0.8)
    b.set_ylabel("mean TTFT / device-only (cost model)")
    b.set_title("simulated TTFT")
    if sweep:
        c = axes[2]
        ns = sorted([*sweep, figs["device_tokens"]])
        dev = [
            figs.get(f"sweep_{m}_hit_rate_device_only", figs["device_only_hit_rate"]) for m in ns
        ]
        tie = [figs.get(f"sweep_{m}_hit_rate_tiered", figs["tiered_hit_rate"]) for m in ns]
        c.plot(ns, dev, "o-", label="device only")
        c.plot(ns, tie, "s-", label="tiered (8N host, 32N disk)")
        c.axhline(figs["unlimited_hit_rate"], color="k", ls="--", lw=0.8, label="unlimited")
        c.set_xscale("log", base=2)
        c.set_xlabel("device prefix cache N (tokens)")
        c.set_ylabel("prefix hit rate")
        c.set_title("hit rate against device size")
        c.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Replay the workload through every configuration; write results JSON and a plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 trace rows, N = 64K tokens")
    ap.add_argument("--rows", type=int, default=None, help="trace rows to use (default: all)")
    ap.add_argument("--device-tokens", type=int, default=None, help="N (default 512K)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.device_tokens or (64 * 1024 if args.quick else 512 * 1024)
    rows, source = load_or_synthesize("azure_conv", args.rows or (2000 if args.quick else None))
    turns = conversations(rows, args.seed)
    figs: dict[str, Any] = {
        "command": " ".join(
            [f"KVMEM_TRACES={os.environ['KVMEM_TRACES']}"] * ("KVMEM_TRACES" in os.environ)
            + ["python -m bench.tiers", *sys.argv[1:]]
        ),
        "commit": git_commit(),
        "quick": args.quick,
        "trace": source if source.startswith("synthetic") else Path(source).name,
        "requests": len(turns),
        "conversations": len({t.conv for t in turns}),
        "prompt_tokens": sum(len(t.prompt) for t in turns),
        **workload_figures(turns, rows),
        "page_size": PAGE,
        "bytes_per_token": SPEC.bytes_per_token,
        "device_tokens": n,
        "host_tokens": 8 * n,
        "disk_tokens": 32 * n,
        "write_policy": "write_back",
        "prefill_us_per_token": PREFILL_S_PER_TOKEN * 1e6,
        "host_load_us_per_token": HOST_S_PER_TOKEN * 1e6,
        "disk_load_us_per_token": DISK_S_PER_TOKEN * 1e6,
        "host": platform.node(),
    }
    console.print(
        "workload: {requests:,} requests in {conversations:,} conversations "
        "({mean_turns_per_conversation:.3f} turns each, {mean_drawn_turns_per_conversation:.3f} "
        "drawn; {conversations_cut_by_short_prompt:,} follow-ups found no row longer than their "
        "history, {cut_share_of_followup_draws:.1%} of those due, {cuts_near_trace_end:,} of them "
        "near the trace's end; rows arrive {mean_followup_row_lead_s:.1f} s after their "
        "follow-up on average); mean prompt {mean_prompt_tokens:,.1f} tokens (trace "
        "{trace_mean_prompt_tokens:,.1f}); history {history_share_of_prompt_tokens:.1%} and "
        "system prompts {system_share_of_prompt_tokens:.1%} of prompt tokens".format(**figs)
    )
    configs = {
        "device_only": (0, 0),
        "host": (8 * n, 0),
        "tiered": (8 * n, 32 * n),
    }
    for name, (host, disk) in configs.items():
        for k, v in run_config(turns, n, host, disk, name).items():
            figs[f"{name}_{k}"] = v
        sim = replay(turns, ExactLRU(n // PAGE, host // PAGE, disk // PAGE), f"{name} (LRU sim)")
        figs[f"{name}_sim_hit_rate"] = sim["hit_rate"]
        figs[f"{name}_sim_rel_diff"] = abs(figs[f"{name}_hit_rate"] / sim["hit_rate"] - 1)
    for k, v in replay(turns, ExactLRU(UNLIMITED, 0, 0), "unlimited").items():
        figs[f"unlimited_{k}"] = v
    sweep = [] if args.quick else [n // 4, n // 2, 2 * n]
    for m in sweep:  # the ratio at other device sizes (tiers of 8m and 32m)
        d = run_config(turns, m, 0, 0, f"device_only N={m}")["hit_rate"]
        t = run_config(turns, m, 8 * m, 32 * m, f"tiered N={m}")["hit_rate"]
        figs[f"sweep_{m}_hit_rate_device_only"] = d
        figs[f"sweep_{m}_hit_rate_tiered"] = t
        figs[f"sweep_{m}_hit_ratio"] = t / max(d, 1e-12)
    figs["hit_rate_device_only"] = figs["device_only_hit_rate"]
    figs["hit_rate_tiered"] = figs["tiered_hit_rate"]
    figs["hit_rate_unlimited"] = figs["unlimited_hit_rate"]
    figs["tiered_vs_device_only_hit_ratio"] = figs["tiered_hit_rate"] / max(
        figs["device_only_hit_rate"], 1e-12
    )
    figs["ttft_tiered_vs_device_only"] = (
        figs["tiered_ttft_mean_s"] / figs["device_only_ttft_mean_s"]
    )
    figs["ttft_p90_tiered_vs_device_only"] = (
        figs["tiered_ttft_p90_s"] / figs["device_only_ttft_p90_s"]
    )
    figs["sim_max_rel_diff"] = max(figs[f"{c}_sim_rel_diff"] for c in configs)
    figs["target_hit_ratio_3x_met"] = figs["tiered_vs_device_only_hit_ratio"] >= 3
    figs["target_sim_within_1pct_met"] = figs["sim_max_rel_diff"] <= 0.01
    rows_out = [
        [
            c,
            figs[f"{c}_hit_rate"],
            figs[f"{c}_hit_rate_device"],
            figs[f"{c}_hit_rate_host"],
            figs[f"{c}_hit_rate_disk"],
            figs.get(f"{c}_sim_hit_rate", float("nan")),
            figs[f"{c}_ttft_mean_s"] / figs["device_only_ttft_mean_s"],
        ]
        for c in ["device_only", "host", "tiered", "unlimited"]
    ]
    print_table(
        "bench/tiers.py: prefix hit rate (share of prompt tokens) and mean TTFT ratio",
        ["config", "hit", "device", "host", "disk", "LRU sim", "TTFT / device-only"],
        rows_out,
    )
    if sweep:
        print_table(
            "device-size sweep (host 8N, disk 32N)",
            ["N tokens", "device-only", "tiered", "ratio"],
            [
                [
                    m,
                    figs[f"sweep_{m}_hit_rate_device_only"],
                    figs[f"sweep_{m}_hit_rate_tiered"],
                    figs[f"sweep_{m}_hit_ratio"],
                ]
                for m in sorted([*sweep, n])
                if f"sweep_{m}_hit_ratio" in figs
            ],
        )
    path = save_results("tiers", figs, args.quick)
    plot(figs, path.with_suffix(".png"))
    console.print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
