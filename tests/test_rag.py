"""Store search, chat RAG and /v1/rag/context over real HTTP: the app on uvicorn (127.0.0.1, a free port), real
stores built with the packaged all-MiniLM-L6-v2, an OpenAI-compatible chat double (tests/chat_double.py) as the
upstream, and the `openai` Python client as a real client."""

from __future__ import annotations

import http.client
import json
import random
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from chat_double import ChatDouble
from woolocal_ingest.chunking import Chunk, ChunkSettings
from woolocal_ingest.config import ChatConfig, FlowsConfig, ProjectConfig, ServiceConfig
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from woolocal_ingest.ingest import model_identity, run_ingest
from woolocal_ingest.api import open_store
from woolocal_ingest.stores import store_dir, write_store
from servers import free_port, running

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample-project"
FACTS = json.loads((REPO / "data" / "sample-facts.json").read_text(encoding="utf-8"))
STORE = "all-minilm-l6-v2-384d"
SAMPLE_ID = f"sample/{STORE}"


# ---------------------------------------------------------------------------------------------------------------
# a real server


def serve(app):
    """Run `app` on uvicorn at 127.0.0.1:<free port>; yield its base URL once its models are loaded."""
    return running(app, wait_healthy=True)


def make_app(config: FlowsConfig, stores_root: Path):
    from woolocal_ingest.service.app import create_app

    return create_app(config, stores_root=stores_root, load_in_background=False)


def config_for(base_dir: Path, *, upstream: str | None, max_tokens: int | None = 123,
               temperature: float | None = 0.3, timeout_s: float = 2.0, chat_model: str | None = None) -> FlowsConfig:
    return FlowsConfig(
        base_dir=base_dir,
        projects=[ProjectConfig(name="sample", path=SAMPLE)],
        service=ServiceConfig(
            models=["projects"],
            chat=ChatConfig(upstream=upstream, model=chat_model, max_tokens=max_tokens, temperature=temperature,
                            timeout_s=timeout_s, k=3),
            aliases={"garden-rag": "sample", "swap-rag": f"swap/{STORE}"},
        ),
    )


# ---------------------------------------------------------------------------------------------------------------
# stores


def _chunks_for_version(v: int) -> list[Chunk]:
    n = 3 + v % 4  # each version has its own row count: a mixed read would show
    return [Chunk(id=f"v{v}-c{i}", text=f"version {v} chunk {i}: the pumpkin patch rota, entry {i}",
                  source=f"rota-{i}.md", chunk=i, metadata={"source": f"rota-{i}.md", "version": v, "i": i},
                  sha256=f"{v:064x}") for i in range(n)]


def write_swap_version(stores_root: Path, embedder, v: int, vectors: np.ndarray) -> Path:
    chunks = _chunks_for_version(v)
    return write_store(store_dir(stores_root, "swap", embedder.info.slug, embedder.dim), chunks, vectors[:len(chunks)],
                       {"project": "swap", "model": model_identity(embedder)})


