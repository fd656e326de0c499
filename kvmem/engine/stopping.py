"""When a request stops, and how much of its text is safe to stream.

Stop conditions: an EOS token (unless ``ignore_eos``), one of
``stop_token_ids``, ``max_tokens``, the model's context, or a stop string in
the text. Text that could be the start of a stop string is held back until
it is known not to be one::

    stop = ("###",)     text so far "answer: 42 #"   streamed "answer: 42 "  held "#"
                        next token "#x"              streamed "##x" (not a stop string)
"""

from __future__ import annotations

from collections.abc import Collection

from kvmem.engine.request import Request


def stop_reason(
    r: Request, tok: int, eos_token_ids: Collection[int], max_model_len: int
) -> str | None:
    """``"stop"`` or ``"length"`` if ``r`` ends with its newest token ``tok``, else None."""
    p = r.params
    if (not p.ignore_eos and tok in eos_token_ids) or tok in p.stop_token_ids:
        return "stop"
    if r.num_output_tokens >= p.max_tokens or r.num_tokens >= max_model_len:
        return "length"
    return None


def advance_text(r: Request, tok: int | None, final: bool) -> tuple[str, bool]:
    """Decode ``tok`` into ``r.text``; return the text now safe to stream and whether a stop
    string matched.

    A matched stop string and all after it are cut from ``r.text``;
    ``r.emitted`` advances past what is returned. Without a decoder
    (``detokenize=False``) there is no text.
    """
    if r.decoder is None:
        return "", False
    old = len(r.text)
    if tok is not None:
        r.text += r.decoder.feed([tok])
    if final:
        r.text += r.decoder.flush()
    stopped = False
    for s in r.params.stop:
        i = r.text.find(s, max(0, old - len(s) + 1))
        if i >= 0:
            r.text = r.text[:i]
            stopped = True
    hold = 0
    if not (final or stopped):
        for s in r.params.stop:
            for k in range(min(len(s) - 1, len(r.text)), hold, -1):
                if r.text.endswith(s[:k]):
                    hold = k
                    break
    end = len(r.text) - hold
    new = r.text[r.emitted : end] if end > r.emitted else ""
    r.emitted = max(r.emitted, end)
    return new, stopped


__all__ = ["advance_text", "stop_reason"]
