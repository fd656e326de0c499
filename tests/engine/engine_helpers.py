"""Helpers shared by the engine tests."""

from __future__ import annotations

from collections.abc import Sequence

from kvmem.engine import Engine, SamplingParams

#: Prompts of different lengths (bytes = tokens), some sharing a prefix.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog, again and again and again.",
    "KV",
    "The quick brown fox jumps over the lazy dog, then sleeps.",
    "Once upon a time, in a land of paged memory,",
    "0123456789 abcdefghij",
]


def run_checked(engine: Engine, prompts: Sequence[str], params: SamplingParams) -> list[list[int]]:
    """Generate, checking the allocator's integrity after every step and that nothing leaks."""
    ids = [engine.add_request(p, params) for p in prompts]
    toks: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            toks[o.request_id].extend(o.new_token_ids)
        engine.allocator.check_integrity()
    stats = engine.allocator.stats()
    assert stats.used_tokens == 0 and stats.num_seqs == 0, "KV leaked"
    return [toks[i] for i in ids]
