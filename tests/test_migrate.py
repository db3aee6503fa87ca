"""Migrating stores (woolocal_ingest.migrate, `woolocal migrate`): re-embedding with the packaged model, re-chunking,
manifest, verification, in-place swap with backup and rollback, dry run, resume after a real `kill -9`, idempotence,
the lock, bulk runs over a Wooster root, and every edge store of ../shared/fixtures/legacy-stores/edge.

Sources are copies (or subsets) of the shared fixtures in tmp_path; the model is the session `embedder` (MiniLM,
384d), handed to `migrate_store` directly or seeded into the CLI's embedder cache so it loads once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from woolocal_ingest import embedders, migrate
from woolocal_ingest.embedders import EmbedderSpec
from woolocal_ingest.migrate import checkpoints
from woolocal_ingest.migrate.backup import target_lock
from woolocal_cli import main
from woolocal_ingest.config import PurposeConfig, load_config
from woolocal_ingest.api import open_store
from woolocal_ingest.stores import Store, verify_store

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("WOOLOCAL_SHARED", REPO.parent / "shared"))
FIX = SHARED / "fixtures" / "legacy-stores"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SLUG_DIR = "all-minilm-l6-v2-384d"
SUMMARY_KEYS = {"store", "source", "model", "dim", "count", "added", "updated", "unchanged", "deleted", "skipped",
                "status", "problems", "backup", "seconds", "resumed_batches"}

pytestmark = pytest.mark.skipif(not FIX.is_dir(), reason=f"shared fixtures not found at {FIX} (set WOOLOCAL_SHARED)")


# ---------------------------------------------------------------------------------------------------------------
# helpers (test_migrate_interop.py imports these)


def expected_rows() -> list[dict]:
    return [json.loads(line) for line in (FIX / "expected_chunks.jsonl").read_text(encoding="utf-8").splitlines()]


def make_js_store(dest: Path, rows: list[dict], seed: int = 0) -> Path:
    """A LangChain JS store (faiss.index 1536d + docstore.json, as FaissStore.save writes them) of `rows`."""
    import faiss

    dest.mkdir(parents=True, exist_ok=True)
    vecs = np.random.default_rng(seed).standard_normal((len(rows), 1536)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = faiss.IndexFlatL2(1536)
    index.add(vecs)
    faiss.write_index(index, str(dest / "faiss.index"))
    docs = [[r["id"], {"pageContent": r["text"], "metadata": r["metadata"]}] for r in rows]
    (dest / "docstore.json").write_text(json.dumps([docs, {str(i): r["id"] for i, r in enumerate(rows)}]),
                                        encoding="utf-8")
    return dest


def tree_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_config(tmp_path: Path, **extra) -> Path:
    """flows.yaml in tmp_path: stores under tmp_path/stores, no embedding cache (every vector really embedded)."""
    data = {"version": 1, "defaults": {"stores_root": "stores"}, "cache": {"enabled": False},
            "purposes": {"projects": {"model": MODEL}, "userProfile": {"model": MODEL}}}
    data.update(extra)
    path = tmp_path / "flows.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def cli(*args: str, code: int | None = 0):
    r = CliRunner().invoke(main, list(args))
    if code is not None:
        assert r.exit_code == code, (args, r.exit_code, r.stdout[-3000:], r.stderr[-3000:], r.exception)
    return r


def one_json(stdout: str) -> dict:
    lines = [x for x in stdout.splitlines() if x.strip()]
    assert len(lines) == 1, stdout[:2000]
    return json.loads(lines[0])


def check_rows_against_source(store: Store, source_rows: list[dict], limit: int = 254) -> dict[str, list]:
    """The migrated rows are the source's, in order: a chunk within the model's limit as it was (same id, text,
    metadata); a longer one as consecutive pieces (`id`, `id#1`, ...) that concatenate to its text, each within the
    limit and found in its source document within its own line range. Returns {source id: [its rows]}."""
    chunks = store.chunks()
    counter = store.embedder.tokens
    by_src: dict[str, list] = {}
    i = 0
    for r in source_rows:
        first = chunks[i]
        assert first.id == r["id"], (i, first.id, r["id"])
        split = first.metadata.get(migrate.SPLIT_KEY)
        parts = split["parts"] if split else 1
        mine = chunks[i:i + parts]
        i += parts
        by_src[r["id"]] = mine
        assert [c.id for c in mine] == [r["id"]] + [f"{r['id']}#{k}" for k in range(1, parts)]
        assert "".join(c.text for c in mine) == r["text"]
        for k, c in enumerate(mine):
            assert counter.count(c.text) <= limit
            meta = dict(c.metadata)
            if split:
                note = meta.pop(migrate.SPLIT_KEY)
                assert note["id"] == r["id"] and note["part"] == k and note["parts"] == parts
                assert r["text"][note["start"]:note["end"]] == c.text
                lines = meta["loc"]["lines"]
                doc = (FIX / r["source"]).read_text(encoding="utf-8").split("\n")
                assert c.text.strip() in "\n".join(doc[lines["from"] - 1:lines["to"]])
                assert r["metadata"]["loc"]["lines"]["from"] <= lines["from"] <= lines["to"] <= \
                    r["metadata"]["loc"]["lines"]["to"]
                meta["loc"] = r["metadata"]["loc"]
            assert meta == r["metadata"]
    assert i == len(chunks)
    return by_src


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return expected_rows()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random BERT (32 dims, 1 layer, 128 tokens, MiniLM's tokenizer): for tests about volume and plumbing
    (long texts cut into hundreds of pieces, checkpoints), where what the vectors mean does not matter."""
    from model_factory import make_bert

    from woolocal_ingest.embedders import load_embedder

    path = make_bert(tmp_path_factory.mktemp("models") / "tiny-bert-32", hidden=32, layers=1, heads=1, max_seq=128)
    return load_embedder(str(path))


