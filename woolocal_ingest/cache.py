"""Embedding cache: identical texts are never embedded twice by the same model files.

One SQLite file (stdlib sqlite3, WAL, default `<stores_root>/.cache/embeddings.sqlite`) holds float32 little-endian
vectors keyed by (model key, sha256 of the text). The model key is backend-independent: it names the model's files
(`ModelInfo.files_sha256()`) and what else decides the vector (pooling, normalisation, document prefix, max tokens),
so the same files on sentence-transformers, ONNX or MLX share rows (their vectors agree within float tolerance).

It serves ingest re-runs (a store deleted or rebuilt), migrations of texts already embedded by that model, and
duplicates across projects. It is bounded (`max_mb`, 1 MB = 1,000,000 bytes of database pages in use): when a write
takes it over the bound, the least recently used rows are pruned down to 90% of it. `last_used` is refreshed in
batches (hits are remembered in memory and written every few thousand hits, every 30 s, on a write, and on close),
not with one write per read.

Concurrency: WAL + a busy timeout make two processes safe (writers take turns, readers never wait); inside a process
one connection per cache object is guarded by a lock, so threads share it safely. A forked child opens its own.

`CachedEmbedder` wraps any embedder with the same interface; it serves hits from the cache, embeds only the misses
(deduplicated within the call) in one call to the inner embedder, stores them, and reports progress for every text.
Queries (`embed_query`) are not cached: they carry the query prefix, are one text each and cheap.

A cache failure (locked past the timeout, a disk error, an unreadable file) never fails an embedding: it is logged
and the texts are embedded as if the cache were empty.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

CACHE_DIR = ".cache"
CACHE_FILE = "embeddings.sqlite"
DEFAULT_MAX_MB = 2048
MB = 1_000_000
KEY_VERSION = 1  # bump when what a model key covers changes
SCHEMA_VERSION = 1
PAGE_SIZE = 16384  # 384/768-dim rows fill 16 KiB pages to 93-98% (4 KiB pages waste 20-25%)
LOW_WATER = 0.9  # an automatic prune goes down to this fraction of max_mb, so it does not run on every write
TOUCH_FLUSH_ROWS = 4096  # pending last_used refreshes written once this many hits are remembered ...
TOUCH_FLUSH_S = 30.0  # ... or this many seconds after the last write of them
SQL_CHUNK = 500  # host parameters per IN (...) query
BUSY_TIMEOUT_S = 30.0
EMPTY_PAGES = 10  # pages of a cache file with no rows (schema, indexes, pointer map)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    name TEXT,
    slug TEXT,
    dim INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    id INTEGER PRIMARY KEY,
    model_id INTEGER NOT NULL,
    sha BLOB NOT NULL,
    vec BLOB NOT NULL,
    UNIQUE (model_id, sha)
);
-- last_used lives apart from the vectors: refreshing it rewrites small pages, not the pages holding the blobs
CREATE TABLE IF NOT EXISTS usage (id INTEGER PRIMARY KEY, last_used REAL NOT NULL);
CREATE INDEX IF NOT EXISTS usage_last_used ON usage (last_used);
CREATE TRIGGER IF NOT EXISTS embeddings_delete_usage AFTER DELETE ON embeddings
    BEGIN DELETE FROM usage WHERE id = old.id; END;
"""


def _schema_statements() -> list[str]:
    out, buf = [], ""
    for line in _SCHEMA.strip().splitlines():
        if line.strip().startswith("--"):
            continue
        buf += line + "\n"
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return out


# ---------------------------------------------------------------------------------------------------------------
# keys and paths


