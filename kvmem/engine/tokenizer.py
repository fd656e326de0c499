"""Tokenizers: a byte-level one by default, a local ``tokenizer.json`` when there is one.

The byte tokenizer maps each UTF-8 byte to its value (0..255) and adds
three specials: BOS 256, EOS 257, PAD 258 (vocabulary 259, the random
presets' size). :class:`IncrementalDecoder` turns a growing list of token
ids into text deltas without splitting multi-byte characters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from kvmem.errors import InvalidArgument


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens dropped)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus BOS/EOS/PAD."""

    BOS, EOS, PAD = 256, 257, 258

    def __init__(self, add_bos: bool = False) -> None:
        self.vocab_size = 259
        self.eos_token_ids: tuple[int, ...] = (self.EOS,)
        self.add_bos = add_bos

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` (after BOS when ``add_bos``)."""
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if self.add_bos else ids

    def decode(self, ids: list[int]) -> str:
        """Bytes back to text; invalid sequences become U+FFFD, specials are dropped."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library (no network)."""

    def __init__(self, path: str | Path, eos_token_ids: tuple[int, ...] = ()) -> None:
        from tokenizers import Tokenizer as _Tok

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise InvalidArgument(f"no tokenizer.json at {p}")
        self._tok = _Tok.from_file(str(p))
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_token_ids = tuple(eos_token_ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (the tokenizer's own post-processing applies)."""
        return list(self._tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens skipped."""
        return str(self._tok.decode(list(ids), skip_special_tokens=True))


def load_tokenizer(path: str | Path | None, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    """``tokenizer.json`` in ``path`` if present, else the byte tokenizer."""
    if path is not None and (Path(path) / "tokenizer.json").is_file():
        return HFTokenizer(path, eos_token_ids)
    return ByteTokenizer()


class IncrementalDecoder:
    """Text deltas of a growing token list; holds back an incomplete trailing character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def feed(self, new_ids: list[int]) -> str:
        """Add ``new_ids``; return the text they complete."""
        self.ids.extend(new_ids)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):
            full = full.rstrip("\ufffd")
        if not full.startswith(self.text):
            # the tokenizer rewrote earlier text (rare); emit nothing until it settles
            return ""
        delta = full[len(self.text) :]
        self.text = full
        return delta

    def flush(self) -> str:
        """Everything left, replacement characters included (call when the stream ends)."""
        full = self.tokenizer.decode(self.ids)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text = full
        return delta


__all__ = ["ByteTokenizer", "HFTokenizer", "IncrementalDecoder", "Tokenizer", "load_tokenizer"]
