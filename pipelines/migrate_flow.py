"""Prefect flows over woolocal_ingest.migrate: one store (`migrate_flow`) or every declared one (`migrate_all_flow`).

Thin on purpose: reading, re-chunking, checkpointed embedding, locking, verification and the atomic swap all live in
`woolocal_ingest.migrate`; a task here is one store's whole migration (the embedding inside it already uses every
core). Entry points take only JSON-able parameters and a `config_path`, so a deployment does not depend on the
working directory when `config_path` is absolute.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from woolocal_ingest import migrate
from woolocal_ingest.config import load_config
from woolocal_ingest.migrate import MigrateRequest


def _log_summary(s: dict) -> None:
    get_run_logger().info("%s: %s -> %s: %s (%d rows, %d embedded, %d resumed batches)", s.get("name") or s["source"],
                          s["status"], s["store"], s.get("message") or s.get("error") or "", s.get("count", 0),
                          s.get("embedded", 0), s.get("resumed_batches", 0))


@task(name="migrate-store", cache_policy=NO_CACHE, persist_result=False)
def migrate_task(request: dict, config_path: str | None) -> dict:
    """One migration: `request` is a `MigrateRequest.to_dict()`."""
    d = migrate.run_migration(MigrateRequest.from_dict(request), load_config(config_path)).to_dict()
    _log_summary(d)
    return d


@task(name="migrate-declared", cache_policy=NO_CACHE, persist_result=False)
def migrate_one_task(request: dict, config_path: str | None) -> dict:
    """One store of a bulk run; a failure is returned as a summary with status `failed`, so the others go on."""
    d = migrate.run_or_fail(MigrateRequest.from_dict(request), load_config(config_path)).to_dict()
    _log_summary(d)
    return d


@flow(name="woolocal-migrate", validate_parameters=False, log_prints=False, persist_result=False)
def migrate_flow(request: dict, config_path: str | None = None) -> dict:
    """Migrate one store: `request` is the `MigrateRequest` the caller built, as `to_dict()` gives it (a declared
    migration's paths already resolved). Returns the summary; a failed migration fails the flow run."""
    return migrate_task(request, config_path)


@flow(name="woolocal-migrate-all", validate_parameters=False, log_prints=False, persist_result=False)
def migrate_all_flow(dry_run: bool = False, config_path: str | None = None) -> list[dict]:
    """Every flows.yaml migration (else every store under `wooster.root`), one task each, one after another.
    Returns every summary; a failing store does not stop the others (the caller decides the exit status)."""
    config = load_config(config_path)
    jobs = migrate.declared_migrations(config)
    return [migrate_one_task(MigrateRequest.declared(m, config, dry_run=dry_run).to_dict(), config_path)
            for m in jobs]


def run_migrate_flow(request: MigrateRequest | None = None, *, all_stores: bool = False, dry_run: bool = False,
                     config_path: str | None = None):
    """Run `migrate_flow` for `request` (or `migrate_all_flow`) in this process and return its result; a failed run
    re-raises the task's own error (its exit code with it)."""
    from pipelines.runtime import flow_result, flow_settings

    with flow_settings():
        if all_stores:
            state = migrate_all_flow(dry_run=dry_run, config_path=config_path, return_state=True)
        else:
            state = migrate_flow(request=request.to_dict(), config_path=config_path, return_state=True)
    return flow_result(state, "migrate flow")
