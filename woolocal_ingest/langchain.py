"""LangChain adapters for agent code: the engine as a LangChain `Embeddings`, and a woolocal store as a LangChain
`VectorStore` (langchain-community's FAISS), without the HTTP service and without unpickling anything.

    from woolocal_ingest.langchain import WoolocalEmbeddings, as_langchain_vectorstore

    emb = WoolocalEmbeddings("projects")            # a purpose of flows.yaml, a model name or a model folder
    vs = as_langchain_vectorstore("sample")          # a project name, or a store folder, or an open Store
    vs.similarity_search("who keeps the key to the tool shed?", k=3)
    retriever = vs.as_retriever(search_kwargs={"k": 5})

LangChain itself is an optional dependency: `pip install 'woolocal-ingest[langchain]'`. The classes are built on
first use, so importing this module never fails; using them without LangChain raises ImportError naming the extra.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from woolocal_ingest.errors import DimensionMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from langchain_community.vectorstores import FAISS

    from woolocal_ingest.embedders.base import Embedder
    from woolocal_ingest.stores import Store

__all__ = ["WoolocalEmbeddings", "as_langchain_vectorstore", "cosine_relevance"]

_MISSING = ("the LangChain adapters need langchain-core and langchain-community; install them with "
            "pip install 'woolocal-ingest[langchain]'")
_lock = threading.Lock()
_classes: dict[str, type] = {}


def _embeddings_base() -> type:
    try:
        from langchain_core.embeddings import Embeddings
    except ImportError as e:
        raise ImportError(f"{_MISSING} ({e})") from e
    return Embeddings


def cosine_relevance(distance: float) -> float:
    """LangChain relevance from FAISS's squared L2 distance between unit vectors: the cosine similarity (the
    `score` Store.search reports)."""
    return 1.0 - float(distance) / 2.0


def _embedder_for(model: str | None, backend: str | None, config: Any) -> "Embedder":
    """A purpose of flows.yaml (its backend, endpoint and fallback) or a model name/folder; None = `projects`."""
    from pathlib import Path

    from woolocal_ingest.embedders import EmbedderSpec, load_embedder

    if model is not None and (os.path.sep in model and Path(model).expanduser().exists()):
        return load_embedder(model, backend=backend or "auto")  # a model folder
    if config is None:
        from woolocal_ingest.config import load_config

        config = load_config()
    name = model or "projects"
    if name in config.purposes:
        return EmbedderSpec.resolve(config.purpose(name), name, backend=backend).build()  # its own, not shared
    return load_embedder(model, backend=backend or "auto")


def _build_embeddings_class() -> type:
    Embeddings = _embeddings_base()

    class WoolocalEmbeddings(Embeddings):
        """The woolocal engine as a LangChain `Embeddings`: local, L2-normalised float vectors; `embed_query` applies
        the model's query prefix (BGE's), `embed_documents` its document prefix, as ingest does.

        `model`: a purpose of flows.yaml (`projects`, `userProfile`), a model name (`all-MiniLM-L6-v2`) or a model
        folder; None = the `projects` purpose. `embedder`: an engine embedder you already hold (e.g. `Store.embedder`).
        `backend`: override the backend (`sentence-transformers`, `onnx`, `mlx`). `config`: a FlowsConfig (default:
        flows.yaml as `woolocal` finds it)."""

        def __init__(self, model: str | None = None, *, embedder: "Embedder | None" = None,
                     backend: str | None = None, config: Any = None):
            self.embedder = embedder if embedder is not None else _embedder_for(model, backend, config)

        @property
        def model_name(self) -> str:
            return self.embedder.model_name

        @property
        def dim(self) -> int:
            return self.embedder.dim

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            texts = list(texts)
            if not texts:
                return []
            return self.embedder.embed_documents(texts).astype("float32").tolist()

        def embed_query(self, text: str) -> list[float]:
            return self.embedder.embed_query(text).astype("float32").tolist()

        def __repr__(self) -> str:
            return f"WoolocalEmbeddings(model={self.model_name!r}, dim={self.dim})"

    WoolocalEmbeddings.__module__ = __name__
    return WoolocalEmbeddings


def __getattr__(name: str) -> Any:
    if name == "WoolocalEmbeddings":
        with _lock:
            cls = _classes.get(name)
            if cls is None:
                cls = _classes[name] = _build_embeddings_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_langchain_vectorstore(store_or_path: "Store | str | os.PathLike", *, embeddings: Any = None,
                             stores_root: "str | os.PathLike | None" = None, model: str | None = None) -> "FAISS":
    """A woolocal store as a LangChain `VectorStore` (langchain_community.vectorstores.FAISS): the same vectors,
    ids, texts and metadata, so `similarity_search(q, k)` returns the same top-k as `Store.search(q, k, mode="dense")`
    (dense, as LangChain expects of a vector store; `Store.search` defaults to hybrid);
    `similarity_search_with_relevance_scores` gives the dense scores (cosine). It is a copy in memory: adding
    texts to it does not change the store on disk (`woolocal ingest` does that).

    `store_or_path`: an open Store, a store folder, or a project name (looked up under `stores_root`, like
    `open_store`; `model` picks one of a project's stores). `embeddings`: any LangChain Embeddings of the store's
    model and dimension (default: WoolocalEmbeddings with the model named in the store's manifest)."""
    try:
        import faiss
        from langchain_community.docstore.in_memory import InMemoryDocstore
        from langchain_community.vectorstores import FAISS
        from langchain_community.vectorstores.utils import DistanceStrategy
        from langchain_core.documents import Document
    except ImportError as e:
        raise ImportError(f"{_MISSING} ({e})") from e
    from woolocal_ingest.api import open_store
    from woolocal_ingest.stores import Store

    store = store_or_path if isinstance(store_or_path, Store) else open_store(store_or_path, stores_root=stores_root,
                                                                              model=model)
    if embeddings is None:
        embeddings = __getattr__("WoolocalEmbeddings")(embedder=store.embedder)  # the manifest's model, dim-checked
    else:
        emb_dim = getattr(embeddings, "dim", None)
        if not isinstance(emb_dim, int):
            emb_dim = len(embeddings.embed_query("dimension check"))
        if emb_dim != store.dim:
            raise DimensionMismatchError(f"{store.path}: the store holds {store.dim}-dim vectors but the embeddings "
                                         f"make {emb_dim}-dim vectors; use the model that built the store "
                                         f"({store.manifest.get('model', {}).get('name')})")
    chunks = store.chunks()
    docstore = InMemoryDocstore({c.id: Document(id=c.id, page_content=c.text, metadata=c.metadata) for c in chunks})
    return FAISS(
        embedding_function=embeddings,
        index=faiss.clone_index(store.index),  # LangChain may add to its index: the Store's own stays as it is
        docstore=docstore,
        index_to_docstore_id={i: c.id for i, c in enumerate(chunks)},
        relevance_score_fn=cosine_relevance,
        normalize_L2=True,  # vectors are unit length already; texts added through LangChain stay so
        distance_strategy=DistanceStrategy.EUCLIDEAN_DISTANCE,
    )

