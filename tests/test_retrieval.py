"""Search modes (hybrid, dense, lexical), the lexical index every store holds, and `woolocal eval`.

A small store of hand-written rows, embedded by the session's packaged model, is enough: each test checks a
behaviour that could fail (a row found by its rare word, stale text never served, an incremental update that
re-indexes only what changed, malformed labelled sets named by file and line)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from woolocal_ingest.chunking import Chunk
from woolocal_cli import main
from woolocal_ingest.eval import EvalError, evaluate, load_eval_set, write_beir_corpus
from woolocal_ingest.lexical import LEXICAL, write_lexical
from woolocal_ingest.retrieval import SearchModeError, fuse_rrf
from woolocal_ingest.stores import Store, verify_store, write_store

ROWS = [
    ("garden/shed.md", "Shed", "The key to the tool shed hangs on a hook inside the laundromat, behind the counter."),
    ("garden/water.md", "Watering", "Beds are watered every evening in July; the standpipe timer runs for forty minutes."),
    ("garden/fees.md", "Fees", "Plot holders pay the yearly fee of thirty euros to the treasurer before March."),
    ("garden/compost.md", "Compost", "Turn the compost heap every two weeks and keep it as damp as a wrung-out sponge."),
    ("garden/tools.md", "Tools", "Rakes, shovels and the wheelbarrow are returned clean; the zxqv-7 padlock code "
                                  "changes each season."),
    ("garden/bees.md", "Bees", "The beehives near the north gate are inspected by the beekeeper on Sundays."),
]


def _chunks() -> list[Chunk]:
    out = []
    for i, (src, title, text) in enumerate(ROWS):
        ctx = f"Garden handbook > {title}"
        out.append(Chunk(id=f"row-{i}", text=text, source=src, chunk=0,
                         metadata={"source": src, "fileType": "md", "chunk": 0},
                         sha256=Chunk.text_sha256(f"{ctx}\n\n{text}"), context=ctx))
    return out


def _write(path: Path, chunks: list[Chunk], embedder) -> Path:
    vecs = embedder.embed_documents([c.embed_text for c in chunks])
    manifest = {"model": {"name": embedder.model_name, "dim": embedder.dim}, "chunking": {}}
    return write_store(path, chunks, vecs, manifest)


@pytest.fixture(scope="module")
def small(tmp_path_factory, embedder) -> Path:
    return _write(tmp_path_factory.mktemp("retr") / "garden" / f"m-{embedder.dim}d", _chunks(), embedder)


def test_store_holds_a_verified_lexical_index(small):
    manifest = json.loads((small / "manifest.json").read_text())
    assert LEXICAL in manifest["files"]
    assert verify_store(small) == []
    with sqlite3.connect(small / LEXICAL) as conn:  # what is indexed: context + text (the embedded text)
        texts = [r[0] for r in conn.execute("SELECT text FROM body")]
    assert any(t.startswith("Garden handbook > Shed\n\nThe key") for t in texts)
    # the LangChain files hold the plain chunk text, nothing of the context
    docs = json.loads((small / "docstore.json").read_text())[0]
    assert all(not d[1]["pageContent"].startswith("Garden handbook") for d in docs)


def test_modes(small, embedder):
    st = Store(small, embedder=embedder)
    lex = st.search("zxqv-7 padlock", k=3, mode="lexical")
    assert lex[0].id == "row-4" and lex[0].mode == "lexical" and set(lex[0].scores) == {"lexical"}
    assert all(h.score > 0 for h in lex) and len(lex) == 1  # only rows sharing a word
    dense = st.search("where do I find the shed key?", k=2, mode="dense")
    assert dense[0].id == "row-0" and set(dense[0].scores) == {"dense"}
    hyb = st.search("where do I find the shed key?", k=6)
    assert hyb[0].id == "row-0" and hyb[0].mode == "hybrid" and len(hyb) == 6
    assert hyb[0].scores["dense"] == pytest.approx(dense[0].score, abs=1e-5) and "lexical" in hyb[0].scores
    # a vector query is dense; lexical/hybrid need text; unknown modes are refused, naming the modes
    v = embedder.embed_query("compost heap")
    assert st.search(v, k=1)[0].id == "row-3"
    with pytest.raises(SearchModeError, match="needs the query text"):
        st.search(v, k=1, mode="hybrid")
    with pytest.raises(SearchModeError, match="hybrid, dense, lexical"):
        st.search("compost", k=1, mode="bm25")
    # filters apply to every mode
    assert [h.id for h in st.search("shed key padlock", k=5, mode="lexical", filter={"source": "garden/tools.md"})] \
        == ["row-4"]
    assert {h.id for h in st.search("shed key", k=5, filter={"source": ["garden/bees.md", "garden/fees.md"]})} \
        == {"row-2", "row-5"}


def test_rrf_fuses_ranks_not_scores():
    fused = fuse_rrf([(1, 0.9), (2, 0.8), (3, 0.1)], [(3, 50.0), (1, 2.0)], k=3)
    assert [f.row for f in fused] == [1, 3, 2]  # 1: ranks 1+2; 3: ranks 3+1; 2: rank 2 only
    assert fused[0].dense == 0.9 and fused[0].lexical == 2.0 and fused[2].lexical is None


def test_lexical_index_updates_only_changed_rows(tmp_path):
    first = [(f"id{i}", f"text number {i} about compost") for i in range(5)]
    write_lexical(tmp_path / "a.sqlite", first)
    second = first[:3] + [("id3", "rewritten text about bees"), ("id9", "a new row")]
    counts = write_lexical(tmp_path / "b.sqlite", second, previous=tmp_path / "a.sqlite")
    assert (counts.kept, counts.deleted, counts.inserted) == (3, 2, 2)
    with sqlite3.connect(tmp_path / "b.sqlite") as conn:
        ids = sorted(r[0] for r in conn.execute("SELECT id FROM rows"))
        assert ids == ["id0", "id1", "id2", "id3", "id9"]
        assert conn.execute("SELECT count(*) FROM body").fetchone()[0] == 5
        assert conn.execute("SELECT count(*) FROM body WHERE body MATCH 'number'").fetchone()[0] == 3


def _append_like_langchain_js(folder: Path, embedder, id_: str, text: str, replace_id: str | None = None) -> None:
    """What Wooster's `addDocuments` + `save` (or a delete and re-add) leaves: a row appended to faiss.index and
    docstore.json; with `replace_id`, that row's text rewritten in place."""
    docs, mapping = json.loads((folder / "docstore.json").read_text())
    if replace_id is not None:
        for d in docs:
            if d[0] == replace_id:
                d[1]["pageContent"] = text
    else:
        index = faiss.read_index(str(folder / "faiss.index"))
        index.add(embedder.embed_documents([text]).astype(np.float32))
        faiss.write_index(index, str(folder / "faiss.index"))
        docs.append([id_, {"pageContent": text, "metadata": {"source": "wooster"}}])
        mapping[str(len(mapping))] = id_
    (folder / "docstore.json").write_text(json.dumps([docs, mapping]))


