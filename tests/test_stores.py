"""Tests for woolocal_ingest.stores: the store format contract (DESIGN.md, "Store format"), with real parts only.

One store is built per module from the shared LangChain fixture documents with the real packaged all-MiniLM-L6-v2,
real FAISS and real Parquet; tests that damage a store work on a copy (shutil.copytree).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from woolocal_ingest.chunking import Chunk, ChunkSettings
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from woolocal_ingest.errors import DimensionMismatchError, StoreError
from woolocal_ingest.ingest import run_ingest
from woolocal_ingest.api import open_store
from woolocal_ingest.stores import Store, store_dir, verify_store, write_store

PROJECT = "docs"
STORE_NAME = "all-minilm-l6-v2-384d"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384

# Sentences copied verbatim from the source documents (line breaks and indentation included, as in the files).
VERBATIM = [
    ("faiss-cpu-readme.md",
     "Vectors that are similar to a query vector are those that have the lowest L2 distance or the highest dot "
     "product with the query vector."),
    ("python-debugger.txt",
     'The module "pdb" defines an interactive source code debugger for\nPython programs.'),
    ("python-import.txt",
     'One leading dot means the current\npackage where the module making the import exists.'),
    ("python-typesmapping.txt",
     "If a key occurs more than once, the last value for that key\n   becomes the corresponding value in the new "
     "dictionary."),
    ("uuid-readme.md",
     "Mobile versions of these same browsers are expected to work but aren't currently tested."),
]

QUESTIONS = [
    "How do I install faiss with pip?",
    "How can I set a breakpoint and step through my Python program?",
    "How do I create a random UUID in JavaScript?",
    "What does str.split return?",
    "How do relative imports work in a package?",
]


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_dir, embedder):
    """(source root, stores root, summary): one real ingest of the fixture documents, with the Python layout."""
    src = shared_dir / "fixtures" / "legacy-stores" / "source_docs"
    if not src.is_dir():
        pytest.skip(f"{src} not found")
    base = tmp_path_factory.mktemp("stores-module")
    root = base / "src"
    shutil.copytree(src, root)
    stores_root = base / "stores"
    summary = run_ingest(PROJECT, root, stores_root, embedder, ChunkSettings(), DEFAULT_INCLUDE, DEFAULT_EXCLUDE,
                         python_layout=True)
    return root, stores_root, summary


@pytest.fixture(scope="module")
def store_path(built) -> Path:
    return Path(built[2].store)


@pytest.fixture(scope="module")
def store(store_path) -> Store:
    """The built store opened the way agent code does: `open_store(path)`, which loads the store's own model."""
    return open_store(store_path)


@pytest.fixture(scope="module")
def table(store_path):
    import pyarrow.parquet as pq

    return pq.read_table(store_path / "chunks.parquet")


@pytest.fixture
def store_copy(store_path, tmp_path) -> Path:
    """A damageable copy of the built store at `<tmp>/stores/<project>/<model>-384d`."""
    dst = tmp_path / "stores" / PROJECT / STORE_NAME
    shutil.copytree(store_path, dst)
    return dst


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p != folder)


def base_manifest(store: Store) -> dict:
    """The caller's part of a manifest (what ingest passes to write_store)."""
    return {k: store.manifest[k] for k in ("project", "model", "chunking", "source", "migrated_from")}


def query_vectors(embedder) -> np.ndarray:
    return np.stack([embedder.embed_query(q) for q in QUESTIONS])


# ---------------------------------------------------------------------------------------------------------------
# layout


def test_store_folder_is_named_for_model_and_dim(built, store_path):
    _, stores_root, summary = built
    assert store_path == stores_root / PROJECT / STORE_NAME
    assert store_path == store_dir(stores_root, PROJECT, "all-minilm-l6-v2", DIM)
    assert summary.written and summary.dim == DIM and summary.model == MODEL_NAME
    assert summary.count == Store(store_path).count > 0
    # Nothing else (no temp or old versions) beside it.
    assert sorted(p.name for p in (stores_root / PROJECT).iterdir()) == [STORE_NAME]


def test_store_files(store_path):
    names = sorted(p.name for p in store_path.iterdir())
    assert names == sorted(["faiss.index", "docstore.json", "chunks.parquet", "manifest.json", "index.faiss", "lexical.sqlite",
                            "index.pkl"])


