"""Running migrations: one store (`migrate_store`: read and plan, embed, verify, swap) or every declared one
(`migrate_all`), and the migration's manifest. What each step guarantees is in the package's docstring."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from woolocal_ingest.errors import StoreError, WoolocalError
from woolocal_ingest.fsutil import make_backup, stamp
from woolocal_ingest.legacy import LegacyStore
from woolocal_ingest.manifest import read_manifest
from woolocal_ingest.migrate.backup import put_back, target_lock
from woolocal_ingest.migrate.checkpoints import ProgressFn, embed_checkpointed, work_dir
from woolocal_ingest.migrate.errors import EmptySourceError, MigrationError, MigrationInputError, MigrationVerifyError
from woolocal_ingest.migrate.layouts import declared_migrations, default_project
from woolocal_ingest.migrate.model import resolve_embedder, uncached
from woolocal_ingest.migrate.plan import Plan, adopt_target, check_target, plan_rows, read_plan, source_fingerprint
from woolocal_ingest.migrate.rechunk import SPLIT_KEY
from woolocal_ingest.migrate.request import MigrateRequest
from woolocal_ingest.migrate.summary import MigrationSummary, problem_counts
from woolocal_ingest.migrate.unchanged import already_done
from woolocal_ingest.migrate.verify import verify_written
from woolocal_ingest.stores import PARQUET, StoreChangedError, is_store, json_safe, store_dir, verify_store, write_store

if TYPE_CHECKING:
    from woolocal_ingest.config import FlowsConfig, MigrationConfig
    from woolocal_ingest.embedders.base import Embedder

ESTIMATE_SAMPLE = 16  # rows embedded by --dry-run to measure the rate

_progress: ProgressFn | None = None


def set_progress(fn: ProgressFn | None) -> None:
    """Route embedding progress to `fn` (the CLI's bar) when a call passes no `progress`; None turns it off."""
    global _progress
    _progress = fn


def _manifest(plan: Plan, emb: "Embedder") -> dict:
    from woolocal_ingest.embedders import model_identity

    lg = plan.legacy
    problems = [p.to_dict() for p in lg.problems + plan.problems]
    return {
        "project": plan.project,
        "model": model_identity(emb),
        "chunking": {"migrated": True, "limit_tokens": plan.limit, "tokenizer": emb.model_name,
                     "rule": "source chunks kept; a chunk over the limit is cut into consecutive pieces at paragraph/"
                             "line/sentence/word boundaries (token boundaries where a run has none), first piece keeps "
                             f"the id, then <id>#1, <id>#2, ...; metadata.{SPLIT_KEY}"},
        "source": {"root": str(plan.source), "fingerprint": plan.fingerprint, "files": plan.files},
        "migrated_from": {
            "path": str(plan.source), "format": lg.format, "dim": lg.dim, "index_type": lg.index_type,
            "ntotal": lg.ntotal, "count": len(lg.chunks), "model": lg.model, "fingerprint": plan.fingerprint,
            "problems": {"counts": problem_counts(problems), "unrecoverable": len(lg.unrecoverable),
                         "details": problems},
            "rechunked": {"limit_tokens": plan.limit, "chunks": len(plan.split),
                          "pieces": sum(len(v) for v in plan.split.values()), "ids": plan.split},
        },
    }


def _unrecoverable_rows(lg: LegacyStore) -> int:
    return sum(max(len(p.rows), len(p.ids), 1) for p in lg.unrecoverable)


def _previous_ids(plan: Plan) -> set[str]:
    if plan.in_place:
        return {json_safe(c.id) for c in plan.legacy.chunks}
    if is_store(plan.target):
        try:
            import pyarrow.parquet as pq

            return set(pq.read_table(plan.target / PARQUET, columns=["id"]).column("id").to_pylist())
        except Exception:
            return set()
    return set()


def _estimate(plan: Plan, emb: "Embedder") -> dict:
    """Embed a small sample to measure the rate (tokens/s, so long and short rows weigh right) and extrapolate."""
    raw = uncached(emb)
    t = time.perf_counter()
    raw.embed_documents(["warm-up"])
    t_load = time.perf_counter() - t
    n = len(plan.rows)
    step = max(1, n // ESTIMATE_SAMPLE)
    sample = list(range(0, n, step))[:ESTIMATE_SAMPLE]
    t = time.perf_counter()
    raw.embed_documents([plan.rows[i].text for i in sample])
    dt = max(time.perf_counter() - t, 1e-6)
    tok_rate = sum(plan.tokens[i] for i in sample) / dt
    seconds = sum(plan.tokens) / tok_rate if tok_rate else 0.0
    return {"seconds": round(seconds + t_load, 1), "embed_seconds": round(seconds, 1),
            "chunks_per_s": round(n / seconds, 1) if seconds else None, "tokens_per_s": round(tok_rate),
            "sample": len(sample), "sample_seconds": round(dt, 3), "model_load_seconds": round(t_load, 2),
            "method": f"embedded {len(sample)} of {n} rows (evenly spaced) after a warm-up; total tokens / measured "
                      "tokens per second, plus the model load"}


RACE_ATTEMPTS = 3  # runs in a row that find the target written by another program mid-run before giving up


def migrate_store(source: Path, to: str, *, config: "FlowsConfig", out: Path | None = None, in_place: bool = False,
                  backend: str | None = None, python_layout: bool | None = None, dry_run: bool = False,
                  progress: ProgressFn | None = None, project: str | None = None,
                  embedder: "Embedder | None" = None, name: str | None = None,
                  quantization: str | None = None) -> MigrationSummary:
    """Migrate one store: `run_migration` of the `MigrateRequest` these arguments make (see it for their meaning;
    `embedder` overrides `to`'s, e.g. an embedder already loaded)."""
    request = MigrateRequest(Path(source), to, out=Path(out) if out is not None else None, in_place=in_place,
                             backend=backend, python_layout=python_layout, quantization=quantization,
                             dry_run=dry_run, project=project, name=name)
    return run_migration(request, config, progress=progress, embedder=embedder)


def run_migration(request: MigrateRequest, config: "FlowsConfig", *, progress: ProgressFn | None = None,
                  embedder: "Embedder | None" = None) -> MigrationSummary:
    """Migrate one store. Raises on failure (`MigrationError` and the library's other errors; exit codes on them);
    returns a summary with status `migrated`, `unchanged` or (dry run) `planned`. When another program (Wooster)
    writes into the target while the run works, nothing of its write is lost (nothing is swapped in, or its
    version is put back) and the run starts again, adopting that write."""
    for attempt in range(1, RACE_ATTEMPTS + 1):
        try:
            return _migrate_once(request, config, progress, embedder)
        except StoreChangedError:
            if attempt == RACE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _migrate_once(request: MigrateRequest, config: "FlowsConfig", progress: ProgressFn | None,
                  embedder: "Embedder | None") -> MigrationSummary:
    """Read and plan, then (under the target's lock) embed, verify and swap: once."""
    t0 = time.perf_counter()
    progress = progress if progress is not None else _progress
    source = Path(request.source).expanduser().resolve()
    if request.in_place and request.out is not None:
        raise MigrationInputError("give either an out folder or in_place, not both")
    emb = embedder if embedder is not None else resolve_embedder(request.to, config, request.backend,
                                                                 request.quantization)
    emb.ensure_ready()  # a primary that cannot load is replaced before anything is planned with it
    target = _target(request, source, config, emb)
    summary = MigrationSummary(status="planned" if request.dry_run else "failed", source=str(source),
                               store=str(target), name=request.name, model=emb.model_name, backend=emb.backend,
                               dim=emb.dim, in_place=request.in_place)
    plan = _read(request, source, target, config, summary)
    _note_source(summary, plan)
    check_target(plan, emb)
    if request.dry_run:
        return _dry_run(plan, emb, summary, t0)
    with target_lock(target):
        if source_fingerprint(source)[0] != plan.fingerprint:  # changed (or swapped by another run) meanwhile
            plan = _read(request, source, target, config, summary)
        reason = already_done(plan, emb)
        if reason:
            return _unchanged(summary, target, reason, t0)
        _plan(plan, emb, summary)
        vectors = _embed(plan, emb, config, progress, summary)
        t = time.perf_counter()
        previous = _previous_ids(plan)
        backup = _write_verified(plan, emb, vectors)
        summary.timings["write"] = round(time.perf_counter() - t, 3)
    _note_written(summary, plan, previous, backup)
    summary.seconds = round(time.perf_counter() - t0, 3)
    return summary


def _target(request: MigrateRequest, source: Path, config: "FlowsConfig", emb: "Embedder") -> Path:
    """The store folder to write: the source (in place), `out`, or `<stores_root>/<project>/<slug>-<dim>d`."""
    if request.in_place:
        return source
    if request.out is not None:
        return Path(request.out).expanduser().resolve()
    return store_dir(config.stores_root(), request.project or default_project(source), emb.info.slug,
                     emb.dim).resolve()


def _read(request: MigrateRequest, source: Path, target: Path, config: "FlowsConfig",
          summary: MigrationSummary) -> Plan:
    t = time.perf_counter()
    plan = read_plan(request, source, target, config)
    summary.timings["read"] = round(time.perf_counter() - t, 3)
    return plan


def _note_source(summary: MigrationSummary, plan: Plan) -> None:
    """What was read from the source; `EmptySourceError` when it holds nothing to embed."""
    lg = plan.legacy
    summary.source_format, summary.source_dim, summary.source_count = lg.format, lg.dim, len(lg.chunks)
    summary.problems = [p.to_dict() for p in lg.problems]
    summary.unrecoverable, summary.skipped = len(lg.unrecoverable), _unrecoverable_rows(lg)
    summary.python_layout = plan.python_layout
    if not lg.chunks:
        raise EmptySourceError(
            f"{plan.source}: nothing to migrate: the {lg.format} store holds no text (index ntotal {lg.ntotal}, dim "
            f"{lg.dim}); nothing was written (an empty index aborts LangChain JS readers)")


def _plan(plan: Plan, emb: "Embedder", summary: MigrationSummary) -> None:
    """The rows of the new store: re-chunked, other writers' changes to the target adopted."""
    t = time.perf_counter()
    plan_rows(plan, emb)
    adopt_target(plan, emb)
    summary.timings["plan"] = round(time.perf_counter() - t, 3)
    summary.count = len(plan.rows)
    summary.rechunked = len(plan.split)
    summary.pieces = sum(len(v) for v in plan.split.values())
    summary.problems = [p.to_dict() for p in plan.legacy.problems + plan.problems]


def _dry_run(plan: Plan, emb: "Embedder", summary: MigrationSummary, t0: float) -> MigrationSummary:
    """The plan and a measured estimate; nothing written, no lock taken."""
    reason = already_done(plan, emb)
    _plan(plan, emb, summary)
    summary.plan = {"action": "unchanged" if reason else "migrate", "reason": reason, "target": str(plan.target),
                    "rows": len(plan.rows), "estimate": None if reason else _estimate(plan, emb)}
    summary.message = reason or f"would write {len(plan.rows)} rows to {plan.target}"
    summary.seconds = round(time.perf_counter() - t0, 3)
    return summary


def _unchanged(summary: MigrationSummary, target: Path, reason: str, t0: float) -> MigrationSummary:
    summary.status, summary.message = "unchanged", reason
    if is_store(target):
        summary.count = summary.unchanged = read_manifest(target).count
    summary.seconds = round(time.perf_counter() - t0, 3)
    return summary


def _embed(plan: Plan, emb: "Embedder", config: "FlowsConfig", progress: ProgressFn | None,
           summary: MigrationSummary) -> np.ndarray:
    t = time.perf_counter()
    done = embed_checkpointed(plan, emb, config, progress)
    summary.batches, summary.resumed_batches = done.batches, done.resumed_batches
    summary.embedded, summary.cached = done.embedded, done.cached
    summary.timings["embed"] = round(time.perf_counter() - t, 3)
    return done.vectors


@dataclass
class _BeforeSwap:
    """What `write_store` runs between writing the new folder and swapping it in: the migration's verification,
    then, in place, the backup of the store it replaces (`backup`, once made)."""

    plan: Plan
    emb: "Embedder"
    backup: Path | None = None

    def __call__(self, tmp: Path) -> None:
        problems = verify_written(tmp, self.plan, self.emb)
        if problems:
            raise MigrationVerifyError(f"{self.plan.target}: the migrated store failed verification, nothing was "
                                       "swapped in: " + "; ".join(problems))
        if self.plan.in_place:
            self.backup = make_backup(self.plan.source)


def _write_verified(plan: Plan, emb: "Embedder", vectors: np.ndarray) -> Path | None:
    """Write the new store, verify it, swap it in (the caller holds the lock) and verify it again; the work folder
    is removed. Returns the in-place backup, if one was made. A failure leaves the previous store as it was."""
    target = plan.target
    guard = _BeforeSwap(plan, emb)
    try:
        write_store(target, plan.rows, vectors, _manifest(plan, emb), python_layout=plan.python_layout,
                    before_swap=guard, expect=plan.snapshot)
    except MigrationVerifyError:
        shutil.rmtree(work_dir(target), ignore_errors=True)  # its shards made a store that failed: not reused
        raise
    except StoreChangedError:
        if guard.backup is not None:  # of the version another writer has since changed: not a backup of ours
            shutil.rmtree(guard.backup, ignore_errors=True)
        raise
    except StoreError as e:
        raise MigrationError(f"{target}: writing the migrated store failed, the previous one is as it was: {e}") \
            from e
    after = verify_store(target)
    if after:
        if guard.backup is not None:
            put_back(target, guard.backup, f".{target.name}.failed-{stamp()}")
        raise MigrationVerifyError(f"{target}: the swapped-in store failed verification"
                                   + (f"; the previous store was restored from {guard.backup}"
                                      if guard.backup is not None else "")
                                   + ": " + "; ".join(after))
    shutil.rmtree(work_dir(target), ignore_errors=True)
    return guard.backup


def _note_written(summary: MigrationSummary, plan: Plan, previous: set[str], backup: Path | None) -> None:
    new_ids = [c.id for c in plan.rows]
    summary.status, summary.written = "migrated", True
    summary.adoption = plan.adoption.to_dict()
    summary.backup = str(backup) if backup else None
    summary.count = len(new_ids)
    summary.added = sum(1 for i in new_ids if i not in previous)
    summary.updated = len(new_ids) - summary.added
    summary.deleted = len(previous - set(new_ids))
    summary.message = (f"{summary.count} rows written to {plan.target}"
                       + (f"; previous store kept at {summary.backup}" if summary.backup else ""))


# ---------------------------------------------------------------------------------------------------------------
# declared and bulk migrations


def run_declared_migration(m: "MigrationConfig", config: "FlowsConfig", dry_run: bool = False,
                           progress: ProgressFn | None = None) -> MigrationSummary:
    """One `migrations:` entry of flows.yaml (or one store found under `wooster.root`); raises on failure."""
    return run_migration(MigrateRequest.declared(m, config, dry_run=dry_run), config, progress=progress)


def run_or_fail(request: MigrateRequest, config: "FlowsConfig", *,
                progress: ProgressFn | None = None) -> MigrationSummary:
    """`run_migration`, but a failure becomes a summary with status `failed` (for bulk runs)."""
    t0 = time.perf_counter()
    try:
        return run_migration(request, config, progress=progress)
    except Exception as e:
        return MigrationSummary(status="failed", source=str(request.source), name=request.name,
                                store=str(request.out) if request.out is not None else "", in_place=request.in_place,
                                error=f"{type(e).__name__}: {e}" if not isinstance(e, WoolocalError) else str(e),
                                exit_code=int(getattr(e, "exit_code", 1)), message="failed",
                                seconds=round(time.perf_counter() - t0, 3))


def run_one(m: "MigrationConfig", config: "FlowsConfig", dry_run: bool = False,
            progress: ProgressFn | None = None) -> MigrationSummary:
    """`run_declared_migration`, but a failure becomes a summary with status `failed` (for bulk runs)."""
    return run_or_fail(MigrateRequest.declared(m, config, dry_run=dry_run), config, progress=progress)


def migrate_all(config: "FlowsConfig", *, dry_run: bool = False,
                progress: ProgressFn | None = None) -> list[MigrationSummary]:
    """Every declared migration (or every store under `wooster.root`), one after another; a failing store does not
    stop the others (its summary has status `failed`)."""
    return [run_one(m, config, dry_run=dry_run, progress=progress) for m in declared_migrations(config)]
