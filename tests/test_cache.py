"""Tests for the embedding cache (woolocal_ingest.cache): the real packaged model behind a spy that records exactly
which texts reached it, a SQLite file per test, and two OS processes writing one file at once."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from woolocal_ingest.cache import (
    MB, CachedEmbedder, EmbeddingCache, cached_embedder, default_cache_path, model_key, open_cache, text_sha256,
)
from woolocal_ingest.errors import DimensionMismatchError

REPO = Path(__file__).resolve().parent.parent

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "FAISS stores dense vectors for similarity search.",
    "def add(a, b):\n    return a + b",
    "Embeddings map text to points in a vector space.",
    "SQLite in WAL mode lets readers and a writer work at once.",
    "A cache never embeds the same text twice with the same model.",
    "Wooster asks questions about local projects.",
    "# Heading\n\nSome markdown body text under a heading.",
]


class Spy:
    """Wraps an embedder and records each embed_documents call's texts."""

    def __init__(self, inner):
        self._inner = inner
        self.calls: list[list[str]] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def embed_documents(self, texts, progress=None):
        self.calls.append(list(texts))
        return self._inner.embed_documents(texts, progress)

    @property
    def texts(self) -> list[str]:
        return [t for c in self.calls for t in c]


class Silent(Spy):
    """A spy whose inner embedder never reports progress (some backends do not)."""

    def embed_documents(self, texts, progress=None):
        return super().embed_documents(texts, None)


