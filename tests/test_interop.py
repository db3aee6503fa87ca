"""Interop with LangChain JS, what Wooster uses: a store this project writes opens with `FaissStore.load` and ranks
the same way. Real parts only: the packaged model, faiss-cpu here, faiss-node + @langchain/community in node.

The node side is built by ../shared/tools/langchain-js/setup.sh into .cache/langchain-js (once; later runs reuse it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from woolocal_ingest.chunking import Chunk, ChunkSettings
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from woolocal_ingest.ingest import run_ingest
from woolocal_ingest.api import open_store
from woolocal_ingest.stores import write_store

REPO = Path(__file__).resolve().parent.parent
DIM = 384
# A subset of the shared fixture documents with no repeated chunk text, so no two rows tie in any ranking.
DOCS = ["faiss-cpu-readme.md", "python-debugger.txt", "python-import.txt", "python-string-methods.txt"]
QUESTIONS = [
    "How do I install faiss with pip?",
    "How can I set a breakpoint and step through my Python program?",
    "What does str.split return?",
    "How do relative imports work in a package?",
    "Is cosine similarity a dot product on normalized vectors?",
]


@pytest.fixture(scope="session")
def langchain_js(shared_dir) -> Path:
    """The folder holding check_store.mjs and its node_modules (built by setup.sh on first use)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the LangChain JS (Wooster) interop check needs node >= 20 with npm")
    setup = shared_dir / "tools" / "langchain-js" / "setup.sh"
    assert setup.is_file(), f"{setup} missing"
    dest = REPO / ".cache" / "langchain-js"
    try:
        proc = subprocess.run(["bash", str(setup), str(dest)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{setup} did not finish in 900 s; stderr:\n{e.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"{setup} failed (exit {proc.returncode}); stderr:\n{proc.stderr[-6000:]}")
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{setup} printed nothing; stderr:\n{proc.stderr[-3000:]}"
    folder = Path(lines[-1])
    assert (folder / "check_store.mjs").is_file(), f"{folder}: no check_store.mjs"
    return folder


@pytest.fixture(scope="module")
def js_store(tmp_path_factory, shared_dir, embedder) -> Path:
    """A store built by a real ingest of the document subset (LangChain JS layout only, as Wooster reads it)."""
    src = shared_dir / "fixtures" / "legacy-stores" / "source_docs"
    base = tmp_path_factory.mktemp("interop")
    root = base / "src"
    root.mkdir()
    for name in DOCS:
        shutil.copy2(src / name, root / name)
    summary = run_ingest("wooster", root, base / "stores", embedder, ChunkSettings(), DEFAULT_INCLUDE,
                         DEFAULT_EXCLUDE, python_layout=False)
    path = Path(summary.store)
    texts = [c.text for c in open_store(path).chunks()]
    assert len(set(texts)) == len(texts), "fixture precondition: repeated chunk texts would make rankings tie"
    return path


@pytest.fixture(scope="module")
def queries(embedder) -> np.ndarray:
    return np.stack([embedder.embed_query(q) for q in QUESTIONS])


def check_store(tool: Path, store: Path, vectors: np.ndarray, tmp_path: Path, k: int = 5) -> dict:
    """Run the LangChain JS check (FaissStore.load + index.search) and return its JSON."""
    qfile = tmp_path / "queries.json"
    qfile.write_text(json.dumps({"k": k, "vectors": [[float(x) for x in v] for v in vectors]}), encoding="utf-8")
    proc = subprocess.run(["node", str(tool / "check_store.mjs"), str(store), str(qfile)], cwd=tool,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"LangChain JS could not open {store} (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_same_ranking(js: dict, store, vectors: np.ndarray, k: int = 5) -> None:
    assert len(js["results"]) == len(vectors)
    for qi, (v, theirs) in enumerate(zip(vectors, js["results"])):
        ours = store.search(v, k=k)
        assert len(theirs) == len(ours) == min(k, store.count)
        assert [r["id"] for r in theirs] == [h.id for h in ours], f"query {qi}: top-{k} ids differ"
        assert [r["source"] for r in theirs] == [h.source for h in ours]
        for r, h in zip(theirs, ours):
            # JS: squared L2 distance d; ours: cosine = 1 - d/2 over unit vectors.
            assert 1.0 - r["score"] / 2.0 == pytest.approx(h.score, abs=1e-4), f"query {qi}: {r['id']}"
            assert r["score"] == pytest.approx(2.0 - 2.0 * h.score, abs=2e-4)


def test_langchain_js_opens_store_with_our_counts(langchain_js, js_store, queries, tmp_path):
    store = open_store(js_store)
    js = check_store(langchain_js, js_store, queries[:1], tmp_path)
    assert js["ntotal"] == store.count == store.manifest["count"]
    assert js["dim"] == DIM == store.dim
    assert js["docs"] == store.count
    assert js["mapping_rows"] == store.count


def test_langchain_js_ranks_like_us(langchain_js, js_store, queries, tmp_path, embedder):
    store = open_store(js_store, embedder=embedder)
    js = check_store(langchain_js, js_store, queries, tmp_path, k=5)
    assert_same_ranking(js, store, queries, k=5)
    # And the ranking is meaningful: the faiss question finds the faiss README first, the debugger one pdb.
    assert js["results"][0][0]["source"] == "faiss-cpu-readme.md"
    assert js["results"][1][0]["source"] == "python-debugger.txt"


def test_langchain_js_reads_a_rewritten_store(langchain_js, js_store, queries, tmp_path, embedder):
    """An atomic rewrite in place (what ingest and migrate do) is what the next FaissStore.load sees, including
    text that needed UTF-8 repair and characters outside the BMP."""
    target = tmp_path / "stores" / "wooster" / js_store.name
    shutil.copytree(js_store, target)
    old = open_store(target)
    keep = old.chunks()[::3]
    keep_vecs = old.vectors()[::3]
    extra = Chunk(id="extra-1", text="Caf\u00e9 \U0001f600 and a lone \udc80 surrogate", source="caf\u00e9.md",
                  chunk=0, metadata={"source": "caf\u00e9.md", "fileType": "md",
                                     "loc": {"lines": {"from": 1, "to": 1}}, "tags": ["\u00fcber", 3]},
                  sha256=Chunk.text_sha256("x"))
    extra_vec = embedder.embed_documents(["Caf\u00e9 and a surrogate"])
    manifest = {k: old.manifest[k] for k in ("project", "model", "chunking", "source", "migrated_from")}
    write_store(target, keep + [extra], np.concatenate([keep_vecs, extra_vec]), manifest)
    new = open_store(target, embedder=embedder)
    assert new.count == len(keep) + 1
    vectors = np.concatenate([queries, extra_vec])
    js = check_store(langchain_js, target, vectors, tmp_path, k=5)
    assert js["ntotal"] == js["docs"] == js["mapping_rows"] == new.count
    assert_same_ranking(js, new, vectors, k=5)
    assert js["results"][-1][0]["id"] == "extra-1"
    assert js["results"][-1][0]["source"] == "caf\u00e9.md"


def test_langchain_js_k_larger_than_store(langchain_js, js_store, queries, tmp_path, embedder):
    """k above ntotal: both sides return every row, in the same order."""
    target = tmp_path / "stores" / "wooster" / js_store.name
    shutil.copytree(js_store, target)
    old = open_store(target)
    manifest = {k: old.manifest[k] for k in ("project", "model", "chunking", "source", "migrated_from")}
    write_store(target, old.chunks()[:3], old.vectors()[:3], manifest)
    small = open_store(target, embedder=embedder)
    js = check_store(langchain_js, target, queries, tmp_path, k=10)
    assert js["ntotal"] == 3
    assert_same_ranking(js, small, queries, k=10)
