"""Running migrations: one store (`migrate_store`: read and plan, embed, verify, swap) or every declared one
(`migrate_all`), and the migration's manifest. What each step guarantees is in the package's docstring."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from woolocal_ingest.coowned import read_current
from woolocal_ingest.errors import StoreError, WoolocalError
from woolocal_ingest.fsutil import make_backup, stamp
from woolocal_ingest.legacy import LegacyStore, read_legacy_store
from woolocal_ingest.manifest import read_manifest
from woolocal_ingest.migrate.backup import put_back, target_lock
from woolocal_ingest.migrate.checkpoints import ProgressFn, embed_checkpointed, work_dir
from woolocal_ingest.migrate.errors import EmptySourceError, MigrationError, MigrationInputError, MigrationVerifyError
from woolocal_ingest.migrate.layouts import declared_migrations, default_project
from woolocal_ingest.migrate.model import resolve_embedder, uncached
from woolocal_ingest.migrate.plan import Plan, adopt_target, check_target, plan_rows, source_fingerprint
from woolocal_ingest.migrate.rechunk import SPLIT_KEY
from woolocal_ingest.migrate.summary import MigrationSummary, problem_counts
from woolocal_ingest.migrate.unchanged import already_done
from woolocal_ingest.migrate.verify import verify_written
from woolocal_ingest.stores import PARQUET, StoreChangedError, is_store, json_safe, store_dir, truth_snapshot, \
    verify_store, write_store

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
    from woolocal_ingest.ingest import model_identity

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


def migrate_store(source: Path, to: str, **kwargs: Any) -> MigrationSummary:
    """Migrate one store (see the module docstring and `_migrate_once` for the arguments). When another program
    (Wooster) writes into the target while the run works, nothing of its write is lost (nothing is swapped in, or
    its version is put back) and the run starts again, adopting that write."""
    for attempt in range(1, RACE_ATTEMPTS + 1):
        try:
            return _migrate_once(source, to, **kwargs)
        except StoreChangedError:
            if attempt == RACE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _migrate_once(source: Path, to: str, *, config: "FlowsConfig", out: Path | None = None, in_place: bool = False,
                  backend: str | None = None, python_layout: bool | None = None, dry_run: bool = False,
                  progress: ProgressFn | None = None, project: str | None = None,
                  embedder: "Embedder | None" = None, name: str | None = None,
                  quantization: str | None = None) -> MigrationSummary:
    """Migrate one store once. Raises on failure (`MigrationError` and the library's other errors; exit codes on
    them); returns a summary with status `migrated`, `unchanged` or (dry run) `planned`.

    `to`: a purpose of flows.yaml or a model name/folder (`embedder` overrides both, e.g. an embedder already
    loaded). `python_layout` None: the source's own layout decides for a LangChain Python store (True), else
    flows.yaml's `defaults.python_layout`. `project`: the project of the default target (default: from the source).
    """
    t0 = time.perf_counter()
    progress = progress if progress is not None else _progress
    source = Path(source).expanduser().resolve()
    if in_place and out is not None:
        raise MigrationInputError("give either an out folder or in_place, not both")
    emb = embedder if embedder is not None else resolve_embedder(to, config, backend, quantization)
    if hasattr(emb, "ensure_ready"):
        emb.ensure_ready()  # a primary that cannot load is replaced before anything is planned with it
    if in_place:
        target = source
    elif out is not None:
        target = Path(out).expanduser().resolve()
    else:
        target = store_dir(config.stores_root(), project or default_project(source), emb.info.slug, emb.dim).resolve()
    summary = MigrationSummary(status="planned" if dry_run else "failed", source=str(source), store=str(target),
                               name=name, model=emb.model_name, backend=emb.backend, dim=emb.dim, in_place=in_place)
    timings = summary.timings

    def read() -> Plan:
        t = time.perf_counter()
        snap = truth_snapshot(target) if target.is_dir() else None  # before reading: a racing write shows later
        lg = read_legacy_store(source)
        current = None
        if is_store(target):
            try:
                current = read_current(target)  # what other writers (Wooster, LangChain Python) did since our run
            except StoreError as e:
                raise MigrationError(f"{target}: the store there cannot be read, so nothing was changed: {e}. Move it "
                                     "aside (it may hold rows only it has) and run again") from None
            if target == source and current.changed_outside:
                lg.chunks = list(current.rows)  # both layouts' changes applied
        fp, files = source_fingerprint(source)
        layout = python_layout if python_layout is not None else (
            True if lg.format == "langchain-python" else config.defaults.python_layout)
        p = Plan(source=source, target=target, in_place=in_place, project=project or default_project(source),
                  legacy=lg, fingerprint=fp, files=files, python_layout=layout, current=current, snapshot=snap)
        timings["read"] = round(time.perf_counter() - t, 3)
        return p

    plan = read()
    lg = plan.legacy
    summary.source_format, summary.source_dim, summary.source_count = lg.format, lg.dim, len(lg.chunks)
    summary.problems = [p.to_dict() for p in lg.problems]
    summary.unrecoverable, summary.skipped = len(lg.unrecoverable), _unrecoverable_rows(lg)
    summary.python_layout = plan.python_layout
    if not lg.chunks:
        raise EmptySourceError(
            f"{source}: nothing to migrate: the {lg.format} store holds no text (index ntotal {lg.ntotal}, dim "
            f"{lg.dim}); nothing was written (an empty index aborts LangChain JS readers)")
    check_target(plan, emb)

    if dry_run:
        reason = already_done(plan, emb)
        t = time.perf_counter()
        plan_rows(plan, emb)
        adopt_target(plan, emb)
        timings["plan"] = round(time.perf_counter() - t, 3)
        _fill_plan_counts(summary, plan)
        summary.plan = {"action": "unchanged" if reason else "migrate", "reason": reason, "target": str(target),
                        "rows": len(plan.rows), "estimate": None if reason else _estimate(plan, emb)}
        summary.message = reason or f"would write {len(plan.rows)} rows to {target}"
        summary.seconds = round(time.perf_counter() - t0, 3)
        return summary

    with target_lock(target):
        if source_fingerprint(source)[0] != plan.fingerprint:  # changed (or swapped by another run) meanwhile
            plan = read()
        reason = already_done(plan, emb)
        if reason:
            summary.status, summary.message = "unchanged", reason
            if is_store(target):
                summary.count = summary.unchanged = read_manifest(target).count
            summary.seconds = round(time.perf_counter() - t0, 3)
            return summary
        t = time.perf_counter()
        plan_rows(plan, emb)
        adopt_target(plan, emb)
        timings["plan"] = round(time.perf_counter() - t, 3)
        _fill_plan_counts(summary, plan)
        t = time.perf_counter()
        vectors = embed_checkpointed(plan, emb, config, progress, summary)
        timings["embed"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        previous = _previous_ids(plan)
        backup: list[Path] = []

        def before_swap(tmp: Path) -> None:
            problems = verify_written(tmp, plan, emb)
            if problems:
                raise MigrationVerifyError(f"{target}: the migrated store failed verification, nothing was swapped "
                                           "in: " + "; ".join(problems))
            if in_place:
                backup.append(make_backup(source))

        try:
            write_store(target, plan.rows, vectors, _manifest(plan, emb), python_layout=plan.python_layout,
                        before_swap=before_swap, expect=plan.snapshot)
        except MigrationVerifyError:
            shutil.rmtree(work_dir(target), ignore_errors=True)  # its shards made a store that failed: not reused
            raise
        except StoreChangedError:
            for b in backup:  # the backup was of the version another writer has since changed: not a backup of ours
                shutil.rmtree(b, ignore_errors=True)
            raise
        except StoreError as e:
            raise MigrationError(f"{target}: writing the migrated store failed, the previous one is as it was: {e}") \
                from e
        after = verify_store(target)
        if after:
            if backup:
                put_back(target, backup[0], f".{target.name}.failed-{stamp()}")
            raise MigrationVerifyError(f"{target}: the swapped-in store failed verification"
                                       + (f"; the previous store was restored from {backup[0]}" if backup else "")
                                       + ": " + "; ".join(after))
        shutil.rmtree(work_dir(target), ignore_errors=True)
        timings["write"] = round(time.perf_counter() - t, 3)
    new_ids = [c.id for c in plan.rows]
    summary.status, summary.written = "migrated", True
    summary.adoption = plan.adoption.to_dict()
    summary.backup = str(backup[0]) if backup else None
    summary.count = len(new_ids)
    summary.added = sum(1 for i in new_ids if i not in previous)
    summary.updated = len(new_ids) - summary.added
    summary.deleted = len(previous - set(new_ids))
    summary.message = (f"{summary.count} rows written to {target}" + (f"; previous store kept at {summary.backup}"
                                                                     if summary.backup else ""))
    summary.seconds = round(time.perf_counter() - t0, 3)
    return summary


def _fill_plan_counts(summary: MigrationSummary, plan: Plan) -> None:
    summary.count = len(plan.rows)
    summary.rechunked = len(plan.split)
    summary.pieces = sum(len(v) for v in plan.split.values())
    summary.problems = [p.to_dict() for p in plan.legacy.problems + plan.problems]


# ---------------------------------------------------------------------------------------------------------------
# declared and bulk migrations


def run_declared_migration(m: "MigrationConfig", config: "FlowsConfig", dry_run: bool = False,
                           progress: ProgressFn | None = None) -> MigrationSummary:
    """One `migrations:` entry of flows.yaml (or one store found under `wooster.root`); raises on failure."""
    return migrate_store(config.resolve_path(m.source), m.to, config=config,
                         out=config.resolve_path(m.out) if m.out is not None else None, in_place=m.in_place,
                         python_layout=m.python_layout, dry_run=dry_run, progress=progress, name=m.name)


def run_one(m: "MigrationConfig", config: "FlowsConfig", dry_run: bool = False,
            progress: ProgressFn | None = None) -> MigrationSummary:
    """`run_declared_migration`, but a failure becomes a summary with status `failed` (for bulk runs)."""
    t0 = time.perf_counter()
    try:
        return run_declared_migration(m, config, dry_run=dry_run, progress=progress)
    except Exception as e:
        return MigrationSummary(status="failed", source=str(config.resolve_path(m.source)), name=m.name,
                                store=str(config.resolve_path(m.out)) if m.out else "", in_place=m.in_place,
                                error=f"{type(e).__name__}: {e}" if not isinstance(e, WoolocalError) else str(e),
                                exit_code=int(getattr(e, "exit_code", 1)), message="failed",
                                seconds=round(time.perf_counter() - t0, 3))


def migrate_all(config: "FlowsConfig", *, dry_run: bool = False,
                progress: ProgressFn | None = None) -> list[MigrationSummary]:
    """Every declared migration (or every store under `wooster.root`), one after another; a failing store does not
    stop the others (its summary has status `failed`)."""
    return [run_one(m, config, dry_run=dry_run, progress=progress) for m in declared_migrations(config)]
