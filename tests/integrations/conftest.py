"""Tiny random-weight transformers models (2 layers, hidden 64) and a KVMemCache factory."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

if not torch.cuda.is_available():  # the Triton kernels run in the interpreter (see tests/attention)
    _prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    with contextlib.suppress(ImportError):
        import triton.experimental.gluon  # noqa: F401

    import kvmem.attention.triton  # noqa: F401

    if _prev is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _prev

from kvmem.integrations.hf import KVMemCache  # noqa: E402

#: Small allocators for each in-process backend the integration supports.
BACKENDS: dict[str, dict[str, Any]] = {
    "paged": {"page_size": 4},
    "grouped": {"page_size": 4, "max_group_pages": 4},
    "vmem": {"page_bytes": 4096, "max_seqs": 64, "max_seq_len": 1024, "map_ahead": False},
}

MODELS = ("llama", "qwen2", "mistral")
VOCAB = 128
PAD = 0


def tiny_config(kind: str, **overrides: Any) -> Any:
    """A 2-layer, hidden-64 config of ``kind`` with GQA (4 query heads, 2 KV heads)."""
    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=None,
    )
    common.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[kind]
    return cls(**common)


def tiny_model(kind: str, seed: int = 0, **overrides: Any) -> Any:
    """A random-weight fp32 causal LM of ``kind`` in eval mode, on SDPA attention."""
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[kind]
    torch.manual_seed(seed)
    model = cls(tiny_config(kind, **overrides)).eval()
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module", params=MODELS)
def model(request: pytest.FixtureRequest) -> Any:
    """Each tiny model in turn (shared by a module's tests; reset to SDPA after each use)."""
    return tiny_model(request.param)


def make_cache(model: Any, backend: str = "paged", num_tokens: int = 4096, **kw: Any) -> KVMemCache:
    """A KVMemCache for ``model`` on a small ``backend`` allocator, reference kernels by default."""
    kw.setdefault("attn_impl", "reference")
    return KVMemCache(model.config, backend, num_tokens=num_tokens, **{**BACKENDS[backend], **kw})


def prompts(batch: int, length: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random prompts, left-padded by 0, 3, 5, 1, ... tokens, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        for i in range(batch):
            p = (0, 3, 5, 1)[i % 4]
            ids[i, :p] = PAD
            mask[i, :p] = 0
    return ids, mask
