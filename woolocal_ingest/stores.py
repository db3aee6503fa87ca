"""The store format (contract in DESIGN.md): atomic write, open with dimension checks, verify, search."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from woolocal_ingest.chunking import Chunk
from woolocal_ingest.errors import DimensionMismatchError, StoreError, StoreNotFoundError

if TYPE_CHECKING:
    from woolocal_ingest.embedders.base import Embedder

FORMAT = "woolocal-store"
FORMAT_VERSION = 1
INDEX_JS, DOCSTORE_JS = "faiss.index", "docstore.json"
INDEX_PY, PICKLE_PY = "index.faiss", "index.pkl"
PARQUET, MANIFEST = "chunks.parquet", "manifest.json"
_NAME_RE = re.compile(r"^(?P<slug>.+)-(?P<dim>\d+)d$")


def store_dir(stores_root: Path, project: str, model_slug: str, dim: int) -> Path:
    """`<stores_root>/<project>/<model-slug>-<dim>d`: the folder name carries model and dimension."""
    return Path(stores_root) / project / f"{model_slug}-{dim}d"


# ---------------------------------------------------------------------------------------------------------------
# writing


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _json_safe(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded: replace them (U+FFFD) so every file stays valid UTF-8.
    A well-formed surrogate pair (as JSON written by JavaScript can hold) becomes the character it encodes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _json_safe_value(value: Any) -> Any:
    """`_json_safe` applied to every string (keys included) in JSON-shaped metadata."""
    if isinstance(value, str):
        return _json_safe(value)
    if isinstance(value, Mapping):
        return {_json_safe(str(k)) if isinstance(k, str) else k: _json_safe_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe_value(v) for v in value]
    return value


def _safe_chunk(c: Chunk) -> Chunk:
    """The chunk with every string it writes (id, text, source, metadata) made valid UTF-8."""
    safe = Chunk(_json_safe(c.id), _json_safe(c.text), _json_safe(c.source), c.chunk, _json_safe_value(c.metadata),
                 c.sha256)
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
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
    })
    pq.write_table(table, path, compression="zstd")


def _rename_exchange(a: Path, b: Path) -> bool:
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


def _swap_into_place(tmp: Path, target: Path) -> Path | None:
    """Put `tmp` at `target`; return where the previous version now lies (None if there was none)."""
    if not target.exists():
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        return None
    if _rename_exchange(tmp, target):
        _fsync_dir(target.parent)
        return tmp
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    return old


def write_store(
    target: Path,
    chunks: Sequence[Chunk],
    vectors: np.ndarray,
    manifest: Mapping[str, Any],
    python_layout: bool = False,
    before_swap: Callable[[Path], None] | None = None,
) -> Path:
    """Write a store atomically: build it in a temp folder beside `target`, fsync, verify, then swap it in.

    The previous version at `target` stays untouched until the new one has verified; on any failure the temp folder
    is removed and `target` is as it was. `manifest` carries model, chunking and source facts; this function adds the
    format, counts, index facts, file hashes and the creation time. Returns `target`.
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
    m = _NAME_RE.match(target.name)
    if m and int(m.group("dim")) != dim:
        raise DimensionMismatchError(f"{target}: folder name says {m.group('dim')}d, vectors have {dim} dims")
    if len({c.id for c in chunks}) != len(chunks):
        raise StoreError(f"{target}: duplicate chunk ids")
    if not np.isfinite(vectors).all():
        raise StoreError(f"{target}: vectors contain NaN or infinity")

    import faiss

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    previous: Path | None = None
    try:
        safe = [_safe_chunk(c) for c in chunks]
        if len({c.id for c in safe}) != len(safe):
            raise StoreError(f"{target}: duplicate chunk ids once made valid UTF-8 (lone surrogates)")
        index = faiss.IndexFlatL2(dim)
        index.add(vectors)
        faiss.write_index(index, str(tmp / INDEX_JS))
        _write_docstore(tmp / DOCSTORE_JS, safe)
        _write_parquet(tmp / PARQUET, safe, vectors)
        layouts = ["langchain-js"]
        if python_layout:
            _write_python_layout(tmp, safe, index)
            layouts.append("langchain-python")
        files = sorted(p.name for p in tmp.iterdir())
        full = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **dict(manifest),
            "dim": dim,
            "count": len(chunks),
            "metric": "cosine (L2 over L2-normalised vectors)",
            "index": {"type": "IndexFlatL2", "normalised": True},
            "layouts": layouts,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {name: _sha256_file(tmp / name) for name in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, ensure_ascii=False, sort_keys=False), encoding="utf-8")
        for name in files + [MANIFEST]:
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        problems = verify_store(tmp, expect_name=target.name)
        if problems:
            raise StoreError(f"{target}: the new version failed verification: " + "; ".join(problems))
        if before_swap:
            before_swap(tmp)
        previous = _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class SearchHit:
    """One search result; `score` is the cosine similarity (higher is closer)."""

    id: str
    text: str
    metadata: dict
    score: float
    row: int = field(default=-1, repr=False)

    @property
    def source(self) -> str | None:
        return self.metadata.get("source")

    def to_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "metadata": self.metadata, "score": self.score}


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


