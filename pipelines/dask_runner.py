"""The ingest flow on Dask: one Prefect API for the whole run, a LocalCluster (or a running scheduler), shard files.

`pipelines.ingest_flow.run_ingest_flow(params, task_runner)` (what the CLI calls) uses `dask_runtime` here when
flows.yaml says `task_runner: {type: dask}`, which:

1. starts ONE Prefect API server for the run (`pipelines.api_server.RunApi`, which ends with this process even on
   `kill -9`), unless PREFECT_API_URL is set or this process already runs Prefect's ephemeral server, and points this process at it. Prefect ships this process's settings with every task it hands
   to Dask, so task runs on the workers report to that API; the workers also get PREFECT_API_URL in their
   environment before they import prefect, so that no worker starts an ephemeral API server of its own;
2. meanwhile starts a `LocalCluster` (`workers` processes, 1 thread each), or connects to `address` and hands the URL
   to its workers with a worker plugin, and has every worker load the model (once per worker process, kept in
   `embedders.get`, the process's one cache) while the API server is still starting;
3. gives the flow a `DaskTaskRunner` on that scheduler (the flow decorator fixes its task runner at definition time,
   hence `with_options` at call time); the flow embeds in coarse shards that workers write to .npy files;
4. on the way out, whatever the outcome: closes the cluster it started, sends Prefect's pending logs and events, and
   stops the API server it started. (`run_ingest_flow` then removes a shard folder a dead run may have left.)

Workers must see the project and stores folders at the same paths (true for a LocalCluster; for a remote cluster,
a shared filesystem), must be able to import `pipelines` and `woolocal_ingest`, and must reach the Prefect API: for
workers on other machines set PREFECT_API_URL to a Prefect server they can reach (the server started here listens
on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import distributed
from distributed.diagnostics.plugin import WorkerPlugin

if TYPE_CHECKING:  # pragma: no cover
    from woolocal_ingest.embedders import EmbedderSpec

log = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 90  # the most a Prefect API server started here may take to answer


class _Api:
    """The run's Prefect API: its URL at once, `wait()` until it answers (a server started here starts in the
    background, so that the cluster and the workers' model loads overlap its start-up)."""

    def __init__(self, url: str, server=None):
        self.url = url
        self.server = server  # a RunApi started (and to be stopped) here, or None

    def wait(self) -> None:
        if self.server is not None:
            self.url = self.server.wait(timeout=STARTUP_TIMEOUT_S)  # a port lost to a race moves it: follow it

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@contextmanager
def shared_prefect_api() -> Iterator[_Api]:
    """The Prefect API this run's processes share: PREFECT_API_URL when one is configured, else Prefect's ephemeral
    server of this process when an earlier flow already started it, else a server started now (stopped on exit).

    The block gets the URL at once; call `wait()` before using it. Inside the block after `wait()`, use
    `api_settings(api)` to point this process's Prefect at it.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        yield _Api(url)
        return
    from prefect.server.api.server import SubprocessASGIServer

    ephemeral = SubprocessASGIServer()  # Prefect's own ephemeral server for this process (port None)
    if ephemeral.running and ephemeral.server_process is not None and ephemeral.server_process.poll() is None:
        yield _Api(ephemeral.api_url)  # not ours to stop
        return
    # Our own server (not Prefect's SubprocessASGIServer, which outlives a `kill -9` of this process), on its own
    # port: Prefect's in-process ephemeral server, if later flows of this process start one, stays theirs.
    from prefect.settings import PREFECT_HOME

    from pipelines.api_server import RunApi

    api = _Api("", RunApi(Path(PREFECT_HOME.value()) / "api-server.log").start())
    api.url = api.server.url
    try:
        yield api
    finally:
        api.stop()


@contextmanager
def api_settings(api: _Api) -> Iterator[None]:
    """This process's Prefect pointed at `api` (it then serialises that URL into every task it gives Dask)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api.url}):
        try:
            yield
        finally:
            if api.server is not None:
                drain_prefect_services()


