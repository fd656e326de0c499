"""kvmem inside Hugging Face transformers (``pip install kvmem[hf]``; transformers >=5.24,<6).

- :class:`KVMemCache`: a ``Cache`` whose KV lives in a kvmem allocator
  (paged, grouped, vmem; every KV format), for ``model.generate(...,
  cache=KVMemCache(model.config, num_tokens=...))``: greedy, sampling,
  left-padded batches, beam search (beams fork and share pages), and prefix
  reuse across calls (:meth:`KVMemCache.prepare`).
- ``attn_implementation="kvmem"``: attention that writes and reads the pages
  in place (registered on import; see :mod:`.attention`). Models on eager
  or SDPA attention get dense K/V gathered from the pages instead.

Example::

    from kvmem.integrations.hf import KVMemCache
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kvmem")
    with KVMemCache(model.config, "paged", num_tokens=65536, device=model.device) as cache:
        out = model.generate(input_ids, cache=cache, num_beams=4, max_new_tokens=64)
"""

from .attention import kvmem_attention, register
from .cache import UNKNOWN_TOKEN, KVMemCache
from .quant import kv_scales_from_state_dict, load_kv_scales

register()

__all__ = [
    "UNKNOWN_TOKEN",
    "KVMemCache",
    "kv_scales_from_state_dict",
    "kvmem_attention",
    "load_kv_scales",
    "register",
]
