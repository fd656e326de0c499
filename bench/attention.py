"""Attention kernels per KV format: decode bandwidth and prefill time on a GPU, errors on CPU.

Heads are Llama-3-8B's (32 query heads, 8 KV heads, head dim 128), pages
of 16 tokens assigned at random.

On a GPU, in one run: the device-to-device copy bandwidth (``dst.copy_(src)``
of 1 GiB; read + written bytes / time) is the ceiling; each Triton decode's
achieved bandwidth is the bytes of KV it must read (codes and int4
scales/zeros, once) over its median time, reported as a fraction of the
ceiling, at several (batch, context) points, per format; FlashInfer runs
on the same inputs when installed (plan done once, outside the timing).
Prefill is timed for a full 4K prompt and for 512-token chunks over 8K
contexts. Also: the fp16 decode on a block-major pool of 32 layers (one
layer read, pages 32 layers apart) against a per-layer pool.

On CPU (``--quick``): the Triton kernels run in the interpreter at tiny
shapes (every format, both pool layouts), against the float64 reference
on the same stored codes; plus the quantization accuracy of each format
(head dim 128, 1024 tokens, fresh random data; cosine and relative L2
against fp16 attention, and the outlier fixture with and without key
smoothing), computed with the reference.

Writes ``bench/results/attention.json`` and ``attention.png``.
Run: ``python -m bench.attention [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import numpy as np
import torch

if not torch.cuda.is_available():  # the kernels must be imported in interpreter mode
    os.environ.setdefault("TRITON_INTERPRET", "1")


from bench.common import console, print_table, progress, results_dir, save_results
from kvmem import KVSpec, PagePool
from kvmem.attention import flashinfer as fi
from kvmem.attention import reference as ref
from kvmem.attention import triton as tk
from kvmem.attention.smoothing import calibrate_key_smoothing
from kvmem.formats import fp8_scales
from kvmem.layout import BatchLayout, build_layout
from kvmem.storage import StorageLayout

HQ, HKV, D, PS = 32, 8, 128, 16
FORMATS = ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int4"]
DECODE_POINTS = [(1, 8192), (8, 4096), (16, 4096), (64, 1024), (64, 2048), (128, 2048)]
PREFILL_POINTS = [(1, 4096, 4096), (4, 8192, 512)]  # (batch, context, new tokens)


def qdtype(fmt: str) -> torch.dtype:
    """The query dtype a format is used with."""
    return torch.bfloat16 if fmt == "bf16" else torch.float16


class Case:
    """A pool of one format filled with random KV for ``batch`` sequences of ``context`` tokens."""

    def __init__(
        self,
        fmt: str,
        batch: int,
        context: int,
        device: torch.device,
        layout: StorageLayout = "layer",
        layers: int = 1,
        heads: tuple[int, int, int] = (HQ, HKV, D),
        page: int = PS,
        per_head_scales: bool = False,
    ) -> None:
        hq, hkv, d = heads
        self.fmt, self.batch, self.context, self.hq = fmt, batch, context, hq
        self.spec = KVSpec(layers, hkv, d, dtype=qdtype(fmt), kv_format=fmt)
        pages = -(-context // page)
        self.pool = PagePool(self.spec, batch * pages, page, device=device, layout=layout)
        self.layer = self.pool.layer(layers - 1)
        rng = np.random.default_rng(0)
        self.table = rng.permutation(batch * pages).astype(np.int32).reshape(batch, pages)
        self.device = device
        g = torch.Generator(device=device).manual_seed(1)
        if self.spec.fmt.kind == "fp8":
            sample = torch.randn(4096, hkv, d, device=device, generator=g)
            s = fp8_scales(sample, fmt, per_head=per_head_scales)
            self.pool.set_fp8_scales(layers - 1, s, s)
        for b in range(batch):  # one sequence at a time keeps the temporaries small
            lay = self.layout(context, start=b, count=1)
            kv = torch.randn(2, context, hkv, d, device=device, generator=g, dtype=qdtype(fmt))
            tk.write_kv(self.layer, lay, kv[0], kv[1])

    def layout(self, q_len: int, start: int = 0, count: int | None = None) -> BatchLayout:
        """Layout of sequences ``start .. start+count`` at full context, ``q_len`` new each."""
        n = self.batch if count is None else count
        rows = self.table[start : start + n].copy()
        lens = np.full(n, self.context)
        return build_layout(
            self.pool.page_size,
            rows,
            lens,
            np.full(n, q_len),
            tuple(range(n)),
            self.device,
            self.spec,
        )

    def kv_bytes(self) -> int:
        """Bytes of KV (codes and int4 scales/zeros) a decode reads: every token once."""
        return self.batch * self.context * self.spec.bytes_per_token_layer

    def queries(self, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Random queries [n, q_heads, head_dim]."""
        g = torch.Generator(device=self.device).manual_seed(2)
        return torch.randn(
            n,
            self.hq,
            self.spec.head_dim,
            device=self.device,
            generator=g,
            dtype=dtype or qdtype(self.fmt),
        )