@pytest.fixture
def seeded(monkeypatch, embedder):
    """The CLI's target-model cache holding the session embedder for the test config's purposes (no reload)."""
    cache = {EmbedderSpec.resolve(PurposeConfig(model=MODEL), p): embedder for p in ("projects", "userProfile")}
    for spec, emb in cache.items():
        monkeypatch.setitem(embedders.spec.EMBEDDERS, spec, emb)
    return cache


# ---------------------------------------------------------------------------------------------------------------
# one JS store, migrated once, inspected by several tests


@pytest.fixture(scope="module")
def migrated(tmp_path_factory, rows, embedder):
    base = tmp_path_factory.mktemp("migrated")
    subset = rows[::10]  # 22 chunks from every document, some over MiniLM's 254 tokens
    src = make_js_store(base / "notes", subset)
    before = tree_hash(src)
    cfg = load_config(write_config(base))
    summary = migrate.migrate_store(src, "projects", config=cfg, embedder=embedder)
    return {"base": base, "src": src, "rows": subset, "cfg": cfg, "summary": summary, "before": before}


def test_js_store_migrates_to_default_target_with_rows_in_order(migrated, embedder):
    s, src = migrated["summary"], migrated["src"]
    target = migrated["base"] / "stores" / "notes" / SLUG_DIR  # <stores_root>/<source folder name>/<slug>-<dim>d
    assert Path(s.store) == target and s.status == "migrated" and s.written
    assert verify_store(target) == []
    store = open_store(target, embedder=embedder)
    by_src = check_rows_against_source(store, migrated["rows"])
    split = {k: v for k, v in by_src.items() if len(v) > 1}
    assert split, "fixture precondition: some chunks exceed MiniLM's limit"
    assert (s.rechunked, s.pieces) == (len(split), sum(len(v) for v in split.values()))
    assert s.count == store.count == len(migrated["rows"]) - len(split) + s.pieces
    assert (s.added, s.updated, s.unchanged, s.deleted, s.skipped) == (s.count, 0, 0, 0, 0)
    assert s.embedded == s.count and s.resumed_batches == 0 and s.batches == 1
    # Re-embedded from the text by the new model: the old 1536-d vectors are never used.
    fresh = embedder.embed_documents([c.text for c in store.chunks()])
    assert np.allclose(store.vectors(), fresh, atol=1e-5)
    # The source is untouched; the work folder is gone.
    assert tree_hash(src) == migrated["before"]
    assert not (target.parent / f".{SLUG_DIR}.migrate-work").exists()


