"""Chat templates: the model's own (a Jinja ``chat_template``) or a simple one for byte models.

The default template, used with the byte tokenizer and with checkpoints
that ship no template, writes each message as a role tag line and its
text, then opens the assistant's turn::

    <|system|>
    You are terse.
    <|user|>
    Hi!
    <|assistant|>

A checkpoint directory's ``tokenizer_config.json`` (or
``chat_template.jinja``) template is rendered as transformers renders it:
in a sandboxed Jinja environment with ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmem.server.protocol import APIError, ChatMessage

log = logging.getLogger(__name__)


def _token_text(tok: Any) -> str:
    if isinstance(tok, dict):
        return str(tok.get("content", ""))
    return "" if tok is None else str(tok)


class ChatTemplate:
    """Turns chat messages into one prompt string."""

    def __init__(
        self, template: str | None = None, bos_token: str = "", eos_token: str = ""
    ) -> None:
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled: Any = None
        if template is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message: str) -> None:
                raise APIError(
                    400, f"the chat template refused the messages: {message}", param="messages"
                )

            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(template)

    @classmethod
    def from_dir(cls, path: str | Path | None) -> ChatTemplate:
        """The template of a checkpoint directory, or the default one if it has none."""
        if path is None:
            return cls()
        root = Path(path)
        cfg_path = root / "tokenizer_config.json"
        cfg: dict[str, Any] = {}
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
        template = cfg.get("chat_template")
        jinja_file = root / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None:
            return cls()
        try:
            return cls(
                str(template), _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
            )
        except ImportError:
            log.warning("jinja2 is not installed: using the default chat template")
            return cls()

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages``."""
        if self._compiled is None:
            text = "".join(f"<|{m.role}|>\n{m.text()}\n" for m in messages)
            return text + ("<|assistant|>\n" if add_generation_prompt else "")
        msgs = [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in messages
        ]
        try:
            return str(
                self._compiled.render(
                    messages=msgs,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
            )
        except APIError:
            raise
        except Exception as e:  # a template bug is the deployment's, but say what it was
            raise APIError(500, f"the chat template failed: {e}", type="server_error") from None


__all__ = ["ChatTemplate"]
