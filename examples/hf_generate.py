"""Generate with a transformers model whose KV cache lives in kvmem memory.

    python examples/hf_generate.py                      # a small random-weight Llama
    python examples/hf_generate.py path/to/llama-dir    # a local checkpoint (with its tokenizer)

Shows greedy decoding on a left-padded batch, beam search whose beams share
pages, and a second call that reuses the first call's prompt prefix.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kvmem.integrations.hf import KVMemCache  # also registers attn_implementation="kvmem"


def load(path: str | None) -> tuple[Any, Any]:
    """The model (and tokenizer) at ``path``, else a random-weight 2-layer Llama."""
    if path:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kvmem")
        try:
            tok = AutoTokenizer.from_pretrained(path, padding_side="left")
        except (OSError, ValueError):  # a checkpoint without tokenizer files
            return model.eval(), None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return model.eval(), tok
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("kvmem")
    return model, None


def main() -> None:
    """Greedy on a padded batch, beam search, then prefix reuse, on one KVMemCache."""
    model, tok = load(sys.argv[1] if len(sys.argv) > 1 else None)
    if tok is not None:
        system = "You are a helpful assistant. Answer briefly.\n"
        texts = [system + "What is a KV cache?", system + "Name a prime number."]
        batch = tok(texts, return_tensors="pt", padding=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]
    else:
        ids = torch.randint(1, model.config.vocab_size, (2, 24))
        mask = torch.ones_like(ids)
        ids[1, :6], mask[1, :6] = 0, 0  # the second prompt is shorter: left padding

    with KVMemCache(model.config, "paged", num_tokens=8192, device=model.device) as cache:
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=16)
        print("greedy:", out[:, ids.shape[1] :].tolist())
        print(f"  KV held: {cache.kv_bytes()} bytes for {len(cache.seq_ids())} sequences")

        cache.reset()
        out = model.generate(ids[:1], cache=cache, num_beams=4, max_new_tokens=16)
        print("beam search:", out[:, ids.shape[1] :].tolist())
        stats = cache.allocator.stats()
        print(
            f"  4 beams hold {stats.used_tokens} token slots (one beam alone: {ids.shape[1] + 16})"
        )

        first = cache.prepare(ids[:1])  # prompt ids known: its full pages become reusable
        model.generate(ids[:1], cache=cache, max_new_tokens=4)
        second = torch.cat([ids[:1], ids[:1, :8]], 1)  # the same prompt, and more
        present = cache.prepare(second)
        model.generate(second, cache=cache, max_new_tokens=4)
        print(f"prefix reuse: {first} then {present} of {second.shape[1]} positions already cached")


if __name__ == "__main__":
    main()
