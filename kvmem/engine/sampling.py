"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeded streams."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvmem.engine.request import SamplingParams


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top ``top_k`` and outside the ``top_p`` nucleus.

    ``logits`` is [V] float32; at least the most likely token always survives.
    """
    v = logits.shape[-1]
    if 0 < top_k < v:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_l, -1)
        before = torch.cumsum(probs, -1) - probs  # mass of strictly better tokens
        drop = before >= top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of ``logits`` [n, V] (float32), row i by ``params[i]``."""
    n = logits.shape[0]
    out = [0] * n
    greedy = [i for i in range(n) if params[i].greedy]
    if greedy:
        idx = torch.tensor(greedy)
        for i, t in zip(greedy, logits[idx].argmax(-1).tolist(), strict=True):
            out[i] = int(t)
    for i in range(n):
        p = params[i]
        if p.greedy:
            continue
        row = filter_logits(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, -1)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out


__all__ = ["filter_logits", "sample"]