class Store:
    """An opened store: its manifest, FAISS index and rows; `search` embeds a query with the store's own model."""

    def __init__(self, path: Path, embedder: "Embedder | None" = None):
        self.path = Path(path)
        self.manifest: dict = _read_manifest(self.path)
        import faiss

        try:
            self.index = faiss.read_index(str(self.path / INDEX_JS))
        except Exception as e:
            raise StoreError(f"{self.path / INDEX_JS}: cannot read FAISS index: {e}") from None
        _check_dims(self.path, self.manifest, self.index.d)
        if self.index.ntotal != self.manifest.get("count"):
            raise StoreError(
                f"{self.path}: index holds {self.index.ntotal} vectors, manifest.json count says {self.manifest.get('count')}"
            )
        self._embedder = embedder
        if embedder is not None:
            self._check_embedder(embedder)

    # -- rows ----------------------------------------------------------------------------------------------------
    @cached_property
    def _rows(self):
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(self.path / PARQUET, columns=["id", "source", "chunk", "text", "sha256", "metadata"])
        except Exception as e:
            raise StoreError(f"{self.path / PARQUET}: cannot read: {e}") from None
        if t.num_rows != self.index.ntotal:
            raise StoreError(f"{self.path}: {PARQUET} has {t.num_rows} rows, {INDEX_JS} has {self.index.ntotal}")
        return t.to_pydict()

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def ids(self) -> list[str]:
        return self._rows["id"]

    def chunks(self) -> list[Chunk]:
        """Every row as a Chunk, in row order."""
        r = self._rows
        return [Chunk(id=r["id"][i], text=r["text"][i], source=r["source"][i], chunk=r["chunk"][i],
                      metadata=json.loads(r["metadata"][i]), sha256=r["sha256"][i]) for i in range(self.count)]

    def vectors(self) -> np.ndarray:
        """All stored vectors, float32 [count, dim], in row order."""
        return self.index.reconstruct_n(0, self.count)

    # -- search ------------------------------------------------------------------------------------------------
    @property
    def embedder(self) -> "Embedder":
        if self._embedder is None:
            from woolocal_ingest.embedders import load_embedder

            model = self.manifest.get("model", {})
            candidates = [model.get("path"), model.get("name")]
            last: Exception | None = None
            for cand in candidates:
                if not cand:
                    continue
                try:
                    emb = load_embedder(cand)
                    break
                except Exception as e:  # try the next way of naming it
                    last = e
            else:
                raise StoreError(f"{self.path}: cannot load the store's model {model.get('name')!r}: {last}")
            self._check_embedder(emb)
            self._embedder = emb
        return self._embedder

    def _check_embedder(self, emb: "Embedder") -> None:
        if emb.dim != self.dim:
            raise DimensionMismatchError(
                f"{self.path}: the store holds {self.dim}-dim vectors but embedder {emb.model_name} makes {emb.dim}-dim "
                "vectors; query it with the model that built it"
            )

    def search(self, query: str | np.ndarray, k: int = 10, filter: Mapping[str, Any] | None = None) -> list[SearchHit]:
        """The `k` rows closest to `query` (text, or a vector of the store's dim), best first; `filter` keeps rows
        whose metadata equals each given value (dotted keys reach into nested metadata; a list means any of)."""
        if k <= 0 or self.count == 0:
            return []
        if isinstance(query, str):
            vec = self.embedder.embed_query(query)
        else:
            vec = np.asarray(query, dtype=np.float32).reshape(-1)
            if vec.shape[0] != self.dim:
                raise DimensionMismatchError(f"{self.path}: query vector has {vec.shape[0]} dims, store has {self.dim}")
        vec = np.ascontiguousarray(vec.reshape(1, -1), dtype=np.float32)
        params = None
        if filter:
            import faiss

            rows = np.array([i for i, m in enumerate(self._metadata) if _matches(m, filter)], dtype=np.int64)
            if rows.size == 0:
                return []
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(rows))
            k = min(k, int(rows.size))
        k = min(k, self.count)
        dist, labels = self.index.search(vec, k, params=params) if params else self.index.search(vec, k)
        r = self._rows
        hits = []
        for d, row in zip(dist[0], labels[0]):
            if row < 0:
                continue
            hits.append(SearchHit(id=r["id"][row], text=r["text"][row], metadata=self._metadata[row],
                                  score=float(1.0 - d / 2.0), row=int(row)))
        return hits

    @cached_property
    def _metadata(self) -> list[dict]:
        return [json.loads(m) for m in self._rows["metadata"]]

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, model={self.manifest.get('model', {}).get('name')!r}, dim={self.dim}, count={self.count})"


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise StoreNotFoundError(f"{path}: no such store folder")
    mf = path / MANIFEST
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{mf}: missing; {path} is not a woolocal store (use `woolocal migrate` for LangChain stores)") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{mf}: unreadable: {e}") from None
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{mf}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(f"{mf}: format_version {manifest.get('format_version')} is newer than this library's {FORMAT_VERSION}")
    return manifest


