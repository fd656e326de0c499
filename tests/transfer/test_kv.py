"""Export/import of a sequence's KV between allocators of every single-process backend."""

from __future__ import annotations

import pytest
import torch

from kvmem import KVSpec, OutOfKVMemory, create_allocator
from kvmem.errors import InvalidArgument
from kvmem.transfer import copy_sequence, export_chunks, export_meta, import_kv

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, kv_format="fp32")
OPTS = {
    "paged": {"page_size": 16},
    "grouped": {"page_size": 8},
    "vmem": {"max_seq_len": 256, "max_seqs": 4},
}


def _make(kind: str, num_tokens: int = 512, spec: KVSpec = SPEC):
    return create_allocator(kind, spec, num_tokens=num_tokens, device="cpu", **OPTS[kind])


def _fill(alloc, seq_id: str, n: int, seed: int) -> list[int]:
    """Register ``seq_id`` with ``n`` tokens and write random KV into every slot part."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (n + 1,), generator=g).tolist()
    alloc.add(seq_id, tokens)
    alloc.reserve(seq_id, n)
    slots = alloc.layout([(seq_id, n)]).slot_mapping.to(torch.int64)
    for i in range(alloc.spec.num_layers):
        layer = alloc.layer(i)
        for t in (layer.k, layer.v):
            ps = t.shape[1]
            vals = torch.randn((n, *t.shape[2:]), generator=g).to(t.dtype)
            t[slots // ps, slots % ps] = vals
    alloc.commit(seq_id, n)
    return tokens


def _kv(alloc, seq_id: str) -> list[torch.Tensor]:
    return [p for c in export_chunks(alloc, seq_id, chunk_tokens=1000) for p in c.parts]


@pytest.mark.parametrize(
    ("src_kind", "dst_kind"),
    [("paged", "vmem"), ("grouped", "paged"), ("vmem", "grouped"), ("paged", "paged")],
)
def test_a_copied_sequence_has_the_same_tokens_counts_and_kv(src_kind, dst_kind):
    with _make(src_kind) as src, _make(dst_kind) as dst:
        tokens = _fill(src, "s", 45, seed=3)
        dst.add("other", [1, 2, 3])  # the destination's own state must stay intact
        copy_sequence(src, "s", tokens, dst, chunk_tokens=16)
        a, b = src.seq_info("s"), dst.seq_info("s")
        assert (b.num_tokens, b.num_computed) == (a.num_tokens, a.num_computed) == (46, 45)
        for x, y in zip(_kv(src, "s"), _kv(dst, "s"), strict=True):
            assert torch.equal(x, y)
        dst.check_integrity()
        src.check_integrity()


def test_an_import_without_room_frees_what_it_took_and_raises():
    with _make("paged") as src, _make("paged", num_tokens=32) as dst:
        tokens = _fill(src, "s", 45, seed=4)
        before = dst.stats()
        with pytest.raises(OutOfKVMemory):
            copy_sequence(src, "s", tokens, dst, chunk_tokens=16)
        assert "s" not in dst and dst.stats().used_tokens == before.used_tokens
        dst.check_integrity()


def test_a_different_spec_or_token_count_is_refused():
    other = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, kv_format="fp32")
    with _make("paged") as src, _make("paged", spec=other) as dst:
        tokens = _fill(src, "s", 20, seed=5)
        with pytest.raises(InvalidArgument, match="tokens given"):
            export_meta(src, "s", tokens[:-1])
        meta = export_meta(src, "s", tokens)
        with pytest.raises(InvalidArgument, match="KVSpec"):
            import_kv(dst, "s", meta, export_chunks(src, "s"))
        assert "s" not in dst


def test_an_interrupted_stream_leaves_nothing_behind():
    with _make("paged") as src, _make("vmem") as dst:
        tokens = _fill(src, "s", 40, seed=6)
        meta = export_meta(src, "s", tokens)

        def broken():
            yield from list(export_chunks(src, "s", chunk_tokens=16))[:1]
            raise RuntimeError("stream cut")

        with pytest.raises(RuntimeError):
            import_kv(dst, "s", meta, broken())
        assert "s" not in dst and dst.stats().used_tokens == 0

        def source_short():  # the source fails with a KV error of its own mid-stream
            yield from list(export_chunks(src, "s", chunk_tokens=16))[:1]
            raise OutOfKVMemory("the source could not read its page table")

        with pytest.raises(OutOfKVMemory):
            import_kv(dst, "s", meta, source_short())
        assert "s" not in dst and dst.stats().used_tokens == 0
        with pytest.raises(InvalidArgument, match="16 of 40"):
            import_kv(dst, "s", meta, list(export_chunks(src, "s", chunk_tokens=16))[:1])
        assert "s" not in dst
