"""OpenAICompatibleEmbedder against a real HTTP test double (tests/openai_double.py) on 127.0.0.1."""

from __future__ import annotations

import json
import socket

import httpx
import numpy as np
import pytest

from openai_double import OpenAIDouble
from woolocal_ingest.config import EndpointConfig
from woolocal_ingest.embedders.openai_compat import (
    MAX_INPUTS, EmbeddingServiceError, decode_embedding, OpenAICompatibleEmbedder, RemoteModelInfo, is_loopback_url,
)
from woolocal_ingest.embedders.registry import ModelInfo
from woolocal_ingest.errors import ConfigError, DimensionMismatchError, ModelNotFoundError

MODEL = "double-embed"


@pytest.fixture
def doubles():
    """Factory: start a double (stopped after the test)."""
    started: list[OpenAIDouble] = []

    def make(**kw) -> OpenAIDouble:
        d = OpenAIDouble(**kw).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def sleeps() -> list[float]:
    return []


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


def make_embedder(urls, sleeps=None, *, max_retries=3, dim=8, model=MODEL, api_key_env=None, **kw):
    ep = EndpointConfig(urls=list(urls), max_retries=max_retries, timeout_s=10, api_key_env=api_key_env)
    sink = sleeps if sleeps is not None else []
    return OpenAICompatibleEmbedder(ep, model, dim, sleep=sink.append, **kw)


def texts(n: int, tag: str = "t") -> list[str]:
    return [f"{tag} number {i}: some text about item {i * 7 % 13}" for i in range(n)]


def expected(double: OpenAIDouble, items) -> np.ndarray:
    return np.stack([double.expected(t) for t in items])


def assert_vectors(out: np.ndarray, double: OpenAIDouble, items) -> None:
    """`out` row i is the double's vector for items[i], L2-normalised (to float32 rounding)."""
    assert out.shape == (len(items), double.dim) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected(double, items), rtol=0, atol=1e-6)


# -- protocol --------------------------------------------------------------------------------------------------


def test_batches_never_exceed_2048_inputs(doubles):
    d = doubles()
    items = texts(2050)
    with make_embedder([d.base_url]) as emb:
        out = emb.embed_documents(items)
    assert d.batch_sizes() == [2048, 2]
    assert all(n <= MAX_INPUTS for n in d.batch_sizes())
    assert out.shape == (2050, 8) and out.dtype == np.float32
    assert_vectors(out, d, items)  # input order kept across batches


def test_max_batch_above_api_limit_is_refused(doubles):
    d = doubles()
    with pytest.raises(ConfigError, match="2048"):
        make_embedder([d.base_url], max_batch=4096)


def test_base64_is_requested_and_decoded_exactly(doubles):
    d = doubles(reply="auto")
    items = texts(5)
    with make_embedder([d.base_url]) as emb:
        out = emb.embed_documents(items)
    req = d.embedding_requests()[0]
    assert req["body"]["encoding_format"] == "base64"
    # the decoder reads the wire bytes exactly as the double's raw float32 vectors
    reply = httpx.post(d.base_url + "/embeddings", json={"model": MODEL, "input": items, "encoding_format": "base64"})
    raw = np.stack([decode_embedding(x["embedding"]) for x in reply.json()["data"]])
    np.testing.assert_array_equal(raw, np.stack([d.vector(t) for t in items]))
    assert req["body"]["model"] == MODEL and req["body"]["input"] == items
    assert_vectors(out, d, items)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


def test_float_replies_are_accepted(doubles):
    d = doubles(reply="float")  # a server that ignores encoding_format
    items = texts(7)
    with make_embedder([d.base_url]) as emb:
        out = emb.embed_documents(items)
    assert_vectors(out, d, items)


def test_server_rejecting_base64_is_asked_for_floats(doubles):
    d = doubles(reject_base64=True)
    items = texts(3)
    with make_embedder([d.base_url]) as emb:
        out = emb.embed_documents(items)
        emb.embed_documents(texts(2, "again"))
    formats = [r["body"]["encoding_format"] for r in d.embedding_requests()]
    assert formats == ["base64", "float", "float"]  # remembered after the first refusal
    assert_vectors(out, d, items)


def test_reply_is_reordered_by_index(doubles):
    d = doubles(shuffle=True)
    items = texts(64)
    with make_embedder([d.base_url]) as emb:
        out = emb.embed_documents(items)
    assert_vectors(out, d, items)