def _check_dims(path: Path, manifest: Mapping[str, Any], index_dim: int) -> None:
    """Folder name (when it carries `-<dim>d`; Wooster's in-place `vectorStore/` does not), manifest and index agree."""
    m = _NAME_RE.match(path.name)
    name_dim = int(m.group("dim")) if m else None
    man_dim = manifest.get("dim")
    model_dim = manifest.get("model", {}).get("dim")
    dims = {d for d in (name_dim, man_dim, model_dim, index_dim) if d is not None}
    if len(dims) > 1 or man_dim is None:
        raise DimensionMismatchError(
            f"{path}: dimensions disagree: folder name {path.name!r} says {name_dim}, manifest.json dim says {man_dim}"
            f" (model.dim {model_dim}), {INDEX_JS} has d={index_dim}"
        )


def is_store(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def open_store(path_or_name: str | os.PathLike, stores_root: str | os.PathLike | None = None,
               model: str | None = None, embedder: "Embedder | None" = None) -> Store:
    """Open a store for search.

    `path_or_name`: a store folder; a project's folder under the stores root (its one store, or the one for `model`);
    or a project name, looked up under `stores_root` (default: flows.yaml's stores root).
    """
    p = Path(path_or_name).expanduser()
    if is_store(p):
        return Store(p, embedder=embedder)
    if p.is_dir() and any((p / n).is_file() for n in (INDEX_JS, INDEX_PY, DOCSTORE_JS, PARQUET)):
        return Store(p, embedder=embedder)  # a store's files without manifest.json: raises, naming it
    if not p.is_dir():
        if stores_root is None:
            from woolocal_ingest.config import load_config

            cfg = load_config()
            proj = cfg.project(str(path_or_name))
            stores_root = cfg.stores_root(proj)
        p = Path(stores_root) / str(path_or_name)
        if is_store(p):
            return Store(p, embedder=embedder)
    if not p.is_dir():
        raise StoreNotFoundError(f"{path_or_name}: no store folder or project of that name (looked in {p.parent})")
    stores = sorted(d for d in p.iterdir() if is_store(d) and not d.name.startswith("."))
    if model is not None:
        from woolocal_ingest.embedders.registry import slugify

        stores = [d for d in stores if _NAME_RE.match(d.name) and _NAME_RE.match(d.name).group("slug") == slugify(model)]
    if len(stores) == 1:
        return Store(stores[0], embedder=embedder)
    if not stores:
        raise StoreNotFoundError(f"{p}: holds no store" + (f" for model {model!r}" if model else ""))
    raise StoreError(f"{p}: holds several stores ({', '.join(d.name for d in stores)}); name one")


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
    """Every problem found in a store folder (empty list: it is sound). Checks files against the manifest's hashes,
    dimensions in name, manifest and index, row counts and ids across index, docstore and Parquet, and that the
    Parquet vectors are the index's vectors."""
    path = Path(path)
    problems: list[str] = []
    try:
        manifest = _read_manifest(path)
    except StoreError as e:
        return [str(e)]
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name}: listed in manifest.json but missing")
        elif _sha256_file(f) != digest:
            problems.append(f"{name}: sha256 differs from manifest.json (changed after writing)")
    if problems:
        return problems
    import faiss
    import pyarrow.parquet as pq

    try:
        index = faiss.read_index(str(path / INDEX_JS))
    except Exception as e:
        return problems + [f"{INDEX_JS}: unreadable: {e}"]
    name = expect_name or path.name
    m = _NAME_RE.match(name)
    dims = {"folder name": int(m.group("dim")) if m else None, "manifest.json": manifest.get("dim"),
            "manifest model.dim": manifest.get("model", {}).get("dim"), INDEX_JS: index.d}
    if len({d for d in dims.values() if d is not None}) != 1 or dims["manifest.json"] is None:
        problems.append("dimensions disagree: " + ", ".join(f"{k} {v}" for k, v in dims.items()))
    if index.ntotal == 0:
        problems.append(f"{INDEX_JS}: empty index (LangChain JS readers abort on it)")
    if manifest.get("count") != index.ntotal:
        problems.append(f"manifest.json count {manifest.get('count')} != {INDEX_JS} ntotal {index.ntotal}")
    try:
        t = pq.read_table(path / PARQUET)
        ids = t.column("id").to_pylist()
        if t.num_rows != index.ntotal:
            problems.append(f"{PARQUET} has {t.num_rows} rows, {INDEX_JS} {index.ntotal}")
        elif index.ntotal:
            emb = np.asarray(t.column("embedding").combine_chunks().flatten(), dtype=np.float32).reshape(t.num_rows, -1)
            if not np.array_equal(emb, index.reconstruct_n(0, index.ntotal)):
                problems.append(f"{PARQUET} embeddings differ from {INDEX_JS} vectors")
            norms = np.linalg.norm(emb, axis=1)
            if not np.allclose(norms, 1.0, atol=1e-3):
                problems.append(f"{PARQUET}: vectors are not L2-normalised (norms {norms.min():.4f}..{norms.max():.4f})")
        if len(set(ids)) != len(ids):
            problems.append(f"{PARQUET}: duplicate ids")
    except Exception as e:
        return problems + [f"{PARQUET}: unreadable: {e}"]
    try:
        docs, mapping = json.loads((path / DOCSTORE_JS).read_text(encoding="utf-8"))
        doc_ids = [d[0] for d in docs]
        if [mapping.get(str(i)) for i in range(len(ids))] != ids or len(mapping) != len(ids):
            problems.append(f"{DOCSTORE_JS}: row→id mapping differs from {PARQUET} ids")
        if set(doc_ids) != set(ids):
            problems.append(f"{DOCSTORE_JS}: documents differ from {PARQUET} ids")
        else:
            # Same rows, same content: what LangChain JS returns is what the canonical record holds.
            by_id = {d[0]: d[1] for d in docs}
            texts, metas = t.column("text").to_pylist(), t.column("metadata").to_pylist()
            differ = [i for i, id_ in enumerate(ids)
                      if by_id[id_].get("pageContent") != texts[i] or by_id[id_].get("metadata") != json.loads(metas[i])]
            if differ:
                problems.append(f"{DOCSTORE_JS}: {len(differ)} document(s) differ from {PARQUET} text or metadata "
                                f"(first: id {ids[differ[0]]})")
    except Exception as e:
        problems.append(f"{DOCSTORE_JS}: unreadable: {e}")
    return problems
