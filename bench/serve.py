"""Serving benchmark: a Poisson request-rate sweep against ``kvmem serve`` (vllm bench serve style).

Starts ``python -m kvmem.server`` as a subprocess on a free port of
127.0.0.1 (or benchmarks a running server given with ``--url``), then for
each request rate sends ``--num-prompts`` streaming ``/v1/completions``
requests with Poisson arrivals (exponential gaps; ``inf`` sends them all at
once) and measures, per request, as the client sees it:

- TTFT: time to first token (first streamed chunk);
- TPOT: time per output token after the first, ``(e2e - ttft) / (n - 1)``;
- ITL: gaps between streamed chunks (a chunk may carry several tokens
  when the client reads slower than the engine steps);
- E2EL: end-to-end latency.

Per rate: request and token throughput, mean/median/P99 of each latency,
and goodput: completed requests per second that meet the SLO (TTFT <=
``--slo-ttft-ms`` and TPOT <= ``--slo-tpot-ms``; vLLM's ``--goodput``). The
default SLO, 250 ms TTFT and 25 ms TPOT, is scaled to the tiny preset on a
CPU. Peak KV usage and preemptions come from the server's ``/metrics``.
Four warm-up requests go first and are not counted. Last, the same engine
configuration runs the last rate's requests in-process with no server
(``Engine.generate``): the ratio of throughputs is what HTTP, streaming and
the engine thread cost.

Prompts are random printable text (``--dataset random``: input and output
lengths uniform in ``len * (1 +- range_ratio)``, outputs forced with
``ignore_eos``), or lengths sampled from the Azure LLM conversation trace
(``--dataset azure-conv``, clipped to the model's context), read from
``../shared/traces``. Writes ``bench/results/serve.json`` and ``serve.png``.

Run: ``python -m bench.serve [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import console, print_table, save_results
from kvmem.traces import find_trace, load_trace

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    """One request as the client saw it."""

    ok: bool
    status: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (None for one-token outputs)."""
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# ----------------------------------------------------------------- workload
def make_requests(args: argparse.Namespace, n: int, rng: random.Random) -> list[tuple[str, int]]:
    """``n`` (prompt, max_tokens) pairs."""
    out: list[tuple[str, int]] = []
    if args.dataset == "azure-conv":
        path = find_trace("azure_conv")
        if path is None:
            raise SystemExit(
                "--dataset azure-conv needs azure_llm_2023_conv.csv in $KVMEM_TRACES "
                "or ../shared/traces"
            )
        rows = [(p, o) for _, p, o in load_trace(path)]
        cap_in, cap_out = args.max_input_len, args.max_output_len
        lengths = [
            (min(max(1, p), cap_in), min(max(1, o), cap_out))
            for p, o in (rng.choice(rows) for _ in range(n))
        ]
    else:
        r = args.range_ratio

        def draw(mean: int) -> int:
            return max(1, rng.randint(int(mean * (1 - r)), int(mean * (1 + r))))

        lengths = [(draw(args.input_len), draw(args.output_len)) for _ in range(n)]
    alphabet = "abcdefghijklmnopqrstuvwxyz     ,.ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    for p, o in lengths:
        out.append(("".join(rng.choice(alphabet) for _ in range(p)), o))
    return out


