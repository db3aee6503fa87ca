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

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from woolocal_ingest.chunking import Chunk
from woolocal_ingest.errors import ModelNotFoundError, StoreError, WoolocalError
from woolocal_ingest.coowned import Adoption, CurrentStore, read_current
from woolocal_ingest.legacy import LegacyStore, Problem, read_legacy_store
from woolocal_ingest.locks import try_lock
from woolocal_ingest.fsutil import (
    BACKUP_TAG, fsync_dir, fsync_file, free_name, make_backup, rename_exchange, sha256_file, stamp,
)
from woolocal_ingest.manifest import NAME_RE, read_manifest
from woolocal_ingest.stores import (
    INDEX_JS, MANIFEST, PARQUET, StoreChangedError, json_safe, json_safe_value, is_store, store_dir,
    truth_snapshot, verify_store, write_store,
)

if TYPE_CHECKING:
    from woolocal_ingest.config import FlowsConfig, MigrationConfig
    from woolocal_ingest.embedders.base import Embedder

__all__ = [
    "BATCH_ENV", "EmptySourceError", "MigrationError", "MigrationInputError", "MigrationLockedError",
    "MigrationSummary", "MigrationVerifyError", "NoBackupError", "SPLIT_KEY", "backups", "declared_migrations",
    "default_project", "format_summary", "format_table", "look_unchanged", "migrate_all", "migrate_store",
    "resolve_embedder", "rollback",
    "run_declared_migration", "run_one", "set_progress", "source_fingerprint",
]

BATCH_ENV = "WOOLOCAL_MIGRATE_BATCH"  # rows per checkpointed batch (tests use small ones)
DEFAULT_BATCH = 128  # rows: ~5 s of MiniLM work on 2 cores, the most a kill -9 can lose
WORK_SUFFIX = ".migrate-work"
LOCK_SUFFIX = ".migrate.lock"
ROLLED_BACK_TAG = ".rolledback-"
SPLIT_KEY = "woolocalSplit"
WORK_VERSION = 2  # 2: rows embedded longest first, shards record their rows
VERIFY_SAMPLE = 24  # rows re-embedded to check that each finds itself first
ESTIMATE_SAMPLE = 16  # rows embedded by --dry-run to measure the rate
_SEPARATORS = ("\n\n", "\n", ". ", " ")

ProgressFn = Callable[[str, int], None]  # ("total+", n) when work is known, ("embedded", n) per texts embedded
_progress: ProgressFn | None = None


def set_progress(fn: ProgressFn | None) -> None:
    """Route embedding progress to `fn` (the CLI's bar) when a call passes no `progress`; None turns it off."""
    global _progress
    _progress = fn


# ---------------------------------------------------------------------------------------------------------------
# errors


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


# ---------------------------------------------------------------------------------------------------------------
# summary


@dataclass
class MigrationSummary:
    """What one migration did (or, for a dry run, would do); `to_dict()` is the CLI's `--json` object."""

    status: str  # "migrated" | "unchanged" | "failed" | "planned"
    source: str
    store: str = ""
    name: str | None = None  # the flows.yaml migration's name, when declared
    source_format: str | None = None
    source_dim: int | None = None
    source_count: int = 0  # chunks read from the source
    model: str = ""
    backend: str = ""
    dim: int = 0
    count: int = 0  # rows in the new store
    added: int = 0  # ids new to the target (for a first migration: every row)
    updated: int = 0  # ids the target held before, re-embedded
    unchanged: int = 0  # rows left as they were (status unchanged: all of them)
    deleted: int = 0  # ids the target held before and no longer holds
    skipped: int = 0  # source rows with no recoverable text (unrecoverable problems)
    embedded: int = 0  # rows embedded by this run
    cached: int = 0  # of `embedded`: served by the embedding cache
    batches: int = 0
    resumed_batches: int = 0  # batches loaded from checkpoints of an interrupted run
    rechunked: int = 0  # source chunks split to fit the model
    pieces: int = 0  # rows those chunks became
    problems: list[dict] = field(default_factory=list)
    unrecoverable: int = 0
    in_place: bool = False
    python_layout: bool = False
    backup: str | None = None  # in place: where the previous store was kept
    written: bool = False
    message: str = ""
    error: str | None = None
    exit_code: int = 0
    plan: dict | None = None  # dry run: estimate and action
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    adoption: dict = field(default_factory=dict)  # rows other writers (Wooster, LangChain) added, deleted, rewrote

    def to_dict(self) -> dict:
        d = asdict(self)
        d["problem_counts"] = _problem_counts(self.problems)
        return d


def _problem_counts(problems: Sequence[dict | Problem]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in problems:
        kind = p["kind"] if isinstance(p, dict) else p.kind
        out[kind] = out.get(kind, 0) + 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# the target model


def resolve_embedder(to: str, config: "FlowsConfig", backend: str | None = None,
                     quantization: str | None = None) -> "Embedder":
    """The embedder `to` names: a purpose of flows.yaml (its model, backend, quantization, batch settings and
    fallback; its `dimensions` checked), else a model name or folder (the registry's resolution, default batch
    settings). `quantization` ("int8" or "none") overrides the purpose's."""
    from woolocal_ingest import embedders
    from woolocal_ingest.config import PurposeConfig
    from woolocal_ingest.errors import ConfigError

    if to in config.purposes:
        purpose = config.purposes[to]
        emb = embedders.get(embedders.EmbedderSpec.resolve(purpose, to, backend=backend, quantization=quantization))
        if purpose.dimensions is not None and emb.dim != purpose.dimensions:
            raise ConfigError(f"purposes.{to}.dimensions is {purpose.dimensions} but model {emb.model_name} makes "
                              f"{emb.dim}-dim vectors")
        return emb
    try:
        return embedders.get(embedders.EmbedderSpec.resolve(PurposeConfig(), "migrate", model=to, backend=backend,
                                                            quantization=quantization))
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"--to {to!r} is neither a purpose of flows.yaml (declared: "
                                 f"{', '.join(sorted(config.purposes)) or 'none'}) nor a model available offline: "
                                 f"{e}") from None


def _model_identity(emb: "Embedder") -> dict:
    """What decides the vectors: the model's files, pooling, prefix, limits, quantization, and the backend."""
    from woolocal_ingest.embedders import model_identity

    m = model_identity(emb)
    return {k: m.get(k) for k in ("name", "dim", "files_sha256", "quantization", "pooling", "normalize",
                                  "doc_prefix", "max_tokens", "backend")}