def text_sha256(text: str) -> str:
    """sha256 of a text as ingest computes it (`Chunk.text_sha256`): the cache's per-text key."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def model_key(embedder: Any) -> str:
    """The cache identity of an embedder (or a ModelInfo): `<slug>-<dim>d-<16 hex>`.

    Backend-independent: covers the model's files (weights, config, tokenizer), pooling, normalisation, the document
    prefix and max tokens (truncation), nothing about which runtime executes the model.
    """
    from woolocal_ingest.embedders.registry import ModelInfo

    info = embedder if isinstance(embedder, ModelInfo) else embedder.info
    ident = {
        "v": KEY_VERSION,
        "files_sha256": info.files_sha256(),
        "dim": int(info.dim),
        "pooling": info.pooling,
        "normalize": bool(info.normalize),
        "doc_prefix": info.doc_prefix,
        "max_tokens": int(info.max_tokens),
    }
    quant = None if isinstance(embedder, ModelInfo) else embedder.quantization
    if quant:  # quantized weights give other vectors (4-bit MiniLM: cosine ~0.97 to float), and each engine's own
        ident["quantization"] = str(quant)  # (ONNX Runtime int8 and OpenVINO int8 differ: identity.precision_of)
        ident["backend"] = embedder.backend
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return f"{info.slug}-{info.dim}d-{digest[:16]}"


def default_cache_path(stores_root: str | os.PathLike) -> Path:
    """`<stores_root>/.cache/embeddings.sqlite` (a dot-folder: never listed as a store)."""
    return Path(stores_root) / CACHE_DIR / CACHE_FILE


def cache_path(stores_root: str | os.PathLike | None = None, path: str | os.PathLike | None = None) -> Path:
    """The cache file: `path` when given (CacheConfig.path, already resolved), else the stores root's default."""
    if path is not None:
        return Path(path).expanduser()
    if stores_root is None:
        raise ValueError("cache_path: give a stores root or a path")
    return default_cache_path(stores_root)


def _sha_bytes(sha: str) -> bytes:
    b = bytes.fromhex(sha)
    if len(b) != 32:
        raise ValueError(f"{sha!r} is not a sha256 hex digest")
    return b


def _chunks(seq: Sequence, n: int = SQL_CHUNK) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


# ---------------------------------------------------------------------------------------------------------------
# the cache


_LIVE: "weakref.WeakSet[EmbeddingCache]" = weakref.WeakSet()
_ORPHANS: list = []  # connections inherited over fork: never closed in the child, never used


@atexit.register
def _flush_all() -> None:
    for c in list(_LIVE):
        try:
            c.flush()
        except Exception:  # pragma: no cover - best effort at exit
            pass