@pytest.fixture(scope="module")
def world(tmp_path_factory, embedder):
    """A stores root with the sample project ingested, a swap-able store, and a store folder OUTSIDE the root that
    traversal attempts aim at."""
    base = tmp_path_factory.mktemp("rag")
    src = base / "sample-project"
    shutil.copytree(SAMPLE, src)
    stores_root = base / "root" / "stores"
    run_ingest("sample", src, stores_root, embedder, ChunkSettings(), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    vectors = embedder.embed_documents([c.text for c in _chunks_for_version(3)])  # 6 rows: enough for any version
    write_swap_version(stores_root, embedder, 0, vectors)
    # a real store outside the stores root (a traversal must never reach it)
    outside = base / "root" / "secret"
    write_store(outside / STORE, _chunks_for_version(1)[:3], vectors[:3],
                {"project": "secret", "model": model_identity(embedder)})
    (stores_root / "escape").symlink_to(outside, target_is_directory=True)  # a symlink out of the root
    # stores whose model the service cannot use for text queries
    unknown = {"name": "acme/unknown-embedder", "path": "/nonexistent/acme-unknown-embedder", "dim": 384}
    write_store(stores_root / "odd" / "unknown-embedder-384d", _chunks_for_version(1)[:3], vectors[:3],
                {"project": "odd", "model": unknown})
    for folder in ("model-a-384d", "model-b-384d"):  # two stores, neither of the configured model
        write_store(stores_root / "multi" / folder, _chunks_for_version(1)[:3], vectors[:3],
                    {"project": "multi", "model": {**unknown, "name": f"acme/{folder[:-5]}"}})
    other_files = {**model_identity(embedder), "files_sha256": "0" * 64}
    write_store(stores_root / "odd" / STORE, _chunks_for_version(2)[:3], vectors[:3],
                {"project": "odd", "model": other_files})
    return {"base": base, "stores_root": stores_root, "vectors": vectors, "outside": outside}


@pytest.fixture(scope="module")
def chat():
    with ChatDouble() as d:
        yield d


@pytest.fixture(scope="module")
def app(world, chat):
    return make_app(config_for(world["base"], upstream=chat.base_url), world["stores_root"])


@pytest.fixture(scope="module")
def server(app):
    with serve(app) as base:
        yield base


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


@pytest.fixture(autouse=True)
def _reset_chat(request):
    if "chat" in request.fixturenames:
        d = request.getfixturevalue("chat")
        d.delay_s, d.stall_after, d.stall_s = 0.0, None, 0.0
        d.answer = "The spare key is held by Marguerite Oyelaran [1]."


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------------------------------------------------------
# GET /v1/stores


def test_list_stores(client, world):
    r = client.get("/v1/stores")
    assert r.status_code == 200, r.text
    rows = {row["id"]: row for row in r.json()["data"]}
    # the symlink out of the root is not listed
    assert set(rows) == {SAMPLE_ID, f"swap/{STORE}", "odd/unknown-embedder-384d", f"odd/{STORE}",
                         "multi/model-a-384d", "multi/model-b-384d"}
    s = rows[SAMPLE_ID]
    manifest = open_store(world["stores_root"] / "sample" / STORE).manifest
    assert s["project"] == "sample" and s["folder"] == STORE
    assert s["model"] == "sentence-transformers/all-MiniLM-L6-v2" and s["dim"] == 384
    assert s["count"] == manifest["count"] > 0
    assert s["created"] == manifest["created"] and s["updated"].startswith(manifest["created"][:10])
    assert s["aliases"] == ["garden-rag"]


# ---------------------------------------------------------------------------------------------------------------
# POST /v1/stores/{store}/search


@pytest.mark.parametrize("name", ["sample", SAMPLE_ID, "sample%2F" + STORE])
def test_search_matches_store_search(client, world, embedder, name):
    fact = FACTS[0]
    r = client.post(f"/v1/stores/{name}/search", json={"query": fact["query"], "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["store"] == SAMPLE_ID and body["dim"] == 384 and body["model"].endswith("all-MiniLM-L6-v2")
    hits = body["data"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert set(hits[0]) >= {"id", "text", "metadata", "score"}
    want = open_store(world["stores_root"] / "sample" / STORE, embedder=embedder).search(fact["query"], k=4)
    assert [h["id"] for h in hits] == [w.id for w in want]
    assert [h["score"] for h in hits] == pytest.approx([w.score for w in want], abs=1e-5)
    assert hits[0]["metadata"]["source"] == fact["source"]
    assert fact["sentence"].split(",")[0] in " ".join(h["text"] for h in hits)
    assert body["mode"] == "hybrid" and hits[0]["mode"] == "hybrid" and "dense" in hits[0]["scores"]


def test_search_modes_agree_with_store_search(client, world, embedder):
    store = open_store(world["stores_root"] / "sample" / STORE, embedder=embedder)
    q = FACTS[1]["query"]
    for mode in ("dense", "lexical"):
        r = client.post(f"/v1/stores/{SAMPLE_ID}/search", json={"query": q, "k": 3, "mode": mode})
        assert r.status_code == 200, r.text
        want = store.search(q, k=3, mode=mode)
        assert [(h["id"], h["mode"]) for h in r.json()["data"]] == [(w.id, mode) for w in want]
        assert [h["score"] for h in r.json()["data"]] == pytest.approx([w.score for w in want], abs=1e-4)
    r = client.post("/v1/rag/context", json={"store": SAMPLE_ID, "query": q, "k": 2, "mode": "lexical"})
    assert r.status_code == 200 and r.json()["mode"] == "lexical"
    assert [c["id"] for c in r.json()["chunks"]] == [w.id for w in store.search(q, k=2, mode="lexical")]
    for bad, where in (({"query": q, "mode": "bm25"}, "hybrid, dense, lexical"),
                       ({"vector": embedder.embed_query(q).tolist(), "mode": "hybrid"}, "needs the query text")):
        r = client.post(f"/v1/stores/{SAMPLE_ID}/search", json=bad)
        assert r.status_code == 400 and where in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "mode"


def test_search_by_vector_and_filter(client, world, embedder):
    vec = embedder.embed_query(FACTS[1]["query"])
    r = client.post(f"/v1/stores/{SAMPLE_ID}/search", json={"vector": vec.tolist(), "k": 3})
    assert r.status_code == 200, r.text
    want = open_store(world["stores_root"] / "sample" / STORE).search(vec, k=3)
    assert [h["id"] for h in r.json()["data"]] == [w.id for w in want]
    # an unnormalised vector ranks the same and scores as cosine
    r2 = client.post(f"/v1/stores/{SAMPLE_ID}/search", json={"vector": (vec * 7).tolist(), "k": 3})
    assert [h["score"] for h in r2.json()["data"]] == pytest.approx([w.score for w in want], abs=1e-5)
    # metadata filter (equality; dotted keys; lists = any of)
    r = client.post(f"/v1/stores/{SAMPLE_ID}/search",
                    json={"query": "compost", "k": 50, "filter": {"source": "README.md"}})
    assert r.status_code == 200 and r.json()["data"]
    assert {h["metadata"]["source"] for h in r.json()["data"]} == {"README.md"}
    r = client.post(f"/v1/stores/{SAMPLE_ID}/search",
                    json={"query": "compost", "filter": {"source": ["README.md", "history.md"]}})
    assert {h["metadata"]["source"] for h in r.json()["data"]} <= {"README.md", "history.md"}
    r = client.post(f"/v1/stores/{SAMPLE_ID}/search", json={"query": "compost", "filter": {"source": "nope"}})
    assert r.status_code == 200 and r.json()["data"] == []


@pytest.mark.parametrize("body,param", [
    ({"query": "x", "k": 0}, "k"),
    ({"query": "x", "k": -3}, "k"),
    ({"query": "x", "k": 1001}, "k"),
    ({"query": "x", "k": "ten"}, "k"),
    ({"query": "x", "k": True}, "k"),
    ({}, "query"),
    ({"query": "x", "vector": [0.1] * 384}, "vector"),
    ({"query": ""}, "query"),
    ({"query": 42}, "query"),
    ({"vector": []}, "vector"),
    ({"vector": ["a", "b"]}, "vector"),
    ({"vector": [0.0] * 384}, "vector"),
    ({"query": "x", "filter": "source=README.md"}, "filter"),
])
def test_search_bad_requests(client, body, param):
    assert_openai_error(client.post(f"/v1/stores/{SAMPLE_ID}/search", json=body), 400, param)


def test_search_vector_wrong_dim_names_both(client):
    err = assert_openai_error(client.post(f"/v1/stores/{SAMPLE_ID}/search", json={"vector": [0.5] * 768}), 400,
                              "vector")
    assert "768" in err["message"] and "384" in err["message"]


def test_search_not_json(client):
    r = client.post(f"/v1/stores/{SAMPLE_ID}/search", content=b"{nope", headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400)


@pytest.mark.parametrize("name", ["nosuch", "sample/nosuch-384d", "swap/all-minilm-l6-v2-768d"])
def test_unknown_store_404(client, name):
    assert_openai_error(client.post(f"/v1/stores/{name}/search", json={"query": "x"}), 404, "store")


def test_store_of_a_model_not_served(client, world):
    err = assert_openai_error(client.post("/v1/stores/odd/unknown-embedder-384d/search", json={"query": "x"}), 409,
                              "store")
    assert "acme/unknown-embedder" in err["message"] and "all-MiniLM-L6-v2" in err["message"]
    # a vector query needs no model
    r = client.post("/v1/stores/odd/unknown-embedder-384d/search", json={"vector": world["vectors"][0].tolist()})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "v1-c0"
    # same model name, other model files: its vectors are not comparable
    err = assert_openai_error(client.post(f"/v1/stores/odd/{STORE}/search", json={"query": "x"}), 409, "store")
    assert "other files" in err["message"]
    # a project with several stores: its name means the store of the configured model (projects purpose)
    r = client.post("/v1/stores/odd/search", json={"vector": world["vectors"][0].tolist()})
    assert r.status_code == 200 and r.json()["store"] == f"odd/{STORE}"
    # several stores, none of the configured model's: name one
    err = assert_openai_error(client.post("/v1/stores/multi/search", json={"query": "x"}), 400, "store")
    assert "model-a-384d" in err["message"] and "model-b-384d" in err["message"]
    # chat with such a store: the same clear error, before anything goes upstream
    assert_openai_error(client.post("/v1/chat/completions", json={
        "messages": _question(), "store": "odd/unknown-embedder-384d"}), 409, "store")


def _raw_post(base: str, raw_path: str, body: dict) -> tuple[int, dict | None]:
    """POST with the path sent byte for byte as given (httpx would normalise dot segments away)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        data = json.dumps(body).encode()
        conn.putrequest("POST", raw_path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, None
    finally:
        conn.close()


TRAVERSALS = [
    "/v1/stores/../secret/search",
    "/v1/stores/../secret/all-minilm-l6-v2-384d/search",
    "/v1/stores/sample/../../secret/all-minilm-l6-v2-384d/search",
    "/v1/stores/%2e%2e/secret/search",
    "/v1/stores/%2e%2e%2fsecret%2fall-minilm-l6-v2-384d/search",
    "/v1/stores/%2E%2E%2Fsecret/search",
    "/v1/stores/..%2fsecret/search",
    "/v1/stores/..%5csecret/search",
    "/v1/stores/..\\secret/search",
    "/v1/stores/%252e%252e%252fsecret/search",
    "/v1/stores//etc/search",
    "/v1/stores/%2Fetc%2Fpasswd/search",
    "/v1/stores/{outside}/search",
    "/v1/stores/sample%00/search",
    "/v1/stores/escape/search",
    f"/v1/stores/escape/{STORE}/search",
    "/v1/stores/./sample/search",
    "/v1/stores/.hidden/search",
    "/v1/stores/sample/x/y/search",
]


@pytest.mark.parametrize("raw_path", TRAVERSALS)
def test_traversal_refused(server, world, raw_path):
    raw_path = raw_path.replace("{outside}", str(world["outside"] / STORE).lstrip("/"))
    vec = world["vectors"][0].tolist()
    status, body = _raw_post(server, raw_path, {"vector": vec, "k": 3})
    assert status in (400, 404), (raw_path, status, body)
    if body is not None and "error" in body:
        assert set(body["error"]) >= {"message", "type", "param", "code"}
    # whatever it answered, nothing outside the root was read: no hit from the secret store
    assert "v1-c0" not in json.dumps(body)


# ---------------------------------------------------------------------------------------------------------------
# hot swap


def test_open_stores_are_cached(client, app):
    body = {"query": "compost", "k": 2}
    assert client.post(f"/v1/stores/{SAMPLE_ID}/search", json=body).status_code == 200
    cache = app.state.woolocal_store_cache
    opens = cache.opens
    for _ in range(3):
        assert client.post(f"/v1/stores/{SAMPLE_ID}/search", json=body).status_code == 200
        assert client.post("/v1/stores/sample/search", json=body).status_code == 200
    assert cache.opens == opens  # unchanged folder: served from the cache, not re-read


def test_hot_swap_serves_new_version(client, world, embedder):
    root, vectors = world["stores_root"], world["vectors"]
    write_swap_version(root, embedder, 10, vectors)
    r = client.post(f"/v1/stores/swap/{STORE}/search", json={"query": "pumpkin patch rota", "k": 10})
    assert r.status_code == 200, r.text
    assert {h["metadata"]["version"] for h in r.json()["data"]} == {10}
    assert r.json()["count"] == len(_chunks_for_version(10))
    write_swap_version(root, embedder, 11, vectors)  # while the server runs
    r = client.post(f"/v1/stores/swap/{STORE}/search", json={"query": "pumpkin patch rota", "k": 10})
    assert {h["metadata"]["version"] for h in r.json()["data"]} == {11}
    assert r.json()["count"] == len(_chunks_for_version(11))
    # and by re-ingesting the sample project with a changed file
    src = world["base"] / "sample-project"
    (src / "notes" / "beehive.md").write_text(
        "# Beehives\n\nThe two beehives behind the greenhouse are inspected by Oluwaseun Adebayo-Lindqvist "
        "every other Sunday.\n", encoding="utf-8")
    try:
        run_ingest("sample", src, root, embedder, ChunkSettings(), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
        r = client.post("/v1/stores/sample/search", json={"query": "who inspects the beehives?", "k": 3})
        assert r.json()["data"][0]["metadata"]["source"] == "notes/beehive.md"
    finally:
        (src / "notes" / "beehive.md").unlink()
        run_ingest("sample", src, root, embedder, ChunkSettings(), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    r = client.post("/v1/stores/sample/search", json={"query": "who inspects the beehives?", "k": 10})
    assert "notes/beehive.md" not in {h["metadata"]["source"] for h in r.json()["data"]}


def test_hot_swap_under_concurrent_search(server, world, embedder):
    """Searches hammer a store while it is swapped again and again: every answer is one complete version."""
    root, vectors = world["stores_root"], world["vectors"]
    counts = {v: len(_chunks_for_version(v)) for v in range(100, 200)}
    stop = threading.Event()
    failures: list[str] = []
    seen: set[int] = set()
    done = [0]
    lock = threading.Lock()
    rng = random.Random(0)
    queries = [vectors[i].tolist() for i in range(3)]

    def hammer(use_text: bool) -> None:
        with httpx.Client(base_url=server, timeout=30) as c:
            while not stop.is_set():
                body = {"query": "pumpkin patch rota", "k": 10} if use_text else {"vector": rng.choice(queries),
                                                                                    "k": 10}
                r = c.post(f"/v1/stores/swap/{STORE}/search", json=body)
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:300]}")
                    continue
                data = r.json()
                versions = {h["metadata"]["version"] for h in data["data"]}
                ids_ok = all(h["id"] == f"v{h['metadata']['version']}-c{h['metadata']['i']}"
                             and h["text"].startswith(f"version {h['metadata']['version']} ") for h in data["data"])
                if len(versions) != 1 or not ids_ok:
                    failures.append(f"mixed versions in one answer: {versions}")
                    continue
                (v,) = versions
                if v >= 100 and (len(data["data"]) != counts[v] or data["count"] != counts[v]):
                    failures.append(f"version {v}: {len(data['data'])} hits, count {data['count']}, want {counts[v]}")
                with lock:
                    seen.add(v)
                    done[0] += 1

    threads = [threading.Thread(target=hammer, args=(i == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for v in range(100, 125):
            write_swap_version(root, embedder, v, vectors)
            time.sleep(0.03)
    finally:
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures, failures[:5]
    assert done[0] > 50
    assert len({v for v in seen if v >= 100}) >= 5, seen  # new versions were picked up while it ran
    r = httpx.post(f"{server}/v1/stores/swap/{STORE}/search", json={"vector": queries[0], "k": 10}, timeout=30)
    assert {h["metadata"]["version"] for h in r.json()["data"]} == {124}
    leftovers = [p.name for p in (root / "swap").iterdir() if p.name != STORE]
    assert not leftovers, leftovers


# ---------------------------------------------------------------------------------------------------------------
# POST /v1/rag/context


def test_rag_context(client, world):
    fact = FACTS[0]
    r = client.post("/v1/rag/context", json={"query": fact["query"], "store": "sample", "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["store"] == SAMPLE_ID and len(body["chunks"]) == 4
    assert [c["n"] for c in body["chunks"]] == [1, 2, 3, 4]
    assert body["chunks"][0]["metadata"]["source"] == fact["source"]
    prompt = body["prompt"]
    for c in body["chunks"]:
        assert f"[{c['n']}] {c['metadata']['source']}" in prompt
    assert "[1]" in prompt and "cite" in prompt.lower() and prompt.rstrip().endswith(fact["query"])
    assert body["messages"] == [{"role": "user", "content": prompt}]
    assert [s["id"] for s in body["sources"]] == [c["id"] for c in body["chunks"]]
    # default k from service.chat.k (3), alias as store, messages instead of query
    r = client.post("/v1/rag/context", json={"store": "garden-rag", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": fact["query"]}]})
    assert r.status_code == 200, r.text
    assert len(r.json()["chunks"]) == 3 and r.json()["messages"][0] == {"role": "system", "content": "Be brief."}
    assert_openai_error(client.post("/v1/rag/context", json={"query": "x"}), 400, "store")
    assert_openai_error(client.post("/v1/rag/context", json={"query": "x", "store": "../secret"}), 400, "store")
    assert_openai_error(client.post("/v1/rag/context", json={"query": "x", "store": "nosuch"}), 404, "store")


# ---------------------------------------------------------------------------------------------------------------
# POST /v1/chat/completions


def _question(i: int = 0) -> list[dict]:
    return [{"role": "system", "content": "You are the garden's assistant."},
            {"role": "user", "content": FACTS[i]["query"]}]


def test_chat_non_stream(client, chat):
    r = client.post("/v1/chat/completions", json={"model": "my-llm", "messages": _question(), "store": "sample"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == chat.answer
    sent = chat.last_body()
    assert sent["model"] == "my-llm" and sent["max_tokens"] == 123 and sent["temperature"] == 0.3
    assert "store" not in sent and "k" not in sent
    assert sent["messages"][0] == _question()[0]
    prompt = sent["messages"][-1]["content"]
    assert sent["messages"][-1]["role"] == "user"
    assert "[1] " in prompt and "[2] " in prompt and "[3] " in prompt and "[4] " not in prompt  # chat.k = 3
    assert FACTS[0]["source"] in prompt and prompt.rstrip().endswith(FACTS[0]["query"])
    sources = body["sources"]
    assert [s["n"] for s in sources] == [1, 2, 3]
    assert set(sources[0]) >= {"n", "id", "source", "score"} and sources[0]["source"] == FACTS[0]["source"]
    assert sources[0]["cited"] is True and sources[1]["cited"] is False
    # the prompt's sources are the ones /v1/rag/context assembles
    ctx = client.post("/v1/rag/context", json={"store": "sample", "query": FACTS[0]["query"]}).json()
    assert ctx["prompt"] == prompt


def test_chat_request_values_win_and_k_override(client, chat):
    r = client.post("/v1/chat/completions", json={
        "model": "my-llm", "messages": _question(1), "store": SAMPLE_ID, "k": 5, "max_tokens": 7, "temperature": 0.0})
    assert r.status_code == 200, r.text
    sent = chat.last_body()
    assert sent["max_tokens"] == 7 and sent["temperature"] == 0.0
    assert "[5] " in sent["messages"][-1]["content"] and len(r.json()["sources"]) == 5


def test_chat_alias_model(client, chat):
    r = client.post("/v1/chat/completions", json={"model": "garden-rag", "messages": _question(2)})
    assert r.status_code == 200, r.text
    sent = chat.last_body()
    assert "model" not in sent  # an alias means nothing upstream: the server's own model answers
    assert FACTS[2]["source"] in sent["messages"][-1]["content"]
    assert r.json()["sources"][0]["source"] == FACTS[2]["source"]


def test_chat_without_store_is_a_plain_proxy(client, chat):
    msgs = [{"role": "user", "content": "hello"}]
    r = client.post("/v1/chat/completions", json={"model": "my-llm", "messages": msgs})
    assert r.status_code == 200, r.text
    assert "sources" not in r.json()
    assert chat.last_body()["messages"] == msgs and chat.last_body()["max_tokens"] == 123


def test_chat_stream_raw_sse(server, chat):
    events = []
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=30,
                      json={"model": "m", "messages": _question(), "store": "sample", "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: "), line
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == chat.answer
    last = chunks[-1]
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk"
    assert [s["n"] for s in last["sources"]] == [1, 2, 3] and last["sources"][0]["cited"] is True
    assert chat.last_body()["stream"] is True and chat.last_body()["max_tokens"] == 123


def test_chat_openai_client(server, chat):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)
    resp = client.chat.completions.create(model="my-llm", messages=_question(), extra_body={"store": "sample"})
    assert resp.choices[0].message.content == chat.answer
    sources = resp.model_extra["sources"]
    assert sources[0]["source"] == FACTS[0]["source"] and sources[0]["n"] == 1
    assert "[1] " in chat.last_body()["messages"][-1]["content"]

    stream = client.chat.completions.create(model="my-llm", messages=_question(3), stream=True,
                                            extra_body={"store": "sample", "k": 2})
    parts, final_sources = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        elif (chunk.model_extra or {}).get("sources") is not None:
            final_sources = chunk.model_extra["sources"]
    assert "".join(parts) == chat.answer
    assert final_sources is not None and len(final_sources) == 2
    assert final_sources[0]["source"] == FACTS[3]["source"]

    # alias as the model; a plain proxy without store
    resp = client.chat.completions.create(model="garden-rag", messages=_question(5))
    assert resp.model_extra["sources"][0]["source"] == FACTS[5]["source"]
    resp = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == chat.answer and "sources" not in (resp.model_extra or {})


def test_chat_upstream_error_relayed_as_502(client, server, chat):
    chat.fail(500, "the model ran out of memory")
    err = assert_openai_error(client.post("/v1/chat/completions", json={"messages": _question(), "store": "sample"}),
                              502)
    assert "the model ran out of memory" in err["message"] and "500" in err["message"]
    chat.fail(400, "context length exceeded")
    err = assert_openai_error(client.post("/v1/chat/completions",
                                          json={"messages": _question(), "store": "sample", "stream": True}), 502)
    assert "context length exceeded" in err["message"]
    import openai

    chat.fail(503, "busy")
    oc = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as ei:
        oc.chat.completions.create(model="m", messages=_question(), extra_body={"store": "sample"})
    assert ei.value.status_code == 502 and "busy" in str(ei.value)


def test_chat_upstream_slow_is_504_not_a_hang(client, chat):
    chat.delay_s = 4.0  # timeout_s is 2
    t = time.monotonic()
    err = assert_openai_error(client.post("/v1/chat/completions", json={"messages": _question(), "store": "sample"}),
                              504)
    assert time.monotonic() - t < 3.8
    assert "service.chat.timeout_s" in err["message"]
    t = time.monotonic()
    r = client.post("/v1/chat/completions", json={"messages": _question(), "store": "sample", "stream": True})
    assert_openai_error(r, 504)
    assert time.monotonic() - t < 3.8


def test_chat_upstream_stalls_mid_stream(server, chat):
    chat.stall_after, chat.stall_s = 2, 4.0
    events = []
    t = time.monotonic()
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=30,
                      json={"messages": _question(), "store": "sample", "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line]
    assert time.monotonic() - t < 3.8
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "upstream_timeout" and set(err) >= {"message", "type", "param", "code"}
    relayed = [json.loads(e) for e in events[:-2]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in relayed) == " ".join(chat.answer.split()[:2])


def test_chat_stream_relays_as_it_arrives(server, chat):
    """Chunks reach the client while the upstream is still writing (no buffering of the whole answer)."""
    chat.stall_after, chat.stall_s = 3, 1.5  # below timeout_s
    arrivals = []
    t = time.monotonic()
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=30,
                      json={"messages": _question(), "store": "sample", "stream": True}) as r:
        for line in r.iter_lines():
            if line:
                arrivals.append((time.monotonic() - t, line[6:]))
    assert arrivals[-1][1] == "[DONE]"
    first_content = next(at for at, e in arrivals if e != "[DONE]" and (json.loads(e).get("choices") or [{}])[0]
                         .get("delta", {}).get("content"))
    assert first_content < 1.2 and arrivals[-1][0] >= 1.5, arrivals
    assert "sources" in json.loads(arrivals[-2][1])


def test_chat_bad_requests(client):
    assert_openai_error(client.post("/v1/chat/completions", json={"store": "sample"}), 400, "messages")
    assert_openai_error(client.post("/v1/chat/completions", json={
        "store": "sample", "messages": [{"role": "assistant", "content": "hi"}]}), 400, "messages")
    assert_openai_error(client.post("/v1/chat/completions", json={"store": "nosuch", "messages": _question()}), 404,
                        "store")
    assert_openai_error(client.post("/v1/chat/completions", json={"store": "../x", "messages": _question()}), 400,
                        "store")
    assert_openai_error(client.post("/v1/chat/completions", json={"store": "sample", "k": 0,
                                                                  "messages": _question()}), 400, "k")


def test_chat_upstream_not_configured(world, embedder):
    cfg = config_for(world["base"], upstream=None)
    with serve(make_app(cfg, world["stores_root"])) as base:
        r = httpx.post(f"{base}/v1/chat/completions", json={"messages": _question(), "store": "sample"}, timeout=30)
        err = assert_openai_error(r, 503)
        assert "service.chat.upstream" in err["message"]
        # retrieval without a chat model still works
        assert httpx.post(f"{base}/v1/rag/context", json={"query": "compost", "store": "sample"},
                          timeout=30).status_code == 200


def test_chat_upstream_down_and_env_defaults(world, embedder, monkeypatch):
    port = free_port()  # nothing listens there
    cfg = config_for(world["base"], upstream=f"http://127.0.0.1:{port}/v1", max_tokens=None, temperature=None)
    with serve(make_app(cfg, world["stores_root"])) as base:
        for stream in (False, True):
            t = time.monotonic()
            r = httpx.post(f"{base}/v1/chat/completions", timeout=30,
                           json={"messages": _question(), "store": "sample", "stream": stream})
            err = assert_openai_error(r, 503)
            assert f"127.0.0.1:{port}" in err["message"] and time.monotonic() - t < 5
    # no max_tokens / temperature in flows.yaml: LOCALMLX_MAX_TOKENS / LOCALMLX_TEMPERATURE, else nothing is sent
    with ChatDouble() as d:
        cfg = config_for(world["base"], upstream=d.base_url, max_tokens=None, temperature=None)
        with serve(make_app(cfg, world["stores_root"])) as base:
            msgs = {"messages": [{"role": "user", "content": "hi"}]}
            assert httpx.post(f"{base}/v1/chat/completions", json=msgs, timeout=30).status_code == 200
            assert "max_tokens" not in d.last_body() and "temperature" not in d.last_body()
            monkeypatch.setenv("LOCALMLX_MAX_TOKENS", "77")
            monkeypatch.setenv("LOCALMLX_TEMPERATURE", "0.65")
            assert httpx.post(f"{base}/v1/chat/completions", json=msgs, timeout=30).status_code == 200
            assert d.last_body()["max_tokens"] == 77 and d.last_body()["temperature"] == 0.65


def test_chat_model_from_config_and_api_key(world, embedder, monkeypatch):
    monkeypatch.setenv("TEST_CHAT_KEY", "sekret")
    with ChatDouble(api_key="sekret") as d:
        cfg = config_for(world["base"], upstream=d.base_url, chat_model="mlx-community/Qwen3-4B")
        cfg = cfg.model_copy(update={"service": cfg.service.model_copy(update={
            "chat": cfg.service.chat.model_copy(update={"api_key_env": "TEST_CHAT_KEY"})})})
        with serve(make_app(cfg, world["stores_root"])) as base:
            r = httpx.post(f"{base}/v1/chat/completions", timeout=30,
                           json={"model": "garden-rag", "messages": _question()})
            assert r.status_code == 200, r.text
            assert d.last_body()["model"] == "mlx-community/Qwen3-4B"
            assert d.chat_requests()[-1]["headers"]["authorization"] == "Bearer sekret"