def _raw(emb: Any) -> Any:
    """The embedder without the embedding cache (verification and estimates must really embed)."""
    return emb.uncached


# ---------------------------------------------------------------------------------------------------------------
# source, target, work folder, lock


def source_fingerprint(path: Path) -> tuple[str, dict[str, str]]:
    """(sha256 over the files, {file name: sha256}) of a store folder's top-level files (dot-files aside)."""
    files = {p.name: sha256_file(p) for p in sorted(Path(path).iterdir())
             if p.is_file() and not p.name.startswith(".")}
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest(), files


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:100] or "store"


def default_project(source: Path) -> str:
    """The project a migrated store is filed under: Wooster's `<name>` for `projects/<name>/vectorStore`, a woolocal
    store's manifest `project` (else its parent folder's name), else the source folder's own name."""
    source = Path(source)
    if source.name == "vectorStore" and source.parent.name:
        return _safe_name(source.parent.name)
    if (source / MANIFEST).is_file():
        try:
            project = read_manifest(source).project
            if isinstance(project, str) and project:
                return _safe_name(project)
        except StoreError:
            pass
        if NAME_RE.match(source.name):
            return _safe_name(source.parent.name)
    return _safe_name(source.name)


def _work_dir(target: Path) -> Path:
    return target.parent / f".{target.name}{WORK_SUFFIX}"


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