class EmbeddingCache:
    """Vectors by (model key, text sha256) in one SQLite file; safe across threads and processes.

    The file is opened lazily (on first use) and re-opened after `close()` or in a forked child. `max_mb=None`
    means unbounded. Counters for this object: `hits`, `misses` (unique shas asked for and not served), `invalid`
    (rows ignored because of a wrong length, dim or non-finite values), `pruned` (rows removed by this process).
    """

    def __init__(self, path: str | os.PathLike, max_mb: float | None = DEFAULT_MAX_MB,
                 timeout_s: float = BUSY_TIMEOUT_S):
        self.path = Path(path).expanduser()
        self.max_mb = max_mb
        self.timeout_s = float(timeout_s)
        self.hits = 0
        self.misses = 0
        self.invalid = 0
        self.pruned = 0
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._pending: dict[int, float] = {}  # embeddings.id -> last read
        self._last_flush = time.monotonic()
        _LIVE.add(self)

    # -- pickling (Dask workers): the connection never travels -----------------------------------------------------
    def __getstate__(self) -> dict:
        return {"path": self.path, "max_mb": self.max_mb, "timeout_s": self.timeout_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["max_mb"], state["timeout_s"])

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.path)!r}, max_mb={self.max_mb})"

    def __enter__(self) -> "EmbeddingCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def max_bytes(self) -> int | None:
        return None if self.max_mb is None else int(self.max_mb * MB)

    # -- connection ----------------------------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid != os.getpid():  # forked: the parent's connection is not ours
            _ORPHANS.append(self._conn)
            self._conn, self._pending = None, {}
        if self._conn is None:
            self._pid = os.getpid()
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout_s
        moved_aside = False
        while True:
            conn = None
            try:
                conn = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None,
                                       check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
                # These two only take effect on a new, empty file; harmless afterwards.
                conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    log.warning("embedding cache %s: journal_mode is %s, not wal (a network file system?)",
                                self.path, mode)
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA journal_size_limit={64 * MB}")
                conn.execute("BEGIN IMMEDIATE")
                for stmt in _schema_statements():
                    conn.execute(stmt)
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                conn.execute("COMMIT")
                return conn
            except sqlite3.OperationalError as e:
                if conn is not None:
                    conn.close()
                msg = str(e).lower()
                if ("locked" in msg or "busy" in msg) and time.monotonic() < deadline:
                    time.sleep(0.05)  # journal_mode changes can return BUSY without the busy handler
                    continue
                raise
            except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
                if conn is not None:
                    conn.close()
                if moved_aside:
                    raise
                self._move_aside(e)
                moved_aside = True

    def _move_aside(self, err: Exception) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                try:
                    p.rename(Path(f"{self.path}.corrupt-{stamp}{suffix}"))
                except OSError:
                    pass
        log.warning("embedding cache %s is unreadable (%s): moved aside, starting an empty cache", self.path, err)

    def open(self) -> "EmbeddingCache":
        """Open (creating the file and its folder if needed) now rather than on first use."""
        with self._lock:
            self._connection()
        return self

    def close(self) -> None:
        """Write pending last_used refreshes and close the connection (a later call opens it again)."""
        with self._lock:
            if self._conn is None:
                return
            if self._pid != os.getpid():
                _ORPHANS.append(self._conn)
                self._conn, self._pending = None, {}
                return
            try:
                self._flush(self._conn)
            except sqlite3.Error as e:
                log.warning("embedding cache %s: last_used not written: %s", self.path, e)
            try:
                self._conn.close()
            finally:
                self._conn = None

    # -- helpers -------------------------------------------------------------------------------------------------
    @staticmethod
    def _model(conn: sqlite3.Connection, key: str) -> tuple[int, int] | None:
        row = conn.execute("SELECT id, dim FROM models WHERE key = ?", (key,)).fetchone()
        return (int(row[0]), int(row[1])) if row else None

    def _flush(self, conn: sqlite3.Connection, in_transaction: bool = False) -> None:
        if not self._pending:
            self._last_flush = time.monotonic()
            return
        rows = [(ts, rid) for rid, ts in self._pending.items()]
        if not in_transaction:
            conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("UPDATE usage SET last_used = max(last_used, ?) WHERE id = ?", rows)
            if not in_transaction:
                conn.execute("COMMIT")
        except BaseException:
            if not in_transaction and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            # best effort: a refresh that could not be written is dropped, not retried forever
            self._pending.clear()
            self._last_flush = time.monotonic()

    def _maybe_flush(self, conn: sqlite3.Connection) -> None:
        if len(self._pending) >= TOUCH_FLUSH_ROWS or (
                self._pending and time.monotonic() - self._last_flush >= TOUCH_FLUSH_S):
            try:
                self._flush(conn)
            except sqlite3.OperationalError as e:
                log.debug("embedding cache %s: last_used refresh skipped: %s", self.path, e)

    def flush(self) -> None:
        """Write the remembered last_used refreshes now."""
        with self._lock:
            if self._conn is not None and self._pending and self._pid == os.getpid():
                self._flush(self._conn)

    @staticmethod
    def _write(conn: sqlite3.Connection, statements: list[tuple[str, Sequence]]) -> int:
        """Run statements in one write transaction; returns the first statement's row count."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            counts = [conn.execute(sql, tuple(params)).rowcount for sql, params in statements]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return max(counts[0], 0) if counts else 0

    @staticmethod
    def _sizes(conn: sqlite3.Connection) -> tuple[int, int, int]:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(page_size), int(pages), int(free)

    def _used_bytes(self, conn: sqlite3.Connection) -> int:
        page_size, pages, free = self._sizes(conn)
        return (pages - free) * page_size

    # -- reading -------------------------------------------------------------------------------------------------
    def get_many(self, model_key: str, shas: Iterable[str], dim: int | None = None) -> dict[str, np.ndarray]:
        """The cached vectors of `shas` (text sha256 hex) for `model_key`: {sha: float32 [dim]}, hits only.

        `dim` is the dimension expected (the embedder's); default the model's recorded one. A row whose length or
        dimension differs, or that holds non-finite values, is ignored, counted in `invalid` and logged; the next
        `put_many` of that sha replaces it.
        """
        wanted = list(dict.fromkeys(shas))
        if not wanted:
            return {}
        out: dict[str, np.ndarray] = {}
        bad: list[str] = []
        with self._lock:
            conn = self._connection()
            model = self._model(conn, model_key)
            if model is None:
                self.misses += len(wanted)
                return {}
            mid, model_dim = model
            expect = int(dim) if dim is not None else model_dim
            now = time.time()
            for part in _chunks([_sha_bytes(s) for s in wanted]):
                q = f"SELECT id, sha, vec FROM embeddings WHERE model_id = ? AND sha IN ({','.join('?' * len(part))})"
                for rid, sha, blob in conn.execute(q, (mid, *part)):
                    sha_hex = bytes(sha).hex()
                    if len(blob) != expect * 4:
                        bad.append(sha_hex)
                        continue
                    v = np.frombuffer(blob, dtype="<f4").astype(np.float32)
                    if not np.isfinite(v).all():
                        bad.append(sha_hex)
                        continue
                    out[sha_hex] = v
                    self._pending[rid] = now
            self.hits += len(out)
            self.misses += len(wanted) - len(out)
            self.invalid += len(bad)
            self._maybe_flush(conn)
        if bad:
            log.warning("embedding cache %s: ignored %d row(s) of %s with a wrong length/dim (expected %d dims) or "
                        "non-finite values (e.g. %s); they will be re-embedded", self.path, len(bad), model_key,
                        expect, bad[0][:12])
        return out

    # -- writing -------------------------------------------------------------------------------------------------
    def put_many(self, model_key: str, items: Mapping[str, np.ndarray], name: str | None = None) -> int:
        """Store vectors {sha: float32 [dim]} for `model_key` (replacing rows of the same sha); returns rows written.

        All vectors must have one dim, the model's (recorded on its first put). Non-finite vectors are not stored.
        `name` (the model's name) is recorded for `stats()` and for matching in `prune(model_key=...)`.
        May prune least-recently-used rows afterwards to stay under `max_mb`.
        """
        rows: list[tuple[bytes, bytes]] = []
        vdim = None
        skipped = 0
        for sha, v in items.items():
            a = np.asarray(v, dtype="<f4").reshape(-1)
            if vdim is None:
                vdim = a.shape[0]
            elif a.shape[0] != vdim:
                raise ValueError(f"put_many({model_key!r}): vectors of {vdim} and {a.shape[0]} dims in one call")
            if not np.isfinite(a).all():
                skipped += 1
                continue
            rows.append((_sha_bytes(sha), a.tobytes()))
        if skipped:
            log.warning("embedding cache %s: %d non-finite vector(s) of %s not stored", self.path, skipped, model_key)
        if not rows:
            return 0
        from woolocal_ingest.embedders.registry import slugify

        with self._lock:
            conn = self._connection()
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("INSERT OR IGNORE INTO models (key, name, slug, dim, created) VALUES (?, ?, ?, ?, ?)",
                             (model_key, name, slugify(name) if name else None, vdim, now))
                mid, model_dim = self._model(conn, model_key)  # type: ignore[misc]
                if model_dim != vdim:
                    from woolocal_ingest.errors import DimensionMismatchError

                    raise DimensionMismatchError(
                        f"embedding cache {self.path}: model {model_key} holds {model_dim}-dim vectors, got {vdim}")
                if name:
                    conn.execute("UPDATE models SET name = ?, slug = ? WHERE id = ? AND name IS NULL",
                                 (name, slugify(name), mid))
                conn.executemany(
                    "INSERT INTO embeddings (model_id, sha, vec) VALUES (?, ?, ?) "
                    "ON CONFLICT (model_id, sha) DO UPDATE SET vec = excluded.vec",
                    [(mid, sha, blob) for sha, blob in rows])
                for part in _chunks([sha for sha, _ in rows]):
                    conn.execute("INSERT OR REPLACE INTO usage (id, last_used) SELECT id, ? FROM embeddings "
                                 f"WHERE model_id = ? AND sha IN ({','.join('?' * len(part))})", (now, mid, *part))
                self._flush(conn, in_transaction=True)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            max_bytes = self.max_bytes
            if max_bytes is not None and self._used_bytes(conn) > max_bytes:
                removed = self._prune_size(conn, int(max_bytes * LOW_WATER), None)
                log.info("embedding cache %s: over %s MB, pruned %d least recently used rows", self.path,
                         self.max_mb, removed)
        return len(rows)

    # -- pruning -------------------------------------------------------------------------------------------------
    def _model_ids(self, conn: sqlite3.Connection, model_key: str) -> list[int]:
        from woolocal_ingest.embedders.registry import slugify

        rows = conn.execute("SELECT id FROM models WHERE key = ?", (model_key,)).fetchall()
        if not rows:  # a model's name or slug: every version of it
            rows = conn.execute("SELECT id FROM models WHERE lower(name) = lower(?) OR slug = ?",
                                (model_key, slugify(model_key))).fetchall()
        return [int(r[0]) for r in rows]

    def match_models(self, pattern: str) -> list[str]:
        """Keys of the cached models that `pattern` names: an exact key, else a model name or slug (all versions)."""
        if not self.path.exists() and self._conn is None:
            return []
        with self._lock:
            conn = self._connection()
            ids = self._model_ids(conn, pattern)
            if not ids:
                return []
            q = f"SELECT key FROM models WHERE id IN ({','.join('?' * len(ids))}) ORDER BY key"
            return [r[0] for r in conn.execute(q, ids)]

    def _compact(self, conn: sqlite3.Connection, full: bool = False) -> None:
        if full:
            conn.execute("VACUUM")
        else:
            conn.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page per call
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the main file shrinks at a checkpoint
        except sqlite3.OperationalError:
            pass  # another process is mid-checkpoint: its checkpoint does it

    def _delete_lru(self, conn: sqlite3.Connection, n: int, ids: list[int] | None) -> int:
        if n <= 0:
            return 0
        if ids is None:
            oldest = "SELECT id FROM usage ORDER BY last_used ASC, id ASC LIMIT ?"
        else:
            oldest = ("SELECT u.id FROM usage u JOIN embeddings e ON e.id = u.id "
                      f"WHERE e.model_id IN ({','.join('?' * len(ids))}) ORDER BY u.last_used ASC, u.id ASC LIMIT ?")
        return self._write(conn, [(f"DELETE FROM embeddings WHERE id IN ({oldest})", (*(ids or ()), n))])

    def _prune_size(self, conn: sqlite3.Connection, target: int, ids: list[int] | None) -> int:
        """Delete least-recently-used rows (of models `ids`, or all) until the pages in use fit in `target` bytes."""
        self._flush(conn)
        removed = 0
        vacuumed = False
        first_per_row = None
        for _ in range(64):
            page_size, pages, free = self._sizes(conn)
            used = (pages - free) * page_size
            if used <= target:
                break
            total = conn.execute("SELECT count(*) FROM embeddings").fetchone()[0]
            if ids is None:
                candidates = total
            else:
                q = f"SELECT count(*) FROM embeddings WHERE model_id IN ({','.join('?' * len(ids))})"
                candidates = conn.execute(q, ids).fetchone()[0]
            if candidates == 0:
                break
            per_row = max((used - EMPTY_PAGES * page_size) / max(total, 1), 1.0)
            if first_per_row is None:
                first_per_row = per_row
            elif per_row > 1.15 * first_per_row and not vacuumed:
                # Deletions scattered over the file left part-filled pages: rewrite it compactly once, then go on.
                self._compact(conn, full=True)
                vacuumed = True
                continue
            n = min(candidates, max(1, math.ceil((used - target) / per_row)))
            removed += self._delete_lru(conn, n, ids)
            self._compact(conn)
        self.pruned += removed
        return removed

    def prune(self, max_mb: float | None = None, model_key: str | None = None,
              older_than_days: float | None = None) -> int:
        """Remove rows; returns how many.

        - `older_than_days`: rows not used for that many days (of `model_key` only, when given);
        - `model_key` alone: every row of that model (an exact key, or a model name/slug: all its versions);
        - `max_mb` (or nothing at all: the cache's own `max_mb`): least-recently-used rows (of `model_key` only,
          when given) until the file's pages in use fit in `max_mb`.
        The file is compacted afterwards (it shrinks on disk).
        """
        if not self.path.exists() and self._conn is None:
            return 0
        with self._lock:
            conn = self._connection()
            self._flush(conn)
            ids = self._model_ids(conn, model_key) if model_key is not None else None
            if ids is not None and not ids:
                return 0
            where_model = f"model_id IN ({','.join('?' * len(ids))})" if ids else ""
            removed = 0
            if older_than_days is not None:
                cutoff = time.time() - float(older_than_days) * 86400
                cond = " AND ".join(x for x in ("id IN (SELECT id FROM usage WHERE last_used < ?)", where_model) if x)
                removed += self._write(conn, [(f"DELETE FROM embeddings WHERE {cond}", (cutoff, *(ids or ())))])
            elif ids and max_mb is None:
                removed += self._write(conn, [(f"DELETE FROM embeddings WHERE {where_model}", ids),
                                              (f"DELETE FROM models WHERE {where_model.replace('model_id', 'id')}", ids)])
            self.pruned += removed
            if removed:
                self._compact(conn)
            limit = max_mb if max_mb is not None else (self.max_mb if older_than_days is None and not ids else None)
            if limit is not None:
                removed += self._prune_size(conn, int(limit * MB), ids)
            return removed

    def clear(self) -> int:
        """Remove every row and model; returns rows removed. The file shrinks to its empty size."""
        if not self.path.exists() and self._conn is None:
            return 0
        with self._lock:
            conn = self._connection()
            self._pending.clear()
            removed = self._write(conn, [("DELETE FROM embeddings", ()), ("DELETE FROM usage", ()),
                                         ("DELETE FROM models", ())])
            self.pruned += removed
            self._compact(conn)
            return removed

    # -- reporting -----------------------------------------------------------------------------------------------
    def disk_bytes(self) -> int:
        """Bytes of the cache's files on disk (database, WAL, shared memory)."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(str(self.path) + suffix).st_size
            except OSError:
                pass
        return total

    def stats(self) -> dict:
        """rows, models {key: {name, dim, rows, vector_bytes, last_used}}, bytes on disk and in use, this process's
        hits/misses/invalid/pruned, max_mb. A cache file that does not exist is reported empty (not created)."""
        out: dict[str, Any] = {
            "path": str(self.path), "exists": self.path.exists(), "rows": 0, "models": {},
            "bytes_on_disk": 0, "used_bytes": 0, "free_bytes": 0, "max_mb": self.max_mb,
            "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses, "invalid": self.invalid,
            "pruned": self.pruned,
        }
        if not out["exists"] and self._conn is None:
            return out
        with self._lock:
            conn = self._connection()
            self._flush(conn)
            models = conn.execute(
                "SELECT m.key, m.name, m.dim, count(e.id), coalesce(sum(length(e.vec)), 0), max(u.last_used) "
                "FROM models m LEFT JOIN embeddings e ON e.model_id = m.id LEFT JOIN usage u ON u.id = e.id "
                "GROUP BY m.id ORDER BY m.key").fetchall()
            out["models"] = {k: {"name": n, "dim": d, "rows": r, "vector_bytes": b,
                                 "last_used": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(lu)) if lu else None}
                             for k, n, d, r, b, lu in models}
            out["rows"] = conn.execute("SELECT count(*) FROM embeddings").fetchone()[0]
            page_size, pages, free = self._sizes(conn)
            out.update(used_bytes=(pages - free) * page_size, free_bytes=free * page_size, page_size=page_size)
            out["hits"], out["misses"], out["invalid"], out["pruned"] = self.hits, self.misses, self.invalid, self.pruned
        out["bytes_on_disk"] = self.disk_bytes()
        return out


# One cache object per file per process, shared by every embedder and thread (one connection, one lock).
_SHARED: dict[Path, EmbeddingCache] = {}
_SHARED_LOCK = threading.Lock()


def open_cache(path: str | os.PathLike, max_mb: float | None = DEFAULT_MAX_MB) -> EmbeddingCache:
    """This process's shared EmbeddingCache for `path` (created on first use; `max_mb` updated on each call)."""
    p = Path(path).expanduser().resolve()
    with _SHARED_LOCK:
        c = _SHARED.get(p)
        if c is None:
            c = _SHARED[p] = EmbeddingCache(p, max_mb=max_mb)
        else:
            c.max_mb = max_mb
        return c


# ---------------------------------------------------------------------------------------------------------------
# the embedder wrapper


class CachedEmbedder:
    """Any embedder, with an embedding cache in front of `embed_documents`.

    Hits come from the cache; the misses, deduplicated within the call, go to the inner embedder in one call and
    are stored. Progress is reported for every text of the call (hits first, then the inner embedder's own
    progress, then in-call duplicates), so a bar reaches 100%. Counters: `hits` (texts served from the cache),
    `misses` (distinct texts sent to the inner embedder). `embed_query` is passed through uncached.
    Everything else of the Embedder interface (info, backend, tokens, generation, quantization, ensure_ready, ...) is
    the inner embedder's; `uncached` is the inner embedder itself.
    """

    def __init__(self, inner: Any, cache: EmbeddingCache, key: str | None = None):
        self.inner = inner
        self.cache = cache
        self.key = key or model_key(inner)
        self.hits = 0
        self.misses = 0
        self._count_lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # during unpickling, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"CachedEmbedder({self.inner!r}, key={self.key!r}, cache={self.cache!r})"

    @property
    def info(self):
        return self.inner.info

    @property
    def backend(self) -> str:
        return self.inner.backend

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def max_tokens(self) -> int:
        return self.inner.max_tokens

    @property
    def tokens(self):
        return self.inner.tokens

    @property
    def uncached(self):
        return self.inner

    def embed_query(self, text: str) -> np.ndarray:
        return self.inner.embed_query(text)

    def embed_documents(self, texts: Sequence[str], progress=None) -> np.ndarray:
        texts = list(texts)
        dim = self.dim
        out = np.zeros((len(texts), dim), dtype=np.float32)
        if not texts:
            return out
        shas = [text_sha256(t) for t in texts]
        try:
            found = self.cache.get_many(self.key, shas, dim=dim)
        except (sqlite3.Error, OSError) as e:
            log.warning("embedding cache %s unavailable, embedding without it: %s", self.cache.path, e)
            found = {}
        hit_rows = 0
        todo: dict[str, list[int]] = {}  # sha -> positions, first occurrence order
        for i, sha in enumerate(shas):
            v = found.get(sha)
            if v is not None:
                out[i] = v
                hit_rows += 1
            else:
                todo.setdefault(sha, []).append(i)
        if progress and hit_rows:
            progress(hit_rows)
        if todo:
            reported = 0

            def inner_progress(n: int) -> None:
                nonlocal reported
                reported += n
                progress(n)

            uniq = list(todo)
            vecs = self.inner.embed_documents([texts[todo[s][0]] for s in uniq],
                                              inner_progress if progress else None)
            vecs = np.asarray(vecs, dtype=np.float32)
            if vecs.shape != (len(uniq), dim):
                from woolocal_ingest.errors import DimensionMismatchError

                raise DimensionMismatchError(f"{self.model_name}: embedder returned {vecs.shape} for {len(uniq)} texts "
                                             f"of {dim} dims")
            for j, sha in enumerate(uniq):
                out[todo[sha]] = vecs[j]
            rest = sum(len(p) for p in todo.values()) - reported
            if progress and rest > 0:
                progress(rest)
            try:
                self.cache.put_many(self.key, {sha: vecs[j] for j, sha in enumerate(uniq)}, name=self.model_name)
            except (sqlite3.Error, OSError) as e:
                log.warning("embedding cache %s: %d vectors not stored: %s", self.cache.path, len(uniq), e)
        with self._count_lock:
            self.hits += hit_rows
            self.misses += len(todo)
        return out


def cached_embedder(embedder: Any, stores_root: str | os.PathLike | None = None, *, enabled: bool = True,
                    path: str | os.PathLike | None = None, max_mb: float | None = DEFAULT_MAX_MB) -> Any:
    """`embedder` behind this process's shared cache for `path` (default `<stores_root>/.cache/embeddings.sqlite`);
    `embedder` itself when `enabled` is false or it is already cached. Takes CacheConfig's fields:
    `cached_embedder(emb, stores_root, **cfg.cache.model_dump())`."""
    if not enabled or isinstance(embedder, CachedEmbedder):
        return embedder
    return CachedEmbedder(embedder, open_cache(cache_path(stores_root, path), max_mb=max_mb))


__all__ = [
    "CACHE_DIR", "CACHE_FILE", "CachedEmbedder", "DEFAULT_MAX_MB", "EmbeddingCache", "cache_path", "cached_embedder",
    "default_cache_path", "model_key", "open_cache", "text_sha256",
]
