"""Opened stores, cached per folder (`StoreCache`): an entry is served while the identity of the folder and its
manifest.json (and of the files LangChain writers rewrite in place) is unchanged, else re-opened, so a store that
a migration or ingest has swapped in is served from the next request on. A store is only ever read from one folder
version (the folder is pinned by a file descriptor while its files load)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from woolocal_ingest.errors import StoreError, StoreNotFoundError
from woolocal_ingest.stores import MANIFEST, TRUTH_FILES, Store, check_dims

CACHE_SIZE = 32


def _identity(path: Path, dir_fd: int | None = None) -> tuple:
    """What changes when a store folder is replaced or written into: the folder's inode, and the inode, mtime and
    size of its manifest and of the files LangChain writers (Wooster) rewrite in place."""
    if dir_fd is not None:
        d = os.fstat(dir_fd)
        m = os.stat(MANIFEST, dir_fd=dir_fd)
    else:
        d = os.stat(path)
        m = os.stat(path / MANIFEST)
    files = []
    for name in TRUTH_FILES:
        try:
            st = os.stat(name, dir_fd=dir_fd) if dir_fd is not None else os.stat(path / name)
            files.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            files.append(None)
    return (d.st_dev, d.st_ino, m.st_ino, m.st_mtime_ns, m.st_size, *files)


_PROC_FD = sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")


def _load_once(path: Path) -> tuple[tuple, Store]:
    """Open a store and read all of it (manifest, index, rows, metadata) from one folder version; `_Changed` when
    the folder was replaced while it was read (the caller reads the new version)."""
    fd = None
    if _PROC_FD:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise StoreNotFoundError(f"{path}: no such store folder") from None
    try:
        try:
            before = _identity(path, fd)
        except FileNotFoundError:
            raise _Changed() from None  # the pinned version lost its manifest: it was swapped out and is being deleted
        # Through /proc/self/fd/N every file is looked up in the pinned folder, even if it is renamed meanwhile.
        base = Path(f"/proc/self/fd/{fd}") if fd is not None else path
        try:
            store = Store(base)
            check_dims(path, store.manifest, store.index.d)
            store.lexical  # the BM25 index (and the rows' context it needs) from this same version, not lazily later
            after = _identity(path, fd)
        except (StoreError, FileNotFoundError) as e:
            if _path_identity(path) != before:
                raise _Changed() from None  # a version swapped out (and deleted) mid-read
            if isinstance(e, FileNotFoundError):
                raise StoreError(f"{path}: {e}") from None
            raise type(e)(str(e).replace(str(base), str(path))) from None
    finally:
        if fd is not None:
            os.close(fd)
    if before != after or (fd is None and _path_identity(path) != before):
        raise _Changed()
    store.path = path
    return before, store


def _path_identity(path: Path) -> tuple | None:
    try:
        return _identity(path)
    except FileNotFoundError:
        return None


class _Changed(Exception):
    """The folder changed while it was read."""


@dataclass
class CachedStore:
    """An opened store, the folder identity it was read at, and the model checks already made against it."""

    identity: tuple
    store: Store
    checked_models: dict = field(default_factory=dict)  # resolved model -> None (ok) or an APIError message


class StoreCache:
    """Open stores by folder; an entry is served while the folder's identity is unchanged, else re-opened."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._entries: OrderedDict[Path, CachedStore] = OrderedDict()
        self._lock = threading.Lock()
        self._path_locks: dict[Path, threading.Lock] = {}
        self.opens = 0  # how many times a store was (re)loaded: for tests and /metrics

    def _current(self, path: Path) -> CachedStore | None:
        try:
            ident = _identity(path)
        except FileNotFoundError:
            return None
        with self._lock:
            e = self._entries.get(path)
            if e is not None and e.identity == ident:
                self._entries.move_to_end(path)
                return e
        return None

    def get(self, path: Path) -> CachedStore:
        """The store at `path` as it is now (blocking: call from a worker thread)."""
        e = self._current(path)
        if e is not None:
            return e
        with self._lock:
            plock = self._path_locks.setdefault(path, threading.Lock())
        with plock:
            e = self._current(path)  # another thread may have loaded it meanwhile
            if e is not None:
                return e
            for _ in range(10):  # a swap during the load: read the new version
                try:
                    ident, store = _load_once(path)
                    break
                except _Changed:
                    time.sleep(0.005)
            else:
                raise StoreError(f"{path}: the store kept changing while it was opened; try again")
            entry = CachedStore(ident, store)
            self.opens += 1
            with self._lock:
                self._entries[path] = entry
                self._entries.move_to_end(path)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            return entry