def test_manifest_records_where_it_came_from(migrated, embedder):
    store = open_store(migrated["summary"].store)
    m = store.manifest
    mf = m["migrated_from"]
    assert mf["path"] == str(migrated["src"]) and mf["format"] == "langchain-js"
    assert (mf["dim"], mf["index_type"], mf["ntotal"], mf["count"], mf["model"]) == (
        1536, "IndexFlatL2", len(migrated["rows"]), len(migrated["rows"]), None)
    assert mf["fingerprint"] == migrate.source_fingerprint(migrated["src"])[0]
    assert mf["problems"]["counts"] == {"rechunked": 1} and mf["problems"]["unrecoverable"] == 0
    detail = mf["problems"]["details"][0]
    assert detail["kind"] == "rechunked" and "#1" in detail["message"]
    assert mf["rechunked"]["ids"] == {k: [c.id for c in v] for k, v in
                                      check_rows_against_source(open_store(store.path, embedder=embedder),
                                                                migrated["rows"]).items() if len(v) > 1}
    assert m["model"]["name"] == MODEL and m["dim"] == 384 and m["project"] == "notes"
    assert m["chunking"]["limit_tokens"] == 254


def test_second_run_is_unchanged_and_writes_nothing(migrated, embedder):
    target = Path(migrated["summary"].store)
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    s = migrate.migrate_store(migrated["src"], "projects", config=migrated["cfg"], embedder=embedder)
    assert s.status == "unchanged" and not s.written and s.embedded == 0
    assert s.unchanged == s.count == open_store(target).count
    assert "already holds this migration" in s.message
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before


def test_a_changed_source_is_migrated_again(migrated, embedder, tmp_path, rows):
    src = tmp_path / "notes"
    shutil.copytree(migrated["src"], src)
    out = tmp_path / "out" / SLUG_DIR
    shutil.copytree(Path(migrated["summary"].store), out)  # a previous migration of the old source
    make_js_store(src, migrated["rows"][:5] + [rows[1]])
    s = migrate.migrate_store(src, "projects", config=migrated["cfg"], out=out, embedder=embedder)
    assert s.status == "migrated"
    assert [c.id for c in open_store(out).chunks()][-1] == rows[1]["id"]
    assert s.deleted > 0 and s.updated >= 5 and s.added >= 1  # counted against the store it replaced


def test_local_store_migrates_to_another_dimension(migrated, tmp_path, bert768_cls):
    """Local -> local: this project's MiniLM store (384d) into a 768-dim model (a random BERT, CLS pooling, 128 tokens:
    pieces made for MiniLM are cut again)."""
    src = Path(migrated["summary"].store)
    out = tmp_path / "local" / "test-bert-768-cls-768d"
    s = migrate.migrate_store(src, str(bert768_cls), config=migrated["cfg"], out=out)
    assert s.status == "migrated" and s.dim == 768 and s.source_format == "woolocal" and s.source_dim == 384
    new, old = open_store(out), open_store(src)
    assert new.dim == 768 and new.manifest["migrated_from"]["model"] == MODEL
    assert new.manifest["migrated_from"]["format"] == "woolocal"
    old_chunks = old.chunks()
    new_chunks = new.chunks()
    # every old row's text is in the new store, in order (whole, or as consecutive pieces)
    assert "".join(c.text for c in new_chunks) == "".join(c.text for c in old_chunks)
    assert {c.id for c in old_chunks} <= {c.id for c in new_chunks}
    assert all(new.embedder.tokens.count(c.text) <= 126 for c in new_chunks)
    assert verify_store(out) == []


# ---------------------------------------------------------------------------------------------------------------
# edge stores


def _edge(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIX / "edge" / name, dst)
    return dst


def _note(name: str) -> dict:
    return json.loads((FIX / "edge" / name / "NOTE.json").read_text(encoding="utf-8"))


def test_edge_js_empty_is_refused_and_nothing_is_written(tmp_path, embedder):
    src = _edge(tmp_path, "js_empty")
    cfg = load_config(write_config(tmp_path))
    before = tree_hash(tmp_path)
    with pytest.raises(migrate.EmptySourceError, match="nothing to migrate.*holds no text.*ntotal 0, dim 1536") as e:
        migrate.migrate_store(src, "projects", config=cfg, embedder=embedder)
    assert e.value.exit_code == 2
    assert tree_hash(tmp_path) == before and not (tmp_path / "stores").exists()


