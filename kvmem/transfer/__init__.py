"""A sequence's KV between allocators: export/import in chunks, and live migration.

- :mod:`kvmem.transfer.kv`: :func:`export_meta` / :func:`export_chunks` read
  a sequence's tokens, counts, format scales and stored KV from any
  single-process allocator; :class:`Importer` / :func:`import_kv` build it in
  any allocator with the same KVSpec, all or nothing; :func:`copy_sequence`
  does both in one process.
- :mod:`kvmem.transfer.live`: Llumnix-style live migration over a
  :class:`~kvmem.distributed.transport.Transport` (pre-copy stages while the
  request decodes, then a short stop for the rest).
"""

from kvmem.transfer.kv import (
    Chunk,
    Importer,
    SeqMeta,
    copy_sequence,
    export_chunks,
    export_meta,
    import_kv,
    read_kv,
)
from kvmem.transfer.live import (
    MigrationFailed,
    MigrationStats,
    SourceMigration,
    receive_migration,
)

__all__ = [
    "Chunk",
    "Importer",
    "MigrationFailed",
    "MigrationStats",
    "SeqMeta",
    "SourceMigration",
    "copy_sequence",
    "export_chunks",
    "export_meta",
    "import_kv",
    "read_kv",
    "receive_migration",
]
