"""LangChain adapters (woolocal_ingest.langchain): the engine as a LangChain Embeddings, a store as a LangChain
VectorStore. Real parts only: the packaged all-MiniLM-L6-v2, a store ingested from data/sample-project, real
langchain-core / langchain-community."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from woolocal_ingest.chunking import ChunkSettings
from woolocal_ingest.config import FlowsConfig
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from woolocal_ingest.errors import DimensionMismatchError
from woolocal_ingest.ingest import run_ingest
from woolocal_ingest.api import open_store

REPO = Path(__file__).resolve().parent.parent
FACTS = json.loads((REPO / "data" / "sample-facts.json").read_text(encoding="utf-8"))
STORE = "all-minilm-l6-v2-384d"


@pytest.fixture(scope="module")
def stores_root(tmp_path_factory, embedder) -> Path:
    base = tmp_path_factory.mktemp("lc")
    src = base / "sample-project"
    shutil.copytree(REPO / "data" / "sample-project", src)
    root = base / "stores"
    run_ingest("sample", src, root, embedder, ChunkSettings(), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    return root


@pytest.fixture(scope="module")
def store(stores_root, embedder):
    return open_store(stores_root / "sample" / STORE, embedder=embedder)


def test_embeddings_equal_the_engine(embedder):
    from langchain_core.embeddings import Embeddings

    from woolocal_ingest.langchain import WoolocalEmbeddings

    emb = WoolocalEmbeddings(embedder=embedder)
    assert isinstance(emb, Embeddings)
    assert emb.dim == 384 and emb.model_name == embedder.model_name
    texts = [f["sentence"] for f in FACTS]
    docs = emb.embed_documents(texts)
    assert isinstance(docs, list) and isinstance(docs[0], list) and isinstance(docs[0][0], float)
    np.testing.assert_array_equal(np.asarray(docs, np.float32), embedder.embed_documents(texts))
    q = emb.embed_query(FACTS[0]["query"])
    np.testing.assert_array_equal(np.asarray(q, np.float32), embedder.embed_query(FACTS[0]["query"]))
    assert emb.embed_documents([]) == []


def test_embeddings_by_purpose_and_name(embedder, tmp_path):
    from woolocal_ingest.langchain import WoolocalEmbeddings

    cfg = FlowsConfig(base_dir=tmp_path)  # default purposes: the embedded MiniLM
    by_purpose = WoolocalEmbeddings("projects", config=cfg)
    assert by_purpose.model_name == embedder.model_name
    q = FACTS[1]["query"]
    np.testing.assert_allclose(by_purpose.embed_query(q), embedder.embed_query(q), atol=1e-5)
    by_name = WoolocalEmbeddings("all-MiniLM-L6-v2", config=cfg)
    np.testing.assert_allclose(by_name.embed_documents([q]), embedder.embed_documents([q]), atol=1e-5)


def test_embeddings_apply_the_query_prefix(embedder):
    """embed_query is the engine's embed_query: the model's query prefix (BGE's) is applied, documents get none."""
    from woolocal_ingest.langchain import WoolocalEmbeddings

    class Prefixed:  # the engine's contract, with a prefix: what a BGE embedder does
        model_name, dim = "prefixed", embedder.dim

        def embed_query(self, text):
            return embedder.embed_documents(["Represent this sentence for searching relevant passages: " + text])[0]

        def embed_documents(self, texts):
            return embedder.embed_documents(texts)

    emb = WoolocalEmbeddings(embedder=Prefixed())
    q = "compost"
    np.testing.assert_array_equal(
        np.asarray(emb.embed_query(q), np.float32),
        embedder.embed_documents(["Represent this sentence for searching relevant passages: compost"])[0])
    assert not np.allclose(emb.embed_query(q), emb.embed_documents([q])[0])


@pytest.mark.parametrize("how", ["store", "path", "project"])
def test_vectorstore_same_top_k_as_store_search(store, stores_root, embedder, how):
    from langchain_core.vectorstores import VectorStore

    from woolocal_ingest.langchain import WoolocalEmbeddings, as_langchain_vectorstore

    if how == "store":
        vs = as_langchain_vectorstore(store)
    elif how == "path":
        vs = as_langchain_vectorstore(stores_root / "sample" / STORE, embeddings=WoolocalEmbeddings(embedder=embedder))
    else:
        vs = as_langchain_vectorstore("sample", stores_root=stores_root,
                                      embeddings=WoolocalEmbeddings(embedder=embedder))
    assert isinstance(vs, VectorStore)
    assert vs.index.ntotal == store.count
    for fact in FACTS:
        want = store.search(fact["query"], k=5, mode="dense")
        got = vs.similarity_search(fact["query"], k=5)
        assert [d.id for d in got] == [h.id for h in want]
        assert [d.page_content for d in got] == [h.text for h in want]
        assert [d.metadata for d in got] == [h.metadata for h in want]
        scored = vs.similarity_search_with_relevance_scores(fact["query"], k=5)
        assert [s for _, s in scored] == pytest.approx([h.score for h in want], abs=1e-5)
    retriever = vs.as_retriever(search_kwargs={"k": 3})
    assert [d.id for d in retriever.invoke(FACTS[0]["query"])] == [h.id for h in store.search(FACTS[0]["query"], k=3, mode="dense")]
    # metadata filters work as LangChain's own
    got = vs.similarity_search(FACTS[0]["query"], k=3, filter={"source": "README.md"}, fetch_k=store.count)
    assert got and {d.metadata["source"] for d in got} == {"README.md"}


def test_vectorstore_is_a_copy(store, embedder):
    from woolocal_ingest.langchain import as_langchain_vectorstore

    vs = as_langchain_vectorstore(store)
    n = store.count
    vs.add_texts(["The greenhouse thermometer hangs by the door."], metadatas=[{"source": "new.md"}])
    assert vs.index.ntotal == n + 1 and store.index.ntotal == n
    assert vs.similarity_search("where is the greenhouse thermometer?", k=1)[0].metadata["source"] == "new.md"


def test_vectorstore_refuses_other_dims(store):
    from langchain_core.embeddings import DeterministicFakeEmbedding

    from woolocal_ingest.langchain import as_langchain_vectorstore

    with pytest.raises(DimensionMismatchError, match="384.*16|16.*384"):
        as_langchain_vectorstore(store, embeddings=DeterministicFakeEmbedding(size=16))


def test_missing_langchain_names_the_extra(monkeypatch):
    import woolocal_ingest.langchain as adapters

    monkeypatch.setattr(adapters, "_classes", {})
    for mod in ("langchain_core", "langchain_core.embeddings", "langchain_community",
                "langchain_community.vectorstores"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match=r"woolocal-ingest\[langchain\]"):
        adapters.WoolocalEmbeddings  # noqa: B018
    with pytest.raises(ImportError, match=r"woolocal-ingest\[langchain\]"):
        adapters.as_langchain_vectorstore("anything")
