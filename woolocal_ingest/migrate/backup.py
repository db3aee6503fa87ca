"""The target's safety net: its lock (runs of one target never overlap), the backups an in-place migration keeps,
and `rollback`, which puts the newest one back."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from woolocal_ingest.fsutil import BACKUP_TAG, free_name, fsync_dir, rename_exchange, stamp
from woolocal_ingest.locks import try_lock
from woolocal_ingest.migrate.errors import MigrationLockedError, NoBackupError

LOCK_SUFFIX = ".migrate.lock"
ROLLED_BACK_TAG = ".rolledback-"


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


@contextmanager
def target_lock(target: Path) -> Iterator[None]:
    """Exclusive, non-blocking flock on `.<target>.migrate.lock`: a second run of the same target fails at once.
    The kernel releases it when the process ends, however it ends (kill -9 included)."""
    lock = lock_path(target)
    with try_lock(lock) as holder:
        if holder is not None:
            raise MigrationLockedError(
                f"{target}: another migration of this store is running (pid {holder} holds {lock}); runs of one store "
                "never overlap - run again when it has finished")
        yield


def backups(path: Path) -> list[Path]:
    """The timestamped backups an in-place migration left beside `path`, oldest first."""
    path = Path(path).expanduser().absolute()
    if not path.parent.is_dir():
        return []
    prefix = path.name + BACKUP_TAG
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def rollback(path: Path) -> Path:
    """Put the newest `<name>.bak-<timestamp>` back at `path` (atomically where the system can swap folders).

    The store it replaces is kept beside it as `<name>.rolledback-<timestamp>` (Wooster may have added documents to
    it since). Takes the same lock as a migration of `path`. Returns `path`."""
    path = Path(path).expanduser().absolute()
    found = backups(path)
    if not found:
        raise NoBackupError(f"{path}: no backup to restore (expected a folder {path.name}{BACKUP_TAG}<timestamp> "
                            "beside it, made by `woolocal migrate --in-place`)")
    newest = found[-1]
    with target_lock(path):
        put_back(path, newest, f"{path.name}{ROLLED_BACK_TAG}{stamp()}")
    return path


def put_back(target: Path, backup: Path, aside_name: str) -> None:
    """Put `backup` back at `target` (the caller holds the lock), atomically where the system can swap folders; the
    store it replaces, if any, is moved aside as `aside_name` (a free variant of it)."""
    if not target.exists():
        os.rename(backup, target)
    else:
        aside = free_name(target.parent, aside_name)
        if rename_exchange(backup, target):
            os.rename(backup, aside)
        else:
            os.rename(target, aside)
            os.rename(backup, target)
    fsync_dir(target.parent)
