"""Run locks: one non-blocking exclusive `flock` per thing that must never run twice at once (a store's migration,
a scheduled ingest, `schedule serve`). The kernel drops a lock when its holder dies, kill -9 included, so a killed
run never leaves a stale one behind."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def try_lock(path: Path) -> Iterator[str | None]:
    """Take the lock on `path` (created, with its folder, when missing) without waiting.

    Yields None while this process holds it (its pid is written in the file), or, when another process holds it,
    that process's pid as it wrote it ("?" when unknown); nothing is held then. The file itself is left in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield None
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts: signalling it is merely refused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
