"""FallbackEmbedder / embedder_for_purpose: when the configured backend fails, the fallback embeds everything, and
with fallbackToCloud false no connection is ever attempted off this machine."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import numpy as np
import pytest

import woolocal_ingest.embedders.fallback as fallback_mod
from openai_double import OpenAIDouble
from woolocal_ingest.config import EndpointConfig, FallbackConfig, PurposeConfig
from woolocal_ingest.embedders.fallback import (
    EmbeddingFailedError, FallbackEmbedder, RemoteNotAllowedError, embedder_for_purpose,
)
from woolocal_ingest.embedders.openai_compat import (
    OpenAICompatibleEmbedder, RemoteEndpointRefusedError, is_loopback_host,
)
from woolocal_ingest.embedders.registry import ModelInfo
from woolocal_ingest.errors import ModelNotFoundError

REMOTE_URLS = [
    "http://10.255.255.1:9/v1",  # non-routable private address
    "https://embeddings.example.com/v1",  # public-looking name (must not even be looked up)
    "http://127.0.0.1@evil.example.com/v1",  # userinfo that looks like loopback
    "http://localhost.example.com:8001/v1",
    "http://[::ffff:10.0.0.1]:8001/v1",
]


# -- fakes and fixtures ------------------------------------------------------------------------------------------


class FakeEmbedder:
    """A local embedder stand-in: deterministic vectors that differ per model; can fail on a given call/batch."""

    def __init__(self, name: str, dim: int = 4, backend: str = "fake-local", fail_on_call: int | None = None,
                 fail_on_batch: int | None = None, batch: int = 2):
        self.info = ModelInfo(name=name, path=Path("/nonexistent") / name, origin="fake", dim=dim, max_tokens=128,
                              pooling="mean", normalize=True, model_type="fake")
        self.backend = backend
        self.fail_on_call = fail_on_call  # 1-based embed_documents call that raises
        self.fail_on_batch = fail_on_batch  # 1-based batch within that call that raises
        self.batch = batch
        self.calls: list[list[str]] = []

    model_name = property(lambda self: self.info.name)
    dim = property(lambda self: self.info.dim)
    max_tokens = property(lambda self: self.info.max_tokens)

    def vector(self, text: str) -> np.ndarray:
        seed = abs(hash((self.info.name, text))) % (2**32)
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def embed_documents(self, texts, progress=None):
        texts = list(texts)
        self.calls.append(texts)
        out = []
        for b, start in enumerate(range(0, len(texts), self.batch), 1):
            if len(self.calls) == self.fail_on_call and b == (self.fail_on_batch or 1):
                raise RuntimeError(f"{self.model_name}: device lost during batch {b}")
            part = texts[start:start + self.batch]
            out += [self.vector(t) for t in part]
            if progress:
                progress(len(part))
        return np.stack(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_query(self, text):
        return self.vector(text)


def failing_factory(exc: Exception):
    def factory():
        raise exc
    return factory


@pytest.fixture
def net_guard(monkeypatch):
    """Records (and blocks) every attempt to reach a non-loopback host: socket connects, DNS lookups, httpx
    transports. Loopback traffic (the test doubles) passes through untouched."""
    attempts: list[tuple[str, object]] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_create, real_gai = socket.create_connection, socket.getaddrinfo
    real_handle = httpx.HTTPTransport.handle_request

    def remote(address) -> bool:
        host = address[0] if isinstance(address, tuple) else address
        return host is not None and not is_loopback_host(str(host))

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and remote(address):
            attempts.append(("connect", address))
            raise OSError("test: non-loopback connect blocked")
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and remote(address):
            attempts.append(("connect_ex", address))
            return 111
        return real_connect_ex(self, address)

    def create_connection(address, *a, **kw):
        if remote(address):
            attempts.append(("create_connection", address))
            raise OSError("test: non-loopback connection blocked")
        return real_create(address, *a, **kw)

    def getaddrinfo(host, *a, **kw):
        if remote((host,)):
            attempts.append(("getaddrinfo", host))
            raise socket.gaierror("test: lookup of a non-loopback name blocked")
        return real_gai(host, *a, **kw)

    def handle_request(self, request):
        if not is_loopback_host(request.url.host):
            attempts.append(("httpx", str(request.url)))
            raise httpx.ConnectError("test: non-loopback request blocked", request=request)
        return real_handle(self, request)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", handle_request)
    return attempts


@pytest.fixture
def doubles():
    started: list[OpenAIDouble] = []

    def make(**kw) -> OpenAIDouble:
        d = OpenAIDouble(**kw).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def built(monkeypatch):
    """Records every OpenAICompatibleEmbedder that embedder_for_purpose builds."""
    seen: list[OpenAICompatibleEmbedder] = []

    class Spy(OpenAICompatibleEmbedder):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.append(self)

    monkeypatch.setattr(fallback_mod, "OpenAICompatibleEmbedder", Spy)
    return seen


def no_sleep(_s: float) -> None:
    pass


# -- switching ---------------------------------------------------------------------------------------------------


def test_primary_load_failure_uses_fallback_and_reports_its_model():
    fb = FakeEmbedder("fallback-model", dim=6, backend="sentence-transformers")
    emb = FallbackEmbedder(failing_factory(ModelNotFoundError("model 'big-model' is not available offline")),
                           lambda: fb, allow_remote=False)
    assert emb.switched and emb.generation == 1 and emb.active is fb and emb.primary is None
    assert "not available offline" in emb.switch_reason
    assert (emb.model_name, emb.dim, emb.backend, emb.max_tokens) == ("fallback-model", 6, "sentence-transformers", 128)
    assert emb.info.to_manifest()["name"] == "fallback-model"  # the manifest names the model that embedded
    out = emb.embed_documents(["a", "b"])
    np.testing.assert_array_equal(out, np.stack([fb.vector("a"), fb.vector("b")]))
    assert emb.primary_texts_served == 0


def test_primary_failure_mid_call_reembeds_every_text_of_the_call():
    primary = FakeEmbedder("primary-model", fail_on_call=1, fail_on_batch=3)  # fails after 2 batches = 4 texts
    fb = FakeEmbedder("fallback-model")
    emb = FallbackEmbedder(lambda: primary, lambda: fb, allow_remote=False)
    items = [f"text {i}" for i in range(9)]
    progress: list[int] = []
    out = emb.embed_documents(items, progress=progress.append)
    assert emb.switched and emb.model_name == "fallback-model"
    assert fb.calls == [items]  # ALL texts of the call, not just the rest
    np.testing.assert_array_equal(out, np.stack([fb.vector(t) for t in items]))
    for t, row in zip(items, out):  # no vector of the primary's model in the result
        assert not np.allclose(row, primary.vector(t))
    assert sum(progress) == len(items)  # each text counted once despite the re-embedding


def test_switch_is_sticky_and_signals_a_full_reembed():
    primary = FakeEmbedder("primary-model", fail_on_call=2)
    fb = FakeEmbedder("fallback-model", dim=5)
    switches = []
    emb = FallbackEmbedder(lambda: primary, lambda: fb, allow_remote=False, on_switch=switches.append)
    planned = (emb.generation, emb.model_name, emb.dim)
    first = emb.embed_documents(["a", "b", "c"])
    assert first.shape == (3, 4) and not emb.switched and emb.primary_texts_served == 3
    second = emb.embed_documents(["d"])
    assert second.shape == (1, 5) and emb.switched and switches == [emb]
    # what the ingest layer checks: the identity it planned with is gone -> re-plan, re-embed everything
    assert (emb.generation, emb.model_name, emb.dim) != planned
    emb.embed_documents(["e"])
    emb.embed_query("q")
    assert len(primary.calls) == 2  # never asked again after the switch
    assert fb.calls == [["d"], ["e"]]


def test_ensure_ready_switches_before_planning():
    class LazyBroken(FakeEmbedder):
        def embed_query(self, text):
            raise OSError("weights file truncated")

    fb = FakeEmbedder("fallback-model")
    emb = FallbackEmbedder(lambda: LazyBroken("primary-model"), lambda: fb, allow_remote=False)
    assert not emb.switched
    emb.ensure_ready()
    assert emb.switched and emb.model_name == "fallback-model"


def test_both_failing_names_both():
    emb_args = (failing_factory(RuntimeError("primary exploded")), failing_factory(RuntimeError("fallback too")))
    with pytest.raises(EmbeddingFailedError, match="primary exploded.*fallback too"):
        FallbackEmbedder(*emb_args, allow_remote=False, primary_label="mlx model m", fallback_label="onnx model m")


def test_no_fallback_configured_returns_the_primary(doubles):
    d = doubles()
    purpose = PurposeConfig(model="double-embed", backend="openai-compatible", dimensions=8,
                            endpoint=EndpointConfig(urls=[d.base_url]))
    emb = embedder_for_purpose(purpose, "projects")
    assert isinstance(emb, OpenAICompatibleEmbedder)
    assert emb.embed_documents(["x"]).shape == (1, 8)


# -- privacy first -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", REMOTE_URLS)
def test_remote_fallback_refused_without_any_connection(url, net_guard, built):
    purpose = PurposeConfig(
        model="local-model", backend="sentence-transformers",
        fallback=FallbackConfig(backend="openai-compatible", model="text-embedding-3-small",
                                endpoint=EndpointConfig(urls=[url])),
        fallbackToCloud=False)
    load_local = failing_factory(ModelNotFoundError("model 'local-model' is not available offline"))
    with pytest.raises(RemoteNotAllowedError) as ei:
        embedder_for_purpose(purpose, "projects", load_local=lambda *a: load_local())
    msg = str(ei.value)
    assert "purposes.projects.fallbackToCloud" in msg and "no connection was attempted" in msg
    assert fallback_mod.redact_url(url) in msg and "not available offline" in msg
    assert net_guard == []  # no connect, no DNS lookup, no HTTP request
    assert built == []  # the fallback embedder was never even built


def test_remote_fallback_refused_when_primary_fails_mid_run(doubles, net_guard, built):
    d = doubles()
    purpose = PurposeConfig(
        model="double-embed", backend="openai-compatible", dimensions=8,
        endpoint=EndpointConfig(urls=[d.base_url], max_retries=1),
        fallback=FallbackConfig(backend="openai-compatible",
                                endpoint=EndpointConfig(urls=["http://10.255.255.1:9/v1"])),
        fallbackToCloud=False)
    emb = embedder_for_purpose(purpose, "userProfile", sleep=no_sleep)
    assert emb.embed_documents(["first"]).shape == (1, 8)
    d.fail(503, times=10)
    with pytest.raises(RemoteNotAllowedError, match=r"10\.255\.255\.1:9.*purposes\.userProfile\.fallbackToCloud"):
        emb.embed_documents(["second", "third"])
    assert net_guard == []
    assert len(built) == 1  # only the (loopback) primary
    assert not emb.switched


def test_mixed_loopback_and_remote_fallback_urls_are_refused(net_guard):
    emb_urls = ["http://127.0.0.1:1/v1", "http://10.255.255.1:9/v1"]
    called = []
    with pytest.raises(RemoteNotAllowedError, match=r"10\.255\.255\.1"):
        FallbackEmbedder(failing_factory(RuntimeError("down")), lambda: called.append(1), allow_remote=False,
                         fallback_urls=emb_urls)
    assert called == [] and net_guard == []


def test_loopback_only_embedder_refuses_remote_urls_itself(net_guard):
    with pytest.raises(RemoteEndpointRefusedError, match="no connection was attempted"):
        OpenAICompatibleEmbedder(EndpointConfig(urls=["http://127.0.0.1:1/v1", "https://api.openai.com/v1"]),
                                 "text-embedding-3-small", loopback_only=True)
    assert net_guard == []


def test_loopback_fallback_is_used_with_cloud_off(doubles, net_guard, built):
    d = doubles(dim=8)
    purpose = PurposeConfig(
        model="local-model", backend="sentence-transformers",
        fallback=FallbackConfig(backend="openai-compatible", model="double-embed",
                                endpoint=EndpointConfig(urls=[d.base_url])),
        fallbackToCloud=False)
    emb = embedder_for_purpose(purpose, "projects",
                               load_local=lambda *a: (_ for _ in ()).throw(ModelNotFoundError("no local-model")))
    out = emb.embed_documents(["a", "b"])
    assert emb.switched and emb.backend == "openai-compatible" and emb.model_name == "double-embed"
    assert built[0].loopback_only  # the second lock on the door
    np.testing.assert_allclose(out, np.stack([d.expected("a"), d.expected("b")]), atol=1e-6)
    assert net_guard == []


def test_fallback_to_cloud_true_allows_the_switch(doubles, net_guard, built):
    # The allow path is exercised against a loopback double only: no traffic ever leaves this machine in tests.
    d = doubles(dim=8)
    purpose = PurposeConfig(
        model="local-model", backend="sentence-transformers",
        fallback=FallbackConfig(backend="openai-compatible", model="double-embed",
                                endpoint=EndpointConfig(urls=[d.base_url])),
        fallbackToCloud=True)
    emb = embedder_for_purpose(purpose, "projects",
                               load_local=lambda *a: (_ for _ in ()).throw(ModelNotFoundError("no local-model")))
    assert emb.embed_documents(["a"]).shape == (1, 8)
    assert built[0].loopback_only is False
    # and a non-loopback fallback address passes the check when allowed (the factory here points at the double)
    fb = OpenAICompatibleEmbedder(EndpointConfig(urls=[d.base_url]), "double-embed", 8)
    emb2 = FallbackEmbedder(failing_factory(RuntimeError("down")), lambda: fb, allow_remote=True,
                            fallback_urls=["https://embeddings.example.com/v1"])
    assert emb2.switched and emb2.embed_documents(["b"]).shape == (1, 8)
    assert net_guard == []


def test_remote_primary_falls_back_to_the_local_model(embedder, doubles, net_guard):
    """End to end with the real packaged model: the configured server is down, the local model takes over."""
    d = doubles(healthy=False)
    purpose = PurposeConfig(
        model="sentence-transformers/all-MiniLM-L6-v2", backend="openai-compatible", dimensions=384,
        endpoint=EndpointConfig(urls=[d.base_url], max_retries=1),
        fallback=FallbackConfig(backend="sentence-transformers"))
    emb = embedder_for_purpose(purpose, "projects", sleep=no_sleep).ensure_ready()
    assert emb.switched and emb.backend == "sentence-transformers" and emb.dim == 384
    assert emb.info.name == embedder.info.name and emb.info.path == embedder.info.path
    items = ["the cat sat on the mat", "vectors in a store"]
    np.testing.assert_allclose(emb.embed_documents(items), embedder.embed_documents(items), atol=1e-5)
    assert d.embedding_requests() == [] and net_guard == []