@contextmanager
def _target_lock(target: Path) -> Iterator[None]:
    """Exclusive, non-blocking flock on `.<target>.migrate.lock`: a second run of the same target fails at once.
    The kernel releases it when the process ends, however it ends (kill -9 included)."""
    lock = _lock_path(target)
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
    with _target_lock(path):
        _put_back(path, newest, f"{path.name}{ROLLED_BACK_TAG}{stamp()}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# planning: rows after re-chunking


@dataclass
class _Plan:
    source: Path
    target: Path
    in_place: bool
    project: str
    legacy: LegacyStore
    fingerprint: str
    files: dict[str, str]
    python_layout: bool
    limit: int = 0
    rows: list[Chunk] = field(default_factory=list)
    origin: list[int] = field(default_factory=list)  # source chunk index of each row
    tokens: list[int] = field(default_factory=list)  # tokens of each row, special tokens included
    source_texts: list[str] = field(default_factory=list)  # each source chunk's text as stored (valid UTF-8)
    split: dict[str, list[str]] = field(default_factory=dict)  # source id -> its pieces' ids
    problems: list[Problem] = field(default_factory=list)
    current: CurrentStore | None = None  # the target as found (a woolocal store), other writers' changes included
    snapshot: dict | None = None  # identity of the target's LangChain files when read (a racing write shows)
    trusted: dict[str, np.ndarray] = field(default_factory=dict)  # text sha256 -> our vector (same model files)
    dropped: set[int] = field(default_factory=set)  # source chunks whose rows another writer deleted in the target
    adoption: Adoption = field(default_factory=Adoption)


def _token_limit(emb: "Embedder") -> int:
    counter = emb.tokens
    prefix = getattr(emb.info, "doc_prefix", "") or ""
    limit = emb.max_tokens - counter.special_tokens - (counter.count(prefix) if prefix else 0)
    if limit < 8:
        raise MigrationError(f"model {emb.model_name}: max {emb.max_tokens} tokens leaves {limit} for text")
    return limit


def _split_text(counter: Any, text: str, limit: int) -> list[str]:
    """Consecutive pieces of `text` of at most `limit` tokens each that concatenate to `text` exactly; cuts prefer a
    paragraph, line, sentence or word boundary in the second half of each window, else fall on a token boundary."""
    tok = getattr(counter, "_tok", None)
    if tok is None:  # a counter without offsets: token boundaries only
        pieces = counter.split(text, limit)
    else:
        starts = [o[0] for o in tok.encode(text, add_special_tokens=False).offsets]
        if len(starts) <= limit:
            return [text]
        pieces, pos, t = [], 0, 0
        while len(starts) - t > limit:
            hard = starts[t + limit]
            if hard <= pos:  # zero-width tokens: move on to the next real boundary
                nxt = bisect.bisect_right(starts, pos)
                hard = starts[nxt] if nxt < len(starts) else len(text)
            window = text[pos:hard]
            cut = hard
            for sep in _SEPARATORS:
                i = window.rfind(sep)
                if i >= len(window) // 2 and i + len(sep) < len(window):
                    cut = pos + i + len(sep)
                    break
            pieces.append(text[pos:cut])
            pos = cut
            t = bisect.bisect_left(starts, pos)
        if pos < len(text) or not pieces:
            pieces.append(text[pos:])
    # A cut inside a word can tokenise differently on its own: split any piece that now exceeds the limit again.
    out: list[str] = []
    for p in pieces:
        n, m = counter.count(p), limit
        parts = [p]
        while n > limit and m > 1:
            m = max(1, m - max(1, limit // 16))
            parts = counter.split(p, m)
            n = max(counter.count(x) for x in parts)
        if n > limit:
            raise MigrationError(f"cannot cut a text into pieces of at most {limit} tokens")
        out.extend(parts)
    assert "".join(out) == text
    return out


def _piece_metadata(meta: dict, orig_id: str, part: int, parts: int, start: int, end: int, text: str) -> dict:
    m = copy.deepcopy(meta)
    m[SPLIT_KEY] = {"id": orig_id, "part": part, "parts": parts, "start": start, "end": end}
    lines = m.get("loc", {}).get("lines") if isinstance(m.get("loc"), dict) else None
    if isinstance(lines, dict):
        lo, hi = lines.get("from"), lines.get("to")
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi))
        if ints and hi - lo == text.rstrip("\n").count("\n"):  # the chunk's own range: give the piece its part
            lines["from"] = lo + text[:start].count("\n")
            lines["to"] = lo + text[:max(start, end - 1)].count("\n")
    return m


def _plan_rows(plan: _Plan, emb: "Embedder") -> None:
    """Rows of the new store, in the source's order: each chunk as is, or its pieces when it exceeds the model."""
    counter = emb.tokens
    plan.limit = limit = _token_limit(emb)
    special = counter.special_tokens
    chunks = plan.legacy.chunks
    plan.source_texts = texts = [json_safe(c.text) for c in chunks]
    counts = counter.count_many(texts) if texts else []
    used: set[str] = set()
    renamed: list[str] = []
    safe_ids = []
    for c in chunks:  # ids as written (lone surrogates replaced); a clash that makes gets a #dup suffix
        sid = json_safe(c.id)
        if sid in used:
            n = 1
            while f"{sid}#dup{n}" in used:
                n += 1
            renamed.append(f"{c.id!r} -> {sid}#dup{n}")
            sid = f"{sid}#dup{n}"
        used.add(sid)
        safe_ids.append(sid)
    if renamed:
        plan.problems.append(Problem("id_renamed", f"{len(renamed)} id(s) equal another once lone surrogates are "
                                     f"replaced (U+FFFD); renamed: {', '.join(renamed[:10])}"))
    for i, c in enumerate(chunks):
        text, cid = texts[i], safe_ids[i]
        meta = json_safe_value(c.metadata)
        if counts[i] <= limit:
            plan.rows.append(Chunk(cid, text, json_safe(c.source), c.chunk, meta, c.sha256))
            plan.origin.append(i)
            plan.tokens.append(counts[i] + special)
            continue
        pieces = _split_text(counter, text, limit)
        ids, pos = [], 0
        for k, piece in enumerate(pieces):
            pid = cid if k == 0 else f"{cid}#{k}"
            while k and pid in used:
                pid += "~"
            used.add(pid)
            ids.append(pid)
            m = _piece_metadata(meta, cid, k, len(pieces), pos, pos + len(piece), text)
            plan.rows.append(Chunk(pid, piece, json_safe(c.source), c.chunk, m, Chunk.text_sha256(piece)))
            plan.origin.append(i)
            plan.tokens.append(counter.count(piece) + special)
            pos += len(piece)
        plan.split[cid] = ids
    if plan.split:
        n_pieces = sum(len(v) for v in plan.split.values())
        plan.problems.append(Problem(
            "rechunked", f"{len(plan.split)} chunk(s) longer than {limit} tokens (what {emb.model_name} takes, less "
            f"special tokens) split into {n_pieces} pieces at paragraph/line/sentence/word boundaries (token "
            f"boundaries where a run has none); nothing truncated. The first piece keeps the chunk's id, the others "
            f"are <id>#1, <id>#2, ...; each carries metadata.{SPLIT_KEY}", ids=list(plan.split)))


def _adopt_target(plan: _Plan, emb: "Embedder") -> None:
    """Apply what other writers did to the target since we wrote it onto the planned rows: rows they deleted stay
    deleted, rows they rewrote keep their text, rows they added are kept (and embedded with our model unless we
    already hold a vector of that text)."""
    cur = plan.current
    if cur is None:
        return
    if _same_model(cur.manifest, emb):
        for c in cur.record.chunks:
            plan.trusted.setdefault(c.sha256, cur.record.vectors[cur.record.by_id[c.id]])
    if plan.in_place:  # the source is the target: its rows (read with both layouts) already are what it holds now
        plan.adoption.outside = [d.to_dict() for d in cur.drifts if d.changed]
        changed = cur.outside_ids()
        plan.adoption.adopted = sum(1 for c in plan.rows if c.id in changed)
        plan.adoption.reembedded = sum(1 for c in plan.rows if c.id in changed and c.sha256 not in plan.trusted)
        return
    drifts = [d for d in cur.drifts if d.changed]
    if not drifts:
        return
    plan.adoption.outside = [d.to_dict() for d in drifts]
    now = {c.id: c for c in cur.rows}
    deleted = {i for d in drifts for i in d.deleted}
    rewritten = {i for d in drifts for i in d.rewritten}
    rows, origin, tokens = [], [], []
    for c, o, t in zip(plan.rows, plan.origin, plan.tokens):
        if c.id in deleted:
            plan.dropped.add(o)
            plan.adoption.stayed_deleted += 1
            continue
        if c.id in rewritten and c.id in now:
            c = now[c.id]
            plan.dropped.add(o)  # its text is another writer's now
            plan.adoption.adopted += 1
            t = emb.tokens.count(c.text) + emb.tokens.special_tokens
        rows.append(c)
        origin.append(o)
        tokens.append(t)
    have = {c.id for c in rows}
    for i in (i for d in drifts for i in d.added):
        if i in now and i not in have:
            c = now[i]
            rows.append(c)
            origin.append(-1)
            tokens.append(emb.tokens.count(c.text) + emb.tokens.special_tokens)
            have.add(i)
            plan.adoption.adopted += 1
    plan.adoption.kept = sum(1 for o in origin if o < 0)
    planned = {r.id for r in plan.rows}  # rows another writer added or rewrote: embedded unless we know the text
    plan.adoption.reembedded = sum(1 for c in rows if (c.id in rewritten or c.id not in planned)
                                   and c.sha256 not in plan.trusted)
    plan.rows, plan.origin, plan.tokens = rows, origin, tokens


def _rows_digest(rows: Sequence[Chunk]) -> str:
    h = hashlib.sha256()
    for c in rows:
        h.update(c.id.encode("utf-8", "surrogatepass") + b"\0" + Chunk.text_sha256(c.text).encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# embedding in checkpointed batches


def _batch_size() -> int:
    raw = os.environ.get(BATCH_ENV, "").strip()
    if not raw:
        return DEFAULT_BATCH
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        from woolocal_ingest.errors import ConfigError

        raise ConfigError(f"{BATCH_ENV}={raw!r}: expected a whole number of rows >= 1")
    return n


def _embed_rows(emb: Any, texts: list[str], progress: ProgressFn | None) -> np.ndarray:
    """One batch of texts -> float32 [n, dim] (a seam for tests)."""
    return emb.embed_documents(texts, progress=(lambda n: progress("embedded", n)) if progress else None)


def _shard_name(b: int) -> str:
    return f"batch-{b:06d}.parquet"


def _write_shard(path: Path, idx: Sequence[int], rows: Sequence[Chunk], vectors: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = vectors.shape[1]
    table = pa.table({
        "row": pa.array(list(idx), pa.int64()),
        "id": pa.array([c.id for c in rows], pa.string()),
        "sha256": pa.array([Chunk.text_sha256(c.text) for c in rows], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim),
    })
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _read_shard(path: Path, idx: Sequence[int], rows: Sequence[Chunk], dim: int) -> np.ndarray | None:
    """The shard's vectors when it holds exactly these rows (ids, text hashes, dim, finite), else None."""
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path)
        if t.num_rows != len(rows):
            return None
        if t.column("row").to_pylist() != list(idx):
            return None
        if t.column("id").to_pylist() != [c.id for c in rows]:
            return None
        if t.column("sha256").to_pylist() != [Chunk.text_sha256(c.text) for c in rows]:
            return None
        v = np.asarray(t.column("embedding").combine_chunks().flatten(), dtype=np.float32).reshape(t.num_rows, -1)
    except Exception:
        return None
    if v.shape != (len(rows), dim) or not np.isfinite(v).all():
        return None
    return v


def _prepare_work(work: Path, key: dict) -> None:
    """The work folder for exactly this key: kept when key.json matches, else emptied and re-keyed."""
    kf = work / "key.json"
    try:
        same = json.loads(kf.read_text(encoding="utf-8")) == key
    except (OSError, ValueError):
        same = False
    if not same and work.exists():
        shutil.rmtree(work)
    if not same:
        tmp = work.parent / f"{work.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "key.json").write_text(json.dumps(key, indent=2, sort_keys=True), encoding="utf-8")
        fsync_file(tmp / "key.json")
        os.rename(tmp, work)
        fsync_dir(work.parent)
    for p in work.glob(".*.tmp"):  # a shard whose write was interrupted
        p.unlink(missing_ok=True)


def _embed_all(plan: _Plan, emb: "Embedder", config: "FlowsConfig", progress: ProgressFn | None,
               summary: MigrationSummary) -> np.ndarray:
    from woolocal_ingest.ingest import with_cache

    rows = plan.rows
    batch = _batch_size()
    dim = emb.dim
    work = _work_dir(plan.target)
    key = {"version": WORK_VERSION, "source_fingerprint": plan.fingerprint, "model": _model_identity(emb),
           "batch": batch, "limit": plan.limit, "rows": len(rows), "rows_sha256": _rows_digest(rows),
           "trusted": len(plan.trusted),
           "order": "tokens-desc"}
    _prepare_work(work, key)
    # Rows are embedded longest first (a stable sort of their token counts), as SentenceTransformer.encode orders a
    # whole call: every batch, checkpoint after checkpoint, pads little. Shards record the rows they hold.
    vectors = np.zeros((len(rows), dim), dtype=np.float32)
    todo_rows = []
    for i, c in enumerate(rows):
        v = plan.trusted.get(c.sha256)
        if v is not None and v.shape == (dim,):
            vectors[i] = v  # a vector of ours for exactly this text, by these model files: not embedded again
        else:
            todo_rows.append(i)
    order = (sorted(todo_rows, key=lambda i: -plan.tokens[i]) if len(plan.tokens) == len(rows) else todo_rows)
    groups = [order[start:start + batch] for start in range(0, len(order), batch)]
    summary.batches = len(groups)
    todo: list[int] = []
    for b, idx in enumerate(groups):
        path = work / _shard_name(b)
        v = _read_shard(path, idx, [rows[i] for i in idx], dim) if path.is_file() else None
        if v is None:
            path.unlink(missing_ok=True)
            todo.append(b)
        else:
            vectors[idx] = v
            summary.resumed_batches += 1
    if progress:
        progress("total+", sum(len(groups[b]) for b in todo))
    # The embedding cache lives under the stores root the target belongs to: flows.yaml's, or, for an --out folder
    # outside it, the folder that holds the target (never the current folder).
    root = config.stores_root().resolve()
    cached = with_cache(emb, root if plan.target.is_relative_to(root) else plan.target.parent,
                        config.cache_settings())
    generation = emb.generation
    for b in todo:
        idx = groups[b]
        part = [rows[i] for i in idx]
        v = np.ascontiguousarray(_embed_rows(cached, [c.text for c in part], progress), dtype=np.float32)
        if v.shape != (len(part), dim):
            raise MigrationError(f"{emb.model_name} returned vectors of shape {v.shape} for {len(part)} texts")
        if emb.generation != generation:
            raise MigrationError(f"{plan.target}: the embedder switched to its fallback mid-run; a store never mixes "
                                 "two models - run the migration again")
        _write_shard(work / _shard_name(b), idx, part, v)
        vectors[idx] = v
        summary.embedded += len(part)
    summary.cached = int(cached.hits)
    return vectors


# ---------------------------------------------------------------------------------------------------------------
# verification


def _verify_written(folder: Path, plan: _Plan, emb: "Embedder") -> list[str]:
    """Migration-specific checks of a written store folder (verify_store has checked its integrity)."""
    import faiss
    import pyarrow.parquet as pq

    problems: list[str] = []
    index = faiss.read_index(str(folder / INDEX_JS))
    t = pq.read_table(folder / PARQUET, columns=["id", "text", "metadata"])
    ids, texts = t.column("id").to_pylist(), t.column("text").to_pylist()
    metas = [json.loads(m) for m in t.column("metadata").to_pylist()]
    n = len(plan.rows)
    if index.d != emb.dim:
        problems.append(f"index dim {index.d}, model {emb.model_name} makes {emb.dim}")
    if index.ntotal != n or len(ids) != n:
        problems.append(f"{n} rows planned, index holds {index.ntotal}, {PARQUET} {len(ids)}")
        return problems
    diff = [i for i in range(n) if ids[i] != plan.rows[i].id]
    if diff:
        problems.append(f"{len(diff)} row id(s) differ from the source's (first: row {diff[0]})")
    diff = [i for i in range(n) if texts[i] != plan.rows[i].text]
    if diff:
        problems.append(f"{len(diff)} row text(s) differ from the source's (first: row {diff[0]})")
    diff = [i for i in range(n) if metas[i] != plan.rows[i].metadata]
    if diff:
        problems.append(f"{len(diff)} row metadata differ from the source's (first: row {diff[0]})")
    joined: list[list[str]] = [[] for _ in plan.source_texts]
    for i, o in enumerate(plan.origin):
        if o >= 0:
            joined[o].append(texts[i])
    lost = [plan.legacy.chunks[j].id for j, parts in enumerate(joined)
            if j not in plan.dropped and "".join(parts) != plan.source_texts[j]]
    if lost:
        problems.append(f"{len(lost)} source text(s) not present in full (first: id {lost[0]})")
    problems += _self_retrieval(index, texts, emb)
    return problems


def _self_retrieval(index: Any, texts: list[str], emb: "Embedder") -> list[str]:
    """A sample of rows, embedded afresh from their text, must each find themselves first (rows of identical text,
    or within 1e-5 of the best distance, count as themselves)."""
    seen: dict[str, int] = {}
    for i, x in enumerate(texts):
        if x.strip():
            seen[x] = -1 if x in seen else i
    candidates = [i for i in seen.values() if i >= 0]
    if not candidates:
        return []
    step = max(1, len(candidates) // VERIFY_SAMPLE)
    sample = candidates[::step][:VERIFY_SAMPLE]
    q = np.ascontiguousarray(_raw(emb).embed_documents([texts[i] for i in sample]), dtype=np.float32)
    k = min(10, index.ntotal)
    dist, labels = index.search(q, k)
    missed = []
    for row, d, lab in zip(sample, dist, labels):
        near = [int(r) for r, x in zip(lab, d) if x <= d[0] + 1e-5]
        if row not in near:
            missed.append(row)
    if missed:
        return [f"self-retrieval: {len(missed)} of {len(sample)} sampled rows did not find themselves first "
                f"(rows {missed[:10]}): vectors do not belong to their texts"]
    return []


# ---------------------------------------------------------------------------------------------------------------
# the migration


@dataclass(frozen=True)
class ModelFacts:
    """What decides a migration's vectors and target, known from the registry without loading the model."""

    name: str
    dim: int
    files_sha256: str | None
    quantization: str | None


def _facts(emb: "Embedder") -> ModelFacts:
    ident = _model_identity(emb)
    return ModelFacts(emb.model_name, emb.dim, ident.get("files_sha256"), ident.get("quantization"))


def _already_done(plan: _Plan, emb: "Embedder") -> str | None:
    """Why the target needs no work (None: it does)."""
    return _unchanged_reason(plan.target, plan.source, plan.fingerprint, plan.python_layout, _facts(emb),
                             plan.legacy.format == "woolocal", plan.current)


def _unchanged_reason(target: Path, source: Path, fingerprint: str, python_layout: bool, model: ModelFacts,
                      source_is_ours: bool, current: CurrentStore | None) -> str | None:
    """Why `target` already holds the migration of `source` by `model` (None: there is work)."""
    if not is_store(target):
        return None
    try:
        m = read_manifest(target)
    except StoreError:
        return None
    mm = m.model
    same_model = (mm.get("files_sha256"), mm.get("quantization"), m.get("dim")) == (
        model.files_sha256, model.quantization, model.dim)
    layouts_ok = not python_layout or "langchain-python" in m.layouts
    if not (same_model and layouts_ok):
        return None
    if current is not None and current.changed_outside:
        return None  # another writer's rows are to be adopted
    if target == source and source_is_ours:
        if not verify_store(target):
            return f"{target} already is a woolocal store of {model.name} ({model.dim}d)"
        return None
    mf = m.migrated_from or {}
    if mf.get("fingerprint") == fingerprint and not verify_store(target):
        return f"{target} already holds this migration of {source} (same source files, same model files)"
    return None


def look_unchanged(source: Path, to: str, *, config: "FlowsConfig", out: Path | None = None, in_place: bool = False,
                   backend: str | None = None, python_layout: bool | None = None,
                   quantization: str | None = None) -> MigrationSummary | None:
    """A cheap look before a migration: the `unchanged` summary when the target already holds this migration of
    `source` (same source files, same model files and precision, no other writer's rows to adopt), found without
    loading the model (registry facts and the remembered sha256 of its files); None when there may be work, or
    when it cannot tell cheaply (a remote backend, an unknown name): the full run decides."""
    from woolocal_ingest.embedders import pick_backend, resolve_model
    from woolocal_ingest.legacy import detect_format
    from woolocal_ingest.preplan import model_files_sha256

    t0 = time.perf_counter()
    try:
        source = Path(source).expanduser().resolve()
        purpose = config.purposes.get(to)
        model = purpose.model if purpose is not None else to
        be = backend or (purpose.backend if purpose is not None else "auto")
        quant = quantization or (purpose.quantization if purpose is not None else None)
        if be == "openai-compatible" or (purpose is not None and purpose.endpoint):
            return None
        info = resolve_model(model)
        choice = pick_backend(info, be, quant)
        if choice.backend not in ("sentence-transformers", "onnx"):
            return None
        facts = ModelFacts(info.name, info.dim, model_files_sha256(info), choice.quantization)
        target = (source if in_place else Path(out).expanduser().resolve() if out is not None
                  else store_dir(config.stores_root(), default_project(source), info.slug, info.dim).resolve())
        fmt = detect_format(source)
        layout = python_layout if python_layout is not None else (
            True if fmt == "langchain-python" else config.defaults.python_layout)
        current = read_current(target) if is_store(target) else None
        reason = _unchanged_reason(target, source, source_fingerprint(source)[0], layout, facts, fmt == "woolocal",
                                   current)
    except WoolocalError:
        return None
    if reason is None:
        return None
    count = read_manifest(target).count
    return MigrationSummary(status="unchanged", source=str(source), store=str(target), model=info.name,
                            backend=choice.backend, dim=info.dim, count=count, unchanged=count, in_place=in_place,
                            message=reason, seconds=round(time.perf_counter() - t0, 3))


def _same_model(manifest: dict, emb: "Embedder") -> bool:
    ident = _model_identity(emb)
    model = manifest.get("model") or {}
    return (model.get("files_sha256") == ident["files_sha256"] and model.get("quantization") == ident["quantization"]
            and manifest.get("dim") == emb.dim)


def _check_target(plan: _Plan, emb: "Embedder") -> None:
    src, target = plan.source, plan.target
    m = NAME_RE.match(target.name)
    if m and int(m.group("dim")) != emb.dim:
        hint = " in place" if plan.in_place else ""
        raise MigrationInputError(f"{target}: the folder name says {m.group('dim')}d but {emb.model_name} makes "
                                  f"{emb.dim}-dim vectors; cannot migrate{hint} into it (give --out, or no --out for "
                                  f"the default <stores_root>/<project>/{emb.info.slug}-{emb.dim}d)")
    if plan.in_place:
        if m and m.group("slug") != emb.info.slug:
            raise MigrationInputError(f"{target}: the folder name says model {m.group('slug')}; migrating it in place "
                                      f"to {emb.model_name} would mislabel it (give --out, or no --out for the "
                                      f"default <stores_root>/<project>/{emb.info.slug}-{emb.dim}d)")
        return
    if target == src:
        if plan.legacy.format == "woolocal" and _same_model(read_manifest(src), emb):
            return  # the same model again: `unchanged`
        raise MigrationInputError(f"{target}: is the source; use --in-place to replace it (it is kept as a backup)")
    if target.is_relative_to(src):
        raise MigrationInputError(f"{target}: lies inside the source {src}; the source is never modified")
    if target.exists() and not is_store(target) and (not target.is_dir() or any(target.iterdir())):
        raise MigrationInputError(f"{target}: exists and is not a woolocal store; refusing to replace it")


def _manifest(plan: _Plan, emb: "Embedder") -> dict:
    from woolocal_ingest.embedders import model_identity

    lg = plan.legacy
    problems = [p.to_dict() for p in lg.problems + plan.problems]
    return {
        "project": plan.project,
        "model": model_identity(emb),
        "chunking": {"migrated": True, "limit_tokens": plan.limit, "tokenizer": emb.model_name,
                     "rule": "source chunks kept; a chunk over the limit is cut into consecutive pieces at paragraph/"
                             "line/sentence/word boundaries (token boundaries where a run has none), first piece keeps "
                             f"the id, then <id>#1, <id>#2, ...; metadata.{SPLIT_KEY}"},
        "source": {"root": str(plan.source), "fingerprint": plan.fingerprint, "files": plan.files},
        "migrated_from": {
            "path": str(plan.source), "format": lg.format, "dim": lg.dim, "index_type": lg.index_type,
            "ntotal": lg.ntotal, "count": len(lg.chunks), "model": lg.model, "fingerprint": plan.fingerprint,
            "problems": {"counts": _problem_counts(problems), "unrecoverable": len(lg.unrecoverable),
                         "details": problems},
            "rechunked": {"limit_tokens": plan.limit, "chunks": len(plan.split),
                          "pieces": sum(len(v) for v in plan.split.values()), "ids": plan.split},
        },
    }


def _unrecoverable_rows(lg: LegacyStore) -> int:
    return sum(max(len(p.rows), len(p.ids), 1) for p in lg.unrecoverable)


def _previous_ids(plan: _Plan) -> set[str]:
    if plan.in_place:
        return {json_safe(c.id) for c in plan.legacy.chunks}
    if is_store(plan.target):
        try:
            import pyarrow.parquet as pq

            return set(pq.read_table(plan.target / PARQUET, columns=["id"]).column("id").to_pylist())
        except Exception:
            return set()
    return set()


def _estimate(plan: _Plan, emb: "Embedder") -> dict:
    """Embed a small sample to measure the rate (tokens/s, so long and short rows weigh right) and extrapolate."""
    raw = _raw(emb)
    t = time.perf_counter()
    raw.embed_documents(["warm-up"])
    t_load = time.perf_counter() - t
    n = len(plan.rows)
    step = max(1, n // ESTIMATE_SAMPLE)
    sample = list(range(0, n, step))[:ESTIMATE_SAMPLE]
    t = time.perf_counter()
    raw.embed_documents([plan.rows[i].text for i in sample])
    dt = max(time.perf_counter() - t, 1e-6)
    tok_rate = sum(plan.tokens[i] for i in sample) / dt
    seconds = sum(plan.tokens) / tok_rate if tok_rate else 0.0
    return {"seconds": round(seconds + t_load, 1), "embed_seconds": round(seconds, 1),
            "chunks_per_s": round(n / seconds, 1) if seconds else None, "tokens_per_s": round(tok_rate),
            "sample": len(sample), "sample_seconds": round(dt, 3), "model_load_seconds": round(t_load, 2),
            "method": f"embedded {len(sample)} of {n} rows (evenly spaced) after a warm-up; total tokens / measured "
                      "tokens per second, plus the model load"}


RACE_ATTEMPTS = 3  # runs in a row that find the target written by another program mid-run before giving up


def migrate_store(source: Path, to: str, **kwargs: Any) -> MigrationSummary:
    """Migrate one store (see the module docstring and `_migrate_once` for the arguments). When another program
    (Wooster) writes into the target while the run works, nothing of its write is lost (nothing is swapped in, or
    its version is put back) and the run starts again, adopting that write."""
    for attempt in range(1, RACE_ATTEMPTS + 1):
        try:
            return _migrate_once(source, to, **kwargs)
        except StoreChangedError:
            if attempt == RACE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _migrate_once(source: Path, to: str, *, config: "FlowsConfig", out: Path | None = None, in_place: bool = False,
                  backend: str | None = None, python_layout: bool | None = None, dry_run: bool = False,
                  progress: ProgressFn | None = None, project: str | None = None,
                  embedder: "Embedder | None" = None, name: str | None = None,
                  quantization: str | None = None) -> MigrationSummary:
    """Migrate one store once. Raises on failure (`MigrationError` and the library's other errors; exit codes on
    them); returns a summary with status `migrated`, `unchanged` or (dry run) `planned`.

    `to`: a purpose of flows.yaml or a model name/folder (`embedder` overrides both, e.g. an embedder already
    loaded). `python_layout` None: the source's own layout decides for a LangChain Python store (True), else
    flows.yaml's `defaults.python_layout`. `project`: the project of the default target (default: from the source).
    """
    t0 = time.perf_counter()
    progress = progress if progress is not None else _progress
    source = Path(source).expanduser().resolve()
    if in_place and out is not None:
        raise MigrationInputError("give either an out folder or in_place, not both")
    emb = embedder if embedder is not None else resolve_embedder(to, config, backend, quantization)
    emb.ensure_ready()  # a primary that cannot load is replaced before anything is planned with it
    if in_place:
        target = source
    elif out is not None:
        target = Path(out).expanduser().resolve()
    else:
        target = store_dir(config.stores_root(), project or default_project(source), emb.info.slug, emb.dim).resolve()
    summary = MigrationSummary(status="planned" if dry_run else "failed", source=str(source), store=str(target),
                               name=name, model=emb.model_name, backend=emb.backend, dim=emb.dim, in_place=in_place)
    timings = summary.timings

    def read() -> _Plan:
        t = time.perf_counter()
        snap = truth_snapshot(target) if target.is_dir() else None  # before reading: a racing write shows later
        lg = read_legacy_store(source)
        current = None
        if is_store(target):
            try:
                current = read_current(target)  # what other writers (Wooster, LangChain Python) did since our run
            except StoreError as e:
                raise MigrationError(f"{target}: the store there cannot be read, so nothing was changed: {e}. Move it "
                                     "aside (it may hold rows only it has) and run again") from None
            if target == source and current.changed_outside:
                lg.chunks = list(current.rows)  # both layouts' changes applied
        fp, files = source_fingerprint(source)
        layout = python_layout if python_layout is not None else (
            True if lg.format == "langchain-python" else config.defaults.python_layout)
        p = _Plan(source=source, target=target, in_place=in_place, project=project or default_project(source),
                  legacy=lg, fingerprint=fp, files=files, python_layout=layout, current=current, snapshot=snap)
        timings["read"] = round(time.perf_counter() - t, 3)
        return p

    plan = read()
    lg = plan.legacy
    summary.source_format, summary.source_dim, summary.source_count = lg.format, lg.dim, len(lg.chunks)
    summary.problems = [p.to_dict() for p in lg.problems]
    summary.unrecoverable, summary.skipped = len(lg.unrecoverable), _unrecoverable_rows(lg)
    summary.python_layout = plan.python_layout
    if not lg.chunks:
        raise EmptySourceError(
            f"{source}: nothing to migrate: the {lg.format} store holds no text (index ntotal {lg.ntotal}, dim "
            f"{lg.dim}); nothing was written (an empty index aborts LangChain JS readers)")
    _check_target(plan, emb)

    if dry_run:
        reason = _already_done(plan, emb)
        t = time.perf_counter()
        _plan_rows(plan, emb)
        _adopt_target(plan, emb)
        timings["plan"] = round(time.perf_counter() - t, 3)
        _fill_plan_counts(summary, plan)
        summary.plan = {"action": "unchanged" if reason else "migrate", "reason": reason, "target": str(target),
                        "rows": len(plan.rows), "estimate": None if reason else _estimate(plan, emb)}
        summary.message = reason or f"would write {len(plan.rows)} rows to {target}"
        summary.seconds = round(time.perf_counter() - t0, 3)
        return summary

    with _target_lock(target):
        if source_fingerprint(source)[0] != plan.fingerprint:  # changed (or swapped by another run) meanwhile
            plan = read()
        reason = _already_done(plan, emb)
        if reason:
            summary.status, summary.message = "unchanged", reason
            if is_store(target):
                summary.count = summary.unchanged = read_manifest(target).count
            summary.seconds = round(time.perf_counter() - t0, 3)
            return summary
        t = time.perf_counter()
        _plan_rows(plan, emb)
        _adopt_target(plan, emb)
        timings["plan"] = round(time.perf_counter() - t, 3)
        _fill_plan_counts(summary, plan)
        t = time.perf_counter()
        vectors = _embed_all(plan, emb, config, progress, summary)
        timings["embed"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        previous = _previous_ids(plan)
        backup: list[Path] = []

        def before_swap(tmp: Path) -> None:
            problems = _verify_written(tmp, plan, emb)
            if problems:
                raise MigrationVerifyError(f"{target}: the migrated store failed verification, nothing was swapped "
                                           "in: " + "; ".join(problems))
            if in_place:
                backup.append(make_backup(source))

        try:
            write_store(target, plan.rows, vectors, _manifest(plan, emb), python_layout=plan.python_layout,
                        before_swap=before_swap, expect=plan.snapshot)
        except MigrationVerifyError:
            shutil.rmtree(_work_dir(target), ignore_errors=True)  # its shards made a store that failed: not reused
            raise
        except StoreChangedError:
            for b in backup:  # the backup was of the version another writer has since changed: not a backup of ours
                shutil.rmtree(b, ignore_errors=True)
            raise
        except StoreError as e:
            raise MigrationError(f"{target}: writing the migrated store failed, the previous one is as it was: {e}") \
                from e
        after = verify_store(target)
        if after:
            if backup:
                _put_back(target, backup[0], f".{target.name}.failed-{stamp()}")
            raise MigrationVerifyError(f"{target}: the swapped-in store failed verification"
                                       + (f"; the previous store was restored from {backup[0]}" if backup else "")
                                       + ": " + "; ".join(after))
        shutil.rmtree(_work_dir(target), ignore_errors=True)
        timings["write"] = round(time.perf_counter() - t, 3)
    new_ids = [c.id for c in plan.rows]
    summary.status, summary.written = "migrated", True
    summary.adoption = plan.adoption.to_dict()
    summary.backup = str(backup[0]) if backup else None
    summary.count = len(new_ids)
    summary.added = sum(1 for i in new_ids if i not in previous)
    summary.updated = len(new_ids) - summary.added
    summary.deleted = len(previous - set(new_ids))
    summary.message = (f"{summary.count} rows written to {target}" + (f"; previous store kept at {summary.backup}"
                                                                     if summary.backup else ""))
    summary.seconds = round(time.perf_counter() - t0, 3)
    return summary


def _put_back(target: Path, backup: Path, aside_name: str) -> None:
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


def _fill_plan_counts(summary: MigrationSummary, plan: _Plan) -> None:
    summary.count = len(plan.rows)
    summary.rechunked = len(plan.split)
    summary.pieces = sum(len(v) for v in plan.split.values())
    summary.problems = [p.to_dict() for p in plan.legacy.problems + plan.problems]


# ---------------------------------------------------------------------------------------------------------------
# declared and bulk migrations


def run_declared_migration(m: "MigrationConfig", config: "FlowsConfig", dry_run: bool = False,
                           progress: ProgressFn | None = None) -> MigrationSummary:
    """One `migrations:` entry of flows.yaml (or one store found under `wooster.root`); raises on failure."""
    return migrate_store(config.resolve_path(m.source), m.to, config=config,
                         out=config.resolve_path(m.out) if m.out is not None else None, in_place=m.in_place,
                         python_layout=m.python_layout, dry_run=dry_run, progress=progress, name=m.name)


def _looks_like_store(p: Path) -> bool:
    names = ("faiss.index", "docstore.json", "index.faiss", "index.pkl", MANIFEST)
    return p.is_dir() and any((p / n).is_file() for n in names)


def declared_migrations(config: "FlowsConfig") -> list["MigrationConfig"]:
    """flows.yaml's `migrations:`; when there are none, one per store under `wooster.root`:
    `projects/*/vectorStore` to `wooster.projects_purpose`, `vector_data/*` to `wooster.user_profile_purpose`, in
    place unless `wooster.in_place` is false (backups, hidden folders and non-store folders are passed over)."""
    from woolocal_ingest.config import MigrationConfig

    if config.migrations:
        return list(config.migrations)
    if config.wooster.root is None:
        raise MigrationInputError("nothing to migrate: flows.yaml declares no migrations and no wooster.root")
    root = config.resolve_path(config.wooster.root)
    if not root.is_dir():
        raise MigrationInputError(f"wooster.root: {root} is not a folder")
    w = config.wooster
    found: list[tuple[str, Path, str]] = []
    projects = root / "projects"
    if projects.is_dir():
        for d in sorted(projects.iterdir()):
            vs = d / "vectorStore"
            if not d.name.startswith(".") and _looks_like_store(vs):
                found.append((f"projects-{d.name}", vs, w.projects_purpose))
    vdata = root / "vector_data"
    if vdata.is_dir():
        for d in sorted(vdata.iterdir()):
            if d.name.startswith(".") or BACKUP_TAG in d.name or ROLLED_BACK_TAG in d.name:
                continue
            if _looks_like_store(d):
                found.append((f"vector_data-{d.name}", d, w.user_profile_purpose))
    out, names = [], set()
    for raw, path, purpose in found:
        name = _safe_name(raw)
        n, base = 1, name
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.add(name)
        out.append(MigrationConfig(name=name, source=path, to=purpose, in_place=w.in_place))
    return out


def run_one(m: "MigrationConfig", config: "FlowsConfig", dry_run: bool = False,
            progress: ProgressFn | None = None) -> MigrationSummary:
    """`run_declared_migration`, but a failure becomes a summary with status `failed` (for bulk runs)."""
    t0 = time.perf_counter()
    try:
        return run_declared_migration(m, config, dry_run=dry_run, progress=progress)
    except Exception as e:
        return MigrationSummary(status="failed", source=str(config.resolve_path(m.source)), name=m.name,
                                store=str(config.resolve_path(m.out)) if m.out else "", in_place=m.in_place,
                                error=f"{type(e).__name__}: {e}" if not isinstance(e, WoolocalError) else str(e),
                                exit_code=int(getattr(e, "exit_code", 1)), message="failed",
                                seconds=round(time.perf_counter() - t0, 3))


def migrate_all(config: "FlowsConfig", *, dry_run: bool = False,
                progress: ProgressFn | None = None) -> list[MigrationSummary]:
    """Every declared migration (or every store under `wooster.root`), one after another; a failing store does not
    stop the others (its summary has status `failed`)."""
    return [run_one(m, config, dry_run=dry_run, progress=progress) for m in declared_migrations(config)]


# ---------------------------------------------------------------------------------------------------------------
# human output


def format_summary(s: dict) -> str:
    """A few lines for one migration summary (`MigrationSummary.to_dict()`)."""
    head = "migrate (dry run)" if s["status"] == "planned" else "migrate"
    lines = [f"{head} {s['source']} -> {s['store']}  [{s['status']}]"]
    fmt = s.get("source_format")
    if fmt:
        lines.append(f"  source   {fmt}, {s.get('source_dim')}d, {s.get('source_count')} chunks")
    counts = s.get("problem_counts") or _problem_counts(s.get("problems") or [])
    if fmt:
        lines.append("  problems " + (", ".join(f"{k} x{v}" for k, v in counts.items()) or "none")
                     + (f"  ({s['unrecoverable']} unrecoverable: {s['skipped']} row(s) without text)"
                        if s.get("unrecoverable") else ""))
    if s.get("model"):
        lines.append(f"  model    {s['model']} ({s['dim']}d, {s['backend']})")
    if s["status"] in ("migrated", "planned"):
        split = f" ({s['rechunked']} re-chunked into {s['pieces']} pieces)" if s.get("rechunked") else ""
        lines.append(f"  rows     {s['count']}{split}")
    if s["status"] == "migrated":
        lines.append(f"  chunks   {s['added']} added, {s['updated']} updated, {s['deleted']} deleted, "
                     f"{s['skipped']} skipped; embedded {s['embedded']}"
                     + (f" ({s['cached']} from the cache)" if s.get("cached") else "")
                     + f", batches {s['batches']} ({s['resumed_batches']} resumed)")
    adoption = s.get("adoption") or {}
    if adoption.get("outside") or adoption.get("adopted"):
        lines.append("  others   " + Adoption(**adoption).line())
    plan = s.get("plan") or {}
    est = plan.get("estimate")
    if est:
        lines.append(f"  estimate {est['seconds']:.0f}s ({est['chunks_per_s']} chunks/s measured on {est['sample']} "
                     f"rows; model load {est['model_load_seconds']}s)")
    if plan:
        lines.append(f"  action   {plan['action']}" + (f": {plan['reason']}" if plan.get("reason") else ""))
    if s.get("backup"):
        lines.append(f"  backup   {s['backup']}  (woolocal migrate --rollback {s['source']})")
    if s.get("error"):
        lines.append(f"  error    {s['error']}")
    elif s.get("message") and s["status"] == "unchanged":
        lines.append(f"  {s['message']}")
    lines.append(f"  time     {s.get('seconds', 0):.1f}s")
    return "\n".join(lines)


def format_table(rows: Sequence[dict]) -> str:
    """One line per migration, then the totals: the summary `woolocal migrate --all` ends with."""
    head = ("name", "status", "model", "dim", "rows", "problems", "time", "store / error")
    table = [head]
    for s in rows:
        probs = sum((s.get("problem_counts") or _problem_counts(s.get("problems") or [])).values())
        table.append((str(s.get("name") or s["source"]), s["status"], str(s.get("model") or "-"),
                      str(s.get("dim") or "-"), str(s.get("count") or 0), str(probs), f"{s.get('seconds', 0):.1f}s",
                      s["error"] if s.get("error") else str(s.get("store") or "")))
    widths = [max(len(r[i]) for r in table) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in table]
    by: dict[str, int] = {}
    for s in rows:
        by[s["status"]] = by.get(s["status"], 0) + 1
    lines.append(f"{len(rows)} store(s): " + (", ".join(f"{n} {k}" for k, n in sorted(by.items())) or "none"))
    return "\n".join(lines)
