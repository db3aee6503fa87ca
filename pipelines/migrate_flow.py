"""Prefect flows over woolocal_ingest.migrate: one store (`migrate_flow`) or every declared one (`migrate_all_flow`).

Thin on purpose: reading, re-chunking, checkpointed embedding, locking, verification and the atomic swap all live in
`woolocal_ingest.migrate`; a task here is one store's whole migration (the embedding inside it already uses every
core). Entry points take only JSON-able parameters and a `config_path`, so a deployment does not depend on the
working directory when `config_path` is absolute.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from woolocal_ingest import migrate
from woolocal_ingest.config import MigrationConfig, load_config


def _log_summary(s: dict) -> None:
    get_run_logger().info("%s: %s -> %s: %s (%d rows, %d embedded, %d resumed batches)", s.get("name") or s["source"],
                          s["status"], s["store"], s.get("message") or s.get("error") or "", s.get("count", 0),
                          s.get("embedded", 0), s.get("resumed_batches", 0))


@task(name="migrate-store", cache_policy=NO_CACHE, persist_result=False)
def migrate_task(name_or_source: str, to: str | None, out: str | None, in_place: bool, dry_run: bool,
                 backend: str | None, python_layout: bool | None, config_path: str | None,
                 quantization: str | None = None) -> dict:
    """One migration: a declared one by name (when `to` is None), else `name_or_source` is a store folder."""
    config = load_config(config_path)
    if to is None:
        m = config.migration(name_or_source)
        if m is None:
            declared = ", ".join(x.name for x in config.migrations) or "none"
            raise migrate.MigrationInputError(f"{name_or_source!r} is not a migration declared in flows.yaml "
                                              f"(declared: {declared}); give a store folder and a target model")
        summary = migrate.run_declared_migration(m, config, dry_run=dry_run)
    else:
        summary = migrate.migrate_store(Path(name_or_source), to, config=config, out=Path(out) if out else None,
                                        in_place=in_place, backend=backend, python_layout=python_layout,
                                        dry_run=dry_run, quantization=quantization)
    d = summary.to_dict()
    _log_summary(d)
    return d


@task(name="migrate-declared", cache_policy=NO_CACHE, persist_result=False)
def migrate_one_task(migration: dict, config_path: str | None, dry_run: bool) -> dict:
    """One store of a bulk run; a failure is returned as a summary with status `failed`, so the others go on."""
    d = migrate.run_one(MigrationConfig(**migration), load_config(config_path), dry_run=dry_run).to_dict()
    _log_summary(d)
    return d


@flow(name="woolocal-migrate", validate_parameters=False, log_prints=False, persist_result=False)
def migrate_flow(name_or_source: str, to: str | None = None, out: str | None = None, in_place: bool = False,
                 dry_run: bool = False, backend: str | None = None, python_layout: bool | None = None,
                 config_path: str | None = None, quantization: str | None = None) -> dict:
    """Migrate one store: a flows.yaml `migrations:` entry by name (`to` None), or the store folder
    `name_or_source` to `to` (a purpose or a model). Returns the summary; a failed migration fails the flow run."""
    return migrate_task(name_or_source, to, out, in_place, dry_run, backend, python_layout, config_path, quantization)


@flow(name="woolocal-migrate-all", validate_parameters=False, log_prints=False, persist_result=False)
def migrate_all_flow(dry_run: bool = False, config_path: str | None = None) -> list[dict]:
    """Every flows.yaml migration (else every store under `wooster.root`), one task each, one after another.
    Returns every summary; a failing store does not stop the others (the caller decides the exit status)."""
    config = load_config(config_path)
    jobs = migrate.declared_migrations(config)
    return [migrate_one_task(m.model_dump(mode="json"), config_path, dry_run) for m in jobs]


def run_migrate_flow(params: dict | None = None, *, all_stores: bool = False, dry_run: bool = False,
                     config_path: str | None = None):
    """Run `migrate_flow(**params)` (or `migrate_all_flow`) in this process and return its result; a failed run
    re-raises the task's own error (its exit code with it)."""
    from pipelines.runtime import flow_result, flow_settings

    with flow_settings():
        if all_stores:
            state = migrate_all_flow(dry_run=dry_run, config_path=config_path, return_state=True)
        else:
            state = migrate_flow(**(params or {}), return_state=True)
    return flow_result(state, "migrate flow")