def test_edge_js_empty_cli_exit_2(tmp_path, seeded):
    src = _edge(tmp_path, "js_empty")
    r = cli("--config", str(write_config(tmp_path)), "migrate", str(src), "--to", "projects", "--no-prefect",
            code=2)
    assert "nothing to migrate" in r.stderr and not (tmp_path / "stores").exists()


def test_edge_js_dup_id_keeps_each_id_once_and_reports(tmp_path, embedder):
    src = _edge(tmp_path, "js_dup_id")
    note = _note("js_dup_id")
    s = migrate.migrate_store(src, "projects", config=load_config(write_config(tmp_path)), embedder=embedder)
    store = open_store(s.store)
    ids = store.ids
    assert len(ids) == len(set(ids)) == note["docstore"] == 6
    assert ids == [note["mapping"][str(i)] for i in range(6)]  # mapping order; the stale row 6 is not a row
    counts = store.manifest["migrated_from"]["problems"]["counts"]
    assert counts == {"count_mismatch": 1, "duplicate_id": 1}
    dup = next(p for p in s.problems if p["kind"] == "duplicate_id")
    assert dup["ids"] == [note["stale_row_maps_to"]] and dup["rows"] == [note["stale_row"]]


def test_edge_js_deleted_leaves_deleted_docs_out(tmp_path, embedder):
    src = _edge(tmp_path, "js_deleted")
    note = _note("js_deleted")
    s = migrate.migrate_store(src, "projects", config=load_config(write_config(tmp_path)), embedder=embedder)
    ids = [i for i in open_store(s.store).ids if "#" not in i]
    assert len(ids) == note["docstore"] == 15
    assert not set(note["deleted_ids"]) & set(open_store(s.store).ids)
    assert s.problems == [p for p in s.problems if p["kind"] == "rechunked"]


def test_edge_js_unicode_long_is_rechunked_never_truncated(tmp_path, tiny):
    src = _edge(tmp_path, "js_unicode_long")
    embedder = tiny
    from woolocal_ingest.legacy import read_legacy_store

    legacy = read_legacy_store(src)
    s = migrate.migrate_store(src, "projects", config=load_config(write_config(tmp_path)), embedder=embedder)
    store = open_store(s.store, embedder=embedder)
    chunks = store.chunks()
    long = [c for c in chunks if c.id == "edge-8" or c.id.startswith("edge-8#")]
    assert len(long) > 100 and [c.id for c in long] == ["edge-8"] + [f"edge-8#{k}" for k in range(1, len(long))]
    original = next(c for c in legacy.chunks if c.id == "edge-8").text
    assert len(original) == _note("js_unicode_long")["long_text_chars"]
    assert "".join(c.text for c in long) == original  # every character, in order
    assert max(embedder.tokens.count(c.text) for c in long) <= 126  # 128 less [CLS] and [SEP]
    assert all(c.metadata[migrate.SPLIT_KEY]["parts"] == len(long) for c in long)
    others = {c.id: c for c in chunks if not c.id.startswith("edge-8")}
    assert sorted(others) == [f"edge-{i}" for i in range(10) if i != 8]
    assert others["edge-7"].text == ""  # empty text kept
    assert others["edge-6"].text == legacy.chunks[6].text.replace("\ud800", "\ufffd")  # lone surrogate -> U+FFFD
    assert others["edge-6"].metadata == {"bad": "\ufffd"}
    assert others["edge-9"].metadata == legacy.chunks[9].metadata  # the metadata zoo survives as JSON
    kinds = store.manifest["migrated_from"]["problems"]["counts"]
    assert kinds == {"lone_surrogate": 1, "long_text": 1, "empty_text": 1, "rechunked": 1}
    # LangChain JS's docstore.json is valid UTF-8 JSON with the same rows
    docs, mapping = json.loads((Path(s.store) / "docstore.json").read_bytes().decode("utf-8"))
    assert [mapping[str(i)] for i in range(len(mapping))] == store.ids


