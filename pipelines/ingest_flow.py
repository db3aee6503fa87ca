"""Prefect flow: ingest one project into its dimension-tagged store (coarse tasks over woolocal_ingest functions)."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from woolocal_ingest import embedders, ingest
from woolocal_ingest.chunking import ChunkSettings
from woolocal_ingest.documents import SourceOptions
from woolocal_ingest.errors import WoolocalError
from woolocal_ingest.embedders import EmbedderSpec
from woolocal_ingest.stores import StoreChangedError

SHARDS_PREFIX = ".shards-"  # <stores_root>/<project>/.shards-<flow-run-id>/: a dask run's vectors, one .npy per shard

def preload_embedder(params: dict):
    """Build the embedder the flow's tasks will use for `params` (ingest_flow's) and load its model now, in this
    process (a fallback whose primary cannot load switches here): the CLI does this while the API server starts."""
    return embedders.get(_model_spec(**params)).ensure_ready().load()


@task(name="discover", cache_policy=NO_CACHE, persist_result=False)
def discover_task(project, root, stores_root, spec, chunk_tokens, overlap_tokens,
                  include, exclude, python_layout, rebuild=False, sources=None, move=False):
    emb = embedders.get(spec)
    emb.ensure_ready()  # a fallback embedder whose primary cannot load switches before anything is planned
    return ingest.plan_ingest(project, Path(root), Path(stores_root), emb, ChunkSettings(chunk_tokens, overlap_tokens),
                              include, exclude, python_layout, rebuild, sources=SourceOptions.from_dict(sources),
                              move=move)


@task(name="load-and-chunk", cache_policy=NO_CACHE, persist_result=False)
def load_chunk_task(root, rels, spec, chunk_tokens, overlap_tokens, sources=None):
    return ingest.load_and_chunk(Path(root), rels, embedders.get(spec),
                                 ChunkSettings(chunk_tokens, overlap_tokens), SourceOptions.from_dict(sources))


@task(name="embed-batch", cache_policy=NO_CACHE, persist_result=False)
def embed_task(texts, spec, stores_root=None, cache=None):
    """(vectors, cache hits) of one batch, embedded in this process behind the embedding cache `cache`."""
    emb = ingest.with_cache(embedders.get(spec), stores_root, cache)
    t = time.perf_counter()
    vectors = ingest.embed_texts(emb, texts)
    dt = time.perf_counter() - t
    get_run_logger().info("embedded %d texts in %.1fs (%.1f/s, %d from the cache)", len(texts), dt,
                          len(texts) / dt if dt else 0.0, emb.hits)
    return vectors, emb.hits


@task(name="embed-shard", cache_policy=NO_CACHE, persist_result=False)
def embed_shard_task(texts, path, spec, stores_root=None, cache=None):
    """Embed one shard of texts (behind the embedding cache `cache`) and write its vectors to `path` (.npy,
    atomically); returns {"path", "cached": cache hits}: the path, not the array.

    The shard folder is made by the flow and never here: once the flow has removed it (after a failure) a late
    shard cannot bring it back.
    """
    emb = ingest.with_cache(embedders.get(spec), stores_root, cache)
    vectors = np.ascontiguousarray(ingest.embed_texts(emb, texts), dtype=np.float32)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            np.save(f, vectors, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(path), "cached": emb.hits, "model": emb.model_name, "generation": emb.generation}


def _load_shard(path: str, n: int, dim: int) -> np.ndarray:
    v = np.load(path, allow_pickle=False)
    if v.shape != (n, dim) or v.dtype != np.float32:
        raise WoolocalError(f"{path}: shard holds {v.dtype}{list(v.shape)}, expected float32[{n}, {dim}]")
    return v


@task(name="write-store", cache_policy=NO_CACHE, persist_result=False)
def write_task(plan, loaded, texts, vectors, spec):
    return ingest.assemble_and_write(plan, loaded, texts, vectors, embedders.get(spec))


def runner_settings(cfg: Any = None) -> dict:
    """`task_runner` from flows.yaml (a TaskRunnerConfig, a dict or None) as a validated plain dict."""
    from pydantic import BaseModel, ValidationError

    from woolocal_ingest.config import TaskRunnerConfig
    from woolocal_ingest.errors import ConfigError

    if cfg is None:
        return TaskRunnerConfig().model_dump()
    if isinstance(cfg, BaseModel):
        return TaskRunnerConfig(**cfg.model_dump()).model_dump()
    try:
        return TaskRunnerConfig(**dict(cfg)).model_dump()
    except ValidationError as e:
        msgs = "; ".join(f"task_runner.{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(msgs) from None


def remove_shards(stores_root: str | os.PathLike, project: str, run_id: str) -> None:
    """Remove the shard folder of flow run `run_id` under `<stores_root>/<project>`, if it is there."""
    d = Path(stores_root) / project / f"{SHARDS_PREFIX}{run_id}"
    if d.exists():
        remove_tree(d)


def remove_tree(path: Path, attempts: int = 5) -> None:
    """rmtree that tolerates a writer racing it (a shard finishing while the folder is removed)."""
    for i in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05 * (i + 1))


def _model_spec(model=None, backend="auto", batch_size=32, purpose=None, purpose_name=None, model_override=None,
                backend_override=None, **_ignored) -> EmbedderSpec:
    """The EmbedderSpec every task gets its embedder for (`embedders.get`)."""
    if purpose is None:
        return EmbedderSpec(model, backend, batch_size=batch_size)
    from woolocal_ingest.config import PurposeConfig

    return EmbedderSpec.resolve(PurposeConfig(**purpose), purpose_name or "projects", model=model_override,
                                backend=backend_override)


def _flow_run_id() -> str:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else uuid.uuid4().hex


def _shard_mode(task_runner: dict | None) -> int:
    """Chunks per shard when the embedding runs as shard tasks (task_runner type dask), else 0 (inline batches)."""
    if not task_runner or task_runner.get("type", "thread") == "thread":
        return 0
    from woolocal_ingest.config import TaskRunnerConfig

    return int(task_runner.get("shard_chunks") or TaskRunnerConfig().shard_chunks)


def _discard(futures) -> None:
    """A run that failed: stop shard tasks that have not started (running ones end on their own)."""
    for f in futures:
        inner = getattr(f, "wrapped_future", None)
        try:
            if inner is not None and not inner.done():
                inner.cancel()
        except Exception:  # the cluster is already gone
            pass


@flow(name="woolocal-ingest", task_runner=ThreadPoolTaskRunner(max_workers=2), validate_parameters=False,
      log_prints=False, persist_result=False)
def ingest_flow(project: str, root: str, stores_root: str, model: str | None = None, backend: str = "auto",
                batch_size: int = 32, chunk_tokens: int = 200, overlap_tokens: int = 32,
                include: list[str] | None = None, exclude: list[str] | None = None,
                python_layout: bool = False, task_runner: dict | None = None, rebuild: bool = False,
                purpose: dict | None = None, purpose_name: str | None = None, model_override: str | None = None,
                backend_override: str | None = None, cache: dict | None = None, sources: dict | None = None,
                move: bool = False) -> dict:
    """Discover → load+chunk per file group (concurrent) → embed → write; returns the run summary.

    `task_runner` (flows.yaml's, as a dict): with type thread (or None) the embedding runs in this process in batches
    of EMBED_TASK_SIZE. With type dask it runs as `embed-shard` tasks of `shard_chunks` chunks submitted to the
    flow's task runner (a DaskTaskRunner given by `run_ingest_flow`); each writes its vectors to
    `<stores_root>/<project>/.shards-<flow-run-id>/shard-NNNNN.npy` and returns the path, and the shards are read
    back in order. The folder is removed when the run ends, whatever the outcome.

    `purpose`, `purpose_name`, `model_override`, `backend_override` (the CLI's): build the embedder from flows.yaml's
    purpose as `--no-prefect` does; `rebuild`: re-embed everything (see `ingest.plan_ingest`); `cache`: the embedding
    cache (flows.yaml's `cache` as a dict; None = none), used wherever the embedding runs; `sources`: SourceOptions
    as a dict (ignore files, secrets, size limit); `move`: the project folder moved (see `ingest.check_source_root`).
    """
    from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE

    log = get_run_logger()
    m = _model_spec(model, backend, batch_size, purpose, purpose_name, model_override, backend_override)
    shard_chunks = _shard_mode(task_runner)
    t0 = time.perf_counter()
    plan = discover_task(project, root, stores_root, m, chunk_tokens, overlap_tokens,
                         tuple(include or DEFAULT_INCLUDE), tuple(exclude or DEFAULT_EXCLUDE), python_layout, rebuild,
                         sources, move)
    t_plan = time.perf_counter() - t0
    generation = embedders.get(m).generation  # a fallback switch after this means: re-embed everything
    log.info("%s: %d files to load, %d unchanged, %d deleted", project, len(plan.to_load), len(plan.unchanged),
             len(plan.deleted))
    # Load+chunk tasks run concurrently on the task runner while earlier groups are being embedded.
    futures = [load_chunk_task.submit(plan.root, g, m, chunk_tokens, overlap_tokens, sources)
               for g in plan.load_groups()]
    loaded, texts, vectors, seen = [], [], [], set()
    cached = 0
    t_wait = t_embed = 0.0
    shard_dir = plan.target.parent / f"{SHARDS_PREFIX}{_flow_run_id()}" if shard_chunks else None
    shards: list = []  # (future, n) per shard, in text order
    pending: list[str] = []

    def submit_shard(part: list[str]) -> None:
        if not shards:  # made here, by the flow, never by a shard task (see embed_shard_task)
            shard_dir.mkdir(parents=True, exist_ok=False)
        path = shard_dir / f"shard-{len(shards):05d}.npy"
        shards.append((embed_shard_task.submit(part, str(path), m, stores_root, cache), len(part)))

    try:
        texts += ingest.adopted_texts(plan, seen)  # rows other writers added or rewrote: embedded with our model
        if shard_dir is not None:
            pending += texts
        for f in futures:
            t = time.perf_counter()
            group = f.result()  # a failed task raises here and fails the flow
            t_wait += time.perf_counter() - t
            loaded.append(group)
            new = ingest.texts_to_embed(plan, group, seen)
            texts += new
            if shard_dir is not None:  # shards start as soon as a shard's worth of texts is known
                t = time.perf_counter()
                pending += new
                while len(pending) >= shard_chunks:
                    submit_shard(pending[:shard_chunks])
                    pending = pending[shard_chunks:]
                t_embed += time.perf_counter() - t
        # Every chunk is known before the bar starts: its total, rate and ETA are right from the first update.
        # (Chunking is ~3% of a first ingest; waiting for it costs less than a bar whose total keeps growing.)
        ingest.emit_progress("total+", len(texts))
        if shard_dir is None:
            t = time.perf_counter()
            for b in ingest.batched(texts, ingest.EMBED_TASK_SIZE):
                v, hits = embed_task(list(b), m, stores_root, cache)
                vectors.append(v)
                cached += hits
            t_embed += time.perf_counter() - t
        if shard_dir is not None:
            t = time.perf_counter()
            if pending:
                submit_shard(pending)
            dim = embedders.get(m).dim
            for f, n in shards:
                done = f.result()  # a failed shard raises here and fails the flow
                if done["generation"] or done["model"] != plan.model["name"]:
                    raise WoolocalError(
                        f"shard {done['path']} was embedded by {done['model']} (a fallback on a worker), the store is "
                        f"for {plan.model['name']}: refusing to mix two models in one store; run ingest again")
                vectors.append(_load_shard(done["path"], n, dim))
                cached += done["cached"]
                ingest.emit_progress("embedded", n)
            t_embed += time.perf_counter() - t
            log.info("%s: %d texts embedded in %d shards", project, len(texts), len(shards))
        if embedders.get(m).generation != generation:
            # The primary failed mid-run and the fallback took over: it re-embeds the whole store, into its own
            # model's store (the same steps, in this process), so no store mixes two models.
            log.warning("%s: embedder switched to its fallback mid-run; re-embedding everything with it", project)
            return ingest.run_ingest(project, Path(root), Path(stores_root), embedders.get(m),
                                     ChunkSettings(chunk_tokens, overlap_tokens), tuple(include or DEFAULT_INCLUDE),
                                     tuple(exclude or DEFAULT_EXCLUDE), python_layout, True, cache,
                                     SourceOptions.from_dict(sources), move).to_dict()
        try:
            summary = write_task(plan, loaded, texts, vectors, m)
        except StoreChangedError:
            # Wooster (or another writer) saved into the store while this run worked: nothing was swapped in.
            # Plan again and adopt its write, in this process (the embedding cache serves what is already done).
            log.warning("%s: the store was written by another program during the run; adopting that write", project)
            return ingest.run_ingest(project, Path(root), Path(stores_root), embedders.get(m),
                                     ChunkSettings(chunk_tokens, overlap_tokens), tuple(include or DEFAULT_INCLUDE),
                                     tuple(exclude or DEFAULT_EXCLUDE), python_layout, rebuild, cache,
                                     SourceOptions.from_dict(sources), move).to_dict()
    except BaseException:
        _discard([f for f, _ in shards])
        raise
    finally:
        if shard_dir is not None and shard_dir.exists():
            remove_tree(shard_dir)
    # load_chunk: time the flow waited on chunking (the rest of it overlapped embedding)
    summary.timings.update(plan=round(t_plan, 3), load_chunk=round(t_wait, 3), embed=round(t_embed, 3))
    summary.cached = cached
    if shard_dir is not None:
        summary.timings["shards"] = len(shards)
    else:  # on Dask the batches were padded in the workers' processes
        summary.padding_waste = ingest.padding_waste(embedders.get(m))
    log.info("%s: %d chunks (%d embedded)", summary.store, summary.count, summary.embedded)
    return summary.to_dict()


def run_ingest_flow(params: dict, task_runner=None, return_state: bool = True):
    """Run `ingest_flow(**params)` on flows.yaml's `task_runner` (a TaskRunnerConfig, a dict, or None = thread).

    thread: the flow as declared (ThreadPoolTaskRunner). dask: the same flow with a DaskTaskRunner given at call time
    (`with_options`), on `address` or on a LocalCluster of `workers` processes started for this run, with one Prefect
    API shared by this process and the workers (see `pipelines.dask_runner`). Returns the final state
    (`return_state`) or the summary dict.
    """
    from pipelines.runtime import flow_settings

    cfg = runner_settings(task_runner)
    if cfg["type"] != "dask":
        with flow_settings():
            return ingest_flow(**params, task_runner=cfg, return_state=return_state)
    from pipelines.dask_runner import dask_runtime

    state = None
    try:
        with dask_runtime(cfg, _model_spec(**params)) as runner, flow_settings():
            state = ingest_flow.with_options(task_runner=runner)(**params, task_runner=cfg, return_state=True)
    finally:
        # The flow removes its shard folder itself; this catches one left by a run that died mid-way (a LocalCluster
        # is closed by now, so nothing writes into it any more).
        if state is not None and state.state_details.flow_run_id is not None:
            remove_shards(params["stores_root"], params["project"], str(state.state_details.flow_run_id))
    return state if return_state else state.result()
