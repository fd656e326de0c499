"""KV backends. Each module registers itself with :func:`kvmem.allocator.register_backend`."""
