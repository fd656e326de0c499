"""The README's example: one request through the paged allocator and attention."""

import torch

from kvmem import KVSpec, create_allocator
from kvmem.attention import decode, prefill, write_kv

spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, kv_format="fp8")
with create_allocator("paged", spec, num_tokens=4096, page_size=16) as kv:
    prompt = list(range(100))
    cached = kv.add("req-1", prompt)  # leading tokens already in the prefix cache
    kv.reserve("req-1", len(prompt) - cached)  # room for the prompt's KV (or OutOfKVMemory)
    lay = kv.layout([("req-1", len(prompt) - cached)])  # page table + slots, FlashInfer-style
    for i in range(spec.num_layers):
        k, v = torch.randn(2, lay.num_tokens, 2, 64)  # the model's K/V for the new tokens
        write_kv(kv.layer(i), lay, k, v)  # quantize to fp8 and store at lay.slot_mapping
        out, lse = prefill(torch.randn(lay.num_tokens, 8, 64), kv.layer(i), lay)  # GQA 8:2
    kv.commit("req-1", lay.num_tokens)
    kv.append("req-1", [42])  # the sampled token; its KV is written by the next step
    kv.reserve("req-1", 1)
    lay = kv.layout([("req-1", 1)])
    out, lse = decode(torch.randn(1, 8, 64), kv.layer(0), lay)
    print(out.shape, kv.stats().used_tokens, "slots in use")
