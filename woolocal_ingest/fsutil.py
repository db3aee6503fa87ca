"""Durable file-system steps every writer shares: fsync, sha256, atomic folder swap, backups, and file identities."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

__all__ = ["BACKUP_TAG", "FileState", "fsync_dir", "fsync_file", "make_backup", "rename_exchange", "sha256_file",
           "snapshot", "stamp", "free_name", "swap_into_place", "write_text_atomic"]

BACKUP_TAG = ".bak-"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a folder (its entries are durable); a no-op where the system cannot open folders."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file (a cache, a state record) so readers see the old or the new content, never a part: a temp
    file beside it, then a rename. OSError propagates (the caller decides whether a read-only place matters)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    return rc == 0


def swap_into_place(tmp: Path, target: Path) -> Path | None:
    """Put `tmp` at `target`; return where the previous version now lies (None if there was none)."""
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return None
    if rename_exchange(tmp, target):
        fsync_dir(target.parent)
        return tmp
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        raise
    fsync_dir(target.parent)
    return old


def stamp() -> str:
    """A UTC timestamp for file names (`20261201T051500Z`)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def free_name(parent: Path, base: str) -> Path:
    """`parent/base`, or `parent/base-1`, `-2`, ... : the first that does not exist."""
    cand, n = parent / base, 1
    while cand.exists():
        cand, n = parent / f"{base}-{n}", n + 1
    return cand


def make_backup(source: Path) -> Path:
    """`<name>.bak-<UTC timestamp>` beside `source`: hard links to its files (copies where links cannot be made),
    so making it costs little and the source itself is not touched."""
    dest = free_name(source.parent, f"{source.name}{BACKUP_TAG}{stamp()}")
    tmp = source.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)

    def copy(src: str, dst: str) -> None:
        # LangChain JS and Python rewrite faiss.index/docstore.json in place (same inode): those are copied, so the
        # backup keeps today's bytes whatever they write next; our own files are only ever replaced, so a link does.
        if Path(src).name in _REWRITTEN_IN_PLACE:
            shutil.copy2(src, dst)
            return
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, tmp, copy_function=copy, symlinks=True)
    os.rename(tmp, dest)
    fsync_dir(source.parent)
    return dest


_REWRITTEN_IN_PLACE = frozenset({"faiss.index", "docstore.json", "index.faiss", "index.pkl"})


# A file's identity: what changes when any writer rewrites it (inode, size, mtime and ctime in ns).
FileState = tuple[int, int, int, int]


def snapshot(folder: Path, names: Iterable[str]) -> dict[str, FileState | None]:
    """The identity of each named file in `folder` (None: absent). Two equal snapshots mean no writer touched those
    files in between; used to notice LangChain writers racing one of our runs."""
    out: dict[str, FileState | None] = {}
    for n in names:
        try:
            st = os.stat(Path(folder) / n)
            out[n] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            out[n] = None
    return out
