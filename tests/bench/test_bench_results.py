"""The committed benchmark results: full runs that say how they were made, with every figure
the README's table needs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
FILES = sorted(RESULTS.glob("*.json"))


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_result_is_a_full_run_with_its_command_commit_and_machine(path):
    figs = json.loads(path.read_text())
    assert figs["quick"] is False
    assert re.fullmatch(rf"(\w+=\S+ )*python -m bench\.{path.stem}( .*)?", figs["command"])
    assert re.fullmatch(r"[0-9a-f]{40}", figs["commit"]), figs["commit"]  # no "+dirty"
    assert figs["machine"]["cpus"] >= 1 and figs["machine"]["torch"]
    assert path.with_suffix(".png").exists()


def test_scheduling_reports_every_policy_at_every_load():
    figs = load("scheduling")
    assert figs["loads"] == [0.7, 0.9, 1.0, 1.25]
    policies = ["fcfs", "isrtf_oracle", "isrtf_guarded", "isrtf_noisy", "isrtf_learned"]
    for ld in figs["loads"]:
        for pol in policies:
            for stat in ("mean_jct", "p99_jct", "mean_ttft", "p99_ttft"):
                assert figs[f"load_{ld}_{pol}_{stat}_s"] > 0
    for key in ("isrtf_guarded_jct_vs_fcfs", "isrtf_guarded_p99_jct_vs_fcfs"):
        ratio = figs[key]
        pol = key.removesuffix("_vs_fcfs").removesuffix("_jct").removesuffix("_p99")
        stat = "p99_jct" if "p99" in key else "mean_jct"
        at = figs["headline_load"]
        want = figs[f"load_{at}_{pol}_{stat}_s"] / figs[f"load_{at}_fcfs_{stat}_s"]
        assert ratio == pytest.approx(want)
    assert figs["cost_decode_s_per_context_token"] > 0


def test_swap_headline_is_against_the_strongest_baseline():
    figs = load("swap")
    size = f"{int(figs['headline_size']) // 1024}K"
    base = figs["strongest_baseline"]
    modes = [k.removeprefix(f"{size}_").removesuffix("_ms") for k in figs if k.endswith("_ms")]
    baselines = [m for m in modes if m.startswith(("block_", "layer_")) and "grouped" not in m]
    assert {"block_vllm0", "block_perpage", "block_paged_runs"} <= set(baselines)
    assert base in baselines
    for key in ("grouped_vs_strongest_speedup", "grouped_vs_vllm0_speedup"):
        assert figs[key] == figs[f"{size}_{key}"] > 0
    assert figs["grouped_vs_vllm0_speedup"] >= figs["grouped_vs_strongest_speedup"]
    assert figs["grouped_frac_of_limit"] > 0


def test_fragmentation_shows_idle_mapped_memory_2mib_pages_and_both_static_lengths():
    figs = load("fragmentation")
    for name in ("vmem2m", "vmem64k"):
        idle, used = figs[f"{name}_idle_mapped_frac"], figs[f"{name}_used_of_mapped_frac"]
        assert 0 <= idle < 1 and used == pytest.approx(figs[f"{name}_used_frac"] * (1 - idle))
    for name in ("static2048", "static8192"):
        assert 0 < figs[f"{name}_used_frac"] < 1
    assert figs["static2048_rejected_requests"] >= 0