def test_faiss_index_is_flat_l2_over_normalised_vectors(store_path, table):
    import faiss

    index = faiss.read_index(str(store_path / "faiss.index"))
    assert isinstance(index, faiss.IndexFlatL2)
    assert index.d == DIM
    assert index.ntotal == table.num_rows > 100
    vecs = index.reconstruct_n(0, index.ntotal)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)


def test_parquet_schema_and_values(table, store_path):
    import faiss
    import pyarrow as pa

    schema = table.schema
    assert schema.names == ["id", "source", "chunk", "text", "sha256", "metadata", "context", "embedding"]
    for name in ("id", "source", "text", "sha256", "metadata", "context"):
        assert schema.field(name).type == pa.string(), name
    assert pa.types.is_integer(schema.field("chunk").type)
    emb_type = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type)
    assert emb_type.list_size == DIM
    assert emb_type.value_type == pa.float32()

    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        embedded = f"{r['context']}\n\n{r['text']}" if r["context"] else r["text"]  # the text as embedded
        assert r["sha256"] == hashlib.sha256(embedded.encode("utf-8")).hexdigest()
        meta = json.loads(r["metadata"])
        assert meta["source"] == r["source"]
        assert meta["chunk"] == r["chunk"]
    # The Parquet embeddings are exactly the index's vectors, row for row.
    emb = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32).reshape(-1, DIM)
    index = faiss.read_index(str(store_path / "faiss.index"))
    np.testing.assert_array_equal(emb, index.reconstruct_n(0, index.ntotal))


def test_docstore_json_is_langchain_js_layout(store_path, table):
    raw = json.loads((store_path / "docstore.json").read_text(encoding="utf-8"))
    assert isinstance(raw, list) and len(raw) == 2
    docs, mapping = raw
    ids = table.column("id").to_pylist()
    texts = table.column("text").to_pylist()
    metas = [json.loads(m) for m in table.column("metadata").to_pylist()]
    assert mapping == {str(i): id_ for i, id_ in enumerate(ids)}
    assert len(docs) == len(ids)
    by_id = {}
    for entry in docs:
        assert isinstance(entry, list) and len(entry) == 2
        doc_id, doc = entry
        assert set(doc) == {"pageContent", "metadata"}
        by_id[doc_id] = doc
    assert set(by_id) == set(ids)
    for id_, text, meta in zip(ids, texts, metas):
        assert by_id[id_]["pageContent"] == text
        assert by_id[id_]["metadata"] == meta
        # LangChain JS shaped metadata: source, fileType and loc.lines.
        assert {"source", "fileType", "loc"} <= set(meta)
        assert meta["loc"]["lines"]["from"] <= meta["loc"]["lines"]["to"]


