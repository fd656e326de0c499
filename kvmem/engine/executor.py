"""Executors: run one scheduled batch and return the logits to sample from.

:class:`ModelExecutor` runs a :class:`~kvmem.engine.model.LlamaModel` over
the allocator's :class:`~kvmem.layout.BatchLayout`. The scheduling
benchmark swaps in :class:`~kvmem.engine.simulate.SimulatedExecutor`, which
charges a cost model to a simulated clock instead, so the scheduling code
under test is the same.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from kvmem.allocator import KVAllocator
from kvmem.engine.model import LlamaModel
from kvmem.engine.scheduler import ScheduledChunk
from kvmem.spec import KVSpec


class Executor(ABC):
    """Runs batches; knows the model's context length, vocabulary and KV shape."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    #: Where the KV should live (the model's device).
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def kv_spec(self, kv_format: str = "auto", **options: object) -> KVSpec:
        """The KV cache the model needs."""

    @abstractmethod
    def execute(self, chunks: Sequence[ScheduledChunk], allocator: KVAllocator) -> torch.Tensor:
        """Compute the chunks' KV (slots reserved); return float32 logits [num sampling chunks, V].

        Rows follow the order of the chunks whose ``samples`` is true.
        """


class ModelExecutor(Executor):
    """A real forward pass of a Llama-architecture model."""

    def __init__(self, model: LlamaModel, attention_impl: str = "auto") -> None:
        self.model = model
        self.model.attention_impl = attention_impl
        cfg = model.config
        self.max_model_len = cfg.max_position_embeddings
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = tuple(cfg.eos_token_ids)
        self.device = model.device

    def kv_spec(self, kv_format: str = "auto", **options: object) -> KVSpec:
        """The model's KV shape in ``kv_format``."""
        return self.model.kv_spec(kv_format, **options)

    def execute(self, chunks: Sequence[ScheduledChunk], allocator: KVAllocator) -> torch.Tensor:
        """One forward over the flattened chunks."""
        layout = allocator.layout([(c.request.request_id, c.num_tokens) for c in chunks])
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        for c in chunks:
            ids.extend(c.request.token_ids[c.start : c.start + c.num_tokens])
            pos.extend(range(c.start, c.start + c.num_tokens))
            if c.samples:
                rows.append(len(ids) - 1)
        dev = self.model.device
        return self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            layout.to(dev) if layout.slot_mapping.device != dev else layout,
            allocator,
            torch.tensor(rows, dtype=torch.long, device=dev),
        )


__all__ = ["Executor", "ModelExecutor"]