def test_lexical_search_covers_rows_another_writer_changed(tmp_path, embedder):
    folder = _write(tmp_path / "g" / f"m-{embedder.dim}d", _chunks(), embedder)
    _append_like_langchain_js(folder, embedder, "wooster-1", "Remember: the quokka feeding rota is on the fridge.")
    _append_like_langchain_js(folder, embedder, "", "The padlock was replaced by a keypad.", replace_id="row-4")
    st = Store(folder, embedder=embedder)
    assert st.drift.changed
    assert [h.id for h in st.search("quokka rota", k=1, mode="lexical")] == ["wooster-1"]
    assert st.search("quokka rota", k=1)[0].id == "wooster-1"
    # the rewritten row is found by its new text only: the file's old text is never served
    assert [h.id for h in st.search("keypad", k=3, mode="lexical")] == ["row-4"]
    assert st.search("zxqv", k=3, mode="lexical") == []
    assert st.lexical.counts.inserted == 2  # only the two changed rows were indexed again


def test_store_without_lexical_file_builds_one_in_memory(tmp_path, embedder):
    folder = _write(tmp_path / "old" / f"m-{embedder.dim}d", _chunks(), embedder)
    (folder / LEXICAL).unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"][LEXICAL]  # as a store written before the lexical index
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert verify_store(folder) == []
    st = Store(folder, embedder=embedder)
    assert st.search("zxqv-7", k=1, mode="lexical")[0].id == "row-4"
    assert st.lexical.counts.inserted == len(ROWS)


