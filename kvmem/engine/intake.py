"""The checks a request passes before the engine queues it (``Engine.add_request``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvmem.engine.errors import InvalidRequest
from kvmem.engine.request import SamplingParams


def prompt_token_ids(engine: Any, prompt: str | Sequence[int], params: object) -> list[int]:
    """The prompt's token ids, checked against ``engine``'s vocabulary, context and KV pool.

    Raises :class:`InvalidRequest` for params that are not SamplingParams, an
    empty prompt, token ids outside the vocabulary, a prompt that leaves no
    room for output within ``max_model_len``, or one larger than the whole KV
    capacity.
    """
    if not isinstance(params, SamplingParams):
        raise InvalidRequest(f"params must be SamplingParams, got {type(params).__name__}")
    if isinstance(prompt, str):
        ids = engine.tokenizer.encode(prompt)
    else:
        try:
            ids = [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise InvalidRequest("a prompt is a string or a sequence of token ids") from None
    if not ids:
        raise InvalidRequest("the prompt is empty")
    vocab = engine.executor.vocab_size
    if engine.config.detokenize and (min(ids) < 0 or max(ids) >= vocab):
        raise InvalidRequest(f"prompt token ids must be in 0..{vocab - 1}")
    if len(ids) >= engine.max_model_len:
        raise InvalidRequest(
            f"the prompt has {len(ids)} tokens; the model's context is {engine.max_model_len} "
            "and must leave room for at least one generated token"
        )
    if len(ids) > engine.kv_capacity_tokens:
        raise InvalidRequest(
            f"the prompt has {len(ids)} tokens, more than the whole KV capacity "
            f"({engine.kv_capacity_tokens} tokens)"
        )
    return ids


def check_priority(priority: object) -> int:
    """``priority`` if it is an int (not a bool), else :class:`InvalidRequest`."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidRequest(f"priority must be an int, got {priority!r}")
    return priority


__all__ = ["check_priority", "prompt_token_ids"]
