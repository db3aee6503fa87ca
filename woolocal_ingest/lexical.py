"""The lexical index of a store: BM25 over the same rows as the vectors, in one SQLite FTS5 file (`lexical.sqlite`).

Why FTS5 rather than `bm25s` (measured on the conda set, `bench/README.md`): it ranked better there (lexical
nDCG@10 0.711 vs 0.689 for bm25s with Snowball stemming and English stop words; hybrid 0.785 vs 0.773), it is in
every Python's `sqlite3` (no new dependency), it is one file (so `write_store` writes, hashes, verifies and swaps it
with the rest), and it is updated in place: a write copies the previous file and deletes/inserts only the rows
whose indexed text changed, and a store another writer (Wooster) changed is brought up to date the same way in
memory when opened. `bm25s` rebuilds its sparse matrix on any change and keeps several files. (`tantivy` was not
measured: a Rust index folder of many segment files, for corpora far larger than a project's.)

What is indexed for each row is the text the model embedded (`Chunk.embed_text`: title > heading context, a blank
line, the chunk); rows another writer added are indexed as their plain text. Tokens: Unicode words, diacritics
folded, Porter-stemmed (`porter unicode61`); a query is the OR of its words (common English function words dropped
unless nothing else is left), ranked by FTS5's `bm25()` (k1 1.2, b 0.75). Scores are negated BM25: higher is closer.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from woolocal_ingest.errors import StoreError

__all__ = ["LEXICAL", "LEXICAL_VERSION", "LexicalIndex", "body_sha", "check_lexical", "query_terms",
           "write_lexical"]

LEXICAL = "lexical.sqlite"
LEXICAL_VERSION = 1
TOKENIZE = "porter unicode61 remove_diacritics 2"
_WORD = re.compile(r"\w+", re.UNICODE)
# Function words a question carries that say nothing about its topic; BM25 weighs them low anyway, but each one
# makes FTS5 score every row that holds it.
STOPWORDS = frozenset("""a an and are as at be by can could do does did for from how i in into is it its me my
of on or should so than that the their them then there these this to was what when where which who why will with
would you your""".split())


def body_sha(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()


def query_terms(query: str) -> list[str]:
    """The words of a query FTS5 is asked for (lower case, each once, stop words dropped unless that leaves none)."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
    kept = [w for w in words if w not in STOPWORDS]
    return kept or words


def _schema(conn: sqlite3.Connection) -> None:
    conn.executescript(f"""
        CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE VIRTUAL TABLE body USING fts5(text, tokenize='{TOKENIZE}');
        CREATE TABLE rows(rid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, sha TEXT NOT NULL);
    """)
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [("version", str(LEXICAL_VERSION)), ("tokenize", TOKENIZE)])


def _compatible(conn: sqlite3.Connection) -> bool:
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError:
        return False
    return meta.get("version") == str(LEXICAL_VERSION) and meta.get("tokenize") == TOKENIZE


@dataclass
class SyncCounts:
    """What bringing an index up to date with a set of rows did."""

    kept: int = 0
    deleted: int = 0
    inserted: int = 0


def _sync(conn: sqlite3.Connection, rows: Iterable[tuple[str, str]]) -> SyncCounts:
    """Make the index hold exactly `rows` (id, indexed text): rows whose text is unchanged stay, others are
    deleted and inserted."""
    have = {id_: (rid, sha) for rid, id_, sha in conn.execute("SELECT rid, id, sha FROM rows")}
    counts = SyncCounts()
    want: dict[str, tuple[str, str]] = {}
    for id_, text in rows:
        want[id_] = (text, body_sha(text))
    gone = [rid for id_, (rid, sha) in have.items() if id_ not in want or want[id_][1] != sha]
    conn.executemany("DELETE FROM body WHERE rowid = ?", [(r,) for r in gone])
    conn.executemany("DELETE FROM rows WHERE rid = ?", [(r,) for r in gone])
    counts.deleted = len(gone)
    gone_set = set(gone)
    next_rid = (conn.execute("SELECT max(rid) FROM rows").fetchone()[0] or 0) + 1
    for id_, (text, sha) in want.items():
        old = have.get(id_)
        if old is not None and old[0] not in gone_set:
            counts.kept += 1
            continue
        conn.execute("INSERT INTO body(rowid, text) VALUES (?, ?)", (next_rid, text))
        conn.execute("INSERT INTO rows(rid, id, sha) VALUES (?, ?, ?)", (next_rid, id_, sha))
        next_rid += 1
        counts.inserted += 1
    return counts


