"""The errors a migration raises, with their exit codes (1: it failed; 2: it cannot be done as asked)."""

from __future__ import annotations

from woolocal_ingest.errors import WoolocalError


class MigrationError(WoolocalError):
    """A migration failed (exit 1); the previous store, and the source, are as they were."""


class MigrationInputError(MigrationError):
    """The migration asked for cannot be done as given (bad target, no backup to restore...): exit 2."""

    exit_code = 2


class EmptySourceError(MigrationInputError):
    """The source holds no text to embed; nothing is written."""


class NoBackupError(MigrationInputError):
    """`rollback` found no `<name>.bak-<timestamp>` beside the store."""


class MigrationLockedError(MigrationError):
    """Another migration of the same target holds its lock (runs of one target never overlap)."""


class MigrationVerifyError(MigrationError):
    """The new store failed verification; it was not swapped in."""
