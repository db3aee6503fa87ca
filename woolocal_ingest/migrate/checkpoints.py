"""Checkpointed embedding: rows embedded in batches, each batch kept as a Parquet shard in `.<target>.migrate-work/`
(keyed by source, model, batch size and rows), so a run killed mid-way resumes where it stopped."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from woolocal_ingest.chunking import Chunk
from woolocal_ingest.fsutil import fsync_dir, fsync_file
from woolocal_ingest.migrate.errors import MigrationError
from woolocal_ingest.migrate.model import vector_identity
from woolocal_ingest.migrate.plan import Plan, rows_digest

if TYPE_CHECKING:
    from woolocal_ingest.config import FlowsConfig
    from woolocal_ingest.embedders.base import Embedder

BATCH_ENV = "WOOLOCAL_MIGRATE_BATCH"  # rows per checkpointed batch (tests use small ones)
DEFAULT_BATCH = 128  # rows: ~5 s of MiniLM work on 2 cores, the most a kill -9 can lose
WORK_SUFFIX = ".migrate-work"
WORK_VERSION = 2  # 2: rows embedded longest first, shards record their rows

ProgressFn = Callable[[str, int], None]  # ("total+", n) when work is known, ("embedded", n) per texts embedded


def work_dir(target: Path) -> Path:
    return target.parent / f".{target.name}{WORK_SUFFIX}"


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


@dataclass
class Embedded:
    """The vectors of a plan's rows, and how they came: batches in all, loaded from checkpoints, rows embedded
    (of which served by the embedding cache)."""

    vectors: np.ndarray
    batches: int = 0
    resumed_batches: int = 0
    embedded: int = 0
    cached: int = 0


def embed_checkpointed(plan: Plan, emb: "Embedder", config: "FlowsConfig", progress: ProgressFn | None) -> Embedded:
    """Every planned row's vector: vectors we already hold for the same text by the same model files, then the
    valid checkpoint shards, then the rest embedded batch by batch (longest rows first), each batch checkpointed."""
    from woolocal_ingest.ingest import with_cache

    rows = plan.rows
    batch = _batch_size()
    dim = emb.dim
    work = work_dir(plan.target)
    key = {"version": WORK_VERSION, "source_fingerprint": plan.fingerprint, "model": vector_identity(emb),
           "batch": batch, "limit": plan.limit, "rows": len(rows), "rows_sha256": rows_digest(rows),
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
    out = Embedded(vectors, batches=len(groups))
    todo: list[int] = []
    for b, idx in enumerate(groups):
        path = work / _shard_name(b)
        v = _read_shard(path, idx, [rows[i] for i in idx], dim) if path.is_file() else None
        if v is None:
            path.unlink(missing_ok=True)
            todo.append(b)
        else:
            vectors[idx] = v
            out.resumed_batches += 1
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
        out.embedded += len(part)
    out.cached = int(cached.hits)
    return out
