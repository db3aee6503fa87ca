"""ONNX Runtime backend: parity with sentence-transformers, dims, the export cache (atomic, reused, repaired,
read-only fallback), input order, query prefix. Real models, real exports, no mocks of the runtime."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from woolocal_ingest.embedders import read_model_info, resolve_model
from woolocal_ingest.embedders import onnx as onnx_mod
from woolocal_ingest.embedders.onnx import MODEL_FILENAME, OnnxEmbedder, cache_dirs, export_onnx, onnx_available

pytestmark = pytest.mark.skipif(not onnx_available(), reason="onnxruntime / onnx not installed")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("WOOLOCAL_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="module", autouse=True)
def _xdg_cache(tmp_path_factory):
    """Exports that fall back to the XDG cache land in a temp folder, never in ~/.cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


def _real_texts() -> list[str]:
    chunks = SHARED / "fixtures" / "legacy-stores" / "expected_chunks.jsonl"
    if chunks.is_file():
        return [json.loads(line)["text"] for line in chunks.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for p in sorted((REPO / "data" / "sample-project").rglob("*")):
        if p.suffix in (".md", ".txt", ".rst", ".py"):
            out += [b.strip() for b in p.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    return out


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """32 real chunks of varied length: a few words up to longer than the models' max tokens (truncation)."""
    src = _real_texts()
    rng = random.Random(7)
    picked = rng.sample(src, min(30, len(src)))
    out = [t[: rng.choice([12, 40, 120, 400, 2000])] for t in picked]
    out.append(" ".join(src[:6]))  # well past 256 / 128 tokens
    out.append("ok")
    return out


def _copy_model(src: Path, dest: Path, name: str | None = None):
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".onnx-cache"))
    return read_model_info(dest, name=name)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """A copy of the packaged all-MiniLM-L6-v2 (mean-pooled), so the test export does not land in site-packages."""
    base = resolve_model(None)
    return _copy_model(base.path, tmp_path_factory.mktemp("onnx-models") / "minilm", name=base.name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 1-layer 64-dim random BERT: exports in about a second, for the cache tests."""
    from model_factory import make_bert

    path = make_bert(tmp_path_factory.mktemp("onnx-models") / "tiny-bert-64", hidden=64, layers=1, pooling="mean")
    return read_model_info(path)


def _fresh_copy(info, tmp_path: Path):
    return _copy_model(info.path, tmp_path / info.path.name, name=info.name)


def _st(info):
    from woolocal_ingest.embedders.sentence_transformers import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(info)


def _cos_min(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(axis=1).min())


def _no_export(model_dir, dest):
    raise AssertionError(f"exported again into {dest}")


# -- availability, parity, dims ------------------------------------------------------------------------------------


def test_onnx_available():
    assert onnx_available() is True


def test_parity_minilm_mean_pooled(minilm, texts):
    assert minilm.pooling == "mean"
    emb = OnnxEmbedder(minilm)
    got = emb.embed_documents(texts)
    ref = _st(minilm).embed_documents(texts)
    assert emb.backend == "onnx" and emb.exported
    assert emb.onnx_path == cache_dirs(minilm)[0] / MODEL_FILENAME
    assert emb.onnx_path.parent.parent == minilm.path / ".onnx-cache"
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert _cos_min(got, ref) >= 0.9999
    assert set(emb.input_names) == {"input_ids", "attention_mask", "token_type_ids"}


def test_parity_bert768_cls_pooled(bert768_cls, texts, tmp_path):
    info = _fresh_copy(read_model_info(bert768_cls), tmp_path)
    assert info.pooling == "cls" and info.dim == 768
    got = OnnxEmbedder(info).embed_documents(texts)
    ref = _st(info).embed_documents(texts)
    assert got.shape == (len(texts), 768)
    assert _cos_min(got, ref) >= 0.9999


def test_bert1024_gives_1024_dim_normalised_vectors(bert1024_cls, texts, tmp_path):
    info = _fresh_copy(read_model_info(bert1024_cls), tmp_path)
    got = OnnxEmbedder(info).embed_documents(texts[:8])
    assert got.shape == (8, 1024) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(got).all()


# -- the export cache ----------------------------------------------------------------------------------------------


def test_second_instance_reuses_the_export(tiny, tmp_path, monkeypatch):
    info = _fresh_copy(tiny, tmp_path)
    first = OnnxEmbedder(info)
    a = first.embed_documents(["one text", "another, longer text"])
    assert first.exported
    st = first.onnx_path.stat()

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("torch.onnx.export called for a cached model")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    second = OnnxEmbedder(info)
    b = second.embed_documents(["one text", "another, longer text"])
    assert not second.exported and second.onnx_path == first.onnx_path
    after = second.onnx_path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size)
    np.testing.assert_array_equal(a, b)
    # the cache does not change the model's identity (registry skips .onnx-cache)
    assert read_model_info(info.path).files_sha256() == tiny.files_sha256()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_cached_export_is_exported_again(tiny, tmp_path, damage):
    info = _fresh_copy(tiny, tmp_path)
    good = OnnxEmbedder(info)
    ref = good.embed_documents(["a short text"])
    path = good.onnx_path
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00not onnx" * 100, "empty": b""}[damage])
    again = OnnxEmbedder(info)
    got = again.embed_documents(["a short text"])
    assert again.exported and again.onnx_path == path
    assert path.stat().st_size == len(data)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_killed_export_leaves_no_model_file_and_its_temp_is_ignored(tiny, tmp_path):
    info = _fresh_copy(tiny, tmp_path)
    folder = cache_dirs(info)[0]

    def dies_half_way(model_dir, dest):
        Path(dest).write_bytes(b"half an export")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        OnnxEmbedder(info, exporter=dies_half_way).load()
    assert not (folder / MODEL_FILENAME).exists()
    assert not list(folder.glob("*.tmp"))  # removed on the way out
    # a SIGKILL leaves its temp file behind: it is never loaded, and the next exporter removes it
    leftover = folder / f".{MODEL_FILENAME}.99999.deadbeef.tmp"
    leftover.write_bytes(b"half an export")
    emb = OnnxEmbedder(info).load()
    assert emb.exported and emb.onnx_path == folder / MODEL_FILENAME
    assert not leftover.exists()


def test_concurrent_instances_export_once(tiny, tmp_path):
    info = _fresh_copy(tiny, tmp_path)
    calls = []

    def counting(model_dir, dest):
        calls.append(dest)
        export_onnx(model_dir, dest)

    embs = [OnnxEmbedder(info, exporter=counting) for _ in range(2)]
    threads = [threading.Thread(target=e.load) for e in embs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(e.exported for e in embs) == [False, True]


def test_read_only_model_folder_falls_back_to_xdg_cache(tiny, tmp_path, monkeypatch):
    info = _fresh_copy(tiny, tmp_path / "site-packages")
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    real_access = os.access
    model_root = str(info.path)

    def access(path, mode, *args, **kwargs):  # the model folder is read-only for this user (root ignores chmod)
        if str(path).startswith(model_root) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(onnx_mod.os, "access", access)
    emb = OnnxEmbedder(info).load()
    sha16 = info.files_sha256()[:16]
    assert emb.exported
    assert emb.onnx_path == xdg / "woolocal" / "onnx" / sha16 / MODEL_FILENAME
    assert not (info.path / ".onnx-cache").exists()
    # and a second instance finds it there
    assert not OnnxEmbedder(info, exporter=_no_export).load().exported


def test_injected_writability_and_shipped_export_in_read_only_folder(tiny, tmp_path, monkeypatch):
    info = _fresh_copy(tiny, tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # an export already next to the model is used even when the folder cannot be written
    shipped = OnnxEmbedder(info).load()
    assert shipped.onnx_path.parent.parent == info.path / ".onnx-cache"
    ro = OnnxEmbedder(info, writable=lambda p: False, exporter=_no_export).load()
    assert not ro.exported and ro.onnx_path == shipped.onnx_path
    # nowhere writable and nothing cached: a clear error, not a crash half way
    other = _fresh_copy(tiny, tmp_path / "other")
    shutil.rmtree(other.path / ".onnx-cache", ignore_errors=True)
    with pytest.raises(OSError, match="no writable ONNX cache"):
        OnnxEmbedder(other, writable=lambda p: False).load()


def test_only_the_graph_inputs_are_fed(tiny, tmp_path):
    """A graph that declares no token_type_ids (as DistilBERT / MPNet exports) gets only what it declares."""
    info = _fresh_copy(tiny, tmp_path)
    two = OnnxEmbedder(info, exporter=_export_without_token_types)
    got = two.embed_documents(["with two inputs", "x"])
    assert two.input_names == ["input_ids", "attention_mask"]
    ref = _st(info).embed_documents(["with two inputs", "x"])
    assert _cos_min(got, ref) >= 0.9999


def _export_without_token_types(src, dst):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(src), local_files_only=True).float().eval()

    class Two(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones((2, 8), dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    axes = {n: {0: "b", 1: "s"} for n in ("input_ids", "attention_mask", "last_hidden_state")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Two(model), (ids, mask), str(dst), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)


# -- order, prefixes -----------------------------------------------------------------------------------------------


def test_input_order_preserved_with_shuffled_lengths(minilm, texts):
    rng = random.Random(3)
    mixed = texts[:]
    rng.shuffle(mixed)
    emb = OnnxEmbedder(minilm, token_budget=256)  # many small batches, sorted by length inside
    got = emb.embed_documents(mixed)
    assert len(emb.last_plan.batches) > 3
    one_by_one = np.stack([emb.embed_documents([t])[0] for t in mixed])
    np.testing.assert_allclose(got, one_by_one, atol=1e-5)
    progress = []
    emb.embed_documents(mixed, progress=progress.append)
    assert sum(progress) == len(mixed)
    assert emb.embed_documents([]).shape == (0, 384)


def test_embed_query_applies_the_query_prefix(minilm):
    info = dataclasses.replace(minilm, query_prefix="query: ")
    emb = OnnxEmbedder(info)
    q = emb.embed_query("how often to water tomatoes")
    assert q.shape == (384,) and q.dtype == np.float32
    np.testing.assert_allclose(q, emb.embed_documents(["query: how often to water tomatoes"])[0], atol=1e-6)
    assert float(q @ emb.embed_documents(["how often to water tomatoes"])[0]) < 0.9999
    ref = _st(info).embed_query("how often to water tomatoes")
    assert float(q @ ref) >= 0.9999
