"""Token sampling (greedy, temperature, top-k, top-p, per-request seeded streams) and logprobs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvmem.engine.request import Request, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from kvmem.engine.scheduler import ScheduledChunk


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


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], top: int) -> list[TokenLogprob]:
    """Row i's log-probability of ``token_ids[i]`` and its ``top`` most likely tokens.

    ``logits`` is [n, V]; the log-softmax is taken in float32 over the raw
    logits (no temperature, top-k or top-p: those shape sampling, not the
    model's distribution), as OpenAI, vLLM and SGLang report them.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.tensor(token_ids, dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, idx.view(-1, 1)).view(-1)
    k = min(top, lp.shape[-1])
    tv, ti = torch.topk(lp, k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    tvs, tis = tv.tolist(), ti.tolist()
    return [
        TokenLogprob(int(t), float(c), tuple(zip(tis[i], tvs[i], strict=True)))
        for i, (t, c) in enumerate(zip(token_ids, chosen.tolist(), strict=True))
    ]


def sampled_logprobs(
    rows: torch.Tensor, requests: Sequence[Request], token_ids: Sequence[int]
) -> list[TokenLogprob | None]:
    """The logprobs of each request's sampled token (None where it asked for none)."""
    want = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(requests)
    if not want:
        return out
    top = max(requests[i].params.logprobs or 0 for i in want)
    lps = token_logprobs(rows[torch.tensor(want)], [token_ids[i] for i in want], top)
    for i, lp in zip(want, lps, strict=True):
        k = requests[i].params.logprobs or 0
        out[i] = TokenLogprob(lp.token_id, lp.logprob, lp.top[:k])
    return out


def score_prompt(r: Request, start: int, num_tokens: int, rows: torch.Tensor) -> None:
    """Extend ``r.prompt_logprobs`` from the logits of positions ``start..start+num_tokens-1``.

    Row i predicts the token at position ``start + i + 1``; positions already
    scored (a chunk recomputed after preemption) are skipped.
    """
    k = r.params.prompt_logprobs
    if k is None:
        return
    lo = max(len(r.prompt_logprobs) + 1, start + 1)
    hi = min(start + num_tokens, r.num_prompt_tokens - 1)
    if lo > hi:
        return
    sel = rows[lo - 1 - start : hi - start]
    r.prompt_logprobs.extend(token_logprobs(sel, r.token_ids[lo : hi + 1], k))


def sample_requests(
    logits: torch.Tensor, samplers: Sequence[tuple[Request, int]], default: torch.Generator
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Sample each request from its logits row; its token and (if asked for) their logprobs.

    A request without a seed of its own draws from ``default``.
    """
    reqs = [r for r, _ in samplers]
    rows = logits[torch.tensor([i for _, i in samplers], dtype=torch.long)]
    toks = sample(rows, [r.params for r in reqs], [r.generator or default for r in reqs])
    return toks, sampled_logprobs(rows, reqs, toks)


@dataclass
class StepRows:
    """Who reads which logits row after a forward pass."""

    #: (request, its logits row) for every request that samples a token now.
    samplers: list[tuple[Request, int]] = field(default_factory=list)
    #: Requests forked from a parent whose prompt was just computed (they sample too).
    forked: list[Request] = field(default_factory=list)
    #: Requests whose prompt is scored and that generate nothing (``max_tokens`` 0).
    scored: list[Request] = field(default_factory=list)


def read_logits(
    chunks: Sequence[ScheduledChunk],
    logits: torch.Tensor,
    forks_due: Callable[[ScheduledChunk], list[Request]],
) -> StepRows:
    """Score the prompt chunks that ask for it; list who samples from which row.

    ``logits`` has ``chunk.num_logit_rows`` rows per chunk, in chunk order;
    a forked request samples from its parent's row.
    """
    out = StepRows()
    row = 0
    for c in chunks:
        k = c.num_logit_rows
        if c.scores_prompt:
            score_prompt(c.request, c.start, c.num_tokens, logits[row : row + k])
        if c.samples:
            children = forks_due(c)
            out.forked.extend(children)
            for r in (c.request, *children):
                if r.params.max_tokens == 0:
                    out.scored.append(r)
                else:
                    out.samplers.append((r, row + k - 1))
        row += k
    return out


__all__ = [
    "StepRows",
    "filter_logits",
    "read_logits",
    "sample",
    "sample_requests",
    "sampled_logprobs",
    "score_prompt",
    "token_logprobs",
]
