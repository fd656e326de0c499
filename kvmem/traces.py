"""Request-length traces for benchmarks: loaders for the public traces and a synthetic generator.

A trace is a list of ``(arrival_s, prompt_tokens, output_tokens)``, arrival
offsets in seconds from the first request, in arrival order.

Known traces (CSV files, looked up by name in :func:`trace_dirs`; never
shipped with kvmem):

==============  =====================================  ================================
name            file                                   columns
==============  =====================================  ================================
``azure_conv``  ``azure_llm_2023_conv.csv``            TIMESTAMP,ContextTokens,GeneratedTokens
``azure_code``  ``azure_llm_2023_code.csv``            same
``arxiv``       ``arxiv_summarization_lengths.csv``    num_prefill_tokens,num_decode_tokens,...
==============  =====================================  ================================

The arXiv file has no timestamps: its requests all arrive at 0 (use
:func:`with_poisson_arrivals` to spread them).

Where the files are absent, :func:`synthetic_trace` draws requests with the
same length statistics: prompt and output lengths independently from the
real traces' quantiles (:data:`QUANTILES`, 28 points from 0 to 100, taken
from the files once; linear between points), arrivals Poisson at the
trace's mean rate. Its mean, median and P90 are within a few percent of the
real ones (tested).
"""

from __future__ import annotations

import csv
import os
from datetime import datetime
from pathlib import Path

import numpy as np

from kvmem.errors import InvalidArgument

Request = tuple[float, int, int]

__all__ = [
    "QUANTILES",
    "RATES",
    "TRACE_FILES",
    "NO_SHARED_ENV",
    "TRACES_ENV",
    "Request",
    "find_trace",
    "load_or_synthesize",
    "sample_lengths",
    "load_trace",
    "synthetic_trace",
    "trace_dirs",
    "with_poisson_arrivals",
]

TRACE_FILES = {
    "azure_conv": "azure_llm_2023_conv.csv",
    "azure_code": "azure_llm_2023_code.csv",
    "arxiv": "arxiv_summarization_lengths.csv",
}

#: Percentiles at which :data:`QUANTILES` are given.
PERCENTILES = (
    0,
    1,
    2.5,
    5,
    7.5,
    10,
    15,
    20,
    25,
    30,
    35,
    40,
    45,
    50,
    55,
    60,
    65,
    70,
    75,
    80,
    85,
    90,
    92.5,
    95,
    97.5,
    99,
    99.9,
    100,
)

#: Length quantiles of each trace: (prompt tokens, output tokens) at PERCENTILES.
QUANTILES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "azure_conv": (
        (
            2,
            29,
            120,
            181,
            200,
            207,
            372,
            387,
            396,
            403,
            414,
            703,
            984,
            1020,
            1045,
            1071,
            1097,
            1130,
            1189,
            1315,
            1876,
            2734,
            4075,
            4083,
            4092,
            4142,
            6179,
            14050,
        ),
        (
            7,
            16,
            28,
            41,
            48,
            54,
            67,
            77,
            85,
            91,
            96,
            103,
            113,
            129,
            151,
            177,
            217,
            384,
            395,
            400,
            411,
            424,
            430,
            451,
            522,
            601,
            954,
            1000,
        ),
    ),
    "azure_code": (
        (
            3,
            17,
            44,
            75,
            102,
            147,
            232,
            386,
            578,
            770,
            939,
            1075,
            1261,
            1469,
            1690,
            1909,
            2164,
            2433,
            2744,
            3192,
            3920,
            5188,
            6097,
            7303,
            7435,
            7436,
            7437,
            7437,
        ),
        (
            6,
            6,
            6,
            6,
            6,
            7,
            7,
            8,
            9,
            9,
            10,
            11,
            12,
            13,
            14,
            16,
            18,
            20,
            24,
            29,
            39,
            55,
            69,
            90,
            145,
            251,
            825,
            1899,
        ),
    ),
    "arxiv": (
        (
            1,
            73,
            331,
            749,
            1019,
            1242,
            1564,
            1802,
            1986,
            2150,
            2308,
            2453,
            2596,
            2730,
            2861,
            2996,
            3127,
            3249,
            3370,
            3490,
            3597,
            3702,
            3759,
            3813,
            3876,
            3933,
            4012,
            4054,
        ),
        (
            5,
            36,
            48,
            60,
            70,
            78,
            92,
            104,
            115,
            125,
            135,
            145,
            156,
            167,
            179,
            192,
            206,
            222,
            242,
            268,
            304,
            372,
            438,
            736,
            2507,
            3271,
            3844,
            4056,
        ),
    ),
}

#: Mean arrival rates in requests per second (arXiv has none; 1.0 is a placeholder).
RATES = {"azure_conv": 5.53, "azure_code": 2.57, "arxiv": 1.0}


#: Environment variable naming a directory of trace files, searched first.
TRACES_ENV = "KVMEM_TRACES"
#: Environment variable that, set to a non-empty value other than ``0``, turns off the
#: ``../shared/traces`` lookup (CI sets it to check that nothing needs the files).
NO_SHARED_ENV = "KVMEM_NO_SHARED_TRACES"