def write_lexical(path: Path, rows: Sequence[tuple[str, str]], previous: Path | None = None) -> SyncCounts:
    """Write the lexical index of `rows` (id, indexed text) to `path` (a new file in a store's temp folder). With a
    readable `previous` index of the same tokenizer, it is copied and updated (only changed rows re-indexed);
    otherwise built afresh."""
    path = Path(path)
    fresh = True
    if previous is not None and Path(previous).is_file():
        shutil.copyfile(previous, path)
        conn = sqlite3.connect(path)
        if _compatible(conn):
            fresh = False
        else:
            conn.close()
            path.unlink()
    if fresh:
        conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=OFF")  # a file in a temp folder: a crash discards the folder
        conn.execute("PRAGMA synchronous=OFF")  # write_store fsyncs the file before the swap
        with conn:
            if fresh:
                _schema(conn)
            counts = _sync(conn, rows)
            if fresh or counts.deleted + counts.inserted > max(1000, counts.kept):
                conn.execute("INSERT INTO body(body) VALUES ('optimize')")
        pages, free = (conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count"))
        if free > pages // 4:
            conn.execute("VACUUM")
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot write the lexical index: {e}") from None
    finally:
        conn.close()
    return counts


def check_lexical(path: Path, rows: Sequence[tuple[str, str]]) -> list[str]:
    """Problems of the lexical index at `path` against the rows it must hold (id, indexed text); [] when sound."""
    try:
        conn = sqlite3.connect(f"file:{Path(path)}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as e:
        return [f"{LEXICAL}: unreadable: {e}"]
    try:
        if not _compatible(conn):
            return [f"{LEXICAL}: not a lexical index of version {LEXICAL_VERSION} ({TOKENIZE})"]
        have = dict(conn.execute("SELECT id, sha FROM rows").fetchall())
        n_body = conn.execute("SELECT count(*) FROM body").fetchone()[0]
    except sqlite3.Error as e:
        return [f"{LEXICAL}: unreadable: {e}"]
    finally:
        conn.close()
    want = {id_: body_sha(text) for id_, text in rows}
    problems = []
    if n_body != len(have):
        problems.append(f"{LEXICAL}: {n_body} indexed texts for {len(have)} rows")
    missing = [i for i in want if i not in have]
    extra = [i for i in have if i not in want]
    stale = [i for i, s in want.items() if i in have and have[i] != s]
    if missing or extra or stale:
        first = (missing or extra or stale)[0]
        problems.append(f"{LEXICAL}: {len(missing)} row(s) missing, {len(extra)} extra, {len(stale)} with other text "
                        f"than the store's (first: id {first})")
    return problems


class LexicalIndex:
    """A store's lexical index in memory, holding exactly the rows given (the store's truth rows), searchable by
    row number. `load` starts from the store's file when it has one (only rows changed since are re-indexed)."""

    def __init__(self, conn: sqlite3.Connection, ids: Sequence[str], counts: SyncCounts):
        self._conn = conn
        self._lock = threading.Lock()  # one connection, searched from the service's worker threads
        self._row_of = {id_: r for r, id_ in enumerate(ids)}
        self.counts = counts
        self._rid_row = {rid: self._row_of[id_] for rid, id_ in conn.execute("SELECT rid, id FROM rows")
                         if id_ in self._row_of}

    @classmethod
    def load(cls, path: Path | None, rows: Sequence[tuple[str, str]]) -> "LexicalIndex":
        """The index of `rows` (id, indexed text), in store row order; `path`: the store's `lexical.sqlite`."""
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        fresh = True
        if path is not None and Path(path).is_file():
            try:
                src = sqlite3.connect(f"file:{Path(path)}?mode=ro&immutable=1", uri=True)
                try:
                    src.backup(conn)
                finally:
                    src.close()
                fresh = not _compatible(conn)
            except sqlite3.Error:
                fresh = True  # unreadable: verify reports it; search rebuilds from the rows
            if fresh:
                conn.close()
                conn = sqlite3.connect(":memory:", check_same_thread=False)
        with conn:
            if fresh:
                _schema(conn)
            counts = _sync(conn, rows)
        return cls(conn, [r[0] for r in rows], counts)

    def search(self, query: str, k: int, rows: Sequence[int] | None = None) -> list[tuple[int, float]]:
        """(store row, score) of the `k` best rows for `query` by BM25, best first (limited to `rows` when given);
        rows that share no word with the query are not returned."""
        terms = query_terms(query)
        if not terms or k <= 0:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        allowed = set(int(r) for r in rows) if rows is not None else None
        sql = "SELECT rowid, bm25(body) FROM body WHERE body MATCH ? ORDER BY bm25(body)"
        args: tuple = (match,)
        if allowed is None:
            sql += " LIMIT ?"
            args = (match, k)
        out = []
        with self._lock:
            found = self._conn.execute(sql, args).fetchall()
        for rid, score in found:
            row = self._rid_row.get(rid)
            if row is None or (allowed is not None and row not in allowed):
                continue
            out.append((row, -float(score)))
            if len(out) >= k:
                break
        return out
