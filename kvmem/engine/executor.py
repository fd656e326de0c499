"""Executors: run one scheduled batch and return the logits to sample from.

:class:`ModelExecutor` runs a :class:`~kvmem.engine.model.LlamaModel` over
the step's :class:`~kvmem.engine.scheduler.StepKV` (the batch layout and
the layers' KV, handed out by the engine: an executor never calls the
allocator). Its attention backend is chosen once, in :meth:`Executor.prepare`.
The scheduling benchmark swaps in
:class:`~kvmem.engine.simulate.SimulatedExecutor`, which charges a cost
model to a simulated clock instead, so the scheduling code under test is
the same.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from kvmem.attention import AttentionBackend, stage_layout
from kvmem.engine.model import LlamaModel
from kvmem.engine.scheduler import ScheduledChunk, StepKV
from kvmem.errors import InvalidArgument
from kvmem.spec import KVSpec


class Executor(ABC):
    """Runs batches; knows the model's context length, vocabulary and KV shape."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    #: Where the KV should live (the model's device).
    device: torch.device = torch.device("cpu")
    #: False for an executor that never reads KV (a simulation): it is then handed none.
    uses_kv: ClassVar[bool] = True

    @abstractmethod
    def kv_spec(self, kv_format: str = "auto", **options: object) -> KVSpec:
        """The KV cache the model needs."""

    def prepare(self, spec: KVSpec) -> None:
        """Get ready to run over KV of ``spec`` (once, when the engine is built).

        Raises a :class:`~kvmem.errors.KVError` when the executor cannot.
        The default has nothing to prepare.
        """
        return None

    @abstractmethod
    def execute(self, chunks: Sequence[ScheduledChunk], kv: StepKV | None) -> torch.Tensor:
        """Compute the chunks' KV into ``kv``; return float32 logits [rows, V].

        Each chunk contributes ``chunk.num_logit_rows`` rows, in chunk order:
        its last row when it ``samples``, every row when it ``scores_prompt``
        (an executor that never sees prompt-logprob requests may return the
        sampling rows only).
        ``kv`` is None only for an executor whose ``uses_kv`` is False.
        """


class ModelExecutor(Executor):
    """A real forward pass of a Llama-architecture model."""

    def __init__(
        self, model: LlamaModel, attention_impl: str = "auto", fp8_headroom: float | None = 2.0
    ) -> None:
        if fp8_headroom is not None and not fp8_headroom >= 1.0:
            raise InvalidArgument(f"fp8_headroom must be >= 1 or None, got {fp8_headroom!r}")
        self.model = model
        self.attention_impl = attention_impl
        self.fp8_headroom = fp8_headroom
        self.attention: AttentionBackend | None = None
        cfg = model.config
        self.max_model_len = cfg.max_position_embeddings
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = tuple(cfg.eos_token_ids)
        self.device = model.device

    def kv_spec(self, kv_format: str = "auto", **options: object) -> KVSpec:
        """The model's KV shape in ``kv_format``."""
        return self.model.kv_spec(kv_format, **options)

    def prepare(self, spec: KVSpec) -> None:
        """Choose the attention backend (``attention_impl``, ``auto`` resolved) once.

        With FP8 KV it calibrates each layer's scales from the first K/V written
        (``fp8_headroom``; :meth:`~kvmem.attention.AttentionBackend.calibrate`).
        """
        self.attention = self.model.attention_backend(spec, self.attention_impl)
        self.attention.fp8_headroom = self.fp8_headroom

    def execute(self, chunks: Sequence[ScheduledChunk], kv: StepKV | None) -> torch.Tensor:
        """One forward over the flattened chunks."""
        if self.attention is None or kv is None:
            raise InvalidArgument("ModelExecutor.execute needs prepare and the step's KV")
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        for c in chunks:
            ids.extend(c.request.token_ids[c.start : c.start + c.num_tokens])
            pos.extend(range(c.start, c.start + c.num_tokens))
            k = c.num_logit_rows
            rows.extend(range(len(ids) - k, len(ids)))
        dev = self.model.device
        return self.model(
            _to_device(ids, dev),
            _to_device(pos, dev),
            stage_layout(kv.layout, dev),
            kv.layers,
            _to_device(rows, dev),
            self.attention,
        )


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


__all__ = ["Executor", "ModelExecutor"]
