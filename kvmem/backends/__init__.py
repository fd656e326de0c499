"""KV backends; the registry in :mod:`kvmem.allocator` names them."""
