"""MLX backend: parity with sentence-transformers, pooling from the model's config, order, prefixes, errors.

Real runs, also on Linux (mlx-cpu). Its bundled reference BLAS is slow (~70 tokens/s for MiniLM), so the texts are
real chunks cut to varied, mostly short lengths: the token count, not the text count, sets this file's runtime.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from woolocal_ingest.embedders import resolve_model
from woolocal_ingest.embedders.registry import read_model_info
from woolocal_ingest.embedders.sentence_transformers import SentenceTransformerEmbedder
from woolocal_ingest.errors import ConfigError, WoolocalError

mlx_mod = pytest.importorskip("woolocal_ingest.embedders.mlx")
MLXEmbedder = mlx_mod.MLXEmbedder
UnsupportedArchitectureError = mlx_mod.UnsupportedArchitectureError

if not mlx_mod.mlx_available():  # pragma: no cover - mlx-cpu is installed in this project's venv
    pytest.skip("mlx / mlx-embeddings not installed", allow_module_level=True)

PARITY = 0.9999
SMALL_BUDGET = 192  # padded tokens per batch: several batches of mixed lengths, so order and padding both matter


@pytest.fixture(scope="session")
def chunk_texts(shared_dir) -> list[str]:
    """Real chunk texts from the legacy-store fixture, in file order."""
    path = shared_dir / "fixtures" / "legacy-stores" / "expected_chunks.jsonl"
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(texts) >= 48
    return texts


def _cut(texts: list[str], lengths: list[int], tokens) -> list[str]:
    """Each text cut to its first `length` tokens (at a token boundary): real text, varied, cheap to embed."""
    return [tokens.split(t, n)[0] for t, n in zip(texts, lengths)]


@pytest.fixture(scope="session")
def minilm():
    return resolve_model(None)


@pytest.fixture(scope="session")
def minilm_texts(chunk_texts, minilm) -> list[str]:
    """24 chunks spread over the file, cut to 1..60 tokens (varied, unsorted)."""
    from woolocal_ingest.embedders.base import TokenCounter

    picked = chunk_texts[:: max(1, len(chunk_texts) // 24)][:24]
    lengths = [(i * 37) % 60 + 1 for i in range(24)]
    return _cut(picked, lengths, TokenCounter(minilm))


@pytest.fixture(scope="session")
def mlx_minilm(minilm):
    emb = MLXEmbedder(minilm, token_budget=SMALL_BUDGET)
    yield emb
    emb.close()


@pytest.fixture(scope="session")
def minilm_vectors(mlx_minilm, minilm, minilm_texts):
    """(MLX, sentence-transformers) vectors of minilm_texts, computed once."""
    return mlx_minilm.embed_documents(minilm_texts), SentenceTransformerEmbedder(minilm).embed_documents(minilm_texts)


@pytest.fixture(scope="session")
def cls768(bert768_cls):
    return read_model_info(bert768_cls)


@pytest.fixture(scope="session")
def mlx_cls768(cls768):
    emb = MLXEmbedder(cls768, token_budget=SMALL_BUDGET)
    yield emb
    emb.close()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- parity -------------------------------------------------------------------------------------------------------

def test_parity_minilm_mean_pooled(mlx_minilm, minilm, minilm_vectors):
    assert minilm.pooling == "mean" and mlx_minilm.backend == "mlx"
    got, want = minilm_vectors
    assert got.shape == want.shape == (24, 384) and got.dtype == np.float32
    cos = _cosines(got, want)
    assert cos.min() >= PARITY, f"worst text {int(cos.argmin())}: cosine {cos.min():.6f}"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert len(mlx_minilm.last_plan.batches) > 1  # token-budget batching really cut several batches


def test_parity_cls_pooled_768(mlx_cls768, cls768, chunk_texts):
    """A CLS-pooled model (BGE's pooling): MLX must pool CLS from hidden states, not mlx-embeddings' mean."""
    assert cls768.pooling == "cls" and cls768.dim == 768
    picked = chunk_texts[5::17][:12]
    texts = _cut(picked[:11], [(i * 13) % 40 + 1 for i in range(11)], mlx_cls768.tokens)
    long_text = max(chunk_texts, key=len)
    assert mlx_cls768.tokens.count(long_text) > cls768.max_tokens  # truncation at max_seq_length is compared too
    texts.append(long_text)
    got = mlx_cls768.embed_documents(texts)
    want = SentenceTransformerEmbedder(cls768).embed_documents(texts)
    assert got.shape == (12, 768)
    cos = _cosines(got, want)
    assert cos.min() >= PARITY, f"worst text {int(cos.argmin())}: cosine {cos.min():.6f}"
    # and it is not mean pooling in disguise
    mean_info = dataclasses.replace(cls768, pooling="mean")
    mean_vecs = MLXEmbedder(mean_info).embed_documents(texts[:2])
    assert _cosines(mean_vecs, got[:2]).max() < 0.999


def test_bge_large_dims_1024(bert1024_cls, chunk_texts):
    info = read_model_info(bert1024_cls)
    emb = MLXEmbedder(info)
    texts = _cut(chunk_texts[:3], [3, 9, 17], emb.tokens)
    got = emb.embed_documents(texts)
    assert got.shape == (3, 1024) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert _cosines(got, SentenceTransformerEmbedder(info).embed_documents(texts)).min() >= PARITY
    q = emb.embed_query(texts[0])
    assert q.shape == (1024,) and abs(float(np.linalg.norm(q)) - 1.0) < 1e-5
    emb.close()


def test_parity_xlm_roberta(tmp_path, minilm, chunk_texts):
    """The other architecture MLX runs here: a tiny random XLM-RoBERTa (positions offset by padding_idx + 1)."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    dest = tmp_path / "tiny-xlm-roberta"
    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=256, max_position_embeddings=66)
    XLMRobertaModel(cfg).eval().save_pretrained(dest, safe_serialization=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "modules.json"):
        shutil.copy(minilm.path / name, dest / name)
    (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (dest / "1_Pooling").mkdir()
    (dest / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 128, "pooling_mode_mean_tokens": True}))
    info = read_model_info(dest)
    assert info.model_type == "xlm-roberta" and mlx_mod.mlx_supports(info)
    texts = [chunk_texts[3], "x", chunk_texts[7][:80]]  # the first is truncated at 64 tokens
    emb = MLXEmbedder(info, token_budget=64)
    got = emb.embed_documents(texts)
    assert _cosines(got, SentenceTransformerEmbedder(info).embed_documents(texts)).min() >= PARITY
    emb.close()