def test_embed_query_applies_the_query_prefix(doubles):
    d = doubles()
    with make_embedder([d.base_url], query_prefix="query: ", doc_prefix="passage: ") as emb:
        q = emb.embed_query("hello")
        emb.embed_documents(["world"])
    assert [r["inputs"] for r in d.embedding_requests()] == [["query: hello"], ["passage: world"]]
    np.testing.assert_allclose(q, d.expected("query: hello"), atol=1e-6)
    assert q.shape == (8,)


def test_progress_reports_each_batch(doubles):
    d = doubles()
    seen = []
    with make_embedder([d.base_url], max_batch=4) as emb:
        emb.embed_documents(texts(10), progress=seen.append)
    assert seen == [4, 4, 2]


def test_request_size_bound_in_characters(doubles):
    d = doubles()
    items = ["x" * 30 for _ in range(7)] + ["y" * 500]  # the long one goes alone
    with make_embedder([d.base_url], max_request_chars=100) as emb:
        out = emb.embed_documents(items)
    assert d.batch_sizes() == [3, 3, 1, 1]
    for r in d.embedding_requests():
        assert len(r["inputs"]) == 1 or sum(map(len, r["inputs"])) <= 100
    assert_vectors(out, d, items)


def test_413_splits_the_batch(doubles):
    d = doubles(max_inputs=3, too_many_status=413)
    items = texts(10)
    with make_embedder([d.base_url]) as emb:
        out = emb.embed_documents(items)
    sizes = d.batch_sizes()
    assert sizes[0] == 10  # the first try, refused with 413, then halved until the server takes it
    assert sum(n for n in sizes if n <= 3) == 10  # every text embedded exactly once
    assert_vectors(out, d, items)


def test_empty_input_list(doubles):
    d = doubles()
    with make_embedder([d.base_url]) as emb:
        out = emb.embed_documents([])
    assert out.shape == (0, 8)
    assert d.embedding_requests() == []


# -- retries ---------------------------------------------------------------------------------------------------


def test_retries_on_429_honouring_retry_after(doubles, sleeps):
    d = doubles()
    d.fail(429, times=2, retry_after=2)
    items = texts(4)
    with make_embedder([d.base_url], sleeps, max_retries=3) as emb:
        out = emb.embed_documents(items)
    assert len(d.embedding_requests()) == 3
    assert len(sleeps) == 2 and all(s >= 2 for s in sleeps)
    assert_vectors(out, d, items)


def test_retries_on_503_with_exponential_backoff(doubles, sleeps):
    d = doubles()
    d.fail(503, times=3)
    with make_embedder([d.base_url], sleeps, max_retries=3, backoff_base_s=0.5, rng=lambda: 0.5) as emb:
        out = emb.embed_documents(texts(2))
    assert len(d.embedding_requests()) == 4
    assert sleeps == [0.5, 1.0, 2.0]  # base * 2**k, jitter factor (0.5 + rng) = 1
    assert out.shape == (2, 8)


def test_retry_after_is_capped(doubles, sleeps):
    d = doubles()
    d.fail(429, times=1, retry_after=3600)
    with make_embedder([d.base_url], sleeps, max_retries=1, max_retry_after_s=5) as emb:
        emb.embed_documents(texts(1))
    assert sleeps and sleeps[0] <= 5 * 1.5


def test_gives_up_after_max_retries_with_the_servers_message(doubles, sleeps):
    d = doubles()
    d.fail(503, times=50, message="upstream model crashed")
    with make_embedder([d.base_url], sleeps, max_retries=2) as emb:
        with pytest.raises(EmbeddingServiceError) as ei:
            emb.embed_documents(texts(3))
    msg = str(ei.value)
    assert "gave up after 3 attempt" in msg and "upstream model crashed" in msg and "503" in msg
    assert len(d.embedding_requests()) == 3 and len(sleeps) == 2


def test_client_errors_are_not_retried_and_surface_the_message(doubles, sleeps):
    d = doubles()
    d.fail(400, message="This model's maximum context length is 8192 tokens")
    with make_embedder([d.base_url], sleeps) as emb:
        with pytest.raises(EmbeddingServiceError, match="maximum context length is 8192 tokens") as ei:
            emb.embed_documents(texts(1))
    assert ei.value.status == 400
    assert len(d.embedding_requests()) == 1 and sleeps == []


