"""Tests for incremental ingest (woolocal_ingest.ingest) and its Prefect flow (pipelines.ingest_flow).

A base store of the sample project is built once per module with the real model; each test works on its own copy
of the project and the store. An embedder spy records exactly which texts a run sent to the model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from woolocal_ingest import ingest as ingest_mod
from woolocal_ingest.chunking import ChunkSettings
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from woolocal_ingest.ingest import run_ingest
from woolocal_ingest.request import IngestRequest
from woolocal_ingest.stores import Store, store_dir, verify_store
from store_copies import copy_stores
from woolocal_ingest import embedders

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample-project"
SETTINGS = ChunkSettings(200, 32)
PROJECT = "sample"


class Spy:
    """Wraps an embedder and records every text it was asked to embed."""

    def __init__(self, inner):
        self._inner = inner
        self.texts: list[str] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def embed_documents(self, texts, progress=None):
        self.texts.extend(texts)
        return self._inner.embed_documents(texts, progress)


def facts() -> list[dict]:
    path = SAMPLE.parent / "sample-facts.json"
    if not path.is_file():
        pytest.fail("data/sample-facts.json is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def rows(store: Store) -> dict[str, tuple[str, str, bytes]]:
    """id -> (source, text, vector bytes): everything a reader of the store sees."""
    vecs = store.vectors()
    return {c.id: (c.source, c.text, vecs[i].tobytes()) for i, c in enumerate(store.chunks())}


class Work:
    """One test's copy of the project and its stores."""

    def __init__(self, proj: Path, stores: Path, embedder):
        self.proj, self.stores, self.embedder = proj, stores, embedder
        self.target = store_dir(stores, PROJECT, embedder.info.slug, embedder.dim)
        self.spy: Spy | None = None

    def ingest(self):
        self.spy = Spy(self.embedder)
        return run_ingest(PROJECT, self.proj, self.stores, self.spy, SETTINGS, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)

    def store(self) -> Store:
        return Store(self.target, embedder=self.embedder)


@pytest.fixture(scope="module")
def base(tmp_path_factory, embedder):
    """The sample project ingested once: (project, stores, summary, texts)."""
    facts()
    root = tmp_path_factory.mktemp("base")
    proj = root / "project"
    shutil.copytree(SAMPLE, proj)
    w = Work(proj, root / "stores", embedder)
    summary = w.ingest()
    return proj, w.stores, summary, list(w.spy.texts)


@pytest.fixture
def work(base, tmp_path, embedder) -> Work:
    proj, stores, _, _ = base
    shutil.copytree(proj, tmp_path / "project", symlinks=True)
    copy_stores(stores, tmp_path / "stores", tmp_path / "project", symlinks=True)
    return Work(tmp_path / "project", tmp_path / "stores", embedder)