# ------------------------------------------------------------------------------------- GPU


def bench_ms(fn: Any) -> float:
    """Median milliseconds of ``fn()`` (Triton's do_bench: warmed up, L2 flushed between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def time_triton(case: Case, new: int, **options: Any) -> float:
    """Median ms of Triton decode (``new == 1``) or prefill over every sequence of ``case``."""
    lay, q = case.layout(new), case.queries(case.batch * new)
    if new == 1:
        return bench_ms(lambda: tk.decode(q, case.layer, lay, **options))
    return bench_ms(lambda: tk.prefill(q, case.layer, lay))


def time_flashinfer(case: Case, new: int) -> float | None:
    """Median ms of FlashInfer on the same inputs (planned once), or None where it cannot run."""
    lay, q = case.layout(new), case.queries(case.batch * new)
    if fi.unsupported_reason(case.spec.fmt, q.dtype, case.device) is not None:
        return None
    att = fi.PagedAttention("decode" if new == 1 else "prefill", case.device)
    att.plan(case.layer, lay, q)
    return bench_ms(lambda: att.run(q, case.layer))


def run_gpu(quick: bool) -> dict[str, Any]:
    """Every GPU figure; not run yet on this project's CPU-only machines."""
    dev = torch.device("cuda")
    figs: dict[str, Any] = {"gpu": torch.cuda.get_device_name(dev)}
    ceiling = copy_bandwidth(dev)
    figs["copy_bw_gbs"] = ceiling / 1e9
    points = DECODE_POINTS[:3] if quick else DECODE_POINTS
    rows = []
    ms: dict[tuple[str, int, int], float] = {}
    for fmt in progress(FORMATS, desc="decode"):
        for b, ctx in points:
            case = Case(fmt, b, ctx, dev)
            t = ms[(fmt, b, ctx)] = time_triton(case, 1)
            key = f"decode_{fmt}_b{b}_ctx{ctx}"
            figs[f"{key}_ms"] = t
            figs[f"{key}_bw_frac"] = case.kv_bytes() / (t * 1e-3) / ceiling
            fi_ms = time_flashinfer(case, 1)
            if fi_ms is not None:
                figs[f"{key}_flashinfer_ms"] = fi_ms
                figs[f"{key}_flashinfer_bw_frac"] = case.kv_bytes() / (fi_ms * 1e-3) / ceiling
            rows.append([fmt, b, ctx, t, figs[f"{key}_bw_frac"], fi_ms or "-"])
            torch.cuda.empty_cache()
    print_table("decode", ["format", "batch", "context", "ms", "bw frac", "flashinfer ms"], rows)
    b, c = max(points, key=lambda p: p[0] * p[1])  # the acceptance point needs >= 64K tokens
    figs["headline_point"] = f"batch {b} x context {c}"
    figs["fp16_decode_bw_frac"] = figs[f"decode_fp16_b{b}_ctx{c}_bw_frac"]
    figs["fp8_vs_fp16_speedup"] = ms[("fp16", b, c)] / ms[("fp8_e4m3", b, c)]
    figs["int4_vs_fp16_speedup"] = ms[("fp16", b, c)] / ms[("int4", b, c)]
    fi_fp16 = figs.get(f"decode_fp16_b{b}_ctx{c}_flashinfer_ms")
    figs["triton_vs_flashinfer_fp16"] = fi_fp16 / ms[("fp16", b, c)] if fi_fp16 else None
    if fi_fp16 is None:
        figs["flashinfer"] = fi.unsupported_reason(KVSpec(1, 1, 8).fmt, torch.float16, dev)

    # storage layouts: a block-major pool of 32 layers (pages 32 layers apart) vs per-layer
    pools: tuple[tuple[StorageLayout, int], ...] = (("layer", 1), ("block", 32))
    for layout, layers in pools:
        case = Case("fp16", b, c, dev, layout=layout, layers=layers)
        figs[f"decode_fp16_{layout}_pool_ms"] = time_triton(case, 1)
        torch.cuda.empty_cache()
    figs["fp16_decode_block_vs_layer_pool"] = (
        figs["decode_fp16_layer_pool_ms"] / figs["decode_fp16_block_pool_ms"]
    )
    if torch.cuda.get_device_capability(dev) >= (8, 9):
        t8 = time_triton(Case("fp8_e4m3", b, c, dev), 1, fp8_query=True)
        figs["fp8_query_vs_fp16_query_speedup"] = ms[("fp8_e4m3", b, c)] / t8

    prow = []
    for fmt in progress(FORMATS, desc="prefill"):
        for b, ctx, new in PREFILL_POINTS[:1] if quick else PREFILL_POINTS:
            case = Case(fmt, b, ctx, dev)
            t = time_triton(case, new)
            key = f"prefill_{fmt}_b{b}_ctx{ctx}_new{new}"
            flops = 4 * HQ * D * b * sum(ctx - new + i + 1 for i in range(new))
            figs[f"{key}_ms"] = t
            figs[f"{key}_tflops"] = flops / (t * 1e-3) / 1e12
            fi_ms = time_flashinfer(case, new)
            if fi_ms is not None:
                figs[f"{key}_flashinfer_ms"] = fi_ms
            prow.append([fmt, b, ctx, new, t, fi_ms or "-"])
            torch.cuda.empty_cache()
    print_table("prefill", ["format", "batch", "context", "new", "ms", "flashinfer ms"], prow)
    plot_gpu(figs, points)
    return figs


