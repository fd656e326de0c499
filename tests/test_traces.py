"""Trace loaders and the synthetic generator."""

from __future__ import annotations

import numpy as np
import pytest

from kvmem import InvalidArgument, traces


def test_loads_both_formats_with_arrival_offsets(tmp_path):
    azure = tmp_path / "a.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
    )
    got = traces.load_trace(azure)
    assert [(p, o) for _, p, o in got] == [(374, 44), (396, 109)]
    assert got[0][0] == 0.0 and got[1][0] == pytest.approx(50.995169 - 46.68059, abs=1e-6)
    arxiv = tmp_path / "b.csv"
    arxiv.write_text(
        "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n3772,54,3826,69.8\n"
    )
    assert traces.load_trace(arxiv) == [(0.0, 3772, 54)]
    assert traces.load_trace(azure, limit=1) == got[:1]
    bad = tmp_path / "c.csv"
    bad.write_text("x,y\n1,2\n")
    with pytest.raises(InvalidArgument):
        traces.load_trace(bad)
    with pytest.raises(InvalidArgument):
        traces.find_trace("nope")


def test_falls_back_to_synthetic_where_the_file_is_absent(tmp_path, monkeypatch):
    monkeypatch.setattr(traces, "trace_dirs", lambda: [tmp_path])
    with pytest.raises(FileNotFoundError):
        traces.load_trace("azure_conv")
    trace, source = traces.load_or_synthesize("azure_conv", 500, seed=3)
    assert source == "synthetic:azure_conv" and len(trace) == 500
    assert trace == traces.synthetic_trace("azure_conv", 500, seed=3)
    arrivals = [t for t, _, _ in trace]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    assert all(p >= 1 and o >= 1 for _, p, o in trace)


@pytest.mark.parametrize("kind", sorted(traces.TRACE_FILES))
def test_synthetic_lengths_match_the_real_trace(kind):
    path = traces.find_trace(kind)
    if path is None:
        pytest.skip(f"{traces.TRACE_FILES[kind]} is not present")
    real = np.array([(p, o) for _, p, o in traces.load_trace(path)], dtype=float)
    synth = np.array(
        [(p, o) for _, p, o in traces.synthetic_trace(kind, 50_000, seed=1)], dtype=float
    )
    for col in range(2):
        for stat in (np.mean, np.median, lambda x: np.percentile(x, 90)):
            r, s = stat(real[:, col]), stat(synth[:, col])
            assert abs(s - r) <= 0.08 * r, f"{kind} column {col}: {s} vs {r}"
    if kind != "arxiv":
        t = traces.load_trace(path)
        rate = len(t) / t[-1][0]
        st = traces.synthetic_trace(kind, 20_000, seed=2)
        assert len(st) / st[-1][0] == pytest.approx(rate, rel=0.05)


def test_shared_lookup_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv(traces.TRACES_ENV, str(tmp_path))
    monkeypatch.delenv(traces.NO_SHARED_ENV, raising=False)
    dirs = traces.trace_dirs()
    assert dirs[0] == tmp_path and len(dirs) == 3
    assert all(d.parts[-2:] == ("shared", "traces") for d in dirs[1:])
    monkeypatch.setenv(traces.NO_SHARED_ENV, "1")
    assert traces.trace_dirs() == [tmp_path]
    assert traces.find_trace("azure_conv") is None
    monkeypatch.setenv(traces.NO_SHARED_ENV, "0")
    assert len(traces.trace_dirs()) == 3


def test_sample_lengths_draws_from_the_file_or_the_synthetic_twin(tmp_path, monkeypatch):
    monkeypatch.setattr(traces, "trace_dirs", lambda: [tmp_path])
    got, source = traces.sample_lengths("azure_code", 300, seed=4)
    assert source == "synthetic:azure_code"
    assert got == [(p, o) for _, p, o in traces.synthetic_trace("azure_code", 300, seed=4)]
    (tmp_path / traces.TRACE_FILES["azure_code"]).write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,0,109\n"
    )
    got, source = traces.sample_lengths("azure_code", 200, seed=4)
    assert source.endswith(traces.TRACE_FILES["azure_code"])
    assert set(got) == {(374, 44), (1, 109)}  # zero-length prompts count as 1
    assert traces.sample_lengths("azure_code", 200, seed=4)[0] == got
    with pytest.raises(InvalidArgument):
        traces.sample_lengths("azure_code", -1)
