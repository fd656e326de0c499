"""What the scheduler hands the engine for one step: the chunks to run, their KV, what it ended."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmem.engine.request import Request
from kvmem.layout import BatchLayout
from kvmem.storage import LayerKV


@dataclass(frozen=True)
class ScheduledChunk:
    """``num_tokens`` tokens of ``request`` starting at token ``start`` run this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether the chunk reaches the last known token (its logits give the next token)."""
        return self.start + self.num_tokens == self.request.num_tokens

    @property
    def scores_prompt(self) -> bool:
        """Whether the executor returns logits of every row (prompt logprobs are asked for)."""
        r = self.request
        return (
            r.params.prompt_logprobs is not None
            and r.num_output_tokens == 0
            and self.start < r.num_prompt_tokens
        )

    @property
    def num_logit_rows(self) -> int:
        """Rows of logits the executor returns for this chunk (all, the last, or none)."""
        return self.num_tokens if self.scores_prompt else int(self.samples)

    @property
    def is_decode(self) -> bool:
        """One token that the model generated (not part of a prompt or a recomputation)."""
        r = self.request
        return self.num_tokens == 1 and self.start == r.num_tokens - 1 and r.num_output_tokens > 0


@dataclass(frozen=True)
class StepKV:
    """The KV memory one step's forward pass reads and writes, as the scheduler hands it out.

    ``layout`` places the batch's new tokens (in chunk order) and all of
    their sequences' KV; ``layers[i]`` is layer i's storage.
    """

    layout: BatchLayout
    layers: tuple[LayerKV, ...]


@dataclass
class SchedulerOutput:
    """One step's plan."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    #: Requests the scheduler ended (their KV already freed), with the reason and error text.
    ended: list[tuple[Request, str, str | None]] = field(default_factory=list)
    #: The chunks' layout and the layers' KV (None without chunks, or if not ``builds_kv``).
    kv: StepKV | None = None

    @property
    def num_decode_tokens(self) -> int:
        """Decode rows in the batch."""
        return sum(1 for c in self.chunks if c.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        """Prompt (and recomputation) rows in the batch."""
        return sum(c.num_tokens for c in self.chunks if not c.is_decode)


__all__ = ["ScheduledChunk", "SchedulerOutput", "StepKV"]