def test_manifest_values(store_path, built, table):
    root, _, _ = built
    manifest = json.loads((store_path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["format"] == "woolocal-store"
    assert manifest["format_version"] == 1
    assert manifest["project"] == PROJECT
    assert manifest["model"]["name"] == MODEL_NAME
    assert manifest["model"]["dim"] == DIM
    assert manifest["model"]["pooling"] == "mean"
    assert manifest["dim"] == DIM
    assert manifest["count"] == table.num_rows
    assert manifest["chunking"]["chunk_tokens"] == ChunkSettings().chunk_tokens
    assert manifest["chunking"]["overlap_tokens"] == ChunkSettings().overlap_tokens
    assert manifest["layouts"] == ["langchain-js", "langchain-python"]
    # Source files: every document, with the sha256 of its bytes.
    expected_sources = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.is_file()}
    assert manifest["source"]["files"] == expected_sources
    assert set(table.column("source").to_pylist()) == set(expected_sources)
    # Store files: the sha256 of each, as on disk.
    assert set(manifest["files"]) == {"faiss.index", "docstore.json", "chunks.parquet", "index.faiss", "index.pkl",
                                     "lexical.sqlite"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((store_path / name).read_bytes()).hexdigest() == digest, name


def test_store_manifest_attribute_is_parsed_manifest(store, store_path):
    assert store.manifest == json.loads((store_path / "manifest.json").read_text(encoding="utf-8"))
    assert store.dim == DIM
    assert store.count == store.manifest["count"]


# ---------------------------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("source,sentence", VERBATIM, ids=[s for s, _ in VERBATIM])
def test_verbatim_sentence_finds_its_chunk_first(store, built, source, sentence):
    root, _, _ = built
    assert sentence in (root / source).read_text(encoding="utf-8")  # guard: truly verbatim
    hits = store.search(sentence, k=3)
    assert len(hits) == 3
    assert hits[0].source == source
    assert hits[0].metadata["source"] == source
    assert sentence in hits[0].text


def test_scores_descending_and_cosine(store, embedder):
    vecs = store.vectors()
    for q, qv in zip(QUESTIONS, query_vectors(embedder)):
        hits = store.search(q, k=10, mode="dense")
        assert len(hits) == 10
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert all(-1.0 - 1e-6 <= s <= 1.0 + 1e-6 for s in scores)
        # score is the cosine similarity of the query and the stored vector.
        for h in hits:
            assert h.score == pytest.approx(float(vecs[h.row] @ qv), abs=1e-4)
        assert len({h.id for h in hits}) == 10
        # hybrid (the default): fused scores descending, each hit's cosine in `scores`
        fused = store.search(q, k=10)
        assert [h.mode for h in fused] == ["hybrid"] * 10 and len({h.id for h in fused}) == 10
        assert [h.score for h in fused] == sorted((h.score for h in fused), reverse=True)
        for h in fused:
            assert h.scores["dense"] == pytest.approx(float(vecs[h.row] @ qv), abs=1e-4)


def test_search_is_exhaustive_top_k(store, embedder):
    """Flat index: the top-k are exactly the k best cosine similarities over every row."""
    vecs = store.vectors()
    for qv in query_vectors(embedder):
        sims = vecs @ qv
        best = np.argsort(-sims, kind="stable")[:5]
        hits = store.search(qv, k=5)
        assert [h.row for h in hits] == [int(i) for i in best]
        assert [h.id for h in hits] == [store.ids[i] for i in best]


def test_filter_file_type(store):
    q = "How do I format a number as a string in Python?"
    unfiltered = store.search(q, k=20)
    assert any(h.metadata["fileType"] != "md" for h in unfiltered)  # the filter has something to remove
    hits = store.search(q, k=20, filter={"fileType": "md"}, mode="dense")
    assert len(hits) == 20
    assert all(h.metadata["fileType"] == "md" for h in store.search(q, k=20, filter={"fileType": "md"}))
    assert all(h.metadata["fileType"] == "md" for h in hits)
    assert all(h.source.endswith(".md") for h in hits)
    txt = store.search("How do I create a random UUID with the uuid package?", k=5, filter={"fileType": "txt"})
    assert txt and all(h.metadata["fileType"] == "txt" for h in txt)
    # The md-filtered ranking is the unfiltered ranking restricted to md rows.
    everything = store.search(q, k=store.count, mode="dense")
    assert [h.id for h in hits] == [h.id for h in everything if h.metadata["fileType"] == "md"][:20]


def test_filter_dotted_key(store):
    expected = {c.id for c in store.chunks() if c.metadata["loc"]["lines"]["from"] == 1}
    assert 0 < len(expected) < store.count
    hits = store.search("documentation", k=store.count, filter={"loc.lines.from": 1})
    assert {h.id for h in hits} == expected
    assert all(h.metadata["loc"]["lines"]["from"] == 1 for h in hits)
    assert store.search("documentation", k=5, filter={"loc.lines.from": -7}) == []


def test_filter_list_means_any_of(store):
    want = {"python-import.txt", "uuid-readme.md"}
    hits = store.search("module", k=store.count, filter={"source": sorted(want)})
    assert {h.source for h in hits} == want
    assert len(hits) == sum(1 for c in store.chunks() if c.source in want)


def test_store_with_the_same_real_embedder_searches_the_same(store_path, store, embedder):
    s = Store(store_path, embedder=embedder)
    for q in QUESTIONS[:2]:
        assert [h.id for h in s.search(q, k=5)] == [h.id for h in store.search(q, k=5)]


# ---------------------------------------------------------------------------------------------------------------
# open checks: dimensions


def test_folder_renamed_to_other_dim_refuses_to_open(store_path, tmp_path):
    wrong = tmp_path / PROJECT / "all-minilm-l6-v2-768d"
    shutil.copytree(store_path, wrong)
    with pytest.raises(DimensionMismatchError) as ei:
        open_store(wrong)
    msg = str(ei.value)
    assert "768" in msg and "384" in msg
    problems = verify_store(wrong)
    assert any("768" in p and "384" in p for p in problems), problems


@pytest.mark.parametrize("key", ["dim", "model.dim"])
def test_manifest_dim_edited_refuses_to_open(store_copy, key):
    mf = store_copy / "manifest.json"
    manifest = json.loads(mf.read_text(encoding="utf-8"))
    if key == "dim":
        manifest["dim"] = 768
    else:
        manifest["model"]["dim"] = 768
    mf.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(DimensionMismatchError) as ei:
        open_store(store_copy)
    msg = str(ei.value)
    assert "768" in msg and "384" in msg
    assert any("768" in p for p in verify_store(store_copy))


def test_query_vector_of_wrong_length_refused(store):
    with pytest.raises(DimensionMismatchError) as ei:
        store.search(np.full(768, 1 / math.sqrt(768), dtype=np.float32), k=3)
    msg = str(ei.value)
    assert "768" in msg and "384" in msg


def test_embedder_of_other_dim_refused_before_search(store_path, embedder):
    from woolocal_ingest.embedders.sentence_transformers import SentenceTransformerEmbedder

    other = SentenceTransformerEmbedder(dataclasses.replace(embedder.info, dim=768))
    assert other.dim == 768
    with pytest.raises(DimensionMismatchError) as ei:
        Store(store_path, embedder=other)
    assert "768" in str(ei.value) and "384" in str(ei.value)
    with pytest.raises(DimensionMismatchError):
        open_store(store_path, embedder=other)


def test_docstore_disagreeing_with_index_refuses_to_open(store_copy):
    """Counts that disagree between faiss.index and docstore.json are damage (a save cut short), not drift."""
    ds = store_copy / "docstore.json"
    docs, mapping = json.loads(ds.read_text(encoding="utf-8"))
    ds.write_text(json.dumps([docs[:-1], {k: v for k, v in mapping.items() if v != docs[-1][0]}]), encoding="utf-8")
    with pytest.raises(StoreError, match="counts disagree") as ei:
        open_store(store_copy)
    assert "docstore.json" in str(ei.value) and "faiss.index" in str(ei.value)
    assert any("counts disagree" in p for p in verify_store(store_copy))


def test_manifest_count_tampered_is_reported_not_served_wrong(store_copy):
    """Our record says one count, the truth another, while faiss.index is as we wrote it: verify names it; the
    store still opens and serves the truth."""
    mf = store_copy / "manifest.json"
    manifest = json.loads(mf.read_text(encoding="utf-8"))
    manifest["count"] += 1
    mf.write_text(json.dumps(manifest), encoding="utf-8")
    assert any("count" in p for p in verify_store(store_copy))
    assert open_store(store_copy).count == manifest["count"] - 1


def test_not_a_store_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError):
        Store(tmp_path / "empty")
    with pytest.raises(StoreError):
        Store(tmp_path / "nope")


def test_open_by_project_folder(store_path, store_copy):
    s = open_store(store_copy.parent)
    assert s.path == store_copy
    assert s.count == open_store(store_path).count
    s2 = open_store(PROJECT, stores_root=store_copy.parent.parent)
    assert s2.path == store_copy


# ---------------------------------------------------------------------------------------------------------------
# atomic write


def test_failure_before_swap_leaves_previous_store_untouched(store_copy, store, embedder):
    before = file_hashes(store_copy)
    seen: list[Path] = []

    def boom(tmp: Path) -> None:
        seen.append(tmp)
        # The new version is complete and verified in a temp folder beside the target.
        assert tmp.parent == store_copy.parent
        assert tmp.name.startswith(f".{STORE_NAME}.tmp-")
        assert verify_store(tmp, expect_name=STORE_NAME) == []
        raise RuntimeError("disk pulled out")

    chunks, vectors = store.chunks()[:7], store.vectors()[:7]
    with pytest.raises(RuntimeError, match="disk pulled out"):
        write_store(store_copy, chunks, vectors, base_manifest(store), before_swap=boom)
    assert len(seen) == 1
    assert not seen[0].exists()
    assert file_hashes(store_copy) == before
    assert siblings(store_copy) == []
    reopened = open_store(store_copy, embedder=embedder)
    assert reopened.count == store.count
    assert verify_store(store_copy) == []
    hits = reopened.search(VERBATIM[0][1], k=3)
    assert hits[0].source == VERBATIM[0][0]


def test_zero_chunks_refused_previous_kept(store_copy, store):
    before = file_hashes(store_copy)
    with pytest.raises(StoreError, match="0 chunks"):
        write_store(store_copy, [], np.zeros((0, DIM), np.float32), base_manifest(store))
    assert file_hashes(store_copy) == before
    assert siblings(store_copy) == []
    assert open_store(store_copy).count == store.count


def test_nan_vectors_refused_previous_kept(store_copy, store):
    before = file_hashes(store_copy)
    vectors = store.vectors()[:4].copy()
    vectors[2, 17] = np.nan
    with pytest.raises(StoreError, match="NaN"):
        write_store(store_copy, store.chunks()[:4], vectors, base_manifest(store))
    vectors[2, 17] = np.inf
    with pytest.raises(StoreError):
        write_store(store_copy, store.chunks()[:4], vectors, base_manifest(store))
    assert file_hashes(store_copy) == before
    assert siblings(store_copy) == []


def test_bad_inputs_refused(store_copy, store):
    before = file_hashes(store_copy)
    chunks, vectors = store.chunks()[:4], store.vectors()[:4]
    with pytest.raises(StoreError):  # vector count differs from chunk count
        write_store(store_copy, chunks, vectors[:3], base_manifest(store))
    with pytest.raises(StoreError, match="duplicate"):
        write_store(store_copy, [chunks[0], chunks[1], chunks[0], chunks[3]], vectors, base_manifest(store))
    with pytest.raises(DimensionMismatchError):  # folder says 384d, vectors have 383 dims
        write_store(store_copy, chunks, vectors[:, :383], base_manifest(store))
    assert file_hashes(store_copy) == before
    assert siblings(store_copy) == []


def test_successful_rewrite_replaces_store_and_leaves_nothing_beside(store_copy, store, embedder):
    chunks, vectors = store.chunks()[:25], store.vectors()[:25]
    out = write_store(store_copy, chunks, vectors, base_manifest(store))
    assert out == store_copy
    assert siblings(store_copy) == []  # no .tmp- or .old- folder
    assert verify_store(store_copy) == []
    s = open_store(store_copy, embedder=embedder)
    assert s.count == 25 == s.manifest["count"]
    assert s.ids == [c.id for c in chunks]
    assert s.chunks() == chunks
    np.testing.assert_array_equal(s.vectors(), vectors)
    # No Python layout asked for this time: only the LangChain JS files, the canonical record and the BM25 index.
    assert sorted(p.name for p in store_copy.iterdir()) == ["chunks.parquet", "docstore.json", "faiss.index", "lexical.sqlite",
                                                           "manifest.json"]
    assert s.manifest["layouts"] == ["langchain-js"]
    assert {h.id for h in s.search("anything at all", k=100)} == {c.id for c in chunks}


def test_write_new_store_and_lone_surrogates(tmp_path, store, embedder):
    target = tmp_path / "new" / PROJECT / STORE_NAME
    c0 = store.chunks()[0]
    # A non-UTF-8 file name reaches Python as a lone surrogate (surrogateescape): in source and metadata too.
    odd = Chunk(id="odd", text="broken \ud800 surrogate, paired \ud83d\ude00", source="caf\udce9.txt", chunk=0,
                metadata={"source": "caf\udce9.txt", "fileType": "txt", "loc": {"lines": {"from": 1, "to": 1}}},
                sha256="x")
    vecs = np.stack([store.vectors()[0], embedder.embed_documents(["broken surrogate"])[0]])
    write_store(target, [c0, odd], vecs, base_manifest(store))
    assert verify_store(target) == []
    # Every file is valid UTF-8; the lone surrogate became U+FFFD (not a look-alike "?"), the pair its character.
    want = "broken \ufffd surrogate, paired \U0001f600"
    docs, _ = json.loads((target / "docstore.json").read_bytes().decode("utf-8"))
    assert docs[1][1]["pageContent"] == want
    got = open_store(target).chunks()[1]
    assert got.text == want
    assert got.source == got.metadata["source"] == docs[1][1]["metadata"]["source"] == "caf\ufffd.txt"


# ---------------------------------------------------------------------------------------------------------------
# verify_store


def test_verify_clean_store(store_path):
    assert verify_store(store_path) == []


def test_verify_flipped_byte_in_faiss_index(store_copy):
    p = store_copy / "faiss.index"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01  # inside the last vector: still a readable index, but not the one written
    p.write_bytes(bytes(data))
    problems = verify_store(store_copy)
    assert problems and any("faiss.index" in x for x in problems), problems


def test_edited_docstore_is_drift_not_damage(store_copy):
    """A text rewritten by another writer (same id, new text) is what the store holds now: served, and reported."""
    p = store_copy / "docstore.json"
    docs, mapping = json.loads(p.read_text(encoding="utf-8"))
    docs[0][1]["pageContent"] += " (edited)"
    p.write_text(json.dumps([docs, mapping]), encoding="utf-8")
    assert verify_store(store_copy) == []
    st = Store(store_copy)
    assert st.drift.rewritten == (docs[0][0],) and not st.drift.added and not st.drift.deleted
    assert "+0 rows, \u22120 rows, 1 rewritten" in st.drift.describe()
    assert {c.id: c.text for c in st.chunks()}[docs[0][0]].endswith(" (edited)")


def test_verify_docstore_mapping_damage_even_with_refreshed_hash(store_copy):
    """A docstore rewritten out of step with the index (non-atomic save) is caught by content, not only by hash."""
    p = store_copy / "docstore.json"
    docs, mapping = json.loads(p.read_text(encoding="utf-8"))
    mapping["0"], mapping["1"] = mapping["1"], mapping["0"]
    p.write_text(json.dumps([docs, mapping]), encoding="utf-8")
    mf = store_copy / "manifest.json"
    manifest = json.loads(mf.read_text(encoding="utf-8"))
    manifest["files"]["docstore.json"] = hashlib.sha256(p.read_bytes()).hexdigest()
    mf.write_text(json.dumps(manifest), encoding="utf-8")
    problems = verify_store(store_copy)
    assert problems and any("docstore.json" in x for x in problems), problems


def test_verify_docstore_text_damage_even_with_refreshed_hash(store_copy):
    """docstore.json text that is not the Parquet record's text (what JS returns would differ) is a problem."""
    p = store_copy / "docstore.json"
    docs, mapping = json.loads(p.read_text(encoding="utf-8"))
    docs[3][1]["pageContent"] = docs[3][1]["pageContent"].upper()
    p.write_text(json.dumps([docs, mapping], ensure_ascii=False), encoding="utf-8")
    mf = store_copy / "manifest.json"
    manifest = json.loads(mf.read_text(encoding="utf-8"))
    manifest["files"]["docstore.json"] = hashlib.sha256(p.read_bytes()).hexdigest()
    mf.write_text(json.dumps(manifest), encoding="utf-8")
    problems = verify_store(store_copy)
    assert problems and any("docstore.json" in x and docs[3][0] in x for x in problems), problems


def test_verify_deleted_parquet(store_copy):
    (store_copy / "chunks.parquet").unlink()
    problems = verify_store(store_copy)
    assert problems and any("chunks.parquet" in x for x in problems), problems


def test_verify_missing_manifest(store_copy):
    (store_copy / "manifest.json").unlink()
    problems = verify_store(store_copy)
    assert problems and any("manifest.json" in x for x in problems), problems
    with pytest.raises(StoreError, match="manifest.json"):
        open_store(store_copy)


# ---------------------------------------------------------------------------------------------------------------
# LangChain Python layout


def _lc_embeddings(embedder):
    from langchain_core.embeddings import Embeddings

    class WoolocalEmbeddings(Embeddings):
        def embed_documents(self, texts):
            return embedder.embed_documents(list(texts)).tolist()

        def embed_query(self, text):
            return embedder.embed_query(text).tolist()

    return WoolocalEmbeddings()


def test_python_layout_loads_in_langchain_and_ranks_the_same(store_path, store, embedder):
    from langchain_community.vectorstores import FAISS

    db = FAISS.load_local(str(store_path), _lc_embeddings(embedder), allow_dangerous_deserialization=True)
    assert db.index.ntotal == store.count
    assert db.index.d == DIM
    assert db.index_to_docstore_id == dict(enumerate(store.ids))
    for qv in query_vectors(embedder):
        ours = store.search(qv, k=5)
        theirs = db.similarity_search_with_score_by_vector(qv.tolist(), k=5)
        assert len(theirs) == 5
        assert [d.id for d, _ in theirs] == [h.id for h in ours]
        for (doc, dist), hit in zip(theirs, ours):
            assert doc.page_content == hit.text
            assert doc.metadata == hit.metadata
            assert 1.0 - float(dist) / 2.0 == pytest.approx(hit.score, abs=1e-4)
    # Text search through LangChain with the same model finds the verbatim sentence's chunk too.
    source, sentence = VERBATIM[1]
    top = db.similarity_search(sentence, k=1)[0]
    assert top.metadata["source"] == source and sentence in top.page_content
