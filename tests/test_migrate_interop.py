"""Interop of migrated stores: the real LangChain JS 1536-d fixture store (`js_openai1536_store`, what Wooster has)
migrated to the packaged MiniLM opens with LangChain JS `FaissStore.load` (Wooster) and LangChain Python
`FAISS.load_local`, and both rank like this project's own `Store.search`. Also a Wooster `vectorStore` migrated in
place. The node side and the ranking checks are test_interop.py's."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from test_interop import QUESTIONS, assert_same_ranking, check_store, langchain_js  # noqa: F401 (fixture)
from test_migrate import FIX, check_rows_against_source, expected_rows, make_js_store, tree_hash, write_config
from woolocal_ingest import migrate
from woolocal_ingest.config import load_config
from woolocal_ingest.api import open_store
from woolocal_ingest.stores import verify_store

pytestmark = pytest.mark.skipif(not FIX.is_dir(), reason=f"shared fixtures not found at {FIX} (set WOOLOCAL_SHARED)")
K = 5


@pytest.fixture(scope="module")
def migrated_full(tmp_path_factory, embedder) -> Path:
    """js_openai1536_store (219 chunks, 1536d) migrated with the Python layout too."""
    base = tmp_path_factory.mktemp("interop-migrate")
    src = base / "js_openai1536_store"
    shutil.copytree(FIX / "js_openai1536_store", src)
    s = migrate.migrate_store(src, "projects", config=load_config(write_config(base)), out=base / "out" /
                              "all-minilm-l6-v2-384d", python_layout=True, embedder=embedder)
    assert s.status == "migrated" and s.source_count == 219 and s.unrecoverable == 0
    return Path(s.store)


@pytest.fixture(scope="module")
def queries(embedder) -> np.ndarray:
    return np.stack([embedder.embed_query(q) for q in QUESTIONS])


def test_migrated_fixture_store_holds_every_chunk(migrated_full, embedder):
    store = open_store(migrated_full, embedder=embedder)
    assert verify_store(migrated_full) == []
    check_rows_against_source(store, expected_rows())  # ids, order, metadata, texts in full, pieces in line ranges
    assert store.manifest["layouts"] == ["langchain-js", "langchain-python"]


def test_langchain_js_opens_the_migrated_store_and_ranks_like_us(langchain_js, migrated_full, queries, embedder,
                                                                  tmp_path):
    store = open_store(migrated_full, embedder=embedder)
    js = check_store(langchain_js, migrated_full, queries, tmp_path, k=K)
    assert js["ntotal"] == js["docs"] == js["mapping_rows"] == store.count and js["dim"] == 384
    assert_same_ranking(js, store, queries, k=K)
    # and the ranking means something: the faiss question finds the faiss README first, the pdb one the debugger
    assert js["results"][0][0]["source"] == "source_docs/faiss-cpu-readme.md"
    assert js["results"][1][0]["source"] == "source_docs/python-debugger.txt"


def test_langchain_python_load_local_ranks_like_us(migrated_full, queries, embedder):
    from langchain_community.vectorstores import FAISS
    from langchain_core.embeddings import Embeddings

    class Emb(Embeddings):
        def embed_documents(self, texts):
            return embedder.embed_documents(list(texts)).tolist()

        def embed_query(self, text):
            return embedder.embed_query(text).tolist()

    store = open_store(migrated_full, embedder=embedder)
    db = FAISS.load_local(str(migrated_full), Emb(), allow_dangerous_deserialization=True)
    assert db.index.ntotal == store.count and db.index.d == 384
    assert db.index_to_docstore_id == dict(enumerate(store.ids))
    for q, qv in zip(QUESTIONS, queries):
        ours = store.search(qv, k=K)
        theirs = db.similarity_search_with_score_by_vector(qv.tolist(), k=K)
        assert [d.id for d, _ in theirs] == [h.id for h in ours]
        for (doc, dist), hit in zip(theirs, ours):
            assert doc.page_content == hit.text and doc.metadata == hit.metadata
            assert 1.0 - float(dist) / 2.0 == pytest.approx(hit.score, abs=1e-4)
        assert [d.id for d in db.similarity_search(q, k=K)] == [h.id for h in store.search(q, k=K, mode="dense")]


def test_wooster_vectorstore_migrated_in_place_opens_in_langchain_js(langchain_js, tmp_path, embedder, queries):
    rows = expected_rows()[::9]
    vs = make_js_store(tmp_path / "wooster" / "projects" / "demo" / "vectorStore", rows)
    original = tree_hash(vs)
    s = migrate.migrate_store(vs, "projects", config=load_config(write_config(tmp_path)), in_place=True,
                              embedder=embedder)
    assert s.status == "migrated" and Path(s.backup).is_dir()
    store = open_store(vs, embedder=embedder)
    js = check_store(langchain_js, vs, queries, tmp_path, k=K)
    assert js["ntotal"] == store.count and js["dim"] == 384
    assert_same_ranking(js, store, queries, k=K)
    migrate.rollback(vs)
    assert tree_hash(vs) == original  # and back: the 1536-d store Wooster had