def test_connection_refused_retries_then_gives_up(sleeps):
    url = closed_port_url()
    with make_embedder([url], sleeps, max_retries=2) as emb:
        with pytest.raises(EmbeddingServiceError, match="gave up after 3 attempt"):
            emb.embed_documents(texts(1))
    assert len(sleeps) == 2


# -- several URLs, health ----------------------------------------------------------------------------------------


def test_round_robin_across_two_servers(doubles):
    a, b = doubles(), doubles()
    items = texts(8)
    with make_embedder([a.base_url, b.base_url], max_batch=2) as emb:
        out = emb.embed_documents(items)
    assert a.batch_sizes() == [2, 2] and b.batch_sizes() == [2, 2]
    firsts = [r["inputs"][0] for r in a.embedding_requests()] + [r["inputs"][0] for r in b.embedding_requests()]
    assert sorted(firsts) == sorted(items[0::2])
    assert_vectors(out, a, items)


def test_down_url_is_skipped(doubles):
    down, up = doubles(healthy=False), doubles()
    with make_embedder([down.base_url, up.base_url], max_batch=1) as emb:
        emb.embed_documents(texts(6))
    assert down.embedding_requests() == []  # never sent text
    assert [r["path"] for r in down.health_requests()][:1] == ["/v1/models"]
    assert len(up.embedding_requests()) == 6


def test_unreachable_url_is_skipped(doubles, sleeps):
    up = doubles()
    with make_embedder([closed_port_url(), up.base_url], sleeps, max_batch=1) as emb:
        out = emb.embed_documents(texts(4))
    assert len(up.embedding_requests()) == 4 and out.shape == (4, 8)
    assert sleeps == []  # failover is immediate, not a backoff


def test_down_url_is_rechecked_after_cooldown(doubles):
    now = [1000.0]
    a, b = doubles(healthy=False), doubles()
    with make_embedder([a.base_url, b.base_url], max_batch=1, health_cooldown_s=30, clock=lambda: now[0]) as emb:
        emb.embed_documents(texts(4))
        assert a.embedding_requests() == []
        a.healthy = True
        now[0] += 10  # still cooling down: not asked again
        checks = len(a.health_requests())
        emb.embed_documents(texts(4))
        assert len(a.health_requests()) == checks and a.embedding_requests() == []
        now[0] += 30  # cooldown over: re-checked, back in the rotation
        emb.embed_documents(texts(4))
    assert len(a.health_requests()) > checks
    assert len(a.embedding_requests()) == 2 and len(b.embedding_requests()) == 10


def test_server_without_models_route_is_checked_at_health(doubles):
    d = doubles(models_route=False)
    with make_embedder([d.base_url]) as emb:
        emb.embed_documents(texts(2))
    assert [r["path"] for r in d.health_requests()] == ["/v1/models", "/health"]
    assert len(d.embedding_requests()) == 1


def test_all_urls_down_gives_up(doubles, sleeps):
    d = doubles(healthy=False)
    with make_embedder([d.base_url], sleeps, max_retries=1) as emb:
        with pytest.raises(EmbeddingServiceError, match="no endpoint is up"):
            emb.embed_documents(texts(1))
    assert d.embedding_requests() == []


# -- dims, keys, model record ---------------------------------------------------------------------------------


def test_dim_mismatch_names_both_dims(doubles):
    d = doubles(dim=16)
    with make_embedder([d.base_url], dim=8, dims_setting="purposes.projects.dimensions") as emb:
        with pytest.raises(DimensionMismatchError) as ei:
            emb.embed_documents(texts(2))
    msg = str(ei.value)
    assert "16" in msg and "8 dims" in msg and "purposes.projects.dimensions" in msg


def test_dim_is_learned_from_the_first_reply(doubles):
    d = doubles(dim=12)
    with make_embedder([d.base_url], dim=None) as emb:
        assert emb.dim == 12  # one probe request
        assert len(d.embedding_requests()) == 1
        assert emb.embed_documents(texts(3)).shape == (3, 12)


def test_servers_disagreeing_on_dim_is_an_error(doubles):
    a, b = doubles(dim=8), doubles(dim=12)
    with make_embedder([a.base_url, b.base_url], dim=None, max_batch=1) as emb:
        with pytest.raises(DimensionMismatchError, match="12-dim.*8 dims"):
            emb.embed_documents(texts(4))