def drain_prefect_services(timeout: float = 5.0) -> None:
    """Send the logs and events this process still holds for the API, before that API goes away (otherwise Prefect
    tries at exit, against a server that is gone, and prints 'Error logging to API')."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=timeout, at_exit=False)
        except Exception:  # best effort: the run's outcome is already decided
            pass


def worker_env(api_url: str) -> dict[str, str]:
    """Set in each worker process before it imports prefect (Prefect reads its settings at import time).

    A LocalCluster's workers inherit the rest of this process's environment (PREFECT_HOME, log levels, HF_HUB_OFFLINE);
    only the API URL, which exists in this process as a setting and not in its environment, has to be handed over.
    """
    return {"PREFECT_API_URL": api_url, "DASK_LOGGING__DISTRIBUTED": _dask_log_level()}


def _dask_log_level() -> str:
    """distributed's own INFO chatter only with -v (Prefect's log level INFO), else errors only."""
    return "WARNING" if os.environ.get("PREFECT_LOGGING_LEVEL", "").upper() in ("DEBUG", "INFO") else "ERROR"


@contextmanager
def _quiet_distributed(level: str | None = None) -> Iterator[None]:
    logger = logging.getLogger("distributed")
    old = logger.level
    logger.setLevel(level or _dask_log_level())
    try:
        yield
    finally:
        logger.setLevel(old)


class PrefectEnvPlugin(WorkerPlugin):
    """Sets the run's environment on every worker of a cluster we did not start, including ones that join later."""

    name = "woolocal-prefect-env"

    def __init__(self, env: Mapping[str, str]):
        self.env = dict(env)

    def setup(self, worker) -> None:  # noqa: ARG002 - WorkerPlugin interface
        os.environ.update(self.env)


@contextmanager
def dask_cluster(cfg: Mapping[str, Any], api_url: str) -> Iterator[distributed.Client]:
    """A client of the cluster to run on: `cfg['address']`, or a LocalCluster started (and closed) here."""
    env = worker_env(api_url)
    if cfg.get("address"):
        # Workers of a cluster we did not start: they may have imported prefect already (their background services
        # then keep the URL prefect was imported with), but the settings Prefect ships with each task carry ours.
        host = cfg["address"].split("://")[-1].rsplit(":", 1)[0]
        if "127.0.0.1" in api_url and host not in ("127.0.0.1", "localhost"):
            log.warning("the Prefect API is at %s, which workers on other machines cannot reach: set "
                        "PREFECT_API_URL to a Prefect server they can", api_url)
        with _quiet_distributed(), distributed.Client(cfg["address"], set_as_default=False, timeout=30) as client:
            client.register_plugin(PrefectEnvPlugin(env), name=PrefectEnvPlugin.name)
            try:
                yield client
            finally:
                try:
                    client.unregister_worker_plugin(PrefectEnvPlugin.name)
                except Exception:  # the scheduler is gone: nothing left to undo
                    pass
        return
    with _quiet_distributed(), distributed.LocalCluster(
            n_workers=int(cfg.get("workers") or 2), threads_per_worker=1, processes=True, env=env,
            dashboard_address=None, host="127.0.0.1", silence_logs=_dask_log_level()) as cluster:
        try:
            with distributed.Client(cluster, set_as_default=False) as client:
                yield client
        finally:
            close_workers(cluster)


def close_workers(cluster, timeout: float = 1.0) -> None:
    """The run's work is on disk by now: stop the workers without waiting for each to tear torch down at its own
    pace (seconds; the nanny would only kill it after 4 s anyway)."""
    with _quiet_distributed("ERROR"):
        try:
            cluster.sync(_close_workers, cluster, timeout)
        except Exception:
            pass


async def _close_workers(cluster, timeout: float) -> None:
    await asyncio.gather(*(w.close(timeout=timeout) for w in list(cluster.workers.values())),
                         return_exceptions=True)


def warm_worker(spec: "EmbedderSpec") -> int:
    """Runs on a worker: load the model into the worker's cache now, while the Prefect API is still starting.
    Errors are left for the real tasks to raise (and report)."""
    from woolocal_ingest import embedders

    try:
        emb = embedders.get(spec)
        _ = emb.tokens  # the tokenizer, and the weights of a local backend (both lazy)
        emb.load()
    except Exception:
        pass
    return os.getpid()


def warm_workers(client: distributed.Client, spec: "EmbedderSpec") -> list:
    """One `warm_worker` per worker, pinned to it; returns the futures (keep them until the run starts)."""
    return [client.submit(warm_worker, spec, workers=[w], allow_other_workers=False, pure=False)
            for w in client.nthreads()]


def dask_task_runner(address: str):
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)


@contextmanager
def dask_runtime(cfg: Mapping[str, Any], model_spec: "EmbedderSpec | None" = None) -> Iterator[Any]:
    """A DaskTaskRunner for one run, with the shared Prefect API and the cluster around it (all closed on exit).

    `model_spec`: the embedder the workers load while the API server starts.
    """
    with ExitStack() as stack:
        api = stack.enter_context(shared_prefect_api())
        client = stack.enter_context(dask_cluster(cfg, api.url))
        warm = warm_workers(client, model_spec) if model_spec is not None else []
        api.wait()
        stack.enter_context(api_settings(api))
        stack.callback(client.cancel, warm)  # still loading when the run ends (a failed run): drop it
        yield dask_task_runner(client.scheduler.address)
