"""The ingest flow on Dask (pipelines.dask_runner): shards on disk, one Prefect API, same store as the thread runner.

Workers are real processes (LocalCluster, processes=True), so nothing here can be monkeypatched inside them: the
failing-shard test gives the workers a model whose weights are corrupt, which fails for real when a worker loads it.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from woolocal_ingest.chunking import ChunkSettings
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from woolocal_ingest.ingest import run_ingest
from woolocal_ingest.request import IngestRequest
from woolocal_ingest.stores import Store, store_dir, verify_store
from store_copies import copy_stores
from woolocal_ingest import embedders

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample-project"
PROJECT = "sample"
SETTINGS = ChunkSettings(200, 32)
SHARD = 20  # chunks per shard: the sample project makes several
MODEL_KEY = embedders.EmbedderSpec()  # the flow's model-cache key for the default model


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def shard_dirs(stores: Path) -> list[Path]:
    return sorted((stores / PROJECT).glob(".shards-*")) if (stores / PROJECT).is_dir() else []


def params(proj: Path, stores: Path, model: str | None = None) -> IngestRequest:
    return IngestRequest(PROJECT, proj, stores, embedders.EmbedderSpec(model), SETTINGS)


def assert_same_store(a: Path, b: Path, atol: float = 1e-5) -> float:
    """Same rows (ids, sources, texts, metadata, order) and vectors within `atol`; returns the largest difference."""
    sa, sb = Store(a), Store(b)
    ca, cb = sa.chunks(), sb.chunks()
    assert [c.id for c in ca] == [c.id for c in cb]
    assert [(c.source, c.chunk, c.text, c.sha256, c.metadata) for c in ca] == \
           [(c.source, c.chunk, c.text, c.sha256, c.metadata) for c in cb]
    va, vb = sa.vectors(), sb.vectors()
    assert va.shape == vb.shape and va.dtype == vb.dtype == np.float32
    diff = float(np.abs(va - vb).max()) if va.size else 0.0
    assert diff <= atol, f"vectors differ by up to {diff}"
    assert verify_store(a) == [] and verify_store(b) == []
    return diff


def copy_project(dst: Path, src: Path = SAMPLE) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def flow_mod():
    from pipelines.runtime import prepare_prefect_env

    prepare_prefect_env(Path(os.environ["PREFECT_HOME"]))
    from pipelines import ingest_flow

    return ingest_flow


@pytest.fixture
def flow_cache(flow_mod, monkeypatch, embedder):
    """The flow process's model cache holds the session's model (workers load their own, once per process)."""
    monkeypatch.setitem(embedders.spec.EMBEDDERS, MODEL_KEY, embedder)
    return embedders.spec.EMBEDDERS


@pytest.fixture(scope="module")
def api_url(flow_mod):
    """One Prefect API server for this module's runs on the shared cluster."""
    from pipelines.api_server import RunApi
    from pipelines.dask_runner import drain_prefect_services

    server = RunApi(Path(os.environ["PREFECT_HOME"]) / "api-server.log").start()
    yield server.wait()
    drain_prefect_services()
    server.stop()


@pytest.fixture
def use_api(api_url):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield api_url


@pytest.fixture(scope="module")
def cluster(flow_mod):
    """A running 2-worker cluster (processes) that the runs connect to by address, as to a cluster started elsewhere:
    its workers did not get PREFECT_API_URL at start; the run hands it over."""
    import distributed

    from pipelines.dask_runner import _quiet_distributed, close_workers

    with _quiet_distributed(), distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                        dashboard_address=None, host="127.0.0.1",
                                                        silence_logs="ERROR") as c:
        yield c
        close_workers(c)


@pytest.fixture(scope="module")
def base(tmp_path_factory, flow_mod, embedder, api_url):
    """The sample project ingested once by the thread runner's flow: (project, stores, summary)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("dask-base")
    proj = copy_project(root / "project")
    with _cached_model(flow_mod, embedder), temporary_settings(updates={PREFECT_API_URL: api_url}):
        state = flow_mod.run_ingest_flow(params(proj, root / "stores"), {"type": "thread"})
    assert state.is_completed(), state
    return proj, root / "stores", state.result()


@contextmanager
def _cached_model(flow_mod, embedder, model: str | None = None):
    key = embedders.EmbedderSpec(model)
    old = embedders.spec.EMBEDDERS.get(key)
    embedders.spec.EMBEDDERS[key] = embedder
    try:
        yield
    finally:
        if old is None:
            embedders.spec.EMBEDDERS.pop(key, None)
        else:
            embedders.spec.EMBEDDERS[key] = old


@pytest.fixture
def work(base, tmp_path):
    proj, stores, _ = base
    project = copy_project(tmp_path / "project", proj)
    return project, copy_stores(stores, tmp_path / "stores", project, symlinks=True)


def _children() -> dict[int, str]:
    """This process's live child processes (pid -> command line)."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out[p.pid] = " ".join(p.cmdline())
        except psutil.Error:
            pass
    return out


