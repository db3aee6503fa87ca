"""Is there work? A cheap look before an ingest starts Prefect or loads a model.

`pre_plan` discovers and hashes the project's files (as `ingest.plan_ingest` does), works out the target store from
the model's files without loading torch (registry facts, the tokenizer for the special-token count, the files'
sha256), and compares with the store's manifest. It answers "nothing to do" only when a full run would write nothing:
same model files, same chunking, every file's hash as recorded, no file gone, the same layouts, and the store's files
still exactly what our manifest records (rows LangChain JS/Python added or removed between our runs are work: the
full run adopts them). Anything it cannot decide cheaply (a remote backend, MLX quantization, an unreadable store) is
"work", and the full run decides. It never writes anything.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from woolocal_ingest.documents import Skipped, SourceOptions, hash_sources, kept_files, parse, read_source
from woolocal_ingest.errors import DocumentError, StoreError, WoolocalError
from woolocal_ingest.fsutil import sha256_file, write_text_atomic
from woolocal_ingest.embedders.identity import precision_of
from woolocal_ingest.manifest import read_manifest

if TYPE_CHECKING:  # pragma: no cover
    from woolocal_ingest.request import IngestRequest



@dataclass
class PrePlan:
    """What the cheap look found; `work` says why a full run is needed ("" when there is nothing to do)."""

    project: str
    root: Path
    store: Path | None  # the target store folder (None when the model could not be resolved cheaply)
    found: int  # files found (readable and skipped)
    to_load: list[str] = field(default_factory=list)  # new or changed files
    deleted: list[str] = field(default_factory=list)  # files gone since the store was written
    skipped: list[Skipped] = field(default_factory=list)
    unchanged: int = 0
    work: str = ""
    manifest: dict | None = None

    @property
    def nothing_to_do(self) -> bool:
        return not self.work

    def headline(self) -> str:
        """The first line a run prints: what it found and what it will do."""
        what = (f"{len(self.to_load)} to load, {len(self.deleted)} to delete, {self.unchanged} unchanged"
                if self.store is not None and self.work != "no store yet" else f"{len(self.to_load)} to load")
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        tail = "nothing to do" if self.nothing_to_do else self.work
        return f"ingest {self.project}: {self.found} files found, {what}{skipped} ({tail})"

    def summary(self) -> dict:
        """The `--json` summary of a run that found nothing to do (the same keys `IngestSummary.to_dict()` has)."""
        m = self.manifest or {}
        model = m.get("model", {})
        files = {"found": self.found, "loaded": 0, "unchanged": self.unchanged, "deleted": 0,
                 "skipped": len({s.source for s in self.skipped})}
        return {"project": self.project, "store": str(self.store), "model": model.get("name"),
                "backend": model.get("backend"), "dim": m.get("dim"), "backend_reason": "", "count": m.get("count", 0),
                "added": 0, "updated": 0, "unchanged": m.get("count", 0), "deleted": 0, "embedded": 0, "cached": 0,
                "padding_waste": 0.0, "reused": 0, "files": files,
                "skipped_files": [{"source": s.source, "reason": s.reason} for s in self.skipped], "written": False,
                "timings": {}, "skipped": len(self.skipped)}


def store_drift(store: Path, manifest: dict) -> str:
    """"" when every file the manifest lists still has its recorded sha256 and nothing else sits beside them that a
    LangChain writer adds; else what differs (a LangChain JS/Python save between our runs, or damage)."""
    recorded = manifest.get("files") or {}
    if not recorded:
        return "the manifest records no file hashes"
    for name, sha in recorded.items():
        p = store / name
        if not p.is_file():
            return f"{name} is missing"
        if sha256_file(p) != sha:
            return f"{name} changed since our last write"
    for extra in ("index.faiss", "index.pkl"):
        if extra not in recorded and (store / extra).exists():
            return f"{extra} was written since our last write"
    return ""


def model_files_sha256(info) -> str:
    """`info.files_sha256()` (the model's identity: sha256 over its files), remembered across processes in the user's
    cache directory, keyed by every file's path, size and mtime under the model folder: a no-op run then reads no
    weights (hashing bge-large's 1.3 GB takes seconds). Any change of a file, added or removed files: hashed again."""
    import json as _json

    from woolocal_ingest.state_dirs import user_cache_dir

    root = Path(info.path)
    try:
        stamp = sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                       for p in root.rglob("*") if p.is_file() and ".onnx-cache" not in p.parts)
    except OSError:
        return info.files_sha256()
    key = hashlib.sha256(_json.dumps([str(root.resolve()), stamp]).encode()).hexdigest()
    path = user_cache_dir() / "model-sha256.json"
    try:
        known = _json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    sha = info.files_sha256()
    try:
        known = known if isinstance(known, dict) else {}
        known[key] = sha
        if len(known) > 64:  # a bounded memo, not a registry
            known = dict(list(known.items())[-64:])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, _json.dumps(known))
    except OSError:
        pass  # a read-only cache dir: hash every time
    return sha