def trace_dirs() -> list[Path]:
    """Where named traces are looked for, in order.

    ``$KVMEM_TRACES``, then ``../shared/traces`` relative to the working
    directory, then relative to the project root (the directory holding the
    ``kvmem`` package, for a source checkout). ``KVMEM_NO_SHARED_TRACES=1``
    drops the two ``../shared`` entries.
    """
    dirs = []
    env = os.environ.get(TRACES_ENV)
    if env:
        dirs.append(Path(env))
    if os.environ.get(NO_SHARED_ENV, "") in ("", "0"):
        dirs.append(Path.cwd().parent / "shared" / "traces")
        dirs.append(Path(__file__).resolve().parents[1].parent / "shared" / "traces")
    return dirs


def find_trace(name: str) -> Path | None:
    """The file of the named trace, or None where it is not present."""
    if name not in TRACE_FILES:
        raise InvalidArgument(f"unknown trace {name!r}; known: {', '.join(TRACE_FILES)}")
    for d in trace_dirs():
        path = d / TRACE_FILES[name]
        if path.is_file():
            return path
    return None


def _timestamp(text: str) -> float:
    date, _, frac = text.strip().partition(".")
    t = datetime.strptime(date, "%Y-%m-%d %H:%M:%S").timestamp()
    return t + (float("0." + frac) if frac else 0.0)


def load_trace(name_or_path: str | os.PathLike[str], limit: int | None = None) -> list[Request]:
    """Read a trace by name (see :data:`TRACE_FILES`) or by path; the first ``limit`` rows.

    Raises FileNotFoundError when a named trace is not in any of
    :func:`trace_dirs`, InvalidArgument for a file in neither format.
    """
    name = os.fspath(name_or_path)
    if name in TRACE_FILES:
        path = find_trace(name)
        if path is None:
            where = ", ".join(str(d) for d in trace_dirs())
            raise FileNotFoundError(f"trace {name!r} ({TRACE_FILES[name]}) not found in {where}")
    else:
        path = Path(name)
    out: list[Request] = []
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        if header[:3] == ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            t0 = None
            for row in rows:
                if limit is not None and len(out) >= limit:
                    break
                t = _timestamp(row[0])
                t0 = t if t0 is None else t0
                out.append((t - t0, int(row[1]), int(row[2])))
        elif header[:2] == ["num_prefill_tokens", "num_decode_tokens"]:
            for row in rows:
                if limit is not None and len(out) >= limit:
                    break
                out.append((0.0, int(row[0]), int(row[1])))
        else:
            raise InvalidArgument(f"{path}: unknown trace format (header {header})")
    return out


def synthetic_trace(kind: str, n: int, seed: int = 0, rate: float | None = None) -> list[Request]:
    """``n`` requests with the length statistics of trace ``kind``, Poisson arrivals.

    ``rate`` defaults to the trace's mean rate (:data:`RATES`).
    """
    if kind not in QUANTILES:
        raise InvalidArgument(f"unknown trace kind {kind!r}; known: {', '.join(QUANTILES)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgument(f"n must be a non-negative int, got {n!r}")
    rng = np.random.default_rng(seed)
    prompt_q, output_q = QUANTILES[kind]
    prompt = np.interp(rng.random(n) * 100, PERCENTILES, prompt_q)
    output = np.interp(rng.random(n) * 100, PERCENTILES, output_q)
    gaps = rng.exponential(1.0 / (rate or RATES[kind]), n)
    arrival = np.cumsum(gaps) - (gaps[0] if n else 0.0)
    return [
        (float(t), max(1, round(p)), max(1, round(o)))
        for t, p, o in zip(arrival, prompt, output, strict=True)
    ]


def with_poisson_arrivals(trace: list[Request], rate: float, seed: int = 0) -> list[Request]:
    """The same requests with Poisson arrivals at ``rate`` per second."""
    if rate <= 0:
        raise InvalidArgument(f"rate must be positive, got {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(trace))
    times = np.cumsum(gaps) - (gaps[0] if len(trace) else 0.0)
    return [(float(t), p, o) for t, (_, p, o) in zip(times, trace, strict=True)]


def load_or_synthesize(name: str, n: int | None = None, seed: int = 0) -> tuple[list[Request], str]:
    """The named trace's first ``n`` requests where its file exists, else ``n`` synthetic ones.

    Returns ``(trace, source)``, ``source`` being the file path or
    ``"synthetic:<name>"``. Without the file, ``n`` defaults to 10,000.
    """
    path = find_trace(name)
    if path is not None:
        return load_trace(path, limit=n), str(path)
    return synthetic_trace(name, 10_000 if n is None else n, seed), f"synthetic:{name}"


def sample_lengths(name: str, n: int, seed: int = 0) -> tuple[list[tuple[int, int]], str]:
    """``n`` ``(prompt, output)`` lengths drawn with replacement from the named trace.

    Where the trace file is absent, the lengths of ``n`` synthetic requests
    with its statistics. Returns ``(lengths, source)`` as
    :func:`load_or_synthesize` does; every length is at least 1.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgument(f"n must be a non-negative int, got {n!r}")
    path = find_trace(name)
    if path is None:
        synth = synthetic_trace(name, n, seed)
        return [(p, o) for _, p, o in synth], f"synthetic:{name}"
    rows = [(max(1, p), max(1, o)) for _, p, o in load_trace(path)]
    pick = np.random.default_rng(seed).integers(0, len(rows), n)
    return [rows[i] for i in pick.tolist()], str(path)
