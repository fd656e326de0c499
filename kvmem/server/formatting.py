"""OpenAI response shapes: completions and chat choices, stream chunks, usage and logprobs.

Logprobs take OpenAI's two shapes. Completions (the legacy shape that
lm-evaluation-harness reads)::

    {"tokens": ["Hel", "lo"], "token_logprobs": [null, -2.1],
     "top_logprobs": [null, {"lo": -2.1, "p": -2.3}], "text_offset": [0, 3]}

one entry per token of the choice's text (the prompt's first, with
``echo``: its first token has no logprob, so null); ``top_logprobs`` holds
the ``logprobs`` most likely tokens plus the chosen one; ``text_offset`` is
each token's offset in the concatenated token strings (the choice's text,
unless a token decodes to part of a character or a stop string cut it). Chat::

    {"content": [{"token": "lo", "logprob": -2.1, "bytes": [108, 111],
                  "top_logprobs": [{"token": "lo", "logprob": -2.1, "bytes": [...]}]}]}

Token strings are the tokenizer's decoding of each token alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvmem.engine import RequestOutput, TokenLogprob
from kvmem.engine.tokenizer import Tokenizer
from kvmem.server.protocol import APIError

#: A position of the logprob shapes: token id and logprobs (None for the prompt's first token).
Position = tuple[int, TokenLogprob | None]


@dataclass
class Sample:
    """One sample's whole output, collected from its stream."""

    prompt_index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    @classmethod
    def collect(cls, prompt_index: int, outs: Sequence[RequestOutput]) -> Sample:
        """The sample made of a finished stream's outputs (500 if the request failed)."""
        last = outs[-1]
        if last.finish_reason in ("error", "abort"):
            raise APIError(
                500,
                f"the request failed: {last.error or last.finish_reason}",
                type="server_error",
                code="request_failed",
            )
        s = cls(prompt_index, finish_reason=last.finish_reason)
        for o in outs:
            s.token_ids += o.new_token_ids
            s.text += o.new_text
            s.logprobs += o.logprobs or []
            if o.prompt_logprobs is not None:
                s.prompt_logprobs = o.prompt_logprobs
        return s

    @property
    def cumulative_logprob(self) -> float:
        """The sum of the generated tokens' logprobs (what ``best_of`` ranks by)."""
        return sum(lp.logprob for lp in self.logprobs)


class Formatter:
    """Builds one request's OpenAI response objects.

    ``logprobs`` is what the client asked for (None: no logprobs in the
    response, even if the engine computed them for ``best_of``).
    """

    def __init__(
        self,
        rid: str,
        model: str,
        chat: bool,
        token_ids: bool,
        tokenizer: Tokenizer,
        logprobs: int | None = None,
    ) -> None:
        self.rid, self.model, self.chat, self.token_ids = rid, model, chat, token_ids
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.created = int(time.time())
        self.obj = "chat.completion" if chat else "text_completion"
        self._offsets: dict[int, int] = {}  # choice index -> text offset so far (streams)

    @staticmethod
    def usage(n_prompt: int, n_out: int, n_cached: int = 0) -> dict[str, Any]:
        """OpenAI's ``usage`` object; ``n_cached`` prompt tokens came from the prefix cache."""
        return {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": n_cached},
        }

    # --------------------------------------------------------------- logprobs
    def _token(self, tok: int) -> str:
        return self.tokenizer.decode([tok])

    def completion_logprobs(self, positions: Sequence[Position], offset: int) -> dict[str, Any]:
        """The completions shape for ``positions``, text offsets counted from ``offset``."""
        k = self.logprobs or 0
        tokens: list[str] = []
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for tok, lp in positions:
            s = self._token(tok)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            if lp is None:
                lps.append(None)
                tops.append(None)
                continue
            lps.append(lp.logprob)
            top: dict[str, float] = {}
            for t, v in (*lp.top[:k], (tok, lp.logprob)):
                top.setdefault(self._token(t), v)  # tokens that read alike: the likeliest
            tops.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _chat_entry(self, tok: int, lp: float) -> dict[str, Any]:
        s = self._token(tok)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    def chat_logprobs(self, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
        """The chat shape for generated tokens ``lps``."""
        k = self.logprobs or 0
        content = []
        for lp in lps:
            e = self._chat_entry(lp.token_id, lp.logprob)
            e["top_logprobs"] = [self._chat_entry(t, v) for t, v in lp.top[:k]]
            content.append(e)
        return {"content": content, "refusal": None}

    # ---------------------------------------------------------------- choices
    def choice(
        self, index: int, s: Sample, prompt_ids: list[int] | None, prompt_text: str | None
    ) -> dict[str, Any]:
        """One choice of a full response; with ``prompt_ids`` the prompt is echoed first."""
        ch: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": s.finish_reason}
        if self.chat:
            ch["message"] = {"role": "assistant", "content": s.text}
            if self.logprobs is not None:
                ch["logprobs"] = self.chat_logprobs(s.logprobs)
        else:
            text = s.text if prompt_ids is None else (prompt_text or "") + s.text
            ch["text"] = text
            if self.logprobs is not None:
                pos: list[Position] = []
                if prompt_ids is not None:
                    pos.append((prompt_ids[0], None))
                    pos += [(lp.token_id, lp) for lp in s.prompt_logprobs or []]
                pos += [(lp.token_id, lp) for lp in s.logprobs]
                ch["logprobs"] = self.completion_logprobs(pos, 0)
        if self.token_ids:
            ch["token_ids"] = s.token_ids
        return ch

    def full(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
        """A whole (non-streamed) response."""
        return {
            "id": self.rid,
            "object": self.obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }

    # ----------------------------------------------------------------- chunks
    def chunk(
        self, choices: list[dict[str, Any]], usage: dict[str, Any] | None, with_usage: bool
    ) -> str:
        """One server-sent event carrying ``choices`` (and ``usage`` if ``with_usage``)."""
        c: dict[str, Any] = {
            "id": self.rid,
            "object": self.obj + ".chunk" if self.chat else self.obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if with_usage:
            c["usage"] = usage
        return f"data: {json.dumps(c, separators=(',', ':'))}\n\n"

    def delta(
        self,
        index: int,
        outs: Sequence[RequestOutput],
        finish: str | None,
        role: bool = False,
    ) -> dict[str, Any]:
        """One choice of a stream chunk: the text, tokens and logprobs of ``outs``."""
        text = "".join(o.new_text for o in outs)
        toks = [t for o in outs for t in o.new_token_ids]
        lps = [lp for o in outs for lp in o.logprobs or []]
        ch: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish}
        if self.chat:
            d: dict[str, Any] = {"role": "assistant"} if role else {}
            if text or role or finish is None:
                d["content"] = text
            ch["delta"] = d
            if self.logprobs is not None and lps:
                ch["logprobs"] = self.chat_logprobs(lps)
        else:
            ch["text"] = text
            if self.logprobs is not None and lps:
                offset = self._offsets.get(index, 0)
                shaped = self.completion_logprobs([(lp.token_id, lp) for lp in lps], offset)
                ch["logprobs"] = shaped
                self._offsets[index] = offset + sum(len(t) for t in shaped["tokens"])
        if self.token_ids:
            ch["token_ids"] = toks
        return ch


def error_event(message: str) -> str:
    """The server-sent event of a request that failed mid-stream."""
    err = APIError(500, message, type="server_error", code="request_failed")
    return f"data: {json.dumps(err.body())}\n\n"


__all__ = ["Formatter", "Position", "Sample", "error_event"]