def source_files(proj: Path) -> list[str]:
    return sorted(p.relative_to(proj).as_posix() for p in proj.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------------------
# first run, unchanged re-run


def test_first_ingest_builds_a_sound_store(base, embedder):
    proj, stores, summary, texts = base
    target = store_dir(stores, PROJECT, embedder.info.slug, embedder.dim)
    assert summary.written and summary.store == str(target)
    assert verify_store(target) == []
    store = Store(target)
    assert summary.count == store.count == summary.added > 20
    assert (summary.updated, summary.unchanged, summary.deleted, summary.skipped_files) == (0, 0, 0, [])
    chunk_texts = [c.embed_text for c in store.chunks()]  # what is embedded: context + chunk
    assert sorted(texts) == sorted(set(chunk_texts)), "every distinct chunk text embedded exactly once"
    assert all(c.context and c.embed_text.endswith(c.text) for c in store.chunks())
    assert summary.embedded == len(texts)
    # every file is in the store, and the manifest records the hash of the bytes on disk
    files = source_files(proj)
    assert sorted({c.source for c in store.chunks()}) == files
    recorded = store.manifest["source"]["files"]
    assert recorded == {f: hashlib.sha256((proj / f).read_bytes()).hexdigest() for f in files}
    assert store.manifest["model"]["dim"] == 384 == store.dim
    # the stored vectors are the model's vectors for the stored texts
    some = [0, store.count // 2, store.count - 1]
    again = embedder.embed_documents([chunk_texts[i] for i in some])
    assert np.allclose(store.vectors()[some], again, atol=1e-4)


def test_facts_are_found(base, embedder):
    """Each fact sentence is in a chunk of its file, and its paraphrased question retrieves that file."""
    _, stores, _, _ = base
    store = Store(store_dir(stores, PROJECT, embedder.info.slug, embedder.dim), embedder=embedder)
    chunks = store.chunks()
    norm = lambda s: " ".join(s.split())  # noqa: E731 - PDF and wrapped lines break sentences differently
    found = 0
    for fact in facts():
        assert any(c.source == fact["source"] and norm(fact["sentence"]) in norm(c.text) for c in chunks), fact
        hits = store.search(fact["query"], k=3)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        found += fact["source"] in [h.source for h in hits]
    assert found >= len(facts()) - 1, f"only {found} of {len(facts())} facts retrieved in the top 3"


def test_unchanged_project_embeds_nothing(work):
    before = tree_digest(work.stores)
    prev = work.store().count
    s = work.ingest()
    assert work.spy.texts == []
    assert s.embedded == 0
    assert (s.added, s.updated, s.deleted, s.skipped_files) == (0, 0, 0, [])
    assert s.unchanged == s.count == prev
    assert not s.written
    assert tree_digest(work.stores) == before, "an unchanged project must not rewrite its store"


def test_asking_for_the_python_layout_rewrites_without_embedding(work):
    """An unchanged project re-ingested with python_layout on gains index.faiss + index.pkl, embedding nothing."""
    assert not (work.target / "index.pkl").exists()
    spy = Spy(work.embedder)
    s = run_ingest(PROJECT, work.proj, work.stores, spy, SETTINGS, DEFAULT_INCLUDE, DEFAULT_EXCLUDE, python_layout=True)
    assert spy.texts == [] and s.written and s.unchanged == s.count
    assert (work.target / "index.faiss").is_file() and (work.target / "index.pkl").is_file()
    assert "langchain-python" in work.store().manifest["layouts"] and verify_store(work.target) == []


def test_touched_but_identical_file_embeds_nothing(work):
    p = work.proj / "history.md"
    os.utime(p, (1, 1))
    p.write_bytes(p.read_bytes())
    s = work.ingest()
    assert work.spy.texts == [] and (s.added, s.updated, s.deleted) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------------------------
# changed, new, deleted files


def test_changed_file_reembeds_only_its_own_chunks(work):
    store = work.store()
    before = rows(store)
    rel = "guides/watering-schedule.rst"
    own_before = {i for i, r in before.items() if r[0] == rel}
    path = work.proj / rel
    old = "It sits in a concrete box with a green lid just inside the north gate"
    text = path.read_text(encoding="utf-8")
    assert old in text
    new_sentence = "It sits in a wooden crate painted orange behind the rhubarb patch by the east fence"
    path.write_text(text.replace(old, new_sentence), encoding="utf-8")

    s = work.ingest()
    after_store = work.store()
    after = rows(after_store)
    assert s.written and verify_store(work.target) == []
    assert work.spy.texts, "the changed text must be embedded"
    own_after = {i: r for i, r in after.items() if r[0] == rel}
    own_embedded = {c.embed_text for c in after_store.chunks() if c.source == rel}
    assert len(own_embedded) == len(own_after)
    assert set(work.spy.texts) <= own_embedded, "only the changed file's chunks are embedded"
    assert len(work.spy.texts) < len(own_after), "unchanged chunks of the changed file reuse their vectors"
    assert s.embedded == len(work.spy.texts)
    assert s.updated >= 1 and s.deleted == len(own_before - own_after.keys()) and s.added == len(own_after.keys() - own_before)
    assert s.count == after_store.count == len(before) + s.added - s.deleted
    assert s.unchanged == s.count - s.added - s.updated
    # every other file's rows are bit-for-bit what they were
    assert {i: r for i, r in after.items() if r[0] != rel} == {i: r for i, r in before.items() if r[0] != rel}
    assert not any(old in r[1] for r in after.values())
    top = after_store.search("Where is the water meter box? behind the rhubarb patch", k=1)[0]
    assert top.source == rel and "rhubarb" in top.text
    assert after_store.manifest["source"]["files"][rel] == hashlib.sha256(path.read_bytes()).hexdigest()
    # and once more: nothing left to do
    s2 = work.ingest()
    assert work.spy.texts == [] and not s2.written


def test_new_file_is_added_and_a_copy_reuses_vectors(work):
    before = rows(work.store())
    (work.proj / "notes" / "2026-05-meeting.md").write_text(
        "# May meeting\n\nThe seed library moved to the green cabinet beside the potting bench. "
        "Seed packets are now sorted by sowing month.\n", encoding="utf-8")
    shutil.copy(work.proj / "README.md", work.proj / "README-copy.md")
    s = work.ingest()
    after = rows(work.store())
    new_rows = {i: r for i, r in after.items() if i not in before}
    assert {r[0] for r in new_rows.values()} == {"notes/2026-05-meeting.md", "README-copy.md"}
    assert s.added == len(new_rows) and s.updated == 0 and s.deleted == 0
    # only the genuinely new text reaches the model: the copy's chunks have the same text as README.md's
    assert work.spy.texts and all("seed library" in t.lower() or "May meeting" in t for t in work.spy.texts)
    assert s.reused == sum(1 for r in new_rows.values() if r[0] == "README-copy.md") > 0
    readme = {r[1]: r[2] for r in before.values() if r[0] == "README.md"}
    assert all(readme[r[1]] == r[2] for r in new_rows.values() if r[0] == "README-copy.md")
    assert {i: r for i, r in after.items() if i in before} == before


def test_deleted_file_leaves_the_store(work):
    before = rows(work.store())
    rel = "notes/2026-04-meeting.txt"
    gone = {i for i, r in before.items() if r[0] == rel}
    assert gone
    (work.proj / rel).unlink()
    s = work.ingest()
    after = rows(work.store())
    assert work.spy.texts == []
    assert s.deleted == len(gone) and (s.added, s.updated) == (0, 0)
    assert s.written and s.count == len(before) - len(gone)
    assert set(after) == set(before) - gone
    assert {i: before[i] for i in after} == after
    assert rel not in work.store().manifest["source"]["files"]
    assert all(h.source != rel for h in work.store().search("annual fee for a half plot", k=10))


def test_everything_deleted_keeps_previous_store(work):
    """No chunks left: refuse to write an empty index (faiss-node aborts on it), keep the previous version."""
    before = tree_digest(work.stores)
    for p in list(work.proj.iterdir()):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    with pytest.raises(Exception) as info:
        work.ingest()
    assert "0 chunks" in str(info.value) or "nothing to write" in str(info.value)
    assert tree_digest(work.stores) == before


# ---------------------------------------------------------------------------------------------------------------
# bad files: skipped with a reason, never the end of the run


def deny_read(monkeypatch, path: Path) -> None:
    """Make `path` unreadable: chmod 000, which root ignores, so for root emulate the kernel's EACCES."""
    path.chmod(0)
    if os.geteuid() == 0:
        original = Path.read_bytes

        def read_bytes(self):
            if Path(self).absolute() == path.absolute() and not (os.stat(self).st_mode & 0o444):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return original(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)


def vanish_during_load(monkeypatch, *paths: Path) -> None:
    """Delete files after discovery and hashing, just before they are loaded and chunked."""
    original = ingest_mod.load_and_chunk

    def load_and_chunk(root, rels, *args, **kwargs):
        for p in paths:
            if p.relative_to(root).as_posix() in rels and p.exists():
                p.unlink()
        return original(root, rels, *args, **kwargs)

    monkeypatch.setattr(ingest_mod, "load_and_chunk", load_and_chunk)


def test_bad_new_files_are_skipped_with_reasons(work, monkeypatch):
    p = work.proj / "bad"
    p.mkdir()
    (p / "blob.txt").write_bytes(b"ELF\x00\x01\x02binary\x00" * 50)
    (p / "doc.pdf.bak").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 8)
    (p / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R\nthis is not a pdf at all")
    (p / "empty.txt").write_text("   \n\n", encoding="utf-8")
    (p / "secret.md").write_text("# Secret\n\nThe shed combination is 4-1-7.\n", encoding="utf-8")
    deny_read(monkeypatch, p / "secret.md")
    (p / "self.md").symlink_to("self.md")  # a link to itself: ELOOP
    (p / "loop").symlink_to("..", target_is_directory=True)  # a folder link back to an ancestor
    (p / "dangling.md").symlink_to("nowhere.md")
    (p / "fleeting.md").write_text("# Fleeting\n\nThis file is deleted while the run is going on.\n", encoding="utf-8")
    vanish_during_load(monkeypatch, p / "fleeting.md")
    (p / "good.md").write_text("# Good\n\nThe rain barrels are emptied before the first frost.\n", encoding="utf-8")

    before = rows(work.store())
    s = work.ingest()
    reasons = {x["source"]: x["reason"] for x in s.skipped_files}
    expect = {
        "bad/blob.txt": "binary", "bad/doc.pdf.bak": "binary", "bad/broken.pdf": "corrupt PDF", "bad/empty.txt": "empty",
        "bad/secret.md": "permission denied", "bad/self.md": "symlink loop", "bad/loop": "symlink loop",
        "bad/dangling.md": "broken symlink", "bad/fleeting.md": "vanished",
    }
    for src, word in expect.items():
        assert src in reasons, (src, reasons)
        assert word.lower() in reasons[src].lower(), (src, reasons[src])
    # the run went on: the good file is in, no bad file is, and nothing that was there before was lost
    after = work.store()
    sources = {c.source for c in after.chunks()}
    assert "bad/good.md" in sources and not (sources & set(expect))
    assert s.written and verify_store(work.target) == []
    assert set(before) <= set(rows(after)) and s.deleted == 0
    assert work.spy.texts and all("rain barrels" in t for t in work.spy.texts)
    assert "4-1-7" not in json.dumps(s.to_dict())
    d = s.to_dict()
    assert d["skipped"] == len(s.skipped_files) and json.loads(json.dumps(d)) == d


def _changed_then_vanishes(monkeypatch, path: Path) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\nA line added just before the file went away.\n")
    vanish_during_load(monkeypatch, path)


def _self_link(monkeypatch, path: Path) -> None:
    path.unlink()
    path.symlink_to(path.name)


BREAKERS = {
    "binary": lambda mp, p: p.write_bytes(b"\x00\x01garbage\x00" * 100),
    # a UTF-16 byte-order mark and then an odd number of bytes: no encoding reads it
    "undecodable": lambda mp, p: p.write_bytes(b"\xff\xfe" + "# History broken".encode("utf-16-le") + b"\xd8"),
    "permission denied": deny_read,
    "vanished": _changed_then_vanishes,
    "symlink loop": _self_link,
}


@pytest.mark.parametrize("how", list(BREAKERS))
def test_previously_indexed_file_that_turns_unreadable_keeps_its_chunks(work, monkeypatch, how):
    """The implemented rule: a file that was indexed and cannot be read now keeps its previous chunks, even when
    the store is rewritten for another change in the same run; once it is gone for good, its chunks go too."""
    rel = "history.md"
    path = work.proj / rel
    original = path.read_bytes()
    before = rows(work.store())
    kept = {i: r for i, r in before.items() if r[0] == rel}
    assert kept
    BREAKERS[how](monkeypatch, path)
    # another change in the same run, so that the store really is rewritten
    other = work.proj / "notes" / "2026-03-meeting.md"
    other.write_text(other.read_text(encoding="utf-8") + "\nThe gate padlock was replaced on 3 March.\n",
                     encoding="utf-8")
    s = work.ingest()
    reasons = {x["source"]: x["reason"] for x in s.skipped_files}
    assert rel in reasons, reasons
    assert s.written and verify_store(work.target) == []
    after = rows(work.store())
    assert {i: r for i, r in after.items() if r[0] == rel} == kept, "the unreadable file's chunks must survive"
    assert s.deleted == 0 or all(before[i][0] != rel for i in set(before) - set(after))
    kept_embedded = {c.embed_text for c in work.store().chunks() if c.id in kept}
    assert all(t not in kept_embedded for t in work.spy.texts)
    assert work.store().manifest["source"]["files"][rel] == hashlib.sha256(original).hexdigest()
    hits = work.store().search("demolished laundromat garden founded", k=3)
    assert rel in [h.source for h in hits]

    monkeypatch.undo()  # readable again: the same bytes as before need no embedding
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(original)
    s2 = work.ingest()
    assert work.spy.texts == [] and s2.deleted == 0
    assert {i: r for i, r in rows(work.store()).items() if r[0] == rel} == kept

    path.unlink()  # really gone now: its chunks leave the store
    s3 = work.ingest()
    assert s3.deleted == len(kept) and not any(r[0] == rel for r in rows(work.store()).values())


def test_unreadable_folder_keeps_its_files_chunks(work, monkeypatch):
    """A folder that cannot be listed this time (permission denied, a network mount gone stale) is not a folder
    whose files were all deleted: they keep their chunks."""
    from woolocal_ingest import documents

    folder = work.proj / "notes"
    before = rows(work.store())
    kept = {i: r for i, r in before.items() if r[0].startswith("notes/")}
    assert {r[0] for r in kept.values()} == {"notes/2026-03-meeting.md", "notes/2026-04-meeting.txt"}
    folder.chmod(0)
    real_scandir = documents.os.scandir

    def scandir(path="."):
        if os.geteuid() == 0 and isinstance(path, (str, os.PathLike)) and Path(path).absolute() == folder.absolute():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_scandir(path)

    monkeypatch.setattr(documents.os, "scandir", scandir)
    (work.proj / "README.md").write_text((work.proj / "README.md").read_text(encoding="utf-8") + "\nOne more rule.\n")
    try:
        s = work.ingest()
    finally:
        folder.chmod(0o755)
    assert any(x["source"] == "notes" and "permission" in x["reason"] for x in s.skipped_files), s.skipped_files
    assert s.written and s.deleted == 0
    after = rows(work.store())
    assert {i: r for i, r in after.items() if r[0].startswith("notes/")} == kept
    monkeypatch.undo()
    (work.proj / "notes" / "2026-04-meeting.txt").unlink()  # readable again, and one file really gone
    s = work.ingest()
    assert s.deleted == sum(1 for r in kept.values() if r[0] == "notes/2026-04-meeting.txt")
    assert work.spy.texts == []


def test_unreadable_pdf_keeps_its_chunks(work):
    rel = "docs/plot-map.pdf"
    before = {i: r for i, r in rows(work.store()).items() if r[0] == rel}
    assert before
    (work.proj / rel).write_bytes(b"%PDF-1.7\n%%EOF truncated by a failed sync")
    (work.proj / "notes" / "extra.txt").write_text("Mulch is delivered on Fridays.\n", encoding="utf-8")
    s = work.ingest()
    assert any(x["source"] == rel and "PDF" in x["reason"] for x in s.skipped_files)
    assert {i: r for i, r in rows(work.store()).items() if r[0] == rel} == before
    assert s.written and s.deleted == 0


# ---------------------------------------------------------------------------------------------------------------
# the Prefect flow


@pytest.fixture
def prefect_flow(monkeypatch, embedder, tmp_path):
    """pipelines.ingest_flow.ingest_flow with the session's model in its cache and a spy on it."""
    from pipelines.runtime import flow_settings, prepare_prefect_env

    prepare_prefect_env(tmp_path / ".prefect")
    from pipelines import ingest_flow as flow_mod

    spy = Spy(embedder)
    monkeypatch.setitem(embedders.spec.EMBEDDERS, embedders.EmbedderSpec(), spy)

    def run(w: Work):
        with flow_settings():
            return flow_mod.ingest_flow(IngestRequest(PROJECT, w.proj, w.stores, chunking=SETTINGS).to_dict(),
                                        return_state=True)

    run.spy = spy
    return run


def test_prefect_flow_matches_in_process_run(work, prefect_flow, tmp_path, embedder):
    twin = Work(tmp_path / "twin-project", tmp_path / "twin-stores", embedder)
    shutil.copytree(work.proj, twin.proj, symlinks=True)
    copy_stores(work.stores, twin.stores, twin.proj, symlinks=True)
    for w in (work, twin):
        (w.proj / "history.md").write_text((w.proj / "history.md").read_text(encoding="utf-8")
                                           + "\n## Since then\n\nA pond was dug in 2025 near the south fence.\n")
        (w.proj / "budget.csv").unlink()
        (w.proj / "bin.txt").write_bytes(b"\x00\x00")
    state = prefect_flow(work)
    assert state.is_completed(), state
    summary = state.result()
    local = twin.ingest().to_dict()
    assert prefect_flow.spy.texts == twin.spy.texts and prefect_flow.spy.texts
    for key in ("count", "added", "updated", "unchanged", "deleted", "embedded", "reused", "skipped", "written"):
        assert summary[key] == local[key], key
    assert rows(work.store()) == rows(twin.store())
    assert verify_store(work.target) == []


@pytest.mark.parametrize("step", ["load_and_chunk", "embed_texts", "write_store"])
def test_prefect_failing_task_fails_the_run_and_keeps_the_store(work, prefect_flow, monkeypatch, step):
    (work.proj / "history.md").write_text("# History\n\nRewritten entirely: the garden began in 1990.\n")
    before = tree_digest(work.stores)

    def boom(*args, **kwargs):
        raise RuntimeError(f"{step} exploded")

    if step == "write_store":  # the real atomic write, failing after the new version is complete, before the swap
        real_write = ingest_mod.write_store
        monkeypatch.setattr(ingest_mod, step, lambda *a, **k: real_write(*a, **{**k, "before_swap": boom}))
    else:
        monkeypatch.setattr(ingest_mod, step, boom)
    state = prefect_flow(work)
    assert state.is_failed(), (state.type, state.message)
    assert not state.is_completed()
    with pytest.raises(RuntimeError, match="exploded"):
        state.result()
    assert tree_digest(work.stores) == before
    assert verify_store(work.target) == []
    assert not [p for p in work.target.parent.iterdir() if p.name.startswith(".")], "temp folders left behind"