def sha(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def vec(i: int, dim: int = 384) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(dim).astype(np.float32)


def put_range(cache: EmbeddingCache, key: str, ids, batch: int = 50) -> None:
    ids = list(ids)
    for s in range(0, len(ids), batch):
        cache.put_many(key, {sha(i): vec(i) for i in ids[s : s + batch]}, name="test/model")


@pytest.fixture
def cache(tmp_path):
    c = EmbeddingCache(tmp_path / ".cache" / "embeddings.sqlite", max_mb=None)
    yield c
    c.close()


# ---------------------------------------------------------------------------------------------------------------
# identity


def test_model_key_is_backend_independent_and_covers_what_changes_vectors(embedder):
    key = model_key(embedder)
    assert key == model_key(embedder) == model_key(embedder.info)
    assert key.startswith(f"{embedder.info.slug}-{embedder.dim}d-") and len(key.rsplit("-", 1)[1]) == 16

    class OtherBackend:  # the same model files on another runtime
        backend = "onnx"
        info = embedder.info
        quantization = None

    assert model_key(OtherBackend()) == key
    for change in ({"doc_prefix": "passage: "}, {"pooling": "cls"}, {"normalize": not embedder.info.normalize},
                   {"max_tokens": 128}):
        assert model_key(dataclasses.replace(embedder.info, **change)) != key, change


def test_text_sha256_matches_ingest():
    from woolocal_ingest.chunking import Chunk

    for t in TEXTS + ["\ud800 lone surrogate", ""]:
        assert text_sha256(t) == Chunk.text_sha256(t)


# ---------------------------------------------------------------------------------------------------------------
# serving hits


def test_second_call_embeds_nothing_and_returns_the_same_vectors(embedder, cache):
    spy = Spy(embedder)
    ce = CachedEmbedder(spy, cache)
    v1 = ce.embed_documents(TEXTS)
    assert spy.calls == [TEXTS]
    assert (ce.hits, ce.misses) == (0, len(TEXTS))
    assert v1.dtype == np.float32 and v1.shape == (len(TEXTS), embedder.dim)
    np.testing.assert_allclose(v1, embedder.embed_documents(TEXTS), atol=1e-5)

    v2 = ce.embed_documents(TEXTS)
    assert spy.calls == [TEXTS], "the second call must not reach the model"
    assert np.array_equal(v1, v2)
    assert (ce.hits, ce.misses) == (len(TEXTS), len(TEXTS))

    # Another cache object on the same file (another run, another process): still served, bit for bit.
    again = EmbeddingCache(cache.path, max_mb=None)
    spy2 = Spy(embedder)
    v3 = CachedEmbedder(spy2, again).embed_documents(list(reversed(TEXTS)))
    again.close()
    assert spy2.calls == []
    assert np.array_equal(v3, v1[::-1])
    # Wrapper delegates the embedder interface.
    assert (ce.info, ce.backend, ce.model_name, ce.dim, ce.max_tokens) == (
        embedder.info, embedder.backend, embedder.model_name, embedder.dim, embedder.max_tokens)
    assert ce.tokens is embedder.tokens
    np.testing.assert_allclose(ce.embed_query("fox"), embedder.embed_query("fox"), atol=1e-6)


def test_duplicates_within_one_call_are_embedded_once_and_progress_covers_every_text(embedder, cache):
    a, b, c, d = TEXTS[:4]
    spy = Spy(embedder)
    ce = CachedEmbedder(spy, cache)
    seen: list[int] = []
    out = ce.embed_documents([a, b, a, c, b, a], progress=seen.append)
    assert spy.calls == [[a, b, c]], "one inner call, each distinct text once, first-occurrence order"
    assert sum(seen) == 6
    assert np.array_equal(out[0], out[2]) and np.array_equal(out[0], out[5]) and np.array_equal(out[1], out[4])
    assert (ce.hits, ce.misses) == (0, 3)

    seen.clear()
    out2 = ce.embed_documents([a, d, a, d], progress=seen.append)
    assert spy.calls[1:] == [[d]]
    assert sum(seen) == 4
    assert np.array_equal(out2[0], out[0]) and np.array_equal(out2[1], out2[3])
    assert (ce.hits, ce.misses) == (2, 4)

    # An inner embedder that reports no progress: the wrapper still brings the bar to 100%.
    seen.clear()
    silent = CachedEmbedder(Silent(embedder), cache)
    silent.embed_documents([a, TEXTS[4], TEXTS[4], TEXTS[5]], progress=seen.append)
    assert sum(seen) == 4
    assert ce.embed_documents([]).shape == (0, embedder.dim)


def test_a_different_model_key_does_not_hit(embedder, cache):
    CachedEmbedder(embedder, cache).embed_documents(TEXTS)
    spy = Spy(embedder)
    other = CachedEmbedder(spy, cache, key="other-model-384d-0000000000000000")
    other.embed_documents(TEXTS)
    assert spy.calls == [TEXTS]
    assert cache.get_many("no-such-model", [text_sha256(t) for t in TEXTS]) == {}
    stats = cache.stats()
    assert stats["rows"] == 2 * len(TEXTS)
    assert {k: m["rows"] for k, m in stats["models"].items()} == {
        model_key(embedder): len(TEXTS), "other-model-384d-0000000000000000": len(TEXTS)}


# ---------------------------------------------------------------------------------------------------------------
# bad rows


def test_a_corrupt_blob_is_ignored_and_re_embedded_not_served(embedder, cache, caplog):
    spy = Spy(embedder)
    ce = CachedEmbedder(spy, cache)
    v1 = ce.embed_documents(TEXTS[:4])
    con = sqlite3.connect(cache.path)
    with con:
        n = con.execute("UPDATE embeddings SET vec = substr(vec, 1, 100) WHERE sha = ?",
                        (bytes.fromhex(text_sha256(TEXTS[1])),)).rowcount
    con.close()
    assert n == 1
    with caplog.at_level(logging.WARNING, logger="woolocal_ingest.cache"):
        v2 = ce.embed_documents(TEXTS[:4])
    assert spy.calls[1:] == [[TEXTS[1]]], "only the corrupt row is embedded again"
    assert cache.invalid == 1 and "ignored 1 row" in caplog.text
    np.testing.assert_allclose(v2, v1, atol=1e-5)
    ce.embed_documents(TEXTS[:4])
    assert len(spy.calls) == 2, "the re-embedded vector replaced the corrupt row"


def test_a_row_of_another_dim_is_ignored_and_reported(cache):
    cache.put_many("k", {sha(i): vec(i) for i in range(3)})
    assert len(cache.get_many("k", [sha(i) for i in range(3)], dim=384)) == 3
    assert cache.get_many("k", [sha(i) for i in range(3)], dim=768) == {}
    assert cache.invalid == 3
    with pytest.raises(DimensionMismatchError):  # one model, one dim
        cache.put_many("k", {sha(9): vec(9, dim=768)})
    cache.put_many("k", {sha(5): np.full(384, np.nan, np.float32)})  # non-finite: not stored
    assert cache.get_many("k", [sha(5)]) == {}


def test_an_unusable_cache_never_fails_embedding(embedder, tmp_path, caplog):
    bad = tmp_path / "a-folder"
    bad.mkdir()
    spy = Spy(embedder)
    ce = CachedEmbedder(spy, EmbeddingCache(bad, max_mb=None))
    with caplog.at_level(logging.WARNING, logger="woolocal_ingest.cache"):
        out = ce.embed_documents(TEXTS[:3])
    assert spy.calls == [TEXTS[:3]]
    np.testing.assert_allclose(out, embedder.embed_documents(TEXTS[:3]), atol=1e-5)
    assert "embedding without it" in caplog.text


def test_an_unreadable_cache_file_is_moved_aside(tmp_path):
    p = tmp_path / "embeddings.sqlite"
    p.write_bytes(b"this is not a database" * 500)
    c = EmbeddingCache(p, max_mb=None)
    c.put_many("k", {sha(1): vec(1)})
    assert np.array_equal(c.get_many("k", [sha(1)])[sha(1)], vec(1))
    c.close()
    assert [x.name for x in tmp_path.iterdir() if ".corrupt-" in x.name]


# ---------------------------------------------------------------------------------------------------------------
# size bound and pruning


def test_prune_keeps_the_most_recently_used_rows_and_shrinks_the_file(cache):
    put_range(cache, "k", range(0, 200))  # A: oldest
    put_range(cache, "k", range(200, 400), batch=20)  # B: newer, ten batches (ten distinct times)
    touched = [sha(i) for i in range(100)]
    assert len(cache.get_many("k", touched)) == 100  # A[:100] becomes the most recently used
    full = cache.stats()
    assert full["rows"] == 400
    target_mb = full["used_bytes"] * 0.6 / MB
    removed = cache.prune(max_mb=target_mb)
    after = cache.stats()
    assert removed > 100 and after["rows"] == 400 - removed
    assert after["used_bytes"] <= target_mb * MB
    assert os.path.getsize(cache.path) <= target_mb * MB, "pages freed, file truncated"
    assert after["bytes_on_disk"] < full["bytes_on_disk"]
    left = cache.get_many("k", [sha(i) for i in range(400)])
    assert all(s in left for s in touched), "recently used rows are kept"
    assert not any(sha(i) in left for i in range(100, 200)), "least recently used go first"
    kept_b = [i for i in range(200, 400) if sha(i) in left]
    assert kept_b and kept_b == list(range(400 - len(kept_b), 400)), "the newest of B are kept"


def test_a_tiny_max_mb_bounds_the_file_on_every_write(tmp_path):
    c = EmbeddingCache(tmp_path / "e.sqlite", max_mb=0.5)
    for b in range(30):
        ids = range(b * 20, b * 20 + 20)
        c.put_many("k", {sha(i): vec(i) for i in ids})
        s = c.stats()
        assert s["used_bytes"] <= c.max_bytes
        assert os.path.getsize(c.path) <= c.max_bytes
        assert len(c.get_many("k", [sha(i) for i in ids])) == 20, "what was just written survives"
    s = c.stats()
    assert s["pruned"] > 0 and 0 < s["rows"] < 600 and s["rows"] + s["pruned"] == 600
    c.close()


def test_prune_by_model_name_and_age(cache):
    put_range(cache, "k1", range(5))
    cache.put_many("k2-384d-abc", {sha(i): vec(i) for i in range(10, 15)}, name="org/My-Model")
    cache.put_many("k3", {sha(i): vec(i) for i in range(20, 26)})
    assert cache.match_models("my-model") == ["k2-384d-abc"] == cache.match_models("org/My-Model")
    assert cache.prune(model_key="nothing-like-it") == 0
    assert cache.prune(model_key="my-model") == 5
    assert "k2-384d-abc" not in cache.stats()["models"]
    # Age: make two of k3's rows ten days old.
    con = sqlite3.connect(cache.path)
    with con:
        con.execute("UPDATE usage SET last_used = last_used - 10 * 86400 WHERE id IN "
                    "(SELECT id FROM embeddings WHERE sha IN (?, ?))", (bytes.fromhex(sha(20)), bytes.fromhex(sha(21))))
    con.close()
    assert cache.prune(older_than_days=7, model_key="k1") == 0
    assert cache.prune(older_than_days=7) == 2
    assert set(cache.get_many("k3", [sha(i) for i in range(20, 26)])) == {sha(i) for i in range(22, 26)}
    assert cache.prune(model_key="k1") == 5
    assert cache.stats()["rows"] == 4
    assert cache.clear() == 4
    s = cache.stats()
    assert s["rows"] == 0 and s["models"] == {}


# ---------------------------------------------------------------------------------------------------------------
# stats


def test_stats_numbers_are_right(tmp_path):
    p = tmp_path / "s" / "embeddings.sqlite"
    c = EmbeddingCache(p, max_mb=7)
    empty = c.stats()
    assert not p.exists() and empty["exists"] is False and empty["rows"] == 0, "stats does not create the file"
    c.put_many("a", {sha(i): vec(i) for i in range(5)}, name="org/A")
    c.put_many("b", {sha(i): vec(i) for i in range(100, 103)})
    got = c.get_many("a", [sha(i) for i in range(7)] + [sha(0)])  # 5 known, 2 unknown, one repeat
    assert len(got) == 5
    s = c.stats()
    assert s["rows"] == 8
    assert {k: (m["rows"], m["dim"], m["vector_bytes"]) for k, m in s["models"].items()} == {
        "a": (5, 384, 5 * 384 * 4), "b": (3, 384, 3 * 384 * 4)}
    assert s["models"]["a"]["name"] == "org/A" and s["models"]["a"]["last_used"]
    assert (s["hits"], s["misses"], s["invalid"], s["pruned"]) == (5, 2, 0, 0)
    assert s["max_mb"] == 7 and s["max_bytes"] == 7 * MB
    on_disk = sum(os.path.getsize(f"{p}{x}") for x in ("", "-wal", "-shm") if os.path.exists(f"{p}{x}"))
    assert s["bytes_on_disk"] == on_disk > 0
    assert s["used_bytes"] > 8 * 384 * 4 and s["path"] == str(p)
    c.close()


# ---------------------------------------------------------------------------------------------------------------
# concurrency


WORKER = textwrap.dedent("""
    import hashlib, os, sys, time
    import numpy as np
    import woolocal_ingest.embedders.registry  # what put_many imports, loaded before the start signal
    from woolocal_ingest.cache import EmbeddingCache

    path, go, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sha = lambda i: hashlib.sha256(str(i).encode()).hexdigest()
    vec = lambda i: np.random.default_rng(i).standard_normal(384).astype(np.float32)
    c = EmbeddingCache(path, max_mb=None)
    c.open()  # open (and maybe create) before the start signal, like a long-running ingest
    open(path + f".ready-{first}", "w").close()
    while not os.path.exists(go):
        time.sleep(0.001)
    t0 = time.time()
    for s in range(first, first + count, 2):  # many small write transactions, reads in between
        ids = range(s, min(s + 2, first + count))
        c.put_many("shared", {sha(i): vec(i) for i in ids}, name="m")
        got = c.get_many("shared", [sha(i) for i in ids] + [sha(i) for i in range(0, 400, 7)])
        assert all(np.array_equal(got[sha(i)], vec(i)) for i in ids)
        if s % 20 == 0:
            c.flush()  # last_used writes compete too
    t1 = time.time()
    c.close()
    print("ok", t0, t1)
""")


def test_two_processes_write_concurrently(tmp_path):
    path, go = tmp_path / "c" / "embeddings.sqlite", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Overlapping ranges: both processes write rows 150..249.
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(go), str(first), "250"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for first in (0, 150)]
    deadline = time.monotonic() + 60
    while not all(Path(f"{path}.ready-{first}").exists() for first in (0, 150)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not start"
        time.sleep(0.01)
    go.touch()
    results = [p.communicate(timeout=60) for p in procs]
    spans = []
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert out.startswith("ok") and "locked" not in err.lower()
        spans.append(tuple(map(float, out.split()[1:3])))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, f"the two writers did not overlap in time: {spans}"
    c = EmbeddingCache(path, max_mb=None)
    got = c.get_many("shared", [sha(i) for i in range(400)])
    assert len(got) == 400 and all(np.array_equal(got[sha(i)], vec(i)) for i in range(400))
    assert c.stats()["rows"] == 400
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    c.close()


def test_threads_share_one_cache(cache):
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for s in range(t * 100, t * 100 + 100, 10):
                cache.put_many("k", {sha(i): vec(i) for i in range(s, s + 10)})
                assert len(cache.get_many("k", [sha(i) for i in range(s, s + 10)])) == 10
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.stats()["rows"] == 400 and cache.hits == 400


# ---------------------------------------------------------------------------------------------------------------
# wiring helpers


def test_cached_embedder_helper_and_pickling(embedder, tmp_path):
    stores = tmp_path / "stores"
    assert cached_embedder(embedder, stores, enabled=False) is embedder
    ce = cached_embedder(embedder, stores, max_mb=64)
    assert isinstance(ce, CachedEmbedder) and ce.cache.path == default_cache_path(stores).resolve()
    assert cached_embedder(ce, stores) is ce
    assert ce.cache is open_cache(default_cache_path(stores), max_mb=64), "one cache object per file per process"
    own = cached_embedder(embedder, stores, path=tmp_path / "elsewhere.sqlite")
    assert own.cache.path == (tmp_path / "elsewhere.sqlite").resolve()
    ce.embed_documents(TEXTS[:2])
    c2 = pickle.loads(pickle.dumps(ce.cache))  # a Dask worker gets the path, not the connection
    assert len(c2.get_many(ce.key, [text_sha256(t) for t in TEXTS[:2]])) == 2
    c2.close()


def test_cache_cli_stats_and_prune(tmp_path, monkeypatch):
    """`woolocal cache stats|prune --json` report the file's real rows; an unknown --model is bad input (exit 2)."""
    import json as _json

    from click.testing import CliRunner

    from woolocal_cli import main

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "emb.sqlite"
    c = EmbeddingCache(path)
    rng = np.random.default_rng(0)
    c.put_many("m-a", {f"{i:064x}": rng.random(8, dtype=np.float32) for i in range(5)}, name="model-a")
    c.put_many("m-b", {f"{i:064x}": rng.random(8, dtype=np.float32) for i in range(3)}, name="model-b")
    c.close()
    run = CliRunner().invoke
    r = run(main, ["cache", "stats", "--path", str(path), "--json"])
    assert r.exit_code == 0, r.output
    s = _json.loads(r.stdout)
    assert s["rows"] == 8 and {k: v["rows"] for k, v in s["models"].items()} == {"m-a": 5, "m-b": 3}
    r = run(main, ["cache", "prune", "--path", str(path), "--model", "m-a", "--json"])
    assert r.exit_code == 0, r.output
    assert _json.loads(r.stdout)["removed"] == 5 and _json.loads(r.stdout)["rows"] == 3
    r = run(main, ["cache", "prune", "--path", str(path), "--model", "no-such-model"])
    assert r.exit_code == 2 and "no cached model matches" in r.stderr