# -- batching, order, prefixes, threads -----------------------------------------------------------------------------

def test_input_order_preserved_under_shuffle(mlx_minilm, minilm_texts, minilm_vectors, monkeypatch):
    got, _ = minilm_vectors
    idx = sorted(range(24), key=lambda i: len(minilm_texts[i]))[:10]  # the 10 shortest: cheap on the CPU BLAS
    random.Random(7).shuffle(idx)
    monkeypatch.setattr(mlx_minilm, "token_budget", 40)  # still several batches of mixed lengths
    shuffled = mlx_minilm.embed_documents([minilm_texts[i] for i in idx])
    assert len(mlx_minilm.last_plan.batches) > 2
    np.testing.assert_allclose(shuffled, got[idx], atol=2e-5)


def test_empty_input(mlx_minilm):
    out = mlx_minilm.embed_documents([])
    assert out.shape == (0, 384) and out.dtype == np.float32


def test_embed_query_applies_query_prefix(cls768, chunk_texts):
    info = dataclasses.replace(cls768, query_prefix="query: ")
    emb = MLXEmbedder(info)
    text = emb.tokens.split(chunk_texts[1], 12)[0]
    q = emb.embed_query(text)
    np.testing.assert_allclose(q, emb.embed_documents(["query: " + text])[0], atol=1e-5)
    assert _cosines(q[None], emb.embed_documents([text]))[0] < 0.9999  # the prefix really changed the input
    emb.close()