def test_edge_py_ip_becomes_an_l2_store_with_the_python_layout(tmp_path, embedder):
    src = _edge(tmp_path, "py_ip")
    s = migrate.migrate_store(src, "projects", config=load_config(write_config(tmp_path)), embedder=embedder)
    store = open_store(s.store)
    assert s.source_format == "langchain-python" and s.python_layout  # a Python source keeps a Python layout
    assert (Path(s.store) / "index.pkl").is_file() and (Path(s.store) / "index.faiss").is_file()
    assert store.count >= 8 and store.manifest["index"]["type"] == "IndexFlatL2"
    assert store.manifest["migrated_from"]["index_type"] == "IndexFlatIP"
    assert "inner_product" in store.manifest["migrated_from"]["problems"]["counts"]


def test_edge_py_nonjson_metadata_is_converted_and_reported(tmp_path, embedder):
    src = _edge(tmp_path, "py_nonjson_metadata")
    s = migrate.migrate_store(src, "projects", config=load_config(write_config(tmp_path)), embedder=embedder,
                              python_layout=False)
    store = open_store(s.store)
    assert store.count == 1 and not (Path(s.store) / "index.pkl").exists()
    meta = store.chunks()[0].metadata
    assert isinstance(meta["when"], str) and isinstance(meta["pair"], list) and isinstance(meta["raw"], str)
    docs, _ = json.loads((Path(s.store) / "docstore.json").read_text(encoding="utf-8"))
    assert docs[0][1]["metadata"] == meta
    details = {p["detail"] for p in store.manifest["migrated_from"]["problems"]["details"]
               if p["kind"] == "metadata_converted"}
    assert details == {"datetime", "path", "tuple", "set", "bytes", "decimal", "numpy"}


# ---------------------------------------------------------------------------------------------------------------
# in place, backup, rollback, verification failure, lock


def _wooster(tmp_path: Path, rows: list[dict], name: str = "demo") -> Path:
    return make_js_store(tmp_path / "wooster" / "projects" / name / "vectorStore", rows)


def test_in_place_keeps_a_backup_and_rolls_back(tmp_path, rows, embedder, seeded):
    vs = _wooster(tmp_path, rows[:10])
    original = tree_hash(vs)
    cfg = write_config(tmp_path)
    r = cli("--config", str(cfg), "migrate", str(vs), "--to", "projects", "--in-place", "--no-prefect", "--json")
    s = one_json(r.stdout)
    assert s["status"] == "migrated" and s["store"] == str(vs) and s["in_place"]
    backup = Path(s["backup"])
    assert backup.parent == vs.parent and backup.name.startswith("vectorStore.bak-") and backup.name.endswith("Z")
    assert tree_hash(backup) == original  # the old store, byte for byte
    assert {"faiss.index", "docstore.json", "manifest.json", "chunks.parquet"} <= {p.name for p in vs.iterdir()}
    assert verify_store(vs) == [] and open_store(vs).manifest["project"] == "demo"
    assert (s["added"], s["updated"], s["deleted"]) == (s["count"] - 10, 10, 0)
    # Again: the source already is a store of this model; the look first answers it without loading the model.
    def no_model(*a, **k):
        raise AssertionError("an already-migrated store needs no model")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(migrate, "resolve_embedder", no_model)
        again = one_json(cli("--config", str(cfg), "migrate", str(vs), "--to", "projects", "--in-place", "--json")
                         .stdout)
    assert again["status"] == "unchanged" and "already is a woolocal store" in again["message"]
    assert migrate.backups(vs) == [backup]
    # Roll back: the old store is back, the migrated one kept aside.
    r = cli("migrate", "--rollback", str(vs), "--json")
    assert one_json(r.stdout) == {"status": "rolled_back", "store": str(vs), "restored_from": str(backup)}
    assert tree_hash(vs) == original and not backup.exists()
    aside = list(vs.parent.glob("vectorStore.rolledback-*"))
    assert len(aside) == 1 and (aside[0] / "manifest.json").is_file()
    r = cli("migrate", "--rollback", str(vs), code=2)
    assert "no backup to restore" in r.stderr


