"""Scheduled flows and their Prefect deployments, built from flows.yaml (`woolocal schedule serve`).

Two small wrapper flows read flows.yaml *at run time* (its absolute path is the deployment's parameter), so an edit
to a project's model or a migration's target applies at the next run without a restart (a changed cron needs one):

- `woolocal-scheduled-ingest` (deployment `ingest-<project>`): the ingest flow for one declared project, as a
  subflow. Unchanged files are not embedded again and an unchanged store is not rewritten; the run logs
  "nothing changed" and returns status "unchanged".
- `woolocal-scheduled-migration` (deployment `migrate-<name>`): `woolocal_ingest.migrate.run_migration` of the
  migration's `MigrateRequest` (built from flows.yaml at run time), status "migrated", "unchanged" (the source has
  not changed since the last migration: nothing re-embedded) or "failed" (the flow run ends Failed; the previous
  store keeps serving).

Deployments use module-path entrypoints (`pipelines.schedules.scheduled_ingest`): nothing depends on the working
directory. Each has `concurrency_limit=1` (a run that comes due while the previous one of the same deployment still
runs waits for it). A scheduled ingest also takes a non-blocking file lock on its project's stores folder, and
`migrate_store` takes its own lock on the target: a run that finds a lock held (another server, a manual run) ends
without writing anything.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, get_run_logger

from woolocal_ingest.errors import ConfigError, WoolocalError
from woolocal_ingest.locks import try_lock
from woolocal_ingest.schedules import INGEST_FLOW, MIGRATE_FLOW, declared_jobs

LOCK_NAME = ".woolocal-schedule.lock"


def _log():
    """The flow run's logger; a plain logger when the function runs outside a flow run (`scheduled_ingest.fn`)."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("woolocal.schedules")


def _load(config_path: str):
    from woolocal_ingest.config import load_config

    return load_config(config_path)


def _failed(log, what: str, e: WoolocalError):
    """A run that failed for a reason the library names (bad config, unreadable store, failed verification): one
    error line and a Failed final state, no traceback. The previous store is untouched and keeps serving."""
    from prefect.states import Failed

    log.error("%s failed: %s", what, e)
    return Failed(message=f"{what} failed: {e}")


@flow(name=INGEST_FLOW, persist_result=False, validate_parameters=False, log_prints=False)
def scheduled_ingest(config_path: str, project: str) -> dict:
    """Ingest one project declared in `config_path`; returns {"status": "updated"|"unchanged"|"skipped", ...}
    (a Failed state when it fails)."""
    log = _log()
    try:
        return _ingest(log, config_path, project)
    except WoolocalError as e:
        return _failed(log, f"ingest {project}", e)


@flow(name=MIGRATE_FLOW, persist_result=False, validate_parameters=False, log_prints=False)
def scheduled_migration(config_path: str, migration: str) -> dict:
    """Run one migration declared in `config_path`; returns its summary ({"status": "migrated"|"unchanged"|
    "skipped", ...}; a Failed state when it fails)."""
    log = _log()
    try:
        return _migrate(log, config_path, migration)
    except WoolocalError as e:
        return _failed(log, f"migration {migration}", e)


def _ingest(log, config_path: str, project: str) -> dict:
    from pipelines.ingest_flow import run_ingest_flow
    from pipelines.runtime import flow_result
    from woolocal_ingest.request import IngestRequest

    cfg = _load(config_path)
    proj = cfg.project(project)
    if proj is None:
        raise ConfigError(f"{config_path}: no project named {project!r} any more (restart `woolocal schedule serve` "
                          "after removing a scheduled project)")
    request = IngestRequest.from_config(cfg, proj)  # as `woolocal ingest NAME` builds it
    lock = request.stores_root / proj.name / LOCK_NAME
    with try_lock(lock) as holder:
        if holder is not None:
            log.warning("ingest %s: another run holds %s; skipping this one (nothing touched)", project, lock)
            return {"status": "skipped", "project": project, "reason": f"lock held: {lock}"}
        # Look first (discover, hash, compare with the store): an unchanged project loads no model and runs no
        # subflow. Otherwise a failed subflow re-raises its own error: this run fails, the old store keeps serving.
        from woolocal_ingest.preplan import pre_plan_request

        pre = pre_plan_request(request)
        if pre.nothing_to_do:
            summary = pre.summary()
        else:
            summary = flow_result(run_ingest_flow(request, cfg.task_runner.model_dump()), f"ingest {project}")
    if summary["written"]:
        summary["status"] = "updated"
        log.info("ingest %s: store updated: %s (%d chunks: %d added, %d updated, %d deleted; %d embedded)", project,
                 summary["store"], summary["count"], summary["added"], summary["updated"], summary["deleted"],
                 summary["embedded"])
    else:
        summary["status"] = "unchanged"
        log.info("ingest %s: nothing changed; %s left as it is (%d chunks)", project, summary["store"],
                 summary["count"])
    return summary


def _migrate(log, config_path: str, migration: str) -> dict:
    from woolocal_ingest.migrate import MigrateRequest, MigrationLockedError, run_migration

    cfg = _load(config_path)
    m = cfg.migration(migration)
    if m is None:
        raise ConfigError(f"{config_path}: no migration named {migration!r} any more (restart `woolocal schedule "
                          "serve` after removing a scheduled migration)")
    request = MigrateRequest.declared(m, cfg)
    try:
        summary = run_migration(request, cfg)  # raises on failure: the run fails, the old store serves on
    except MigrationLockedError as e:
        log.warning("migration %s: %s; skipping this run (nothing touched)", migration, e)
        return {"status": "skipped", "name": migration, "reason": str(e)}
    d = summary.to_dict()
    status = d.get("status")
    if status == "failed":
        raise WoolocalError(str(d.get("error") or d.get("message") or d))
    if status == "unchanged":
        log.info("migration %s: nothing changed; %s left as it is (%s)", migration, d.get("store"),
                 d.get("message") or "already migrated")
    else:
        log.info("migration %s: %s %s -> %s (%s chunks, %s embedded, %s problems reported)", migration, status,
                 d.get("source"), d.get("store"), d.get("count"), d.get("embedded"), len(d.get("problems") or []))
    return d


def build_deployments(cfg, config_file: Path) -> list:
    """One RunnerDeployment per scheduled project and migration in `cfg` (read from `config_file`)."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    config_path = str(Path(config_file).resolve())
    out = []
    for j in declared_jobs(cfg):
        fl, key = (scheduled_ingest, "project") if j.kind == "ingest" else (scheduled_migration, "migration")
        out.append(fl.to_deployment(
            j.deployment_name,
            schedules=[Cron(j.cron, timezone=j.timezone)],
            parameters={"config_path": config_path, key: j.name},
            concurrency_limit=1,
            paused=False,
            entrypoint_type=EntrypointType.MODULE_PATH,
            tags=["woolocal", j.kind],
            description=f"woolocal {j.kind} {j.name!r} ({j.target}) from {config_path}",
        ))
    return out


def serve_deployments(deployments: list, api_url: str, limit: int | None = None) -> None:
    """`prefect.serve` against `api_url`; returns when SIGTERM or Ctrl-C stops the runner (schedules paused)."""
    from prefect import serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        serve(*deployments, pause_on_shutdown=True, print_starting_message=True, limit=limit)