def test_concurrent_calls_are_serialised(mlx_cls768, chunk_texts):
    texts = [mlx_cls768.tokens.split(t, 6)[0] for t in chunk_texts[10:14]]
    expected = mlx_cls768.embed_documents(texts)
    results, errors = [None] * 4, []

    def work(i):
        try:
            results[i] = mlx_cls768.embed_query(texts[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    np.testing.assert_allclose(np.stack(results), expected, atol=2e-5)


# -- architecture support ---------------------------------------------------------------------------------------------

@pytest.fixture
def mpnet_folder(tmp_path, minilm) -> Path:
    """The MiniLM folder, its config.json saying model_type mpnet (weights left out: they must not be read)."""
    dest = tmp_path / "fake-all-mpnet-base-v2"
    shutil.copytree(minilm.path, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(model_type="mpnet", architectures=["MPNetModel"])
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_unsupported_architecture_is_named_before_loading(mpnet_folder, monkeypatch):
    import mlx_embeddings.utils

    def no_load(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("weights must not be loaded for an unsupported architecture")

    monkeypatch.setattr(mlx_embeddings.utils, "load_model", no_load)
    info = read_model_info(mpnet_folder)
    assert info.model_type == "mpnet"
    assert not mlx_mod.mlx_supports(info)
    with pytest.raises(UnsupportedArchitectureError) as exc:
        MLXEmbedder(info)
    msg = str(exc.value)
    assert "mpnet" in msg and "sentence-transformers" in msg and info.name in msg
    assert isinstance(exc.value, WoolocalError) and exc.value.exit_code == 2


def test_supports_bert_models_and_rejects_dense_heads(minilm, cls768, tmp_path):
    assert mlx_mod.mlx_supports(minilm) and mlx_mod.mlx_supports(cls768)
    assert mlx_mod.mlx_unsupported_reason(minilm) is None
    dense = tmp_path / "with-dense"
    shutil.copytree(cls768.path, dense, ignore=shutil.ignore_patterns("*.safetensors"))
    modules = json.loads((dense / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    info = read_model_info(dense)
    assert not mlx_mod.mlx_supports(info)
    with pytest.raises(UnsupportedArchitectureError, match="Dense.*sentence-transformers"):
        MLXEmbedder(info)


def test_platform_probes():
    assert mlx_mod.mlx_available() is True
    if sys.platform != "darwin":
        assert mlx_mod.metal_available() is False  # Linux: auto must never pick MLX


def test_missing_mlx_is_a_clear_error(minilm, monkeypatch):
    monkeypatch.setattr(mlx_mod, "mlx_available", lambda: False)
    with pytest.raises(mlx_mod.MLXNotAvailableError, match="mlx-embeddings.*sentence-transformers"):
        MLXEmbedder(minilm)


# -- quantization -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["5", "16", "abc", "4.5", "-8"])
def test_bad_quantization_value(minilm, monkeypatch, value):
    monkeypatch.setenv("LOCALMLX_QUANTIZATION", value)
    with pytest.raises(ConfigError, match="LOCALMLX_QUANTIZATION.*4 or 8"):
        MLXEmbedder(minilm)


def test_quantization_unset_or_off(minilm, monkeypatch):
    monkeypatch.delenv("LOCALMLX_QUANTIZATION", raising=False)
    assert MLXEmbedder(minilm).quantization is None
    monkeypatch.setenv("LOCALMLX_QUANTIZATION", "")
    assert MLXEmbedder(minilm).quantization is None


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_run(minilm, minilm_texts, minilm_vectors, monkeypatch, bits):
    """8 bits stays within 0.99 of the float vectors; 4 bits on a model as small as MiniLM is ~0.97 (measured)."""
    import mlx.nn as nn

    monkeypatch.setenv("LOCALMLX_QUANTIZATION", str(bits))
    emb = MLXEmbedder(minilm)
    assert emb.quantization == bits and emb.describe()["quantization"] == bits
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in emb.model.named_modules())
    idx = [1, 4, 9]
    got = emb.embed_documents([minilm_texts[i] for i in idx])
    _, want = minilm_vectors
    assert _cosines(got, want[idx]).min() >= (0.99 if bits == 8 else 0.95)
    emb.close()
