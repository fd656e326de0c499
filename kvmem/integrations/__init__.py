"""Integrations of kvmem memory into other libraries (each an optional extra).

- :mod:`kvmem.integrations.hf`: a Hugging Face transformers ``Cache`` on kvmem
  memory and an ``attn_implementation="kvmem"`` that reads pages in place
  (``pip install kvmem[hf]``).
"""