def test_verification_failure_leaves_the_store_as_it_was(tmp_path, rows, embedder, monkeypatch):
    """Vectors that do not belong to their texts (here: a batch returned in reverse) fail self-retrieval; nothing
    is swapped in, no backup is made, the source is byte-identical, the untrusted shards are removed."""
    vs = _wooster(tmp_path, rows[20:28])
    original = tree_hash(vs)
    real = checkpoints._embed_rows
    monkeypatch.setattr(checkpoints, "_embed_rows", lambda emb, texts, p: real(emb, texts, p)[::-1].copy())
    with pytest.raises(migrate.MigrationVerifyError, match="self-retrieval"):
        migrate.migrate_store(vs, "projects", config=load_config(write_config(tmp_path)), in_place=True,
                              embedder=embedder)
    assert tree_hash(vs) == original
    assert sorted(p.name for p in vs.parent.iterdir()) == [".vectorStore.migrate.lock", "vectorStore"]


def test_a_second_run_of_the_same_target_fails_fast(tmp_path, rows, embedder, seeded):
    vs = _wooster(tmp_path, rows[:3])
    cfg = write_config(tmp_path)
    with target_lock(vs):
        t = time.perf_counter()
        with pytest.raises(migrate.MigrationLockedError, match=f"another migration of this store is running \\(pid "
                                                               f"{os.getpid()}"):
            migrate.migrate_store(vs, "projects", config=load_config(cfg), in_place=True, embedder=embedder)
        assert time.perf_counter() - t < 5
        r = cli("--config", str(cfg), "migrate", str(vs), "--to", "projects", "--in-place", "--no-prefect", code=1)
        assert "another migration" in r.stderr
    assert migrate.backups(vs) == [] and not (vs / "manifest.json").exists()


def test_checkpoints_resume_and_are_discarded_when_source_or_model_change(tmp_path, rows, tiny, monkeypatch):
    """In-process: a run that dies after 2 batches leaves 2 shards; a re-run resumes them. A changed source (or model)
    discards them."""
    embedder = tiny
    monkeypatch.setenv(migrate.BATCH_ENV, "3")
    src = make_js_store(tmp_path / "src", rows[40:49])
    cfg = load_config(write_config(tmp_path))
    out = tmp_path / "out" / "tiny-32d"
    work = out.parent / ".tiny-32d.migrate-work"
    real, calls = checkpoints._embed_rows, []

    def dying(emb, texts, p):
        calls.append(len(texts))
        if len(calls) > 2:
            raise RuntimeError("killed")
        return real(emb, texts, p)

    monkeypatch.setattr(checkpoints, "_embed_rows", dying)
    with pytest.raises(RuntimeError):
        migrate.migrate_store(src, "projects", config=cfg, out=out, embedder=embedder)
    assert sorted(p.name for p in work.glob("batch-*.parquet")) == ["batch-000000.parquet", "batch-000001.parquet"]
    assert not out.exists()
    key = json.loads((work / "key.json").read_text())
    assert key["source_fingerprint"] == migrate.source_fingerprint(src)[0] and key["batch"] == 3
    # Another model identity: the shards are not used (and are replaced).
    monkeypatch.setattr(checkpoints, "vector_identity", lambda emb: {"name": "other"})
    with pytest.raises(RuntimeError):
        migrate.migrate_store(src, "projects", config=cfg, out=out, embedder=embedder)
    assert json.loads((work / "key.json").read_text())["model"] == {"name": "other"}
    monkeypatch.undo()
    monkeypatch.setenv(migrate.BATCH_ENV, "3")
    # Resume: a dying run with the real identity again leaves 2 shards; then a clean run loads them.
    calls.clear()
    monkeypatch.setattr(checkpoints, "_embed_rows", dying)
    with pytest.raises(RuntimeError):
        migrate.migrate_store(src, "projects", config=cfg, out=out, embedder=embedder)
    monkeypatch.setattr(checkpoints, "_embed_rows", real)
    s = migrate.migrate_store(src, "projects", config=cfg, out=out, embedder=embedder)
    assert (s.status, s.resumed_batches, s.embedded) == ("migrated", 2, s.count - 6) and s.batches >= 3
    assert not work.exists()
    # A changed source discards a work folder made for the old one.
    shutil.rmtree(out)
    calls.clear()
    monkeypatch.setattr(checkpoints, "_embed_rows", dying)
    with pytest.raises(RuntimeError):
        migrate.migrate_store(src, "projects", config=cfg, out=out, embedder=embedder)
    make_js_store(src, rows[40:48])
    monkeypatch.setattr(checkpoints, "_embed_rows", real)
    s = migrate.migrate_store(src, "projects", config=cfg, out=out, embedder=embedder)
    assert s.resumed_batches == 0 and s.embedded == s.count


