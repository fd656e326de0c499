"""transformers generate on kvmem memory (KVMemCache) against DynamicCache, side by side.

One random-weight Llama (no download), in one process, three scenarios:

- beam search, 4 beams: peak KV bytes held during ``generate`` (DynamicCache:
  the bytes of its K/V tensors; KVMemCache: the pages its sequences hold,
  which beams share copy-on-write) and output tokens per second, for the
  paged, grouped and vmem backends;
- batched greedy (left-padded prompts of different lengths): tokens per
  second and peak KV bytes, KVMemCache with ``attn_implementation="kvmem"``
  (kernels read the pages) and with SDPA on dense K/V gathered from the
  pages, against DynamicCache on SDPA (the strongest baseline on a CPU);
- prefix reuse across two calls sharing a system prompt: positions the
  second call did not compute, and its output against a cold call.

Every timing alternates the compared runs and keeps the median. Outputs
are checked token-identical to DynamicCache (fp32). Writes
``bench/results/hf.json`` and ``hf.png``.
Run: ``python -m bench.hf [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StoppingCriteria

from bench.common import console, print_table, progress, save_results
from kvmem.integrations.hf import KVMemCache

BACKENDS: dict[str, dict[str, Any]] = {
    "paged": {"page_size": 16},
    "grouped": {"page_size": 16},
    "vmem": {"page_bytes": 4096, "max_seqs": 64, "max_seq_len": 4096},
}


class KVProbe(StoppingCriteria):
    """Records the KV bytes a cache holds after every step; never stops generation."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.held: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
        self.held.append(kv_bytes(self.cache))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def kv_bytes(cache: Any) -> int:
    """Bytes of KV a cache holds now."""
    if isinstance(cache, KVMemCache):
        return cache.kv_bytes()
    return sum(
        t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None
    )