def test_verify_reports_a_stale_lexical_index(tmp_path, embedder):
    folder = _write(tmp_path / "s" / f"m-{embedder.dim}d", _chunks(), embedder)
    with sqlite3.connect(folder / LEXICAL) as conn:
        conn.execute("DELETE FROM rows WHERE id = 'row-1'")
    problems = verify_store(folder)
    assert any(LEXICAL in p and "sha256 differs" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------------------
# woolocal eval


def test_eval_on_a_tsv_set_and_cli(small, tmp_path, embedder):
    qs = tmp_path / "queries.tsv"
    qs.write_text("# comment\nwho keeps the key of the tool shed\tgarden/shed.md\n"
                  "yearly plot fee\tgarden/fees.md\tgarden/water.md\n")
    report = evaluate(Store(small, embedder=embedder), load_eval_set(qs))
    assert report.questions == 2 and set(report.modes) == {"hybrid", "dense", "lexical"}
    h = report.modes["hybrid"]
    assert h.mrr_10 == 1.0 and h.recall_100 == 1.0 and 0.5 < h.ndcg_10 <= 1.0
    # per question, for paired comparisons of two stores; the mean is the mode's nDCG@10
    data = load_eval_set(qs)
    first = next(q for q in data.judged if data.queries[q].startswith("who keeps"))
    assert set(h.ndcg_by_question) == set(data.judged) and h.ndcg_by_question[first] == 1.0
    assert sum(h.ndcg_by_question.values()) / 2 == pytest.approx(h.ndcg_10, abs=1e-4)
    res = CliRunner().invoke(main, ["eval", str(small), str(qs), "--mode", "lexical", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert list(out["modes"]) == ["lexical"] and out["questions"] == 2
    assert set(out["modes"]["lexical"]["ndcg_by_question"]) == set(data.judged)


def test_beir_folder_round_trip_and_errors(tmp_path, embedder):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d/{i}", "title": title, "text": text} for i, (_, title, text) in enumerate(ROWS)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "beehive inspection day"}) + "\n"
                                        + json.dumps({"_id": "q2", "text": "unjudged"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td/5\t1\n")
    assert write_beir_corpus(beir, tmp_path / "docs") == len(ROWS)
    assert (tmp_path / "docs" / "d%2F5.md").read_text().startswith("# Bees\n\n")
    chunks = [Chunk(id=f"c{i}", text=d["text"], source=f"d%2F{i}.md", chunk=0, metadata={"source": f"d%2F{i}.md"},
                    sha256=Chunk.text_sha256(d["text"])) for i, d in enumerate(docs)]
    folder = _write(tmp_path / "b" / f"m-{embedder.dim}d", chunks, embedder)
    data = load_eval_set(beir)
    assert data.format == "beir" and list(data.queries) == ["q1"]
    assert evaluate(Store(folder, embedder=embedder), data).modes["dense"].mrr_10 == 1.0
    res = CliRunner().invoke(main, ["eval", "--write-corpus", str(tmp_path / "cli-docs"), str(beir)])
    assert res.exit_code == 0 and (tmp_path / "cli-docs" / "d%2F0.md").is_file()
    assert CliRunner().invoke(main, ["eval", str(beir)]).exit_code == 2  # STORE DATASET, or --write-corpus DIR
    # malformed sets: the file, line and field are named
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td/5\tvery\n")
    with pytest.raises(EvalError, match=r"qrels/test.tsv:2: score 'very' is not a number"):
        load_eval_set(beir)
    (beir / "qrels" / "test.tsv").write_text("q9\td/5\t1\n")
    with pytest.raises(EvalError, match=r"test.tsv:1: query-id 'q9' is not in queries.jsonl"):
        load_eval_set(beir)
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "ok"}\n{"_id": "q2", "text": 3.5e}\n')
    with pytest.raises(EvalError, match=r"queries.jsonl:2: not a JSON object"):
        load_eval_set(beir)
    (beir / "qrels" / "test.tsv").unlink()
    with pytest.raises(EvalError, match=r"not a BEIR folder: qrels/test.tsv is missing"):
        load_eval_set(beir)
    bad = tmp_path / "q.tsv"
    bad.write_text("a question without a source\n")
    with pytest.raises(EvalError, match=r"q.tsv:1: expected question<TAB>source"):
        load_eval_set(bad)
    res = CliRunner().invoke(main, ["eval", str(folder), str(bad)])
    assert res.exit_code == 2 and "q.tsv:1" in res.output


def test_a_store_of_an_older_scheme_is_rechunked_reusing_unchanged_vectors(tmp_path, embedder):
    from woolocal_ingest.chunking import CHUNKER_VERSION, ChunkSettings
    from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
    from woolocal_ingest.ingest import run_ingest

    sample = Path(__file__).resolve().parent.parent / "data" / "sample-project"
    root = tmp_path / "proj"
    root.mkdir()
    for name in ("README.md", "guides/watering-schedule.rst"):  # Markdown and reST, hard-wrapped
        (root / name.rsplit("/", 1)[-1]).write_bytes((sample / name).read_bytes())

    def ingest(settings):
        return run_ingest("sample", root, tmp_path / "stores", embedder, settings, DEFAULT_INCLUDE, DEFAULT_EXCLUDE,
                          cache={"enabled": False})

    old = ingest(ChunkSettings(200, 32, sentences=False, context=False))  # as chunker 3 cut and embedded
    mid = ingest(ChunkSettings(200, 32, sentences=True, context=False))
    assert mid.written and 0 < mid.reused and mid.embedded < mid.count  # chunks whose text did not move: reused
    new = ingest(ChunkSettings())
    st = Store(Path(new.store), embedder=embedder)
    assert st.manifest["chunking"]["chunker_version"] == CHUNKER_VERSION
    assert st.manifest["chunking"]["scheme"] == "sentences+context"
    assert new.updated == new.count and new.embedded == new.count  # every embedded text gained its context
    assert all(c.context for c in st.chunks()) and verify_store(st.path) == []
    assert old.count and ingest(ChunkSettings()).written is False  # and then it is stable