# -------------------------------------------------------------------- client
async def send(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int
) -> Result:
    """One streaming completion, timed."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = Result(ok=False)
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode()[:200]
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    res.ok = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    break
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"]:
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        res.ok = False
    res.e2e = last - start
    return res


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^kvmem:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def _watch(
    client: httpx.AsyncClient, url: str, peak: dict[str, float], stop: asyncio.Event
) -> None:
    """Sample /metrics for peak KV usage and queue length until ``stop``."""
    while not stop.is_set():
        try:
            page = (await client.get(f"{url}/metrics")).text
            peak["kv_usage"] = max(peak["kv_usage"], _metric(page, "kv_cache_usage_perc"))
            peak["waiting"] = max(peak["waiting"], _metric(page, "num_requests_waiting"))
        except httpx.HTTPError:
            pass
        with_timeout = asyncio.create_task(stop.wait())
        await asyncio.wait({with_timeout}, timeout=0.25)
        with_timeout.cancel()


async def run_rate(
    url: str,
    model: str,
    reqs: list[tuple[str, int]],
    rate: float,
    seed: int,
    max_concurrency: int | None,
) -> dict[str, Any]:
    """Send ``reqs`` at ``rate`` requests/s (Poisson); return the results and the wall time."""
    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=len(reqs) + 8)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    from rich.progress import Progress

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600)) as client:
        before = (await client.get(f"{url}/metrics")).text
        peak = {"kv_usage": 0.0, "waiting": 0.0}
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch(client, url, peak, stop))
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"rate {rate:g} req/s", total=len(reqs))

            async def one(prompt: str, max_tokens: int) -> Result:
                if sem is None:
                    r = await send(client, url, model, prompt, max_tokens)
                else:
                    async with sem:
                        r = await send(client, url, model, prompt, max_tokens)
                bar.advance(task)
                return r

            t0 = time.perf_counter()
            tasks = []
            for prompt, max_tokens in reqs:
                tasks.append(asyncio.create_task(one(prompt, max_tokens)))
                if math.isfinite(rate):
                    await asyncio.sleep(float(rng.exponential(1.0 / rate)))
            results = await asyncio.gather(*tasks)
            duration = time.perf_counter() - t0
        stop.set()
        await watcher
        after = (await client.get(f"{url}/metrics")).text
    preempt = _metric(after, "num_preemptions_total") - _metric(before, "num_preemptions_total")
    return {"results": results, "duration": duration, "peak": peak, "preemptions": preempt}


# ------------------------------------------------------------------- figures
def summarize(run: dict[str, Any], slo_ttft: float, slo_tpot: float) -> dict[str, float]:
    """vLLM ``bench serve`` figures (milliseconds for latencies)."""
    res: list[Result] = run["results"]
    dur = run["duration"]
    ok = [r for r in res if r.ok]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)

    def stats(name: str, xs: list[float]) -> dict[str, float]:
        a = np.asarray(xs, dtype=float) * 1000 if xs else np.zeros(1)
        return {
            f"mean_{name}_ms": float(a.mean()),
            f"median_{name}_ms": float(np.median(a)),
            f"p99_{name}_ms": float(np.percentile(a, 99)),
        }

    tpots = [t for r in ok if (t := r.tpot) is not None]
    good = [
        r for r in ok if r.ttft <= slo_ttft / 1000 and (r.tpot is None or r.tpot <= slo_tpot / 1000)
    ]
    return {
        "completed": len(ok),
        "failed": len(res) - len(ok),
        "rejected_429": sum(r.status == 429 for r in res),
        "duration_s": dur,
        "request_throughput": len(ok) / dur,
        "output_throughput": out_tok / dur,
        "total_token_throughput": (in_tok + out_tok) / dur,
        "request_goodput": len(good) / dur,
        "slo_attainment": len(good) / len(res) if res else 0.0,
        **stats("ttft", [r.ttft for r in ok]),
        **stats("tpot", tpots),
        **stats("itl", [x for r in ok for x in r.itl]),
        **stats("e2el", [r.e2e for r in ok]),
        "peak_kv_usage": run["peak"]["kv_usage"],
        "peak_waiting": run["peak"]["waiting"],
        "preemptions": run["preemptions"],
    }


def plot(
    rates: list[float],
    rows: list[dict[str, float]],
    args: argparse.Namespace,
    offline_rps: float | None,
    path: Path,
) -> None:
    """TTFT, TPOT and throughput/goodput against the offered rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in rates if math.isfinite(r)]
    top = max(finite) * 2 if finite else 1.0
    xs = [r if math.isfinite(r) else top for r in rates]
    labels = [f"{r:g}" if math.isfinite(r) else "inf" for r in rates]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in (
        (axes[0], "ttft", "time to first token"),
        (axes[1], "tpot", "time per output token"),
    ):
        ax.plot(xs, [r[f"median_{key}_ms"] for r in rows], "o-", label="median")
        ax.plot(xs, [r[f"p99_{key}_ms"] for r in rows], "s--", label="P99")
        slo = args.slo_ttft_ms if key == "ttft" else args.slo_tpot_ms
        ax.axhline(slo, color="C3", lw=1, ls=":", label=f"SLO {slo:g} ms")
        ax.set_title(title)
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(xs, [r["request_throughput"] for r in rows], "o-", label="throughput")
    ax.plot(xs, [r["request_goodput"] for r in rows], "s--", label="goodput (SLO met)")
    if offline_rps:
        ax.axhline(offline_rps, color="C7", lw=1, ls=":", label="offline engine")
    ax.set_ylim(0, 1.15 * max([offline_rps or 0.0, *(r["request_throughput"] for r in rows)]))
    ax.set_title("requests/s served")
    ax.set_ylabel("req/s")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(xs, labels)
        ax.minorticks_off()
        ax.set_xlabel("offered request rate (req/s)")
    fig.suptitle(
        f"kvmem serve, {args.model_desc}: {args.num_prompts} requests per rate, "
        f"{args.input_len}/{args.output_len} tokens in/out",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m kvmem.server`` on a free port; returns once /health answers."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "kvmem.server",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--threads",
        str(args.server_threads),
        "--backend",
        args.backend,
        "--kv-format",
        args.kv_format,
        "--policy",
        args.policy,
        "--num-kv-tokens",
        str(args.num_kv_tokens),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--max-queue",
        str(args.max_queue),
    ]
    cmd += ["--model", args.model] if args.model else ["--preset", args.preset]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start in 120 s")
        time.sleep(0.2)


