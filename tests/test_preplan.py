"""The cheap look before an ingest (`woolocal_ingest.preplan`): "nothing to do" exactly when a full run would write
nothing, and "work" for every change a full run acts on: an edited, new or deleted file, other chunk settings, another
layout, --rebuild, a store written by LangChain JS/Python between our runs, a store that is not there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from woolocal_ingest.chunking import ChunkSettings
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from woolocal_ingest.ingest import plan_ingest, run_ingest
from woolocal_ingest.preplan import pre_plan
from store_copies import copy_stores

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample-project"
PROJECT = "sample"


@pytest.fixture(scope="module")
def base(tmp_path_factory, embedder):
    root = tmp_path_factory.mktemp("preplan")
    proj, stores = root / "proj", root / "stores"
    shutil.copytree(SAMPLE, proj)
    run_ingest(PROJECT, proj, stores, embedder, ChunkSettings(200, 32), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    return proj, stores


@pytest.fixture
def work(base, tmp_path):
    proj, stores = tmp_path / "proj", tmp_path / "stores"
    shutil.copytree(base[0], proj)
    copy_stores(base[1], stores, proj)
    return proj, stores


def look(proj, stores, chunk=200, overlap=32, python_layout=False, rebuild=False):
    return pre_plan(PROJECT, proj, stores, None, "auto", chunk, overlap, DEFAULT_INCLUDE, DEFAULT_EXCLUDE,
                    python_layout, rebuild)


def test_unchanged_project_is_nothing_to_do_and_agrees_with_the_full_plan(work, embedder):
    proj, stores = work
    pre = look(proj, stores)
    assert pre.nothing_to_do, pre.work
    full = plan_ingest(PROJECT, proj, stores, embedder, ChunkSettings(200, 32), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    assert (pre.to_load, pre.deleted, str(pre.store)) == (full.to_load, full.deleted, str(full.target)) == (
        [], [], str(full.target))
    s = pre.summary()
    manifest = json.loads((pre.store / "manifest.json").read_text())
    assert (s["count"], s["unchanged"], s["written"], s["embedded"]) == (manifest["count"], manifest["count"], False, 0)
    assert s["files"]["found"] == len(manifest["source"]["files"])
    assert "nothing to do" in pre.headline()


def test_every_change_is_work(work, embedder):
    proj, stores = work
    md = sorted(proj.rglob("*.md"))[0]
    original = md.read_bytes()
    md.write_bytes(original + b"\n\nOne more paragraph.\n")
    pre = look(proj, stores)
    assert pre.work == "files changed" and pre.to_load == [md.relative_to(proj).as_posix()]
    md.write_bytes(original)
    (proj / "new.txt").write_text("a new file")
    assert look(proj, stores).to_load == ["new.txt"]
    (proj / "new.txt").unlink()
    md.unlink()
    pre = look(proj, stores)
    assert pre.work == "files changed" and pre.deleted == [md.relative_to(proj).as_posix()]
    md.write_bytes(original)
    assert look(proj, stores).nothing_to_do
    (proj / "empty.md").write_text("  \n")  # a file every run skips (no text) is not work, but is reported
    pre = look(proj, stores)
    assert pre.nothing_to_do and [(s.source, s.reason) for s in pre.skipped] == [("empty.md", "empty file")]
    assert pre.summary()["skipped_files"] == [{"source": "empty.md", "reason": "empty file"}]
    (proj / "empty.md").unlink()
    assert look(proj, stores, chunk=128).work == "chunk settings changed"
    assert look(proj, stores, python_layout=True).work == "layouts changed"
    assert look(proj, stores, rebuild=True).work == "--rebuild"
    assert look(proj, stores.parent / "elsewhere").work == "no store yet"


def test_a_store_written_by_langchain_between_runs_is_work(work):
    proj, stores = work
    pre = look(proj, stores)
    doc = pre.store / "docstore.json"
    data = json.loads(doc.read_text())
    data[0].append(["wooster-added", {"pageContent": "added by Wooster", "metadata": {}}])
    doc.write_text(json.dumps(data))
    assert "changed outside woolocal (docstore.json changed" in look(proj, stores).work
    shutil.copy(pre.store / "faiss.index", pre.store / "index.faiss")
    doc.unlink()
    assert "docstore.json is missing" in look(proj, stores).work


def test_model_identity_is_remembered_and_rehashed_when_a_file_changes(tmp_path, monkeypatch, embedder):
    """The model files' sha256 is memoised in the user's cache dir; touching a file invalidates it."""
    import dataclasses
    import os

    from woolocal_ingest.embedders.registry import read_model_info
    from woolocal_ingest.preplan import model_files_sha256

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(embedder.info.path, folder)
    info = read_model_info(folder)
    first = model_files_sha256(info)
    assert first == info.files_sha256() and (tmp_path / "cache" / "woolocal" / "model-sha256.json").is_file()
    calls = []
    fake = dataclasses.replace(info)
    monkeypatch.setattr(type(fake), "files_sha256", lambda self: calls.append(1) or "rehashed")
    assert model_files_sha256(fake) == first and calls == []  # remembered: no hashing
    cfg = folder / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    os.utime(cfg, ns=(1, 1))
    assert model_files_sha256(fake) == "rehashed" and calls == [1]
