"""Prefect flow: ingest one project into its dimension-tagged store (coarse tasks over woolocal_ingest functions)."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from woolocal_ingest import ingest
from woolocal_ingest.chunking import ChunkSettings
from woolocal_ingest.embedders import load_embedder

# One embedder per (model, backend) per process: loading a model costs seconds, tasks share it.
_EMBEDDERS: dict = {}


def _embedder(model: str | None, backend: str, batch_size: int):
    key = (model, backend, batch_size)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = load_embedder(model, backend=backend, batch_size=batch_size)
    return _EMBEDDERS[key]


@task(name="discover", cache_policy=NO_CACHE, persist_result=False)
def discover_task(project, root, stores_root, model, backend, batch_size, chunk_tokens, overlap_tokens, include,
                  exclude, python_layout):
    emb = _embedder(model, backend, batch_size)
    return ingest.plan_ingest(project, Path(root), Path(stores_root), emb, ChunkSettings(chunk_tokens, overlap_tokens),
                              include, exclude, python_layout)


@task(name="load-and-chunk", cache_policy=NO_CACHE, persist_result=False)
def load_chunk_task(root, rels, model, backend, batch_size, chunk_tokens, overlap_tokens):
    return ingest.load_and_chunk(Path(root), rels, _embedder(model, backend, batch_size),
                                 ChunkSettings(chunk_tokens, overlap_tokens))


@task(name="embed-batch", cache_policy=NO_CACHE, persist_result=False)
def embed_task(texts, model, backend, batch_size):
    return ingest.embed_texts(_embedder(model, backend, batch_size), texts)


@task(name="write-store", cache_policy=NO_CACHE, persist_result=False)
def write_task(plan, loaded, texts, vectors, model, backend, batch_size):
    return ingest.assemble_and_write(plan, loaded, texts, vectors, _embedder(model, backend, batch_size))


@flow(name="woolocal-ingest", task_runner=ThreadPoolTaskRunner(max_workers=2), validate_parameters=False,
      log_prints=False, persist_result=False)
def ingest_flow(project: str, root: str, stores_root: str, model: str | None = None, backend: str = "auto",
                batch_size: int = 32, chunk_tokens: int = 200, overlap_tokens: int = 32,
                include: list[str] | None = None, exclude: list[str] | None = None,
                python_layout: bool = False) -> dict:
    """Discover → load+chunk per file group (concurrent) → embed per batch → write; returns the run summary."""
    from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE

    log = get_run_logger()
    m = (model, backend, batch_size)
    t0 = time.perf_counter()
    plan = discover_task(project, root, stores_root, *m, chunk_tokens, overlap_tokens,
                         tuple(include or DEFAULT_INCLUDE), tuple(exclude or DEFAULT_EXCLUDE), python_layout)
    t_plan = time.perf_counter() - t0
    log.info("%s: %d files to load, %d unchanged, %d deleted", project, len(plan.to_load), len(plan.unchanged),
             len(plan.deleted))
    # Load+chunk tasks run concurrently on the thread runner while earlier groups are being embedded.
    futures = [load_chunk_task.submit(plan.root, g, *m, chunk_tokens, overlap_tokens) for g in plan.load_groups()]
    loaded, texts, vectors, seen = [], [], [], set()
    t_wait = t_embed = 0.0
    for f in futures:
        t = time.perf_counter()
        group = f.result()  # a failed task raises here and fails the flow
        t_wait += time.perf_counter() - t
        loaded.append(group)
        new = ingest.texts_to_embed(plan, group, seen)
        ingest._emit("total+", len(new))
        texts += new
        t = time.perf_counter()
        vectors += [embed_task(list(b), *m) for b in ingest.batched(new, ingest.EMBED_TASK_SIZE)]
        t_embed += time.perf_counter() - t
    summary = write_task(plan, loaded, texts, vectors, *m)
    # load_chunk: time the flow waited on chunking (the rest of it overlapped embedding)
    summary.timings.update(plan=round(t_plan, 3), load_chunk=round(t_wait, 3), embed=round(t_embed, 3))
    log.info("%s: %d chunks (%d embedded)", summary.store, summary.count, summary.embedded)
    return summary.to_dict()
