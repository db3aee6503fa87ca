"""Unchanged detection: whether the target already holds this migration of the source by this model (nothing to
do), from the plan (`already_done`) or, before any model is loaded, from registry facts (`look_unchanged`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from woolocal_ingest.coowned import CurrentStore, read_current
from woolocal_ingest.errors import StoreError, WoolocalError
from woolocal_ingest.embedders.identity import precision_of
from woolocal_ingest.manifest import read_manifest
from woolocal_ingest.migrate.layouts import default_project
from woolocal_ingest.migrate.model import ModelFacts, model_facts
from woolocal_ingest.migrate.plan import Plan, source_fingerprint
from woolocal_ingest.migrate.request import MigrateRequest
from woolocal_ingest.migrate.summary import MigrationSummary
from woolocal_ingest.stores import is_store, store_dir, verify_store

if TYPE_CHECKING:
    from woolocal_ingest.config import FlowsConfig
    from woolocal_ingest.embedders.base import Embedder


def already_done(plan: Plan, emb: "Embedder") -> str | None:
    """Why the target needs no work (None: it does)."""
    return _unchanged_reason(plan.target, plan.source, plan.fingerprint, plan.python_layout, model_facts(emb),
                             plan.legacy.format == "woolocal", plan.current)


def _unchanged_reason(target: Path, source: Path, fingerprint: str, python_layout: bool, model: ModelFacts,
                      source_is_ours: bool, current: CurrentStore | None) -> str | None:
    """Why `target` already holds the migration of `source` by `model` (None: there is work)."""
    if not is_store(target):
        return None
    try:
        m = read_manifest(target)
    except StoreError:
        return None
    mm = m.model
    same_model = (mm.get("files_sha256"), precision_of(mm), m.get("dim")) == (
        model.files_sha256, model.precision(), model.dim)
    layouts_ok = not python_layout or "langchain-python" in m.layouts
    if not (same_model and layouts_ok):
        return None
    if current is not None and current.changed_outside:
        return None  # another writer's rows are to be adopted
    if target == source and source_is_ours:
        if not verify_store(target):
            return f"{target} already is a woolocal store of {model.name} ({model.dim}d)"
        return None
    mf = m.migrated_from or {}
    if mf.get("fingerprint") == fingerprint and not verify_store(target):
        return f"{target} already holds this migration of {source} (same source files, same model files)"
    return None


def look_unchanged(request: MigrateRequest, config: "FlowsConfig") -> MigrationSummary | None:
    """A cheap look before a migration: the `unchanged` summary when the target already holds this migration of
    the request's source (same source files, same model files and precision, no other writer's rows to adopt),
    found without loading the model (registry facts and the remembered sha256 of its files); None when there may be
    work, or when it cannot tell cheaply (a remote backend, an unknown name): the full run decides."""
    from woolocal_ingest.embedders import pick_backend, resolve_model
    from woolocal_ingest.legacy import detect_format
    from woolocal_ingest.preplan import model_files_sha256

    t0 = time.perf_counter()
    try:
        source = Path(request.source).expanduser().resolve()
        purpose = config.purposes.get(request.to)
        model = purpose.model if purpose is not None else request.to
        be = request.backend or (purpose.backend if purpose is not None else "auto")
        quant = request.quantization or (purpose.quantization if purpose is not None else None)
        if be == "openai-compatible" or (purpose is not None and purpose.endpoint):
            return None
        info = resolve_model(model)
        choice = pick_backend(info, be, quant)
        if choice.backend not in ("sentence-transformers", "onnx"):
            return None
        facts = ModelFacts(info.name, info.dim, model_files_sha256(info), choice.quantization, choice.backend)
        target = (source if request.in_place else Path(request.out).expanduser().resolve() if request.out is not None
                  else store_dir(config.stores_root(), request.project or default_project(source), info.slug,
                                      info.dim).resolve())
        fmt = detect_format(source)
        layout = request.python_layout if request.python_layout is not None else (
            True if fmt == "langchain-python" else config.defaults.python_layout)
        current = read_current(target) if is_store(target) else None
        reason = _unchanged_reason(target, source, source_fingerprint(source)[0], layout, facts, fmt == "woolocal",
                                   current)
    except WoolocalError:
        return None
    if reason is None:
        return None
    count = read_manifest(target).count
    return MigrationSummary(status="unchanged", source=str(source), store=str(target), model=info.name,
                            backend=choice.backend, dim=info.dim, count=count, unchanged=count,
                            in_place=request.in_place,
                            message=reason, seconds=round(time.perf_counter() - t0, 3))
