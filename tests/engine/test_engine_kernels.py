"""The engine on the Triton kernels gives the reference's greedy tokens (CPU: the interpreter)."""

from __future__ import annotations

import importlib

import pytest
import torch

from kvmem import attention
from kvmem.engine import Engine, SamplingParams, random_model

pytestmark = pytest.mark.skipif(
    "triton" not in attention.IMPLS, reason="no Triton attention implementation in this tree"
)


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton in the interpreter when there is no GPU (set before the kernels import)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        for mod in ("triton.experimental.gluon", "kvmem.attention.triton"):  # in this order
            importlib.import_module(mod)
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_greedy_equals_reference(interpret):
    model = random_model("tiny", seed=0).to(interpret)
    prompts, p = ["Hello world", "KV"], SamplingParams(max_tokens=6, ignore_eos=True)
    outs = {}
    for impl in ("reference", "triton"):
        eng = Engine(model, attention_impl=impl, max_num_batched_tokens=8)
        outs[impl] = [c.output_token_ids for c in eng.generate(prompts, p)]
    assert outs["triton"] == outs["reference"]
