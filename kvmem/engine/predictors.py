"""Output-length predictors for ISRTF scheduling (ELIS).

A :class:`LengthPredictor` estimates how many output tokens a request still
has to generate, given its prompt and what it has generated so far. The
ISRTF policy asks again every ``k`` generated tokens.

- :class:`OraclePredictor`: the true remaining length (from a replayed
  trace's ``output_len_hint``); the upper bound of what prediction buys.
- :class:`NoisyOraclePredictor`: the truth times log-normal noise whose
  spread is calibrated so that predictions of the total output length have
  R^2 = 0.85 against the truth, the accuracy ELIS's BGE-based predictor
  reached.
- :class:`LearnedPredictor`: fitted on a trace's (prompt features, output
  length) pairs. The Azure traces carry lengths only, so the one feature is
  the prompt length: training requests are split into prompt-length
  quantile bins, and the prediction is the mean residual output length of
  the bin's requests that ran longer than what is already generated,
  ``E[L - g | L > g, bin]``. With text prompts, :meth:`LearnedPredictor.fit`
  takes any feature function whose first column orders requests into bins.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np

from kvmem.engine.request import Request
from kvmem.errors import InvalidArgument


class LengthPredictor(ABC):
    """Predicts a request's remaining output tokens."""

    name: str = "predictor"

    @abstractmethod
    def predict_remaining(self, request: Request) -> float:
        """Expected output tokens still to come (>= 0)."""


def _true_remaining(request: Request) -> float:
    if request.output_len_hint is None:
        raise InvalidArgument(
            f"request {request.request_id!r} has no output_len_hint; oracle predictors need one"
        )
    return float(max(request.output_len_hint - request.num_output_tokens, 0))


class OraclePredictor(LengthPredictor):
    """The exact remaining length, from ``Request.output_len_hint``."""

    name = "oracle"

    def predict_remaining(self, request: Request) -> float:
        """The true remaining output tokens."""
        return _true_remaining(request)


def r2_score(truth: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination of ``pred`` against ``truth``."""
    truth = np.asarray(truth, dtype=np.float64)
    ss_tot = float(((truth - truth.mean()) ** 2).sum())
    return 1.0 - float(((truth - np.asarray(pred)) ** 2).sum()) / ss_tot if ss_tot else 0.0


def _unit_normal(key: str) -> float:
    """A standard normal number determined by ``key`` (stable across runs and processes)."""
    h = hashlib.blake2b(key.encode(), digest_size=16).digest()
    u1 = (int.from_bytes(h[:8], "little") + 0.5) / 2**64
    u2 = (int.from_bytes(h[8:], "little") + 0.5) / 2**64
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2 * math.pi * u2)


class NoisyOraclePredictor(LengthPredictor):
    """The truth times ``exp(sigma * z - sigma^2 / 2)``, ``z`` a fresh normal per prediction.

    ``z`` is drawn from a hash of (seed, request id, tokens generated), so a
    replay sees the same noise. Build one with :meth:`calibrated` to hit a
    target R^2 on a set of output lengths.
    """

    name = "noisy"

    def __init__(self, sigma: float, seed: int = 0) -> None:
        if not math.isfinite(sigma) or sigma < 0:
            raise InvalidArgument(f"sigma must be finite and >= 0, got {sigma}")
        self.sigma = sigma
        self.seed = seed

    def _noise(self, key: str) -> float:
        s = self.sigma
        return math.exp(s * _unit_normal(f"{self.seed}/{key}") - s * s / 2)

    def predict_remaining(self, request: Request) -> float:
        """The true remaining length, perturbed."""
        key = f"{request.request_id}/{request.num_output_tokens}"
        return _true_remaining(request) * self._noise(key)

    def r2(self, lengths: Sequence[int]) -> float:
        """R^2 of first predictions (at arrival) against ``lengths``."""
        truth = np.asarray(lengths, dtype=np.float64)
        pred = truth * np.array([self._noise(f"{i}/0") for i in range(len(truth))])
        return r2_score(truth, pred)

    @classmethod
    def calibrated(
        cls, lengths: Sequence[int], r2: float = 0.85, seed: int = 0
    ) -> NoisyOraclePredictor:
        """The sigma whose predictions of ``lengths`` reach R^2 = ``r2`` (bisection)."""
        if not 0 < r2 < 1:
            raise InvalidArgument(f"target r2 must be in (0, 1), got {r2}")
        if len(lengths) < 2:
            raise InvalidArgument("need at least two lengths to calibrate")
        lo, hi = 0.0, 4.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if cls(mid, seed).r2(lengths) > r2:
                lo = mid
            else:
                hi = mid
        return cls((lo + hi) / 2, seed)


class LearnedPredictor(LengthPredictor):
    """Mean residual output length per prompt-feature bin, learned from a trace."""

    name = "learned"

    def __init__(
        self,
        edges: np.ndarray,
        bins: list[np.ndarray],
        feature: Callable[[Request], float],
    ) -> None:
        self.edges = edges
        self.bins = bins  # sorted output lengths of each bin's training requests
        self.feature = feature

    @staticmethod
    def prompt_length(request: Request) -> float:
        """The default feature: prompt tokens."""
        return float(request.num_prompt_tokens)

    @classmethod
    def fit(
        cls,
        features: Sequence[float],
        output_lengths: Sequence[int],
        num_bins: int = 8,
        feature: Callable[[Request], float] | None = None,
    ) -> LearnedPredictor:
        """Fit on training pairs; ``feature`` maps a live request to the same feature."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(output_lengths, dtype=np.float64)
        if x.shape != y.shape or len(x) < num_bins or num_bins < 1:
            raise InvalidArgument("need as many features as lengths, and at least one per bin")
        edges = np.unique(np.quantile(x, np.linspace(0, 1, num_bins + 1)[1:-1]))
        which = np.searchsorted(edges, x, side="right")
        bins = [np.sort(y[which == b]) for b in range(len(edges) + 1)]
        bins = [b if len(b) else np.sort(y) for b in bins]
        return cls(edges, bins, feature or cls.prompt_length)

    def predict_total(self, feature_value: float) -> float:
        """Expected output length for a prompt with this feature value."""
        b = self.bins[int(np.searchsorted(self.edges, feature_value, side="right"))]
        return float(b.mean())

    def predict_remaining(self, request: Request) -> float:
        """``E[L - g | L > g]`` in the request's bin, ``g`` the tokens generated so far."""
        b = self.bins[int(np.searchsorted(self.edges, self.feature(request), side="right"))]
        g = request.num_output_tokens
        longer = b[np.searchsorted(b, g, side="right") :]
        if len(longer) == 0:
            return 1.0  # beyond every training request: expect it to end soon
        return float(longer.mean() - g)


def make_predictor(name: str, **options: object) -> LengthPredictor:
    """``oracle`` or ``noisy`` (options: sigma, seed); a learned one comes from ``fit``."""
    if name == "oracle":
        return OraclePredictor()
    if name == "noisy":
        return NoisyOraclePredictor(**options)  # type: ignore[arg-type]
    raise InvalidArgument(f"unknown predictor {name!r}; known: oracle, noisy (learned: fit one)")


__all__ = [
    "LearnedPredictor",
    "LengthPredictor",
    "NoisyOraclePredictor",
    "OraclePredictor",
    "make_predictor",
    "r2_score",
]
