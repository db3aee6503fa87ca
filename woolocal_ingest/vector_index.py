"""Index kinds: how a store's FAISS index is built, written, read and scored, behind one small interface.

The manifest names the kind (`index.kind`); `index_kind(name)` returns its implementation. `flat-l2` (exact L2
over L2-normalised vectors, so L2 ranking is cosine ranking) is the only kind today. A new kind (IVF, HNSW) is one
subclass here, and must stay readable by LangChain JS `FaissStore.load` (faiss `read_index`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from woolocal_ingest.errors import StoreError

__all__ = ["DEFAULT_KIND", "FlatL2", "VectorIndex", "index_kind"]


class VectorIndex(ABC):
    """One index kind. `build` makes an index over unit vectors; `scores` turns its distances into cosine
    similarities (higher is closer)."""

    kind: str
    faiss_type: str

    @abstractmethod
    def build(self, vectors: np.ndarray) -> Any: ...

    @abstractmethod
    def scores(self, distances: np.ndarray) -> np.ndarray: ...

    def write(self, index: Any, path: Path) -> None:
        import faiss

        faiss.write_index(index, str(path))

    def read(self, path: Path) -> Any:
        import faiss

        try:
            return faiss.read_index(str(path))
        except Exception as e:
            raise StoreError(f"{path}: cannot read FAISS index: {e}") from None

    def search(self, index: Any, query: np.ndarray, k: int, rows: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the `k` nearest rows to each query (limited to `rows` when given), best first."""
        import faiss

        q = np.ascontiguousarray(query.reshape(-1, index.d), dtype=np.float32)
        if rows is not None:
            dist, labels = index.search(q, k, params=faiss.SearchParameters(sel=faiss.IDSelectorBatch(rows)))
        else:
            dist, labels = index.search(q, k)
        return self.scores(dist), labels

    def manifest(self) -> dict:
        return {"kind": self.kind, "type": self.faiss_type, "normalised": True}


class FlatL2(VectorIndex):
    """Exact search: `IndexFlatL2` over unit vectors (what LangChain JS and Python write by default)."""

    kind = "flat-l2"
    faiss_type = "IndexFlatL2"

    def build(self, vectors: np.ndarray) -> Any:
        import faiss

        index = faiss.IndexFlatL2(int(vectors.shape[1]))
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return index

    def scores(self, distances: np.ndarray) -> np.ndarray:
        return 1.0 - distances / 2.0  # squared L2 between unit vectors = 2 - 2 cos


_KINDS: dict[str, VectorIndex] = {k.kind: k for k in (FlatL2(),)}
DEFAULT_KIND = FlatL2.kind


def index_kind(name: str) -> VectorIndex:
    """The implementation of index kind `name`; StoreError naming the kinds this library knows."""
    try:
        return _KINDS[name]
    except KeyError:
        raise StoreError(f"index kind {name!r} is not one this library knows ({', '.join(sorted(_KINDS))})") from None
