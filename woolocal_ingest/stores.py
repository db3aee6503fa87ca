"""The store format (contract in DESIGN.md): atomic write, open with dimension checks, verify, search.

A store is co-owned: Wooster (LangChain JS) and LangChain Python add, delete and rewrite rows in `faiss.index` +
`docstore.json` (or `index.faiss` + `index.pkl`) between our runs. Those files are the truth for what a store
holds; `manifest.json` and `chunks.parquet` are our record of what we wrote. `Store` serves the truth and reports
its `drift` from the record; only real damage (unreadable files, dims or counts that disagree) is an error.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

import numpy as np

from woolocal_ingest.chunking import Chunk, embed_text
from woolocal_ingest.errors import DimensionMismatchError, StoreError
from woolocal_ingest.fsutil import FileState, fsync_dir, fsync_file, rename_exchange, sha256_file, snapshot, swap_into_place
from woolocal_ingest.lexical import LEXICAL, LexicalIndex, check_lexical, write_lexical
from woolocal_ingest.manifest import FORMAT, FORMAT_VERSION, MANIFEST, Manifest, folder_dim, read_manifest
from woolocal_ingest.retrieval import FUSION_DEPTH, check_mode, fuse_rrf
from woolocal_ingest.vector_index import DEFAULT_KIND, index_kind

if TYPE_CHECKING:
    from woolocal_ingest.embedders.base import Embedder

__all__ = [
    "DOCSTORE_JS", "Drift", "FORMAT", "INDEX_JS", "INDEX_PY", "LEXICAL", "MANIFEST", "PARQUET", "PICKLE_PY", "SearchHit", "Store",
    "StoreChangedError", "TRUTH_FILES", "is_store", "json_safe", "json_safe_value", "list_stores", "store_dir",
    "truth_snapshot", "verify_store", "write_store",
]

INDEX_JS, DOCSTORE_JS = "faiss.index", "docstore.json"
INDEX_PY, PICKLE_PY = "index.faiss", "index.pkl"
PARQUET = "chunks.parquet"
JS_FILES, PY_FILES = (INDEX_JS, DOCSTORE_JS), (INDEX_PY, PICKLE_PY)
TRUTH_FILES = JS_FILES + PY_FILES  # what LangChain writers rewrite; manifest.json and chunks.parquet are ours alone


class StoreChangedError(StoreError):
    """Another program wrote into the store while one of our runs worked on it (nothing of its write is lost: the
    run did not swap, or swapped its version back); running again adopts that write."""


def store_dir(stores_root: Path, project: str, model_slug: str, dim: int) -> Path:
    """`<stores_root>/<project>/<model-slug>-<dim>d`: the folder name carries model and dimension."""
    return Path(stores_root) / project / f"{model_slug}-{dim}d"


def truth_snapshot(folder: Path) -> dict[str, FileState | None]:
    """The identity of the files LangChain writers rewrite: equal snapshots mean nobody wrote in between."""
    return snapshot(folder, TRUTH_FILES)


# ---------------------------------------------------------------------------------------------------------------
# writing



# ---------------------------------------------------------------------------------------------------------------
# writing


def json_safe(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded: replace them (U+FFFD) so every file stays valid UTF-8.
    A well-formed surrogate pair (as JSON written by JavaScript can hold) becomes the character it encodes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def json_safe_value(value: Any) -> Any:
    """`json_safe` applied to every string (keys included) in JSON-shaped metadata."""
    if isinstance(value, str):
        return json_safe(value)
    if isinstance(value, Mapping):
        return {json_safe(str(k)) if isinstance(k, str) else k: json_safe_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe_value(v) for v in value]
    return value


def _safe_chunk(c: Chunk) -> Chunk:
    """The chunk with every string it writes (id, text, source, metadata) made valid UTF-8."""
    safe = Chunk(json_safe(c.id), json_safe(c.text), json_safe(c.source), c.chunk, json_safe_value(c.metadata),
                 c.sha256, json_safe(c.context))
    return c if safe == c else safe


def _write_docstore(path: Path, chunks: Sequence[Chunk]) -> None:
    docs = [[c.id, {"pageContent": c.text, "metadata": c.metadata}] for c in chunks]
    mapping = {str(i): c.id for i, c in enumerate(chunks)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump([docs, mapping], f, ensure_ascii=False, allow_nan=False)


def _write_python_layout(folder: Path, chunks: Sequence[Chunk], index) -> None:
    import pickle

    import faiss

    try:
        from langchain_community.docstore.in_memory import InMemoryDocstore
        from langchain_core.documents import Document as LCDocument
    except ImportError as e:  # pragma: no cover - depends on the install
        raise StoreError(
            "the LangChain Python layout (index.faiss + index.pkl) needs langchain-community: "
            "pip install 'woolocal-ingest[langchain]'"
        ) from e
    faiss.write_index(index, str(folder / INDEX_PY))
    docstore = InMemoryDocstore({c.id: LCDocument(id=c.id, page_content=c.text, metadata=c.metadata) for c in chunks})
    with open(folder / PICKLE_PY, "wb") as f:
        pickle.dump((docstore, {i: c.id for i, c in enumerate(chunks)}), f)


def _write_parquet(path: Path, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = vectors.shape[1]
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    table = pa.table({
        "id": pa.array([c.id for c in chunks], pa.string()),
        "source": pa.array([c.source for c in chunks], pa.string()),
        "chunk": pa.array([c.chunk for c in chunks], pa.int32()),
        "text": pa.array([c.text for c in chunks], pa.string()),
        "sha256": pa.array([c.sha256 for c in chunks], pa.string()),
        "metadata": pa.array([json.dumps(c.metadata, ensure_ascii=False, sort_keys=True) for c in chunks], pa.string()),
        "context": pa.array([c.context for c in chunks], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
    })
    pq.write_table(table, path, compression="zstd")



def write_store(
    target: Path,
    chunks: Sequence[Chunk],
    vectors: np.ndarray,
    manifest: Mapping[str, Any],
    python_layout: bool = False,
    before_swap: Callable[[Path], None] | None = None,
    expect: Mapping[str, FileState | None] | None = None,
) -> Path:
    """Write a store atomically: build it in a temp folder beside `target`, fsync, verify, then swap it in.

    The previous version at `target` stays untouched until the new one has verified; on any failure the temp folder
    is removed and `target` is as it was. `manifest` carries model, chunking and source facts; this function adds the
    format, counts, index facts, file hashes and the creation time. Returns `target`.

    `expect`: the `truth_snapshot` of `target` that the caller's rows were read from. If a LangChain writer changed
    those files since, nothing is swapped in; if it wrote in the instant between that check and the swap, the
    previous version (holding its write) is swapped back. Both raise `StoreChangedError`: run again to adopt it.
    """
    target = Path(target)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(chunks) == 0:
        raise StoreError(
            f"{target}: nothing to write (0 chunks); the previous store, if any, is left as it was "
            "(an empty faiss.index aborts LangChain JS readers)"
        )
    if vectors.ndim != 2 or vectors.shape[0] != len(chunks):
        raise StoreError(f"{target}: {len(chunks)} chunks but vectors of shape {vectors.shape}")
    dim = int(vectors.shape[1])
    name_dim = folder_dim(target.name)
    if name_dim is not None and name_dim != dim:
        raise DimensionMismatchError(f"{target}: folder name says {name_dim}d, vectors have {dim} dims")
    if len({c.id for c in chunks}) != len(chunks):
        raise StoreError(f"{target}: duplicate chunk ids")
    if not np.isfinite(vectors).all():
        raise StoreError(f"{target}: vectors contain NaN or infinity")

    kind = index_kind(str((manifest.get("index") or {}).get("kind") or DEFAULT_KIND))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    previous: Path | None = None
    try:
        safe = [_safe_chunk(c) for c in chunks]
        if len({c.id for c in safe}) != len(safe):
            raise StoreError(f"{target}: duplicate chunk ids once made valid UTF-8 (lone surrogates)")
        index = kind.build(vectors)
        kind.write(index, tmp / INDEX_JS)
        _write_docstore(tmp / DOCSTORE_JS, safe)
        _write_parquet(tmp / PARQUET, safe, vectors)
        # BM25 over the same rows, updated from the previous version's index (only changed rows re-indexed)
        write_lexical(tmp / LEXICAL, [(c.id, c.embed_text) for c in safe], previous=target / LEXICAL)
        layouts = ["langchain-js"]
        if python_layout:
            _write_python_layout(tmp, safe, index)
            layouts.append("langchain-python")
        files = sorted(p.name for p in tmp.iterdir())
        full = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **{k: v for k, v in manifest.items() if k != "index"},
            "dim": dim,
            "count": len(chunks),
            "metric": "cosine (L2 over L2-normalised vectors)",
            "index": kind.manifest(),
            "layouts": layouts,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {name: sha256_file(tmp / name) for name in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, ensure_ascii=False, sort_keys=False), encoding="utf-8")
        for name in files + [MANIFEST]:
            fsync_file(tmp / name)
        fsync_dir(tmp)
        problems = verify_store(tmp, expect_name=target.name)
        if problems:
            raise StoreError(f"{target}: the new version failed verification: " + "; ".join(problems))
        if before_swap:
            before_swap(tmp)
        if expect is not None and truth_snapshot(target) != dict(expect):
            raise StoreChangedError(f"{target}: another program (Wooster or LangChain) wrote into the store while "
                                    "this run worked; nothing was swapped in, the store holds its version")
        previous = swap_into_place(tmp, target)
        if expect is not None and previous is not None and truth_snapshot(previous) != dict(expect):
            # It wrote into the old version in the instant between the check and the swap: put that version back.
            if not rename_exchange(previous, target):
                aside = target.parent / f".{target.name}.raced-{uuid.uuid4().hex[:8]}"
                os.rename(target, aside)
                os.rename(previous, target)
                previous = aside
            fsync_dir(target.parent)
            raise StoreChangedError(f"{target}: another program (Wooster or LangChain) wrote into the store during "
                                    "the swap; its version was put back in place")
    except BaseException:
        shutil.rmtree(previous if previous is not None else tmp, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------------
# reading: the truth (faiss.index + docstore.json) and our record (chunks.parquet)


@dataclass(frozen=True)
class SearchHit:
    """One search result; `score` is its mode's score, higher is closer: the cosine similarity (`dense`), the BM25
    score (`lexical`) or the reciprocal-rank-fusion score (`hybrid`); `scores` holds each ranking's own score
    (`dense`: cosine, `lexical`: BM25; absent where that ranking did not return the row)."""

    id: str
    text: str
    metadata: dict
    score: float
    row: int = field(default=-1, repr=False)
    mode: str = "dense"
    scores: dict = field(default_factory=dict, compare=False)

    @property
    def source(self) -> str | None:
        return self.metadata.get("source")

    def to_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "metadata": self.metadata, "score": self.score, "mode": self.mode,
                "scores": dict(self.scores)}


@dataclass(frozen=True)
class Drift:
    """How the truth of one layout differs from our record: ids added, deleted, and rewritten (same id, other text
    or metadata) by another writer."""

    layout: str
    added: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    rewritten: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.added or self.deleted or self.rewritten)

    def describe(self) -> str:
        return (f"changed outside woolocal ({self.layout}): +{len(self.added)} rows, \u2212{len(self.deleted)} rows, "
                f"{len(self.rewritten)} rewritten")

    def to_dict(self) -> dict:
        return {"layout": self.layout, "added": len(self.added), "deleted": len(self.deleted),
                "rewritten": len(self.rewritten), "ids": {"added": list(self.added)[:20],
                                                          "deleted": list(self.deleted)[:20],
                                                          "rewritten": list(self.rewritten)[:20]}}


@dataclass(frozen=True)
class Record:
    """Our record of a store (chunks.parquet): rows as we wrote them, with their vectors."""

    chunks: tuple[Chunk, ...]
    vectors: np.ndarray

    @cached_property
    def by_id(self) -> dict[str, int]:
        return {c.id: i for i, c in enumerate(self.chunks)}

    @cached_property
    def by_sha(self) -> dict[str, int]:
        """Row of each text sha256 (the first): vectors we computed ourselves, reusable for the same text."""
        out: dict[str, int] = {}
        for i, c in enumerate(self.chunks):
            out.setdefault(c.sha256, i)
        return out


def read_record(folder: Path, with_vectors: bool = True) -> Record:
    """chunks.parquet of a store folder; StoreError naming the file when it cannot be read."""
    import pyarrow.parquet as pq

    path = Path(folder) / PARQUET
    cols = ["id", "source", "chunk", "text", "sha256", "metadata"]
    try:
        # `context` (the title > heading prefix embedded before the text) came with chunker 4; older records have none
        names = set(pq.read_schema(path).names)
        extra = [c for c in ("context",) if c in names]
        t = pq.read_table(path, columns=cols + extra + (["embedding"] if with_vectors else []))
        r = t.select(cols + extra).to_pydict()
        ctx = r.get("context") or [""] * t.num_rows
        chunks = tuple(Chunk(id=r["id"][i], text=r["text"][i], source=r["source"][i], chunk=r["chunk"][i],
                             metadata=json.loads(r["metadata"][i]), sha256=r["sha256"][i], context=ctx[i] or "")
                       for i in range(t.num_rows))
        if with_vectors and t.num_rows:
            vec = np.asarray(t.column("embedding").combine_chunks().flatten(), dtype=np.float32)
            vectors = vec.reshape(t.num_rows, -1)
        else:
            vectors = np.zeros((t.num_rows, 0), np.float32)
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(f"{path}: cannot read: {e}") from None
    return Record(chunks, vectors)


def read_docstore(folder: Path, ntotal: int) -> list[tuple[str, str, dict]]:
    """(id, text, metadata) of each row of a LangChain JS docstore.json, in index row order; StoreError naming the
    file and what disagrees when it is not a whole, consistent docstore of `ntotal` rows."""
    path = Path(folder) / DOCSTORE_JS
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable ({e}); a save was interrupted?") from None
    if not (isinstance(data, list) and len(data) == 2 and isinstance(data[0], list) and isinstance(data[1], dict)):
        raise StoreError(f"{path}: expected [[[id, {{pageContent, metadata}}], ...], {{\"0\": id, ...}}]")
    docs_raw, mapping = data
    docs: dict[str, tuple[str, dict]] = {}
    for i, d in enumerate(docs_raw):
        if not (isinstance(d, list) and len(d) == 2 and isinstance(d[0], str) and isinstance(d[1], dict)
                and isinstance(d[1].get("pageContent"), str)):
            raise StoreError(f"{path}: entry {i} is not [id, {{pageContent: text, metadata}}]")
        meta = d[1].get("metadata")
        docs[d[0]] = (d[1]["pageContent"], meta if isinstance(meta, dict) else {})
    if len(mapping) != ntotal or len(docs) != ntotal:
        raise StoreError(f"{path}: counts disagree: {INDEX_JS} holds {ntotal} vectors, the row->id mapping "
                         f"{len(mapping)} rows and the docstore {len(docs)} documents (a save was interrupted?)")
    rows = []
    for r in range(ntotal):
        id_ = mapping.get(str(r))
        if not isinstance(id_, str) or id_ not in docs:
            raise StoreError(f"{path}: row {r} maps to {id_!r}, which is not a document of the docstore")
        rows.append((id_, *docs[id_]))
    if len({r[0] for r in rows}) != ntotal:
        raise StoreError(f"{path}: the row->id mapping names one id for several rows")
    return rows


def _meta_key(m: Mapping[str, Any]) -> str:
    return json.dumps(m, ensure_ascii=False, sort_keys=True)


def drift_between(layout: str, truth: Sequence[tuple[str, str, dict]], record: Record) -> Drift:
    """What another writer changed: truth rows (id, text, metadata) against our record."""
    truth_ids = {t[0] for t in truth}
    added, rewritten = [], []
    for id_, text, meta in truth:
        i = record.by_id.get(id_)
        if i is None:
            added.append(id_)
        else:
            c = record.chunks[i]
            if c.text != text or _meta_key(c.metadata) != _meta_key(meta):
                rewritten.append(id_)
    deleted = [c.id for c in record.chunks if c.id not in truth_ids]
    return Drift(layout, tuple(added), tuple(deleted), tuple(rewritten))


def _matches(metadata: Mapping[str, Any], flt: Mapping[str, Any]) -> bool:
    for key, want in flt.items():
        value: Any = metadata
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(want, (list, tuple, set)):
            if value not in want:
                return False
        elif value != want:
            return False
    return True


EmbedderSource = Union["Embedder", Callable[[], "Embedder"], None]


class Store:
    """An opened store: its manifest, FAISS index and rows as Wooster sees them (faiss.index + docstore.json).

    `embedder` (an Embedder, or a function that loads one on first use) embeds text queries; the store never
    loads a model itself (`woolocal_ingest.api.open_store` passes the store's own). Opening reads one consistent
    version: a docstore that disagrees with the index is damage (StoreError), rows changed by another writer are
    not (`drift` says what changed)."""

    def __init__(self, path: Path, embedder: EmbedderSource = None):
        self.path = Path(path)
        self.snapshot = truth_snapshot(self.path)  # before reading: a write racing this read shows as a change
        self.manifest: Manifest = read_manifest(self.path)
        self.kind = index_kind(self.manifest.index_kind)
        self.index = self.kind.read(self.path / INDEX_JS)
        check_dims(self.path, self.manifest, int(self.index.d))
        self._truth = read_docstore(self.path, int(self.index.ntotal))
        self._embedder: Any = None
        self._provider: Callable[[], Embedder] | None = None
        if callable(embedder) and not hasattr(embedder, "embed_query"):
            self._provider = embedder
        elif embedder is not None:
            self._check_embedder(embedder)
            self._embedder = embedder

    # -- rows ----------------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def ids(self) -> list[str]:
        return [t[0] for t in self._truth]

    @property
    def rows(self) -> list[tuple[str, str, dict]]:
        """(id, text, metadata) of every row as the store holds it now (faiss.index + docstore.json), in row order."""
        return list(self._truth)

    @cached_property
    def record(self) -> Record:
        """Our record of the store (chunks.parquet, with vectors)."""
        return read_record(self.path)

    @cached_property
    def drift(self) -> Drift:
        """What another writer changed in faiss.index + docstore.json since we wrote the store."""
        return drift_between("langchain-js", self._truth, self.record)

    def chunks(self) -> list[Chunk]:
        """Every row as a Chunk, in row order (ids, texts and metadata as the store holds them now)."""
        rec = self.record
        out = []
        for row, (id_, text, meta) in enumerate(self._truth):
            i = rec.by_id.get(id_)
            # our record keeps the sha256 of the text as chunked and embedded (with its context; before lone
            # surrogates became U+FFFD); a row another writer added or rewrote is embedded as its plain text
            ours = i is not None and rec.chunks[i].text == text
            sha = rec.chunks[i].sha256 if ours else Chunk.text_sha256(text)
            source, chunk = meta.get("source"), meta.get("chunk")
            out.append(Chunk(id=id_, text=text, source=source if isinstance(source, str) else "",
                             chunk=chunk if isinstance(chunk, int) and not isinstance(chunk, bool) else row,
                             metadata=meta, sha256=sha, context=rec.chunks[i].context if ours else ""))
        return out

    def vectors(self) -> np.ndarray:
        """All stored vectors, float32 [count, dim], in row order."""
        return self.index.reconstruct_n(0, self.count)

    @cached_property
    def lexical(self) -> LexicalIndex:
        """BM25 over the rows the store holds now: its `lexical.sqlite` brought up to date in memory with the truth
        (rows another writer added or rewrote are indexed as their text; a store without the file gets one built)."""
        rec = read_record(self.path, with_vectors=False) if (self.path / PARQUET).is_file() else None
        ours = rec.by_id if rec is not None else {}
        rows = []
        for id_, text, _ in self._truth:
            i = ours.get(id_)
            ctx = rec.chunks[i].context if i is not None and rec.chunks[i].text == text else ""
            rows.append((id_, embed_text(ctx, text)))
        path = self.path / LEXICAL
        return LexicalIndex.load(path if LEXICAL in self.manifest.files else None, rows)

    # -- search ------------------------------------------------------------------------------------------------
    @property
    def embedder(self) -> "Embedder":
        if self._embedder is None:
            if self._provider is None:
                raise StoreError(f"{self.path}: a text query needs the store's model: open the store with "
                                 "woolocal_ingest.open_store (which loads it) or pass embedder=")
            emb = self._provider()
            self._check_embedder(emb)
            self._embedder = emb
        return self._embedder

    def _check_embedder(self, emb: "Embedder") -> None:
        if emb.dim != self.dim:
            raise DimensionMismatchError(
                f"{self.path}: the store holds {self.dim}-dim vectors but embedder {emb.model_name} makes {emb.dim}-dim "
                "vectors; query it with the model that built it"
            )

    def search(self, query: str | np.ndarray, k: int = 10, filter: Mapping[str, Any] | None = None,
               mode: str | None = None, vector: np.ndarray | None = None) -> list[SearchHit]:
        """The `k` rows closest to `query` (text, or a vector of the store's dim), best first; `filter` keeps rows
        whose metadata equals each given value (dotted keys reach into nested metadata; a list means any of).

        `mode`: `hybrid` (default for text: dense and BM25 rankings fused by reciprocal rank fusion, see
        `woolocal_ingest.retrieval`), `dense` (cosine; the default for a query vector) or `lexical` (BM25).
        `vector`: the text query's embedding when the caller already has it (the service embeds it itself).
        Each hit's `score` is its mode's (higher is closer) and `scores` holds each ranking's own."""
        text = isinstance(query, str)
        mode = check_mode(mode, text)
        if k <= 0 or self.count == 0:
            return []
        rows = None
        if filter:
            rows = np.array([i for i, t in enumerate(self._truth) if _matches(t[2], filter)], dtype=np.int64)
            if rows.size == 0:
                return []
        if mode == "lexical":
            return [self._hit(r, s, mode, lexical=s) for r, s in self.lexical.search(str(query), k, rows)]
        if text:
            vec = self.embedder.embed_query(query) if vector is None else vector
        else:
            vec = query
        vec = np.asarray(vec, dtype=np.float32).reshape(-1)
        if vec.shape[0] != self.dim:
            raise DimensionMismatchError(f"{self.path}: query vector has {vec.shape[0]} dims, store has {self.dim}")
        depth = k if mode == "dense" else max(k, FUSION_DEPTH)
        dense = self._dense(vec, depth, rows)
        if mode == "dense":
            return [self._hit(r, s, mode, dense=s) for r, s in dense]
        fused = fuse_rrf(dense, self.lexical.search(str(query), depth, rows), k)
        out = []
        for f in fused:
            d = f.dense if f.dense is not None else float(self.index.reconstruct(int(f.row)) @ vec)
            out.append(self._hit(f.row, f.score, mode, dense=d, lexical=f.lexical))
        return out

    def _dense(self, vec: np.ndarray, k: int, rows: np.ndarray | None) -> list[tuple[int, float]]:
        k = min(k, self.count if rows is None else int(rows.size))
        scores, labels = self.kind.search(self.index, vec, k, rows)
        return [(int(r), float(s)) for s, r in zip(scores[0], labels[0]) if r >= 0]

    def _hit(self, row: int, score: float, mode: str, dense: float | None = None,
             lexical: float | None = None) -> SearchHit:
        id_, text, meta = self._truth[row]
        scores = {m: v for m, v in (("dense", dense), ("lexical", lexical)) if v is not None}
        return SearchHit(id=id_, text=text, metadata=meta, score=float(score), row=int(row), mode=mode,
                         scores=scores)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, model={self.manifest.model_name!r}, dim={self.dim}, count={self.count})"


def check_dims(path: Path, manifest: Manifest, index_dim: int, name: str | None = None) -> None:
    """Folder name (when it carries `-<dim>d`; Wooster's in-place `vectorStore/` does not), manifest and index
    agree; DimensionMismatchError naming all of them."""
    name = name or Path(path).name
    name_dim = folder_dim(name)
    man_dim = manifest.get("dim")
    model_dim = manifest.model.get("dim")
    dims = {d for d in (name_dim, man_dim, model_dim, index_dim) if d is not None}
    if len(dims) > 1 or man_dim is None:
        raise DimensionMismatchError(
            f"{path}: dimensions disagree: folder name {name!r} says {name_dim}, manifest.json dim says {man_dim}"
            f" (model.dim {model_dim}), {INDEX_JS} has d={index_dim}"
        )


def is_store(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def list_stores(stores_root: Path) -> list[Path]:
    """Every store folder under a stores root (`<root>/<project>/<model>-<dim>d`)."""
    root = Path(stores_root)
    if not root.is_dir():
        return []
    return sorted(d for proj in root.iterdir() if proj.is_dir() and not proj.name.startswith(".")
                  for d in proj.iterdir() if not d.name.startswith(".") and is_store(d))


# ---------------------------------------------------------------------------------------------------------------
# verifying


def verify_store(path: Path, expect_name: str | None = None) -> list[str]:
    """Every sign of real damage in a store folder (empty list: it is sound). Rows another LangChain writer added,
    deleted or rewrote are not damage (`Store.drift` reports them); checked are: our own files against the
    manifest's hashes, dimensions in name, manifest and index, the docstore against the index (counts, ids), and,
    while faiss.index and docstore.json are as we wrote them, that they equal our record (ids, texts, metadata,
    vectors, unit length)."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except StoreError as e:
        return [str(e)]
    problems: list[str] = []
    ours_changed = []
    truth_changed = False
    for name, digest in manifest.files.items():
        f = path / name
        if not f.is_file():
            if name in TRUTH_FILES and name not in JS_FILES:
                truth_changed = True  # a LangChain Python layout removed by its user: not ours to insist on
                continue
            problems.append(f"{name}: listed in manifest.json but missing")
        elif sha256_file(f) != digest:
            if name in TRUTH_FILES:
                truth_changed = truth_changed or name in JS_FILES
            else:
                ours_changed.append(name)
    problems += [f"{n}: sha256 differs from manifest.json (our record was changed after writing)" for n in ours_changed]
    if problems:
        return problems
    try:
        index = index_kind(manifest.index_kind).read(path / INDEX_JS)
    except StoreError as e:
        return [f"{INDEX_JS}: unreadable: {e}"]
    try:
        check_dims(path, manifest, int(index.d), name=expect_name)
    except DimensionMismatchError as e:
        problems.append(str(e))
    if index.ntotal == 0:
        problems.append(f"{INDEX_JS}: empty index (LangChain JS readers abort on it)")
    try:
        truth = read_docstore(path, int(index.ntotal))
    except StoreError as e:
        return problems + [str(e).replace(f"{path}/", "")]
    try:
        record = read_record(path)
    except StoreError as e:
        return problems + [str(e)]
    if truth_changed:
        # Another writer's rows are drift (adopted by the next run that writes), but a row it did not touch keeps
        # the vector we wrote: LangChain adds and deletes rows, it never alters another row's vector.
        vectors = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)
        altered = [t[0] for row, t in enumerate(truth)
                   if (i := record.by_id.get(t[0])) is not None and record.chunks[i].text == t[1]
                   and record.vectors.shape[1] == vectors.shape[1]
                   and not np.allclose(vectors[row], record.vectors[i], atol=1e-6)]
        if altered:
            problems.append(f"{INDEX_JS}: the vectors of {len(altered)} row(s) whose text is unchanged differ from "
                            f"the ones we wrote (first: id {altered[0]}): the file was damaged")
        return problems
    ids = [c.id for c in record.chunks]
    if manifest.get("count") != index.ntotal:
        problems.append(f"manifest.json count {manifest.get('count')} != {INDEX_JS} ntotal {index.ntotal}")
    if len(ids) != index.ntotal:
        problems.append(f"{PARQUET} has {len(ids)} rows, {INDEX_JS} {index.ntotal}")
    elif index.ntotal:
        if not np.array_equal(record.vectors, index.reconstruct_n(0, index.ntotal)):
            problems.append(f"{PARQUET} embeddings differ from {INDEX_JS} vectors")
        norms = np.linalg.norm(record.vectors, axis=1)
        if not np.allclose(norms, 1.0, atol=1e-3):
            problems.append(f"{PARQUET}: vectors are not L2-normalised (norms {norms.min():.4f}..{norms.max():.4f})")
    if len(set(ids)) != len(ids):
        problems.append(f"{PARQUET}: duplicate ids")
    if [t[0] for t in truth] != ids:
        problems.append(f"{DOCSTORE_JS}: row->id mapping differs from {PARQUET} ids")
    else:
        differ = [i for i, (t, c) in enumerate(zip(truth, record.chunks))
                  if t[1] != c.text or _meta_key(t[2]) != _meta_key(c.metadata)]
        if differ:
            problems.append(f"{DOCSTORE_JS}: {len(differ)} document(s) differ from {PARQUET} text or metadata "
                            f"(first: id {ids[differ[0]]})")
    if LEXICAL in manifest.files:  # stores written before the lexical index get one in memory when searched
        problems += check_lexical(path / LEXICAL, [(c.id, c.embed_text) for c in record.chunks])
    return problems