def plot_gpu(figs: dict[str, Any], points: list[tuple[int, int]]) -> None:
    """Bandwidth fraction per format and point (and FlashInfer fp16)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [f"{b}x{c}" for b, c in points]
    series = [(f, [figs[f"decode_{f}_b{b}_ctx{c}_bw_frac"] for b, c in points]) for f in FORMATS]
    fl = [figs.get(f"decode_fp16_b{b}_ctx{c}_flashinfer_bw_frac") for b, c in points]
    if all(v is not None for v in fl):
        series.append(("flashinfer fp16", fl))
    w = 0.8 / len(series)
    for i, (name, vals) in enumerate(series):
        ax.bar(np.arange(len(points)) + i * w, vals, w, label=name)
    ax.set_xticks(np.arange(len(points)) + 0.4 - w / 2, labels)
    ax.set_xlabel("batch x context")
    ax.set_ylabel("KV bytes / time / copy bandwidth")
    ax.set_title(f"decode, 32q/8kv heads, dim 128 ({figs['gpu']})")
    ax.axhline(0.8, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results_dir() / "attention.png", dpi=120)


# ------------------------------------------------------------------------------------- CPU


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def run_cpu() -> dict[str, Any]:
    """Every kernel in the interpreter at tiny shapes against the float64 reference."""
    cpu = torch.device("cpu")
    figs: dict[str, Any] = {"gpu": None, "mode": "cpu interpreter, tiny shapes"}
    heads = (8, 2, 32)  # Llama-3's 4:1 GQA ratio, scaled down
    rows = []
    worst = {"decode": 0.0, "prefill": 0.0}
    codes_equal = True
    runs: list[tuple[str, StorageLayout]] = [(f, "block") for f in [*FORMATS, "fp32"]]
    runs += [("fp16", "layer"), ("int4", "layer")]
    for fmt, layout in progress(runs, desc="kernels"):
        t0 = time.perf_counter()
        case = Case(
            fmt, 2, 24, cpu, layout=layout, layers=2, heads=heads, page=8, per_head_scales=True
        )
        # writer: same codes as the reference writer
        lay = case.layout(24)
        kv = torch.randn(2, 48, heads[1], heads[2])
        tk.write_kv(case.layer, lay, kv[0], kv[1])
        got = [t.clone() for t in (case.layer.k, case.layer.v)]
        ref.write_kv(case.layer, lay, kv[0], kv[1])
        codes_equal &= all(
            torch.equal(a, b) for a, b in zip(got, (case.layer.k, case.layer.v), strict=True)
        )
        dec = case.layout(1)
        q = case.queries(2, torch.float32)
        want = ref.decode(q.double(), case.layer, dec)
        errs = [
            max(_err(o, want[0]), _err(s, want[1]))
            for o, s in (tk.decode(q, case.layer, dec, num_splits=n) for n in (1, 3))
        ]
        pre = case.layout(10)
        qp = case.queries(20, torch.float32)
        want = ref.prefill(qp.double(), case.layer, pre)
        o, s = tk.prefill(qp, case.layer, pre)
        perr = max(_err(o, want[0]), _err(s, want[1]))
        figs[f"decode_max_err_{fmt}_{layout}"] = max(errs)
        figs[f"prefill_max_err_{fmt}_{layout}"] = perr
        worst["decode"] = max(worst["decode"], *errs)
        worst["prefill"] = max(worst["prefill"], perr)
        rows.append([fmt, layout, max(errs), perr, time.perf_counter() - t0])
    print_table(
        "Triton (interpreter) vs float64 reference, fp32 queries",
        ["format", "pool", "decode max err", "prefill max err", "s"],
        rows,
    )
    figs["write_codes_equal_reference"] = bool(codes_equal)
    figs["decode_max_err"] = worst["decode"]
    figs["prefill_max_err"] = worst["prefill"]
    g = torch.Generator().manual_seed(3)
    parts = [(torch.randn(5, 8, 32, generator=g), torch.randn(5, 8, generator=g)) for _ in range(3)]
    a = tk.merge_states(*tk.merge_states(*parts[0], *parts[1]), *parts[2])
    b = tk.merge_states(*parts[0], *tk.merge_states(*parts[1], *parts[2]))
    r = ref.merge_states(*ref.merge_states(*parts[0], *parts[1]), *parts[2])
    figs["merge_max_err"] = max(_err(a[0], r[0]), _err(a[1], r[1]), _err(b[0], r[0]))
    figs.update(accuracy())
    figs["gpu_figures"] = (
        "not measured: no GPU (fp16_decode_bw_frac, fp8_vs_fp16_speedup, "
        "int4_vs_fp16_speedup, triton_vs_flashinfer_fp16 need one)"
    )
    plot_cpu(rows, figs)
    return figs


def accuracy() -> dict[str, float]:
    """Format accuracy against fp16 attention, head dim 128, 1024 tokens (reference kernels)."""
    n, nq, hkv, hq, d = 1024, 32, 2, 8, 128
    cpu = torch.device("cpu")

    def attend(
        fmt: str,
        k: torch.Tensor,
        v: torch.Tensor,
        q: torch.Tensor,
        smooth: torch.Tensor | None = None,
    ) -> torch.Tensor:
        spec = KVSpec(1, hkv, d, dtype=torch.float16, kv_format=fmt)
        pool = PagePool(spec, n // PS, PS)
        if spec.fmt.kind == "fp8":
            pool.set_fp8_scales(0, fp8_scales(k, fmt, per_head=True), fp8_scales(v, fmt, True))
        if smooth is not None:
            pool.set_key_smoothing(0, smooth)
        table = np.random.default_rng(0).permutation(n // PS).astype(np.int32)[None]
        full = build_layout(PS, table.copy(), np.array([n]), np.array([n]), (0,), cpu, spec)
        ref.write_kv(pool.layer(0), full, k, v)
        lay = build_layout(PS, table.copy(), np.array([n]), np.array([nq]), (0,), cpu, spec)
        return ref.prefill(q.double(), pool.layer(0), lay)[0]

    def cos_rel(o: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
        a, b = o.flatten().double(), base.flatten().double()
        return float(a @ b / (a.norm() * b.norm())), float((a - b).norm() / b.norm())

    g = torch.Generator().manual_seed(10)
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g).half()
    q = torch.randn(nq, hq, d, generator=g).half()
    out: dict[str, float] = {}
    base = attend("fp16", k.half(), v, q)
    for fmt in ("fp8_e4m3", "fp8_e5m2", "int4"):
        cos, rel = cos_rel(attend(fmt, k.half(), v, q), base)
        out[f"acc_{fmt}_cosine"], out[f"acc_{fmt}_rel_l2"] = cos, rel
    c = int(torch.randint(0, d // 2, (1,), generator=g))
    k[:, :, [c, c + d // 2]] *= 20
    ko = k.half()
    base = attend("fp16", ko, v, q)
    out["acc_outlier_fp8_e4m3_cosine"] = cos_rel(attend("fp8_e4m3", ko, v, q), base)[0]
    out["acc_outlier_int4_cosine"] = cos_rel(attend("int4", ko, v, q), base)[0]
    out["acc_outlier_int4_smoothed_cosine"] = cos_rel(
        attend("int4", ko, v, q, calibrate_key_smoothing(ko[:256])), base
    )[0]
    print_table(
        "accuracy vs fp16 attention (d=128, 1024 tokens)",
        ["figure", "value"],
        [[k_, v_] for k_, v_ in out.items()],
    )
    return out


def plot_cpu(rows: list[list[Any]], figs: dict[str, Any]) -> None:
    """Max error against the reference per format (interpreter run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [f"{r[0]}\n{r[1]}" for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [max(r[2], 1e-12) for r in rows], 0.4, label="decode")
    ax.bar(x + 0.2, [max(r[3], 1e-12) for r in rows], 0.4, label="prefill")
    ax.axhline(1e-5, color="grey", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x, names, fontsize=6)
    ax.set_ylabel("max |triton - float64 reference|")
    ax.set_title("Triton interpreter, fp32 queries")
    ax.legend()
    keys = [k for k in figs if k.startswith("acc_") and k.endswith("cosine")]
    ax2.barh([k[4:-7] for k in keys], [figs[k] for k in keys])
    ax2.set_xlim(min(0.6, min(figs[k] for k in keys)), 1.0)
    ax2.set_title("cosine vs fp16 attention")
    fig.tight_layout()
    fig.savefig(results_dir() / "attention.png", dpi=120)


def main() -> None:
    """Run the benchmark for this machine and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer points (on CPU: always tiny)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    figs = run_gpu(args.quick) if torch.cuda.is_available() else run_cpu()
    figs["seconds"] = time.perf_counter() - t0
    path = save_results("attention", figs, quick=args.quick)
    console.print(f"wrote {path} in {figs['seconds']:.1f} s")
    if not math.isfinite(float(figs.get("decode_max_err", 0.0))):
        raise SystemExit("non-finite error")


if __name__ == "__main__":
    main()