def _new_children(before: dict[int, str]) -> dict[int, str]:
    # multiprocessing's resource tracker, started with the first spawned process, lives as long as this process
    return {pid: cmd for pid, cmd in _children().items() if pid not in before and "resource_tracker" not in cmd}


def _worker_facts() -> dict:
    """Runs on a worker: what Prefect there points at, and what it holds."""
    import sys

    facts = {"pid": os.getpid(), "env_api_url": os.environ.get("PREFECT_API_URL"), "servers": 0, "models": {}}
    if "prefect" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        facts["servers"] = sum(1 for s in SubprocessASGIServer._instances.values() if s.running)
    if "pipelines.ingest_flow" in sys.modules:
        # (spec, id) pairs: a dict keyed by specs would reach the test with its keys hashed as Dask decoded them
        facts["models"] = [(k, id(v)) for k, v in sys.modules["woolocal_ingest.embedders.spec"].EMBEDDERS.items()]
    return facts


# ---------------------------------------------------------------------------------------------------------------


def test_dask_run_matches_thread_run_and_cleans_up(tmp_path, base, flow_mod, flow_cache, embedder, monkeypatch):
    """The CLI's path: no address, so the run starts its own LocalCluster (2 processes) and, with no API configured,
    its own Prefect API (or shares this process's ephemeral one, when an earlier test started it); its store equals
    the thread runner's; the shards were .npy files in the run's folder, read back in order; the run leaves no shard
    folder, no worker and no server behind."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _, _, thread_summary = base
    loaded: list[tuple[str, bool, tuple]] = []
    real_load = flow_mod._load_shard

    def spy_load(path, n, dim):  # runs in the flow's process: which shard files the flow read back
        v = real_load(path, n, dim)
        loaded.append((path, Path(path).is_file(), v.shape))
        return v

    monkeypatch.setattr(flow_mod, "_load_shard", spy_load)
    proj, stores = copy_project(tmp_path / "d-project"), tmp_path / "d-stores"
    before = _children()
    t = time.perf_counter()
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no API configured: the run brings its own
        state = flow_mod.run_ingest_flow(params(proj, stores), {"type": "dask", "workers": 2, "shard_chunks": SHARD})
    t_dask = time.perf_counter() - t
    assert state.is_completed(), state
    summary = state.result()
    print(f"\nsample project on dask (LocalCluster x2, API and cluster started cold): {t_dask:.1f}s; "
          f"timings thread {thread_summary['timings']} dask {summary['timings']}")

    for key in ("count", "added", "updated", "unchanged", "deleted", "embedded", "reused", "skipped", "written"):
        assert summary[key] == thread_summary[key], key
    target = store_dir(stores, PROJECT, embedder.info.slug, embedder.dim)
    assert summary["store"] == str(target)
    diff = assert_same_store(target, Path(thread_summary["store"]))
    print(f"largest vector difference dask vs thread: {diff:.2e}")

    n_shards = math.ceil(summary["embedded"] / SHARD)
    assert n_shards >= 3 and summary["timings"]["shards"] == n_shards
    run_dir = stores / PROJECT / f".shards-{state.state_details.flow_run_id}"
    assert [p for p, _, _ in loaded] == [str(run_dir / f"shard-{i:05d}.npy") for i in range(n_shards)]
    assert all(exists for _, exists, _ in loaded)
    assert [s[0] for _, _, s in loaded] == [SHARD] * (n_shards - 1) + [summary["embedded"] - SHARD * (n_shards - 1)]
    assert shard_dirs(stores) == [] and not run_dir.exists()
    deadline = time.time() + 10
    while _new_children(before) and time.time() < deadline:
        time.sleep(0.2)
    assert not _new_children(before), "the run's workers or API server are still running"


def test_dask_on_a_running_cluster_reports_to_one_api(work, tmp_path, flow_mod, flow_cache, embedder, cluster,
                                                      use_api):
    """On a cluster given by address: PREFECT_API_URL reaches the workers, they start no API of their own, every task
    run of the flow is recorded in the one API, each worker loads the model once; an incremental run embeds only the
    changed text and gives the same store as the in-process ingest."""
    import distributed
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    proj, stores = work
    twin_proj = copy_project(tmp_path / "twin", proj)
    twin_stores = copy_stores(stores, tmp_path / "tw-st", twin_proj)
    for p in (proj, twin_proj):
        (p / "history.md").write_text((p / "history.md").read_text(encoding="utf-8")
                                      + "\n## Since then\n\nA pond was dug in 2025 near the south fence.\n")
        (p / "notes" / "2026-05-meeting.md").write_text(
            "# May meeting\n\nThe seed library moved to the green cabinet beside the potting bench.\n")
    cfg = {"type": "dask", "address": cluster.scheduler_address, "shard_chunks": 2}
    state = flow_mod.run_ingest_flow(params(proj, stores), cfg)
    assert state.is_completed(), state
    summary = state.result()
    local = run_ingest(PROJECT, twin_proj, twin_stores, embedder, SETTINGS, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    assert 0 < summary["embedded"] == local.embedded < summary["count"]
    assert summary["timings"]["shards"] == math.ceil(summary["embedded"] / 2)
    for key in ("count", "added", "updated", "unchanged", "deleted", "reused"):
        assert summary[key] == getattr(local, key), key
    assert_same_store(Path(summary["store"]), Path(local.store))
    assert shard_dirs(stores) == []

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    names = sorted(r.name.rsplit("-", 1)[0] for r in runs)
    assert names.count("embed-shard") == summary["timings"]["shards"], names
    assert "load-and-chunk" in names and "discover" in names and "write-store" in names
    assert all(r.state and r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]

    with distributed.Client(cluster.scheduler_address, set_as_default=False) as c:
        facts = c.run(_worker_facts)
    assert len(facts) == 2
    assert all(f["env_api_url"] == use_api for f in facts.values()), facts
    assert all(f["servers"] == 0 for f in facts.values()), "a worker started its own Prefect API"
    assert all(MODEL_KEY in dict(f["models"]) for f in facts.values()), "every worker loads the model (warm-up)"
    from pipelines.dask_runner import PrefectEnvPlugin

    assert PrefectEnvPlugin.name not in cluster.scheduler.worker_plugins, "the run left its plugin on the cluster"

    # Unchanged now: nothing to embed, nothing written, no shard folder left; the workers kept their model.
    before = tree_digest(stores)
    state = flow_mod.run_ingest_flow(params(proj, stores), cfg)
    assert state.is_completed() and state.result()["embedded"] == 0 and not state.result()["written"]
    assert tree_digest(stores) == before and shard_dirs(stores) == []
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as c:
        again = c.run(_worker_facts)
    assert {w: (f["pid"], dict(f["models"])[MODEL_KEY]) for w, f in again.items()} == \
           {w: (f["pid"], dict(f["models"])[MODEL_KEY]) for w, f in facts.items()}, "a worker loaded the model again"


def _broken_model(dst: Path, embedder) -> Path:
    """A copy of the model whose config and tokenizer are fine but whose weights are not: it resolves and chunks,
    and fails where a worker loads the weights to embed."""
    src = embedder.info.path
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".onnx-cache", "*.safetensors", "*.bin", "onnx"))
    (dst / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}" + b"\x00" * 64)
    return dst


def test_failing_shard_fails_the_run_and_keeps_the_store(work, tmp_path, flow_mod, embedder, cluster, use_api):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    proj, stores = work
    broken = _broken_model(tmp_path / "broken-model", embedder)
    # The flow's own process plans with the real model (same store folder, same reuse); only the workers, which
    # embed, load the broken copy.
    (proj / "history.md").write_text("# History\n\nRewritten entirely: the garden began in 1990.\n")
    before = tree_digest(stores)
    with _cached_model(flow_mod, embedder, str(broken)):
        state = flow_mod.run_ingest_flow(params(proj, stores, model=str(broken)),
                                         {"type": "dask", "address": cluster.scheduler_address, "shard_chunks": SHARD})
    assert state.is_failed(), (state.type, state.message)
    with pytest.raises(Exception) as info:
        state.result()
    assert "safetensors" in f"{type(info.value).__module__} {info.value}".lower() or "header" in str(info.value)
    assert tree_digest(stores) == before, "the previous store must be untouched"
    assert shard_dirs(stores) == []
    target = store_dir(stores, PROJECT, embedder.info.slug, embedder.dim)
    assert verify_store(target) == []
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    failed = [r.name for r in runs if r.state and r.state.is_failed()]
    assert failed and all(n.startswith("embed-shard") for n in failed), [(r.name, r.state_type) for r in runs]
