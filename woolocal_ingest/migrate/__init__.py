"""Re-embed an existing store (LangChain JS, LangChain Python, or a woolocal store) with a local model.

`migrate_store(source, to, config=...)` reads the source with `legacy.read_legacy_store` (old vectors are never
reused), re-chunks texts longer than the new model's limit, embeds the rows in checkpointed batches, writes a store
in this project's format with `stores.write_store` (temp folder, fsync, verify, atomic swap) and `migrated_from` in
its manifest, and verifies it before the swap. The steps, and what each guarantees:

* **Target.** `--out DIR` (the store folder itself), `in_place` (the source folder; the old one is kept beside it
  as `<name>.bak-<UTC timestamp>`), or by default `<stores_root>/<project>/<model-slug>-<dim>d/` where `project`
  is Wooster's project name for `projects/<name>/vectorStore`, the `project` of a woolocal store's manifest, else
  the source folder's name.
* **Re-chunking.** A text of more tokens than the model takes (its max sequence length less special tokens and any
  document prefix) is cut into consecutive pieces that fit, preferring a paragraph, line, sentence or word boundary
  in the second half of each window, else a token boundary. The pieces concatenate to exactly the original text
  (nothing is truncated or dropped). The first piece keeps the chunk's id, the others are `<id>#1`, `<id>#2`, ...
  in order, right after it; each piece's metadata is the chunk's plus `woolocalSplit: {id, part, parts, start,
  end}` (character offsets into the original text) and, where the chunk's `loc.lines` matches its text, the
  piece's own line range. The manifest lists every split (`migrated_from.rechunked`).
* **Resumable.** Rows are embedded in batches of `WOOLOCAL_MIGRATE_BATCH` (default 128) rows; each batch is
  checkpointed as a Parquet shard (row, id, text sha256, embedding) in `.<target>.migrate-work/` beside the target,
  written atomically. The folder is keyed (`key.json`) by the source's fingerprint (sha256 of its files), the
  model's identity (files, pooling, prefix, max tokens, quantization, backend), the batch size and the row plan:
  any change discards it. A re-run after `kill -9` loads the valid shards (`resumed_batches`) and embeds the rest;
  batch boundaries are the same, so the store equals an uninterrupted run's. The work folder is removed after
  success (and after a failed verification, whose shards are not trusted).
* **Verification** (before the swap; a failure leaves the previous store as it was): `stores.verify_store` (hashes,
  dims, counts, ids, vectors), then the rows written equal the planned rows (ids, order, texts, metadata), every
  source text is present (its pieces concatenate to it), dims match the model, and a sample of rows re-embedded
  from their text finds itself first (self-retrieval).
* **Idempotent.** A target that already holds a migration of the same source fingerprint by the same model files
  (or, in place, a source that already is a woolocal store of that model) is left alone: status `unchanged`.
* **Locked.** An exclusive `fcntl.flock` on `.<target>.migrate.lock` beside the target: a second run of the same
  target fails at once with `MigrationLockedError` (exit 1), it does not wait.
* **Empty source** (nothing to embed, e.g. LangChain JS after deleting every document): `EmptySourceError` (exit 2)
  and nothing is written (an empty index would abort LangChain JS readers).
"""

from woolocal_ingest.migrate.backup import backups, rollback
from woolocal_ingest.migrate.checkpoints import BATCH_ENV
from woolocal_ingest.migrate.errors import (
    EmptySourceError, MigrationError, MigrationInputError, MigrationLockedError, MigrationVerifyError, NoBackupError,
)
from woolocal_ingest.migrate.layouts import declared_migrations, default_project
from woolocal_ingest.migrate.model import resolve_embedder
from woolocal_ingest.migrate.plan import source_fingerprint
from woolocal_ingest.migrate.rechunk import SPLIT_KEY
from woolocal_ingest.migrate.request import MigrateRequest
from woolocal_ingest.migrate.run import (
    migrate_all, migrate_store, run_declared_migration, run_migration, run_one, run_or_fail, set_progress,
)
from woolocal_ingest.migrate.summary import MigrationSummary
from woolocal_ingest.migrate.unchanged import look_unchanged

__all__ = [
    "BATCH_ENV", "EmptySourceError", "MigrateRequest", "MigrationError", "MigrationInputError", "MigrationLockedError",
    "MigrationSummary", "MigrationVerifyError", "NoBackupError", "SPLIT_KEY", "backups", "declared_migrations",
    "default_project", "look_unchanged", "migrate_all", "migrate_store",
    "resolve_embedder", "rollback",
    "run_declared_migration", "run_migration", "run_one", "run_or_fail", "set_progress", "source_fingerprint",
]