def _woolocal_cmd() -> list[str]:
    return [sys.executable, "-m", "woolocal_cli"]


def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, rows, embedder, monkeypatch):
    """A real `woolocal migrate` subprocess killed with SIGKILL once checkpoints exist; the source is byte-identical
    after the kill; the re-run resumes the checkpoints and ends with the store an uninterrupted run makes."""
    src = make_js_store(tmp_path / "src", rows[2::8])  # 28 chunks, ~17 batches of 2
    before = tree_hash(src)
    cfg = write_config(tmp_path)
    killed_out = tmp_path / "killed" / SLUG_DIR
    work = killed_out.parent / f".{SLUG_DIR}.migrate-work"
    # One thread, so that even an idle machine leaves seconds between the 2nd checkpoint and the end of the run.
    env = {**os.environ, migrate.BATCH_ENV: "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = [*_woolocal_cmd(), "--config", str(cfg), "migrate", str(src), "--to", "projects", "--out", str(killed_out),
           "--no-prefect", "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.monotonic() + 180
    try:
        while len(list(work.glob("batch-*.parquet"))) < 2:
            assert proc.poll() is None, f"migrate ended before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "no checkpoints after 180 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    shards = len(list(work.glob("batch-*.parquet")))
    assert shards >= 2
    assert tree_hash(src) == before  # the source is never modified
    assert not killed_out.exists()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = one_json(p.stdout)
    assert resumed["status"] == "migrated" and resumed["resumed_batches"] == shards < resumed["batches"]
    assert resumed["embedded"] == resumed["count"] - 2 * shards  # checkpoints are whole batches, written in order
    assert not work.exists() and tree_hash(src) == before
    # The reference: the same migration, uninterrupted.
    monkeypatch.setenv(migrate.BATCH_ENV, "2")
    ref_out = tmp_path / "ref" / SLUG_DIR
    ref = migrate.migrate_store(src, "projects", config=load_config(cfg), out=ref_out, embedder=embedder)
    assert ref.resumed_batches == 0 and ref.count == resumed["count"]
    a, b = open_store(killed_out), open_store(ref_out)
    assert a.chunks() == b.chunks()  # ids, texts, metadata, sha256, in order
    assert np.allclose(a.vectors(), b.vectors(), atol=1e-6, rtol=0)
    ma, mb = dict(a.manifest), dict(b.manifest)
    assert ma.pop("created") and mb.pop("created")
    fa, fb = ma.pop("files"), mb.pop("files")
    assert fa["docstore.json"] == fb["docstore.json"]
    assert ma == mb


# ---------------------------------------------------------------------------------------------------------------
# dry run, CLI, bulk


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, rows, seeded):
    src = make_js_store(tmp_path / "src", rows[::20])
    cfg = write_config(tmp_path)
    before = tree_hash(tmp_path)
    r = cli("--config", str(cfg), "migrate", str(src), "--to", "projects", "--dry-run", "--json")
    s = one_json(r.stdout)
    assert s["status"] == "planned" and s["source_format"] == "langchain-js" and s["source_dim"] == 1536
    assert s["source_count"] == len(rows[::20]) and s["dim"] == 384 and s["model"] == MODEL
    assert s["count"] == len(rows[::20]) - s["rechunked"] + s["pieces"]
    est = s["plan"]["estimate"]
    assert s["plan"]["action"] == "migrate" and est["seconds"] > 0 and est["sample"] >= 1 and est["tokens_per_s"] > 0
    assert tree_hash(tmp_path) == before and not (tmp_path / "stores").exists()
    human = cli("--config", str(cfg), "migrate", str(src), "--to", "projects", "--dry-run").stdout
    assert "dry run" in human and "estimate" in human and "langchain-js, 1536d" in human and "rechunked" in human
    assert tree_hash(tmp_path) == before


