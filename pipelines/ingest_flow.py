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
from woolocal_ingest.errors import WoolocalError
from woolocal_ingest.ingest import IngestPlan, ProgressFn
from woolocal_ingest.request import IngestRequest
from woolocal_ingest.stores import StoreChangedError

SHARDS_PREFIX = ".shards-"  # <stores_root>/<project>/.shards-<flow-run-id>/: a dask run's vectors, one .npy per shard


@task(name="discover", cache_policy=NO_CACHE, persist_result=False)
def discover_task(r: IngestRequest) -> IngestPlan:
    emb = embedders.get(r.embedder)
    emb.ensure_ready()  # a fallback embedder whose primary cannot load switches before anything is planned
    return ingest.plan_ingest(r.project, r.root, r.stores_root, emb, r.chunking, r.include, r.exclude, r.python_layout,
                              r.rebuild, sources=r.sources, move=r.move)


@task(name="load-and-chunk", cache_policy=NO_CACHE, persist_result=False)
def load_chunk_task(r: IngestRequest, root: Path, rels: list[str]):
    return ingest.load_and_chunk(root, rels, embedders.get(r.embedder), r.chunking, r.sources)


@task(name="embed-batch", cache_policy=NO_CACHE, persist_result=False)
def embed_task(texts: list[str], r: IngestRequest, progress: ProgressFn | None = None):
    """(vectors, cache hits) of one batch, embedded in this process behind the request's embedding cache."""
    emb = ingest.with_cache(embedders.get(r.embedder), r.stores_root, r.cache)
    t = time.perf_counter()
    vectors = ingest.embed_texts(emb, texts, progress)
    dt = time.perf_counter() - t
    get_run_logger().info("embedded %d texts in %.1fs (%.1f/s, %d from the cache)", len(texts), dt,
                          len(texts) / dt if dt else 0.0, emb.hits)
    return vectors, emb.hits


@task(name="embed-shard", cache_policy=NO_CACHE, persist_result=False)
def embed_shard_task(texts: list[str], path: str, r: IngestRequest) -> dict:
    """Embed one shard of texts (behind the request's embedding cache) and write its vectors to `path` (.npy,
    atomically); returns {"path", "cached": cache hits}: the path, not the array.

    The shard folder is made by the flow and never here: once the flow has removed it (after a failure) a late
    shard cannot bring it back.
    """
    emb = ingest.with_cache(embedders.get(r.embedder), r.stores_root, r.cache)
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
def write_task(plan, loaded, texts, vectors, r: IngestRequest):
    return ingest.assemble_and_write(plan, loaded, texts, vectors, embedders.get(r.embedder))


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


class _Shards:
    """A Dask run's `embed-shard` tasks: texts are cut into shards of `size` as they become known, each submitted
    at once; its vectors go to `<dir>/shard-NNNNN.npy`, made by the flow (never by a shard task)."""

    def __init__(self, folder: Path, size: int, request: IngestRequest):
        self.folder, self.size, self.request = folder, size, request
        self.submitted: list = []  # (future, n) per shard, in text order
        self.pending: list[str] = []

    def add(self, texts: list[str]) -> None:
        self.pending += texts
        while len(self.pending) >= self.size:
            self._submit(self.pending[:self.size])
            self.pending = self.pending[self.size:]

    def finish(self) -> None:
        """Submit what is left (the last, shorter shard)."""
        if self.pending:
            self._submit(self.pending)
            self.pending = []

    def _submit(self, part: list[str]) -> None:
        if not self.submitted:  # made here, by the flow, never by a shard task (see embed_shard_task)
            self.folder.mkdir(parents=True, exist_ok=False)
        path = self.folder / f"shard-{len(self.submitted):05d}.npy"
        self.submitted.append((embed_shard_task.submit(part, str(path), self.request), len(part)))


def _embed_inline(texts: list[str], r: IngestRequest, progress: ProgressFn | None) -> tuple[list[np.ndarray], int]:
    """Thread runner: the texts embedded in this process in batches of EMBED_TASK_SIZE; (vectors, cache hits)."""
    vectors, cached = [], 0
    for b in ingest.batched(texts, ingest.EMBED_TASK_SIZE):
        v, hits = embed_task(list(b), r, progress)
        vectors.append(v)
        cached += hits
    return vectors, cached


def _embed_sharded(shards: _Shards, plan: IngestPlan, progress: ProgressFn | None) -> tuple[list[np.ndarray], int]:
    """Dask: the last shard submitted, then every shard's vectors read back in order; (vectors, cache hits). A shard
    embedded by another model than the plan's (a fallback on a worker) fails the run."""
    shards.finish()
    dim = embedders.get(shards.request.embedder).dim
    vectors, cached = [], 0
    for f, n in shards.submitted:
        done = f.result()  # a failed shard raises here and fails the flow
        if done["generation"] or done["model"] != plan.model["name"]:
            raise WoolocalError(
                f"shard {done['path']} was embedded by {done['model']} (a fallback on a worker), the store is "
                f"for {plan.model['name']}: refusing to mix two models in one store; run ingest again")
        vectors.append(_load_shard(done["path"], n, dim))
        cached += done["cached"]
        if progress:
            progress("embedded", n)
    return vectors, cached


@flow(name="woolocal-ingest", task_runner=ThreadPoolTaskRunner(max_workers=2), validate_parameters=False,
      log_prints=False, persist_result=False)