def pre_plan(project: str, root: Path, stores_root: Path, model: str | None, backend: str, chunk_tokens: int,
             overlap_tokens: int, include: Sequence[str], exclude: Sequence[str], python_layout: bool = False,
             rebuild: bool = False, sources: SourceOptions | None = None,
             quantization: str | None = None) -> PrePlan:
    """Discover, hash and compare with the target store's manifest; see the module docstring."""
    from woolocal_ingest.chunking import ChunkSettings, chunking_record, effective_settings
    from woolocal_ingest.embedders import TokenCounter, pick_backend, resolve_model
    from woolocal_ingest.stores import store_dir

    root = Path(root).resolve()
    if not root.is_dir():
        raise WoolocalError(f"{root}: project folder not found")
    sources = sources or SourceOptions()
    file_sha, skipped = hash_sources(root, include, exclude, sources)
    pre = PrePlan(project=project, root=root, store=None, found=len(file_sha) + len({s.source for s in skipped}),
                  skipped=skipped, to_load=sorted(file_sha))
    if rebuild:
        pre.work = "--rebuild"
        return pre
    info = resolve_model(model)
    choice = pick_backend(info, backend, quantization)
    pre.store = store_dir(Path(stores_root), project, info.slug, info.dim)
    if choice.backend not in ("sentence-transformers", "onnx", "mlx"):
        pre.work = f"backend {choice.backend}: the full run decides"
        return pre
    if choice.backend == "mlx" and os.environ.get("LOCALMLX_QUANTIZATION"):
        pre.work = "MLX quantization: the full run decides"
        return pre
    mf = pre.store / "manifest.json"
    if not mf.is_file():
        pre.work = "no store yet"
        return pre
    try:
        manifest = read_manifest(pre.store)
    except StoreError:
        pre.work = "the store's manifest is unreadable"
        return pre
    pre.manifest = manifest
    if manifest.source_root != str(root):
        pre.work = f"the store records another source folder ({manifest.source_root}): the full run decides"
        return pre
    prev_model = manifest.get("model", {})
    if (prev_model.get("files_sha256"), precision_of(prev_model)) != (
            model_files_sha256(info), precision_of({"quantization": choice.quantization, "backend": choice.backend})):
        pre.work = "the model's files differ from the store's"
        return pre
    eff = effective_settings(ChunkSettings(chunk_tokens, overlap_tokens), TokenCounter(info), info.max_tokens)
    chunking = chunking_record(eff, info.name, sources)
    if manifest.get("chunking") != chunking:
        pre.work = "chunk settings changed"
        return pre
    if ("langchain-python" in manifest.get("layouts", [])) != bool(python_layout):
        pre.work = "layouts changed"
        return pre
    prev_files: dict[str, str] = manifest.get("source", {}).get("files", {})
    pre.to_load = sorted(r for r, sha in file_sha.items() if prev_files.get(r) != sha)
    kept = kept_files(prev_files, file_sha, skipped)  # as plan_ingest: unreadable now is not deleted
    pre.deleted = sorted(r for r in prev_files if r not in file_sha and r not in kept)
    pre.unchanged = len(file_sha) - len(pre.to_load) + len(kept)
    if pre.to_load and not pre.deleted:
        # A file the full run would skip again (empty, binary, no text layer) is not work: the full run would parse
        # it, skip it, and write nothing (the manifest never records it). Parse until one file yields text.
        unparsable = []
        for rel in pre.to_load:
            try:
                parse(read_source(root, root / rel), sources)
            except DocumentError as e:
                unparsable.append(Skipped.from_error(rel, e))
                continue
            break
        else:
            pre.skipped += unparsable
            pre.to_load = []
    if pre.to_load or pre.deleted:
        pre.work = "files changed"
        return pre
    drift = store_drift(pre.store, manifest)
    if drift:
        pre.work = f"the store was changed outside woolocal ({drift})"
    return pre


def pre_plan_request(request: "IngestRequest") -> PrePlan:
    """`pre_plan` for an IngestRequest: what `woolocal ingest` and a scheduled run look at first."""
    r, spec = request, request.embedder
    return pre_plan(r.project, r.root, r.stores_root, spec.model, spec.backend, r.chunking.chunk_tokens,
                    r.chunking.overlap_tokens, r.include, r.exclude, r.python_layout, r.rebuild, sources=r.sources,
                    quantization=spec.quantization)