def build_model(quick: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """A random-weight Llama: 4 layers, hidden 256, GQA 8/4 (quick: 2 layers, hidden 128)."""
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=128 if quick else 256,
        intermediate_size=256 if quick else 688,
        num_hidden_layers=2 if quick else 4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(cfg)
    return model.to(device=device, dtype=dtype).eval()


def run(model: Any, cache: Any, attn: str, ids: torch.Tensor, **kw: Any) -> tuple[Any, float, int]:
    """``(output, seconds, peak KV bytes)`` of one generate."""
    model.set_attn_implementation(attn)
    probe = KVProbe(cache)
    if ids.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(ids, cache=cache, stopping_criteria=[probe], do_sample=False, **kw)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t, max(probe.held)


def kvmem_cache(model: Any, backend: str, num_tokens: int) -> KVMemCache:
    """A KVMemCache of ``num_tokens`` on ``backend``, on the model's device."""
    return KVMemCache(
        model.config, backend, num_tokens=num_tokens, device=model.device, **BACKENDS[backend]
    )


def compare(
    model: Any, ids: torch.Tensor, runs: dict[str, tuple[str, str | None]], reps: int, **kw: Any
) -> dict[str, dict[str, float]]:
    """Median seconds and peak bytes of each named run ``(attn, backend or None=DynamicCache)``."""
    times: dict[str, list[float]] = {n: [] for n in runs}
    peak: dict[str, int] = {}
    ref = None
    for _ in progress(range(reps), desc="runs"):
        for name, (attn, backend) in runs.items():
            cache: Any = (
                DynamicCache(config=model.config)
                if backend is None
                else kvmem_cache(model, backend, 1 << 14)
            )
            out, secs, held = run(model, cache, attn, ids, **kw)
            if isinstance(cache, KVMemCache):
                cache.close()
            ref = out if ref is None else ref
            if not torch.equal(out, ref):
                console.print(f"[red]{name}: output differs from DynamicCache[/red]")
            times[name].append(secs)
            peak[name] = held
    new = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {
        n: {
            "seconds": statistics.median(t),
            "tokens_per_s": new / statistics.median(t),
            "peak_kv_bytes": float(peak[n]),
        }
        for n, t in times.items()
    }


def prefix_reuse(model: Any, quick: bool, new: int) -> dict[str, Any]:
    """Two calls sharing a system prompt: positions present at the second, output vs a cold call."""
    g = torch.Generator().manual_seed(5)
    system = torch.randint(1, 1024, (1, 96 if quick else 256), generator=g)
    first = torch.cat([system, torch.randint(1, 1024, (1, 24), generator=g)], 1).to(model.device)
    second = torch.cat([system, torch.randint(1, 1024, (1, 40), generator=g)], 1).to(model.device)
    model.set_attn_implementation("sdpa")
    cold = model.generate(second, max_new_tokens=new, do_sample=False)
    with kvmem_cache(model, "paged", 1 << 14) as cache:
        model.set_attn_implementation("kvmem")
        cache.prepare(first)
        model.generate(first, cache=cache, max_new_tokens=new, do_sample=False)
        before = cache.tokens_computed
        present = cache.prepare(second)
        warm = model.generate(second, cache=cache, max_new_tokens=new, do_sample=False)
        computed = cache.tokens_computed - before
    return {
        "prefix_reuse_prompt_tokens": second.shape[1],
        "prefix_reuse_positions_present": present,
        "prefix_reuse_tokens_computed": computed,
        "prefix_reuse_tokens_cold": second.shape[1] + new - 1,
        "prefix_reuse_tokens_saved_frac": present / second.shape[1],
        "prefix_reuse_output_equal": bool(torch.equal(warm, cold)),
    }


def plot(figs: dict[str, Any], beam: dict[str, dict[str, float]], path: Path) -> None:
    """Bar charts: peak KV bytes of beam search, and greedy tokens/s, relative to DynamicCache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = list(beam)
    ax[0].bar(names, [beam[n]["peak_kv_bytes"] / 2**20 for n in names], color="tab:blue")
    ax[0].set_ylabel("peak KV MiB")
    ax[0].set_title("beam search, 4 beams")
    ax[0].tick_params(axis="x", rotation=20)
    g = figs["greedy"]
    gn = list(g)
    ax[1].bar(gn, [g[n]["tokens_per_s"] for n in gn], color="tab:green")
    ax[1].set_ylabel("tokens / s")
    ax[1].set_title(f"batched greedy (batch {figs['greedy_batch']})")
    ax[1].tick_params(axis="x", rotation=20)
    fig.suptitle(f"KVMemCache vs DynamicCache ({figs['device']}; quick={figs['quick']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Run the scenarios, print tables, write bench/results/hf.json and hf.png."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model and shorter runs")
    args = ap.parse_args()
    quick = args.quick
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_model(quick, device, dtype)
    reps = 1 if quick else 2
    new = 8 if quick else 16
    g = torch.Generator().manual_seed(1)

    prompt = torch.randint(1, 1024, (1, 96 if quick else 192), generator=g).to(device)
    beam_runs: dict[str, tuple[str, str | None]] = {"DynamicCache": ("sdpa", None)}
    beam_runs.update({f"kvmem-{b}": ("kvmem", b) for b in BACKENDS})
    beam = compare(model, prompt, beam_runs, reps, num_beams=4, max_new_tokens=new)

    batch = 4 if quick else 8
    lengths = torch.randint(32 if quick else 48, 96 if quick else 128, (batch,), generator=g)
    ids = torch.randint(1, 1024, (batch, int(lengths.max())), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate(lengths.tolist()):
        ids[i, : ids.shape[1] - n] = 0
        mask[i, : ids.shape[1] - n] = 0
    greedy_runs: dict[str, tuple[str, str | None]] = {
        "DynamicCache": ("sdpa", None),
        "kvmem-paged": ("kvmem", "paged"),
        "kvmem-paged-dense-sdpa": ("sdpa", "paged"),
    }
    greedy = compare(
        model,
        ids.to(device),
        greedy_runs,
        reps,
        attention_mask=mask.to(device),
        max_new_tokens=new,
    )
    prefix = prefix_reuse(model, quick, new)

    dyn_b, dyn_g = beam["DynamicCache"], greedy["DynamicCache"]
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    figs: dict[str, Any] = {
        "beam4_kv_bytes_vs_dynamic": beam["kvmem-paged"]["peak_kv_bytes"] / dyn_b["peak_kv_bytes"],
        "greedy_tokens_per_s_vs_dynamic": greedy["kvmem-paged"]["tokens_per_s"]
        / dyn_g["tokens_per_s"],
        **prefix,
        "beam4_tokens_per_s_vs_dynamic": beam["kvmem-paged"]["tokens_per_s"]
        / dyn_b["tokens_per_s"],
        **{
            f"beam4_kv_bytes_vs_dynamic_{b}": beam[f"kvmem-{b}"]["peak_kv_bytes"]
            / dyn_b["peak_kv_bytes"]
            for b in BACKENDS
        },
        "greedy_dense_sdpa_tokens_per_s_vs_dynamic": greedy["kvmem-paged-dense-sdpa"][
            "tokens_per_s"
        ]
        / dyn_g["tokens_per_s"],
        "greedy_kv_bytes_vs_dynamic": greedy["kvmem-paged"]["peak_kv_bytes"]
        / dyn_g["peak_kv_bytes"],
        "beam": beam,
        "greedy": greedy,
        "greedy_batch": batch,
        "beam_prompt_tokens": prompt.shape[1],
        "new_tokens": new,
        "device": str(device),
        "dtype": str(dtype),
        "command": "python -m bench.hf" + (" --quick" if quick else ""),
        "commit": commit,
        "quick": quick,
    }
    rows = [[n, r["peak_kv_bytes"] / 2**20, r["tokens_per_s"]] for n, r in beam.items()]
    print_table("beam search, 4 beams", ["cache", "peak KV MiB", "tokens/s"], rows)
    rows = [[n, r["peak_kv_bytes"] / 2**20, r["tokens_per_s"]] for n, r in greedy.items()]
    print_table(f"greedy, batch {batch}", ["cache", "peak KV MiB", "tokens/s"], rows)
    print_table("prefix reuse", ["figure", "value"], [[k, v] for k, v in prefix.items()])
    path = save_results("hf", figs, args.quick)
    plot(figs, beam, path.with_suffix(".png"))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