def ingest_flow(request: dict, task_runner: dict | None = None, progress: ProgressFn | None = None) -> dict:
    """Discover → load+chunk per file group (concurrent) → embed → write; returns the run summary.

    `request`: an IngestRequest as `to_dict()` (a JSON parameter). `task_runner` (flows.yaml's, as a dict): with
    type thread (or None) the embedding runs in this process in batches of EMBED_TASK_SIZE (`_embed_inline`). With
    type dask it runs as `embed-shard` tasks of `shard_chunks` chunks submitted to the flow's task runner (a
    DaskTaskRunner given by `run_ingest_flow`; `_embed_sharded`); each writes its vectors to
    `<stores_root>/<project>/.shards-<flow-run-id>/shard-NNNNN.npy` and returns the path, and the shards are read
    back in order. The folder is removed when the run ends, whatever the outcome. `progress` gets ("total+", n) and
    ("embedded", n) in this process (the CLI's bar).
    """
    r = IngestRequest.from_dict(request)
    log = get_run_logger()
    shard_chunks = _shard_mode(task_runner)
    t0 = time.perf_counter()
    plan = discover_task(r)
    t_plan = time.perf_counter() - t0
    generation = embedders.get(r.embedder).generation  # a fallback switch after this means: re-embed everything
    log.info("%s: %d files to load, %d unchanged, %d deleted", r.project, len(plan.to_load), len(plan.unchanged),
             len(plan.deleted))
    # Load+chunk tasks run concurrently on the task runner while earlier groups are being embedded.
    futures = [load_chunk_task.submit(r, plan.root, g) for g in plan.load_groups()]
    loaded, texts, seen = [], [], set()
    t_wait = t_embed = 0.0
    shards = (_Shards(plan.target.parent / f"{SHARDS_PREFIX}{_flow_run_id()}", shard_chunks, r) if shard_chunks
              else None)
    try:
        texts += ingest.adopted_texts(plan, seen)  # rows other writers added or rewrote: embedded with our model
        if shards is not None:
            shards.add(texts)
        for f in futures:
            t = time.perf_counter()
            group = f.result()  # a failed task raises here and fails the flow
            t_wait += time.perf_counter() - t
            loaded.append(group)
            new = ingest.texts_to_embed(plan, group, seen)
            texts += new
            if shards is not None:  # shards start as soon as a shard's worth of texts is known
                t = time.perf_counter()
                shards.add(new)
                t_embed += time.perf_counter() - t
        # Every chunk is known before the bar starts: its total, rate and ETA are right from the first update.
        # (Chunking is ~3% of a first ingest; waiting for it costs less than a bar whose total keeps growing.)
        if progress:
            progress("total+", len(texts))
        t = time.perf_counter()
        if shards is None:
            vectors, cached = _embed_inline(texts, r, progress)
        else:
            vectors, cached = _embed_sharded(shards, plan, progress)
            log.info("%s: %d texts embedded in %d shards", r.project, len(texts), len(shards.submitted))
        t_embed += time.perf_counter() - t
        if embedders.get(r.embedder).generation != generation:
            # The primary failed mid-run and the fallback took over: it re-embeds the whole store, into its own
            # model's store (the same steps, in this process), so no store mixes two models.
            log.warning("%s: embedder switched to its fallback mid-run; re-embedding everything with it", r.project)
            return ingest.run_request(r.with_rebuild(), progress=progress).to_dict()
        try:
            summary = write_task(plan, loaded, texts, vectors, r)
        except StoreChangedError:
            # Wooster (or another writer) saved into the store while this run worked: nothing was swapped in.
            # Plan again and adopt its write, in this process (the embedding cache serves what is already done).
            log.warning("%s: the store was written by another program during the run; adopting that write",
                        r.project)
            return ingest.run_request(r, progress=progress).to_dict()
    except BaseException:
        _discard([f for f, _ in shards.submitted] if shards is not None else [])
        raise
    finally:
        if shards is not None and shards.folder.exists():
            remove_tree(shards.folder)
    # load_chunk: time the flow waited on chunking (the rest of it overlapped embedding)
    summary.timings.update(plan=round(t_plan, 3), load_chunk=round(t_wait, 3), embed=round(t_embed, 3))
    summary.cached = cached
    if shards is not None:
        summary.timings["shards"] = len(shards.submitted)
    else:  # on Dask the batches were padded in the workers' processes
        summary.padding_waste = ingest.padding_waste(embedders.get(r.embedder))
    log.info("%s: %d chunks (%d embedded)", summary.store, summary.count, summary.embedded)
    return summary.to_dict()


def run_ingest_flow(request: IngestRequest, task_runner=None, return_state: bool = True,
                    progress: ProgressFn | None = None):
    """Run `ingest_flow` for `request` on flows.yaml's `task_runner` (a TaskRunnerConfig, a dict, or None = thread).

    thread: the flow as declared (ThreadPoolTaskRunner). dask: the same flow with a DaskTaskRunner given at call time
    (`with_options`), on `address` or on a LocalCluster of `workers` processes started for this run, with one Prefect
    API shared by this process and the workers (see `pipelines.dask_runner`). Returns the final state
    (`return_state`) or the summary dict.
    """
    from pipelines.runtime import flow_settings

    cfg = runner_settings(task_runner)
    if cfg["type"] != "dask":
        with flow_settings():
            return ingest_flow(request.to_dict(), task_runner=cfg, progress=progress, return_state=return_state)
    from pipelines.dask_runner import dask_runtime

    state = None
    try:
        with dask_runtime(cfg, request.embedder) as runner, flow_settings():
            state = ingest_flow.with_options(task_runner=runner)(request.to_dict(), task_runner=cfg, progress=progress,
                                                                 return_state=True)
    finally:
        # The flow removes its shard folder itself; this catches one left by a run that died mid-way (a LocalCluster
        # is closed by now, so nothing writes into it any more).
        if state is not None and state.state_details.flow_run_id is not None:
            remove_shards(request.stores_root, request.project, str(state.state_details.flow_run_id))
    return state if return_state else state.result()