def test_zero_vectors_are_refused(doubles):
    d = doubles(zero_vectors=True)
    with make_embedder([d.base_url]) as emb:
        with pytest.raises(EmbeddingServiceError, match="all zeros"):
            emb.embed_documents(texts(1))


def test_api_key_is_sent_as_bearer(doubles, monkeypatch):
    monkeypatch.setenv("WOOLOCAL_TEST_KEY", "sk-test-123")
    d = doubles(api_key="sk-test-123")
    with make_embedder([d.base_url], api_key_env="WOOLOCAL_TEST_KEY") as emb:
        emb.embed_documents(texts(2))
    assert all(r["headers"]["authorization"] == "Bearer sk-test-123" for r in d.requests)
    assert len(d.embedding_requests()) == 1


def test_wrong_api_key_surfaces_the_servers_message(doubles, monkeypatch):
    monkeypatch.setenv("WOOLOCAL_TEST_KEY", "wrong")
    d = doubles(api_key="right")
    with make_embedder([d.base_url], api_key_env="WOOLOCAL_TEST_KEY") as emb:
        with pytest.raises(EmbeddingServiceError, match="Incorrect API key provided") as ei:
            emb.embed_documents(texts(1))
    assert ei.value.status == 401


def test_missing_api_key_env_is_a_config_error(monkeypatch):
    monkeypatch.delenv("WOOLOCAL_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="WOOLOCAL_TEST_KEY"):
        make_embedder(["http://127.0.0.1:1/v1"], api_key_env="WOOLOCAL_TEST_KEY")


def test_bad_url_is_a_config_error():
    with pytest.raises(ConfigError, match=r"urls\[0\]"):
        make_embedder(["ftp://127.0.0.1/v1"])


def test_endpoint_model_is_the_name_sent(doubles):
    d = doubles()
    ep = EndpointConfig(urls=[d.base_url], model="nomic-embed-text")
    with OpenAICompatibleEmbedder(ep, "nomic-ai/nomic-embed-text-v1.5", 8) as emb:
        emb.embed_documents(["a"])
        assert emb.model_name == "nomic-ai/nomic-embed-text-v1.5"
        assert emb.info.remote_model == "nomic-embed-text"
    assert d.embedding_requests()[0]["body"]["model"] == "nomic-embed-text"


def test_info_for_a_model_not_on_this_machine(doubles):
    d = doubles()
    with make_embedder([d.base_url], dim=None, model="text-embedding-3-small-double") as emb:
        info = emb.info
        assert isinstance(info, RemoteModelInfo) and isinstance(info, ModelInfo)
        assert (info.name, info.dim, info.max_tokens, info.pooling, info.path) == (
            "text-embedding-3-small-double", 8, 8191, "remote", None)
        assert emb.backend == "openai-compatible" and emb.max_tokens == 8191
        manifest = info.to_manifest()
        json.dumps(manifest)
        assert manifest["path"] is None and manifest["endpoints"] == [d.base_url]
        assert len(info.files_sha256()) == 64 and info.slug == "text-embedding-3-small-double"
        with pytest.raises(ModelNotFoundError, match="chunking needs the tokenizer"):
            emb.tokens


def test_tokens_from_a_local_model_of_the_same_tokenizer(doubles):
    d = doubles(dim=384)
    with make_embedder([d.base_url], dim=384, model="remote-minilm",
                       tokenizer_model="sentence-transformers/all-MiniLM-L6-v2") as emb:
        assert emb.tokens.count("hello world") == 2
        assert emb.max_tokens == 256  # the local model's own limit, not 8191
        assert emb.info.model_type == "bert"


def test_is_loopback_url():
    for u in ["http://127.0.0.1:8001/v1", "http://127.3.4.5/v1", "http://localhost:1/v1", "https://LOCALHOST/v1",
              "http://[::1]:8001/v1", "http://[::ffff:127.0.0.1]:80/v1"]:
        assert is_loopback_url(u), u
    for u in ["http://10.255.255.1:9/v1", "https://api.openai.com/v1", "http://127.0.0.1@evil.example.com/v1",
              "http://localhost.example.com/v1", "http://[::ffff:10.0.0.1]:80/v1", "http://0.0.0.0:8001/v1",
              "http://2130706433/v1", "http://192.168.1.5:8080/v1", "ftp://127.0.0.1/v1", "not a url"]:
        assert not is_loopback_url(u), u