def offline_throughput(
    args: argparse.Namespace, reqs: list[tuple[str, int]]
) -> tuple[float, float]:
    """(output tokens/s, requests/s) of the same engine run in-process, all requests at once.

    The baseline for the server's throughput at the highest rate: what HTTP,
    streaming and the engine thread cost on top of the engine itself.
    """
    import torch

    from kvmem.engine import Engine, SamplingParams, load_model, random_model
    from kvmem.engine.tokenizer import load_tokenizer

    torch.set_num_threads(args.server_threads)
    if args.model:
        model = load_model(args.model)
        tok = load_tokenizer(args.model, model.config.eos_token_ids)
    else:
        model, tok = random_model(args.preset, seed=0), None
    eng = Engine(
        model,
        tokenizer=tok,
        backend=args.backend,
        kv_format=args.kv_format,
        policy=args.policy,
        num_kv_tokens=args.num_kv_tokens,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    with console.status("offline engine baseline"):
        t0 = time.perf_counter()
        done = eng.generate(
            [p for p, _ in reqs], [SamplingParams(max_tokens=o, ignore_eos=True) for _, o in reqs]
        )
        dt = time.perf_counter() - t0
    eng.close()
    return sum(len(c.output_token_ids) for c in done) / dt, len(done) / dt


def parallel_sampling(
    args: argparse.Namespace, prompt_len: int = 1000, out_len: int = 64, n: int = 8
) -> dict[str, float]:
    """n samples of one prompt forked from one prefill vs n separate requests, side by side.

    Same engine options, all requests at once; figures: the peak KV bytes
    held (ratio, target <= 0.3) and output tokens/s of each. Two baselines:
    separate requests that share nothing (each its own cache salt: what an
    engine without prefix caching holds), and the strongest, separate
    requests sharing the prompt's full pages through the prefix cache
    (chunked prefill lets the later ones find the first one's pages).
    """
    import torch

    from kvmem.engine import Engine, SamplingParams, load_model, random_model

    torch.set_num_threads(args.server_threads)
    model = load_model(args.model) if args.model else random_model(args.preset, seed=0)
    eng = Engine(
        model,
        backend=args.backend,
        kv_format=args.kv_format,
        num_kv_tokens=args.num_kv_tokens,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    rng = random.Random(args.seed)
    figs: dict[str, float] = {}
    for mode in ("separate", "cached", "forked"):
        # a fresh prompt each time: the prefix cache must not serve one run from the other
        prompt = [rng.randrange(eng.executor.vocab_size) for _ in range(prompt_len)]
        first = None
        for i in range(n):
            params = SamplingParams(max_tokens=out_len, temperature=1.0, seed=i, ignore_eos=True)
            salt = i if mode == "separate" else None
            rid = eng.add_request(prompt, params, fork_from=first, cache_salt=salt)
            first = first or rid if mode == "forked" else None
        peak, t0 = 0, time.perf_counter()
        with console.status(f"n={n}, {mode}"):
            while eng.has_unfinished():
                eng.step()
                peak = max(peak, eng.allocator.stats().used_bytes)
        figs[f"{mode}_kv_bytes"] = peak
        figs[f"{mode}_output_throughput"] = n * out_len / (time.perf_counter() - t0)
    eng.close()
    forked_kv, forked_tps = figs["forked_kv_bytes"], figs["forked_output_throughput"]
    return {
        f"n{n}_kv_bytes_vs_separate": forked_kv / figs["separate_kv_bytes"],
        f"n{n}_kv_bytes_vs_separate_prefix_cached": forked_kv / figs["cached_kv_bytes"],
        f"n{n}_kv_bytes": forked_kv,
        f"separate{n}_kv_bytes": figs["separate_kv_bytes"],
        f"separate{n}_prefix_cached_kv_bytes": figs["cached_kv_bytes"],
        f"n{n}_output_throughput": forked_tps,
        f"separate{n}_output_throughput": figs["separate_output_throughput"],
        f"n{n}_vs_separate_throughput": forked_tps / figs["separate_output_throughput"],
        f"n{n}_vs_separate_prefix_cached_throughput": forked_tps / figs["cached_output_throughput"],
    }


def _rates(text: str) -> list[float]:
    return [math.inf if x.strip() == "inf" else float(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (under a minute on CPU)")
    ap.add_argument("--url", help="benchmark this running server instead of starting one")
    ap.add_argument("--model", help="checkpoint directory for the started server")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument(
        "--rates",
        type=_rates,
        default=None,
        help="comma-separated request rates (req/s); 'inf' sends all at once",
    )
    ap.add_argument("--num-prompts", type=int, default=None, help="requests per rate")
    ap.add_argument("--dataset", choices=("random", "azure-conv"), default="random")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--range-ratio", type=float, default=0.25)
    ap.add_argument("--max-input-len", type=int, default=1024, help="azure-conv clip")
    ap.add_argument("--max-output-len", type=int, default=256, help="azure-conv clip")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--slo-ttft-ms", type=float, default=250.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=25.0)
    ap.add_argument("--backend", default="paged")
    ap.add_argument("--kv-format", default="auto")
    ap.add_argument("--policy", default="fcfs")
    ap.add_argument("--num-kv-tokens", type=int, default=16384)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-queue", type=int, default=4096)
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.rates = args.rates or [4.0, 16.0, math.inf]
        args.num_prompts = args.num_prompts or 32
        args.input_len, args.output_len = min(args.input_len, 64), min(args.output_len, 32)
    args.rates = args.rates or [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, math.inf]
    args.num_prompts = args.num_prompts or 100
    args.model_desc = Path(args.model).name if args.model else f"{args.preset} preset"

    load_before = os.getloadavg()[0]
    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        with console.status("starting kvmem serve"):
            proc, url = start_server(args)
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        rng = random.Random(args.seed)
        asyncio.run(run_rate(url, model, make_requests(args, 4, rng), math.inf, 0, None))
        rows = []
        for i, rate in enumerate(args.rates):
            reqs = make_requests(args, args.num_prompts, rng)
            run = asyncio.run(run_rate(url, model, reqs, rate, args.seed + i, args.max_concurrency))
            rows.append(summarize(run, args.slo_ttft_ms, args.slo_tpot_ms))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    # the last rate's requests again, in-process, with the server gone
    offline, offline_rps = offline_throughput(args, reqs) if not args.url else (None, None)
    parallel = parallel_sampling(args) if not args.url else {}

    labels = [f"{r:g}" if math.isfinite(r) else "inf" for r in args.rates]
    shown = [
        ("completed", "completed"),
        ("failed", "failed"),
        ("request_throughput", "req/s"),
        ("output_throughput", "output tok/s"),
        ("request_goodput", "goodput req/s"),
        ("median_ttft_ms", "TTFT p50 ms"),
        ("p99_ttft_ms", "TTFT p99 ms"),
        ("median_tpot_ms", "TPOT p50 ms"),
        ("p99_tpot_ms", "TPOT p99 ms"),
        ("median_itl_ms", "ITL p50 ms"),
        ("median_e2el_ms", "E2EL p50 ms"),
        ("peak_kv_usage", "peak KV usage"),
        ("preemptions", "preemptions"),
    ]
    print_table(
        f"bench/serve.py: {args.model_desc}, {args.backend}/{args.kv_format}/"
        f"{args.policy}, {args.num_prompts} requests per rate; goodput SLO: TTFT <= "
        f"{args.slo_ttft_ms:g} ms, TPOT <= {args.slo_tpot_ms:g} ms",
        ["offered req/s", *labels],
        [[name, *(row[k] for row in rows)] for k, name in shown],
    )
    if offline is not None:
        console.print(
            f"offline engine on the same requests: {offline:.4g} output tok/s; the "
            f"server at rate {labels[-1]} reaches "
            f"{rows[-1]['output_throughput'] / offline:.2f}x of it"
        )
    for k, v in parallel.items():
        console.print(f"{k}: {v:.4g}")
    figures: dict[str, Any] = {
        **parallel,
        "model": args.model_desc,
        "backend": args.backend,
        "kv_format": args.kv_format,
        "policy": args.policy,
        "dataset": args.dataset,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_prompts": args.num_prompts,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tpot_ms": args.slo_tpot_ms,
        "rates": [r if math.isfinite(r) else "inf" for r in args.rates],
        # other processes on a shared machine move every latency here: record how busy it was
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
        "max_output_throughput": max(r["output_throughput"] for r in rows),
        "offline_output_throughput": offline,
        "server_vs_offline_throughput": (
            rows[-1]["output_throughput"] / offline if offline else None
        ),
        "max_request_goodput": max(r["request_goodput"] for r in rows),
    }
    for rate, row in zip(args.rates, rows, strict=True):
        tag = f"rate_{rate:g}" if math.isfinite(rate) else "rate_inf"
        figures.update({f"{tag}_{k}": v for k, v in row.items()})
    path = save_results("serve", figures, quick=args.quick)
    plot(args.rates, rows, args, offline_rps, path.with_suffix(".png"))
    console.print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