def test_cli_usage_errors_exit_2(tmp_path, seeded):
    src = _edge(tmp_path, "js_deleted")
    cfg = str(write_config(tmp_path))
    cases = [
        (["migrate", str(src), "--to", "projects", "--out", str(tmp_path / "o"), "--in-place"], "not both"),
        (["migrate", str(src)], "--to is required"),
        (["migrate"], "give SRC"),
        (["migrate", "--rollback", str(src), "--to", "projects"], "--rollback takes SRC alone"),
        (["migrate", "--all", str(src)], "--all takes no SRC"),
        (["migrate", str(tmp_path / "nope"), "--to", "projects", "--no-prefect"], "no such store folder"),
        (["migrate", str(tmp_path), "--to", "projects", "--no-prefect"], "not a store folder"),
        (["migrate", str(src), "--to", "no-such-model-xyz", "--no-prefect"], "neither a purpose"),
        (["migrate", str(src), "--to", "projects", "--out", str(tmp_path / "x-768d"), "--no-prefect"],
         "folder name says 768d"),
    ]
    for args, msg in cases:
        r = cli("--config", cfg, *args, code=2)
        assert msg in r.stderr, (args, r.stderr)
    assert not (tmp_path / "stores").exists()


def test_all_walks_a_wooster_root_and_one_failure_does_not_stop_the_others(tmp_path, rows, seeded):
    root = tmp_path / "wooster"
    a = _wooster(tmp_path, rows[30:33], "alpha")
    broken = _wooster(tmp_path, rows[33:35], "broken")
    (broken / "docstore.json").write_text("[[[", encoding="utf-8")  # a save that was cut short
    profile = root / "vector_data" / "profile"
    shutil.copytree(FIX / "edge" / "py_nonjson_metadata", profile)
    (root / "vector_data" / "notes.txt").write_text("not a store")
    (root / "projects" / "empty-project").mkdir()  # a project without a vectorStore
    cfg = write_config(tmp_path, wooster={"root": "wooster"})
    r = cli("--config", str(cfg), "migrate", "--all", "--no-prefect", "--json", code=1)
    out = one_json(r.stdout)
    assert out["status"] == "failed" and out["failed"] == 1
    by = {m["name"]: m for m in out["migrations"]}
    assert set(by) == {"projects-alpha", "projects-broken", "vector_data-profile"}
    assert by["projects-broken"]["status"] == "failed" and "not valid JSON" in by["projects-broken"]["error"]
    assert by["projects-alpha"]["status"] == by["vector_data-profile"]["status"] == "migrated"
    assert by["projects-alpha"]["in_place"] and verify_store(a) == [] and verify_store(profile) == []
    assert migrate.backups(a) and migrate.backups(profile) and not migrate.backups(broken)
    # Human output: the table on stdout; exit 1 again (the broken store is still broken), the others unchanged.
    r = cli("--config", str(cfg), "migrate", "--all", "--no-prefect", code=1)
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["name", "status"]
    assert any(x.startswith("projects-alpha") and " unchanged " in x for x in lines)
    assert any(x.startswith("projects-broken") and " failed " in x for x in lines)
    assert lines[-1] == "3 store(s): 1 failed, 2 unchanged"
    # The walk passes over the backups it made.
    assert len(migrate.declared_migrations(load_config(cfg))) == 3


def test_declared_migration_by_name_through_the_prefect_flow(tmp_path, seeded):
    """`woolocal migrate NAME` runs the flows.yaml entry through pipelines/migrate_flow.py (Prefect, in-process)."""
    src = _edge(tmp_path, "js_dup_id")
    cfg = write_config(tmp_path, migrations=[{"name": "dups", "source": "js_dup_id", "to": "projects",
                                              "out": "converted/dups-384d"}])
    r = cli("--config", str(cfg), "migrate", "dups", "--json")
    s = one_json(r.stdout)
    assert SUMMARY_KEYS <= set(s) and s["status"] == "migrated" and s["name"] == "dups"
    assert s["store"] == str(tmp_path / "converted" / "dups-384d") and s["count"] == 6
    assert verify_store(Path(s["store"])) == [] and src.is_dir()
    r = cli("--config", str(cfg), "migrate", "--all", "--json")
    out = one_json(r.stdout)
    assert [m["status"] for m in out["migrations"]] == ["unchanged"] and out["failed"] == 0
