"""Incremental ingest as plain functions: plan (what changed), load+chunk, embed, assemble and write a store.

The Prefect flow in `pipelines/ingest_flow.py` orchestrates exactly these steps; `run_ingest` runs them in-process.
Semantics follow LangChain's indexing API with `cleanup="full"`: unchanged files are not re-read or re-embedded,
a changed file re-embeds only chunks whose text is new, a deleted file's chunks leave the store.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from woolocal_ingest.chunking import Chunk, ChunkSettings, chunk_document, chunk_id, chunking_record, effective_settings
from woolocal_ingest.coowned import Adoption, CurrentStore, read_current
from woolocal_ingest.documents import (
    Skipped, SourceOptions, describe_redactions, hash_sources, kept_files, parse, read_source,
)
from woolocal_ingest.embedders.base import Embedder
from woolocal_ingest.embedders.identity import model_identity, precision_label, precision_of
from woolocal_ingest.errors import DocumentError, ModelChangedError, SourceMismatchError, StoreError, WoolocalError
from woolocal_ingest.fsutil import make_backup
from woolocal_ingest.manifest import read_manifest
from woolocal_ingest.stores import StoreChangedError, read_record, store_dir, write_store

if TYPE_CHECKING:  # pragma: no cover
    from woolocal_ingest.request import IngestRequest

EMBED_TASK_SIZE = 512  # chunks per embedding task: coarse, so per-task orchestration cost hides under the model
LOAD_GROUP_BYTES = 1 << 20  # raw bytes per load+chunk task: several groups, so chunking overlaps embedding

ProgressFn = Callable[[str, int], None]  # ("total+", n) as work is found, ("embedded", n) per batch done


@dataclass
class IngestPlan:
    """What a run must do, decided from file hashes before any parsing or embedding."""

    project: str
    root: Path
    target: Path
    model: dict  # ModelInfo.to_manifest() + files_sha256 + backend
    chunking: dict
    python_layout: bool
    to_load: list[str]  # new or changed files (rel paths)
    file_sha: dict[str, str]  # every file found and hashed
    unchanged: list[str]  # files whose chunks are copied from the previous store
    deleted: list[str]  # files gone since the previous store
    skipped: list[Skipped]
    previous: str | None  # previous store folder, if any
    reuse_vectors: bool  # previous store was embedded by the very same model files
    reusable: frozenset[str] = frozenset()  # text sha256s whose vectors the previous store already holds
    kept: list[Chunk] = field(default_factory=list)  # rows carried over: unchanged files' and other writers'
    outside_ids: frozenset[str] = frozenset()  # of `kept`: rows another writer added or rewrote (adopted now)
    other_writers: frozenset[str] = frozenset()  # of `kept`: rows that are not chunks of the folder's files
    adoption: Adoption = field(default_factory=Adoption)
    snapshot: dict | None = None  # identity of the previous store's LangChain files when read (races show)
    unreadable: str | None = None  # why the previous store could not be read (only with rebuild: kept as a backup)

    def load_groups(self, max_bytes: int = LOAD_GROUP_BYTES) -> list[list[str]]:
        """`to_load` cut into groups of about `max_bytes` of files each (one load+chunk task per group)."""
        groups: list[list[str]] = [[]]
        size = 0
        for rel in self.to_load:
            try:
                n = (self.root / rel).stat().st_size
            except OSError:
                n = 0
            if groups[-1] and size + n > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(rel)
            size += n
        return [g for g in groups if g]


@dataclass
class Loaded:
    """Chunks of one group of files, with the hash of exactly the bytes that were parsed."""

    chunks: list[Chunk] = field(default_factory=list)
    file_sha: dict[str, str] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    redacted: dict[str, str] = field(default_factory=dict)  # rel -> which lines were redacted and why


@dataclass
class IngestSummary:
    """What a run did; `to_dict()` is the CLI's `--json` object."""

    project: str
    store: str
    model: str
    backend: str
    dim: int
    backend_reason: str = ""
    count: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    embedded: int = 0
    cached: int = 0  # of `embedded`: vectors served by the embedding cache instead of the model
    padding_waste: float = 0.0  # share of padded tokens in the embedding batches
    reused: int = 0
    files: dict = field(default_factory=dict)
    skipped_files: list[dict] = field(default_factory=list)  # {source, reason, kind[, rule]} for each entry left out
    redacted_files: list[dict] = field(default_factory=list)  # {source, lines}: indexed with secret lines redacted
    duplicates: int = 0  # chunks whose text another chunk of the store has too (they share one embedding)
    written: bool = False
    adoption: dict = field(default_factory=dict)  # Adoption.to_dict(): rows other writers added, deleted, rewrote
    backup: str | None = None  # where an unreadable previous store was kept (--rebuild)
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = len(self.skipped_files)
        ignored: dict[str, int] = {}
        for sk in self.skipped_files:
            if sk.get("kind") == "ignored":
                ignored[sk.get("rule", "")] = ignored.get(sk.get("rule", ""), 0) + 1
        d["ignored"] = ignored  # rule -> how many entries it left out
        return d


def check_gate_on_store(embedder: Embedder, target: Path) -> None:
    """An int8 embedder about to write into an existing store is gated on that store's own texts too (a sample)."""
    if embedder.quantization != "int8":
        return
    parquet = Path(target) / "chunks.parquet"
    if not parquet.is_file():
        return
    try:
        import pyarrow.parquet as pq

        texts = pq.read_table(parquet, columns=["text"]).column("text").to_pylist()
    except Exception:  # an unreadable record is reported by the store checks, not here
        return
    embedder.check_sample(texts)


def check_source_root(project_dir: Path, root: Path, move: bool = False) -> None:
    """One store per source: refuse when a store of `project_dir` (<stores_root>/<project>) records another source
    folder than `root`, unless `move` says the folder moved there. Stores without a recorded root (migrated) pass."""
    if move or not Path(project_dir).is_dir():
        return
    for manifest in sorted(Path(project_dir).glob("*/manifest.json")):
        try:
            recorded = (json.loads(manifest.read_text(encoding="utf-8")).get("source") or {}).get("root")
        except (OSError, ValueError, AttributeError):
            continue  # a damaged store is reported when it is opened
        if recorded and Path(recorded) != Path(root):
            name = Path(project_dir).name
            raise SourceMismatchError(
                f"{manifest.parent}: project {name!r} was ingested from {recorded}, not {root}. Two folders with the "
                f"same name cannot share a store: give this one its own project name (woolocal ingest {root} "
                f"--name OTHER-NAME, or a projects: entry in flows.yaml), or pass --move if {recorded} moved to "
                f"{root}.")


def plan_ingest(project: str, root: Path, stores_root: Path, embedder: Embedder, settings: ChunkSettings,
                include: Sequence[str], exclude: Sequence[str], python_layout: bool = False,
                rebuild: bool = False, sources: SourceOptions | None = None, move: bool = False) -> IngestPlan:
    """Discover and hash the project's files and compare them with the previous store's record.

    A previous store embedded by other model files (same name and dim, changed weights or tokenizer) is refused
    with ModelChangedError unless `rebuild` asks to re-embed everything: a store never mixes two models.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise WoolocalError(f"{root}: project folder not found")
    sources = sources or SourceOptions()
    check_source_root(Path(stores_root) / project, root, move)
    file_sha, skipped = hash_sources(root, include, exclude, sources)
    chunking = chunking_record(effective_settings(settings, embedder.tokens, embedder.max_tokens), embedder.model_name,
                               sources)
    model = model_identity(embedder)
    target = store_dir(stores_root, project, embedder.info.slug, embedder.dim)
    prev_files: dict[str, str] = {}
    previous = None
    reuse = False
    reusable: frozenset[str] = frozenset()
    same_chunking = False
    current: CurrentStore | None = None
    unreadable: str | None = None
    if target.exists() and any(target.iterdir()):
        try:
            current = read_current(target)
        except StoreError as e:
            if not rebuild:
                raise StoreError(
                    f"{target}: the previous store cannot be read, so nothing was changed: {e}. Run again with "
                    f"--rebuild to re-embed everything; the unreadable version is then kept as "
                    f"{target.name}.bak-<UTC time> beside it") from None
            unreadable = str(e)
    if current is not None:
        if current.manifest.model.get("quantization") == model["quantization"] == "int8":
            check_gate_on_store(embedder, target)  # gate on the store's own texts (may fall back to fp32)
            model = model_identity(embedder)
        previous = str(target)
        prev_files = current.manifest.source_files
        prev_model = current.manifest.model
        if (prev_model.get("files_sha256") == model["files_sha256"] and not rebuild
                and precision_of(prev_model) != precision_of(model)):
            prev_q, prev_backend = precision_of(prev_model)
            raise ModelChangedError(
                f"{target}: holds {precision_label(prev_model)} vectors of {embedder.model_name}, and "
                f"this run would add {precision_label(model)} vectors: a store never mixes precisions. "
                f"Re-embed the whole store as {precision_label(model)} with --rebuild, or run with "
                f"--quantization {'int8' if prev_q == 'int8' else 'none'}"
                + (f" --backend {prev_backend}" if prev_backend else "")
                + f" to keep it {precision_label(prev_model)}.")
        reuse = (prev_model.get("files_sha256"), precision_of(prev_model)) == (
            model["files_sha256"], precision_of(model))
        if not reuse and not rebuild:
            raise ModelChangedError(
                f"{target}: was embedded by model files sha256 {prev_model.get('files_sha256')} (quantization "
                f"{prev_model.get('quantization')}) but {embedder.model_name} at {embedder.info.path} is now "
                f"{model['files_sha256']} (quantization {model['quantization']}); "
                "refusing to append with a changed model. Re-embed the whole store with --rebuild.")
        reusable = frozenset(current.record.by_sha) if reuse else frozenset()
        same_chunking = current.manifest.chunking == chunking and reuse
    # Old chunks of unreadable files are only kept when they were embedded by these very model files (otherwise
    # their vectors would not fit the rest of the store).
    kept = kept_files(prev_files, file_sha, skipped) if reuse else []
    if same_chunking:
        to_load = [r for r, sha in file_sha.items() if prev_files.get(r) != sha]
        unchanged = [r for r, sha in file_sha.items() if prev_files.get(r) == sha] + kept
    else:
        to_load, unchanged = sorted(file_sha), kept
    deleted = sorted(r for r in prev_files if r not in file_sha and r not in kept) if previous else []
    kept, adoption, outside, others = _carry_over(current, prev_files, set(unchanged), reuse)
    return IngestPlan(project=project, root=root, target=target, model=model, chunking=chunking,
                      python_layout=python_layout, to_load=sorted(to_load), file_sha=file_sha,
                      unchanged=sorted(unchanged), deleted=deleted, skipped=skipped, previous=previous,
                      reuse_vectors=reuse, reusable=reusable, kept=kept, outside_ids=frozenset(outside),
                      other_writers=frozenset(others), adoption=adoption,
                      snapshot=current.snapshot if current is not None else None, unreadable=unreadable)


def _is_folder_chunk(c: Chunk, files: dict[str, str]) -> bool:
    """A row this project's ingest wrote for one of the folder's files (its id is derived from source and index);
    other writers' rows (Wooster's uuids, LangChain Python's) are not."""
    return c.source in files and c.id == chunk_id(c.source, c.chunk)


def _carry_over(current: CurrentStore | None, prev_files: dict[str, str], unchanged: set[str],
                reuse: bool) -> tuple[list[Chunk], Adoption, set[str], set[str]]:
    """Rows the next version keeps from the previous one, before any file is re-read: the rows of unchanged files
    (as other writers rewrote them; the ones they deleted restored, since the folder is the truth for its files)
    and every row of other writers (added or rewritten since our last run: adopted). Returns (rows, adoption,
    ids adopted now, ids of other writers' rows)."""
    adoption = Adoption()
    if current is None:
        return [], adoption, set(), set()
    adoption.outside = [d.to_dict() for d in current.drifts if d.changed]
    now = {c.id: c for c in current.rows}
    changed = current.outside_ids()
    ours = [c for c in current.record.chunks if _is_folder_chunk(c, prev_files)]
    our_ids = {c.id for c in ours}
    kept: list[Chunk] = []
    for c in ours:
        if c.source not in unchanged:
            continue
        if c.id in now:
            kept.append(now[c.id])
        else:
            kept.append(c)  # deleted outside, but the file still has it: written back
            adoption.restored += 1
    others = [c for c in current.rows if c.id not in our_ids]
    kept += others
    adopted = {c.id for c in kept if c.id in changed}
    adoption.adopted = len(adopted)
    adoption.kept = len(others)
    adoption.reembedded = sum(1 for c in kept if not (reuse and current.trusted(c)))
    gone = {i for d in current.drifts for i in d.deleted}
    adoption.stayed_deleted = sum(1 for i in gone if i not in our_ids)
    return kept, adoption, adopted, {c.id for c in others}


def load_and_chunk(root: Path, rels: Sequence[str], embedder: Embedder, settings: ChunkSettings,
                   sources: SourceOptions | None = None) -> Loaded:
    """Read, parse and chunk a group of files; a bad file becomes a Skipped entry, never an exception."""
    out = Loaded()
    for rel in rels:
        try:
            src = read_source(root, Path(root) / rel)
            doc = parse(src, sources)
        except DocumentError as e:
            out.skipped.append(Skipped.from_error(rel, e))
            continue
        out.file_sha[rel] = doc.sha256
        if doc.redactions:
            out.redacted[rel] = describe_redactions(doc.redactions)
        out.chunks.extend(chunk_document(doc, embedder.tokens, settings, embedder.max_tokens))
    return out


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def embed_texts(embedder: Embedder, texts: Sequence[str], progress: ProgressFn | None = None) -> np.ndarray:
    """Embed one batch of texts, reporting ("embedded", n) to `progress`; float32 [n, dim], L2-normalised."""
    return embedder.embed_documents(list(texts), progress=(lambda n: progress("embedded", n)) if progress else None)


def with_cache(embedder: Embedder, stores_root: str | Path, cache: dict | None) -> Embedder:
    """`embedder` behind the embedding cache `cache` describes (CacheConfig fields as a dict, path resolved or
    None for `<stores_root>/.cache/embeddings.sqlite`); `embedder` itself when None or disabled."""
    if not cache or not cache.get("enabled", True):
        return embedder
    from woolocal_ingest.cache import cached_embedder

    return cached_embedder(embedder, stores_root, **cache)


def padding_waste(embedder: Embedder) -> float:
    """Padding share over everything `embedder` (or the one it wraps) has embedded so far."""
    real, padded = embedder.real_tokens, embedder.padded_tokens
    return round(1.0 - real / padded, 4) if padded else 0.0


def texts_to_embed(plan: IngestPlan, group: Loaded, seen: set[str]) -> list[str]:
    """Texts of `group`'s chunks that neither the previous store nor an earlier group (`seen`, updated) covers."""
    return _new_texts(plan, group.chunks, seen)


def adopted_texts(plan: IngestPlan, seen: set[str]) -> list[str]:
    """Texts of carried-over rows with no vector of ours (other writers' rows, rows of unchanged files that they
    rewrote): embedded again with the store's own model, so a store never holds vectors of unknown origin."""
    return _new_texts(plan, plan.kept, seen)


def _new_texts(plan: IngestPlan, chunks: Sequence[Chunk], seen: set[str]) -> list[str]:
    out = []
    for c in chunks:
        if c.sha256 not in plan.reusable and c.sha256 not in seen:
            seen.add(c.sha256)
            out.append(c.embed_text)  # what c.sha256 is of: the text with its title > heading context
    return out


def assemble_and_write(plan: IngestPlan, loaded: Sequence[Loaded], new_texts: Sequence[str],
                       new_vectors: Sequence[np.ndarray], embedder: Embedder) -> IngestSummary:
    """Combine carried-over rows, reused and new vectors into the next version of the store and write it atomically.

    The write is refused (StoreChangedError) if another writer changed the store since `plan` read it."""
    t0 = time.perf_counter()
    choice = embedder.choice
    summary = IngestSummary(project=plan.project, store=str(plan.target), model=embedder.model_name,
                            backend=embedder.backend, dim=embedder.dim, backend_reason=choice.reason if choice else "")
    record = read_record(Path(plan.previous)) if plan.previous is not None else None
    prev_chunks = list(record.chunks) if record is not None else []
    new_vecs = np.concatenate(list(new_vectors)) if len(new_vectors) else np.zeros((0, embedder.dim), np.float32)
    if new_vecs.shape[0] != len(new_texts):
        raise WoolocalError(f"embedding returned {new_vecs.shape[0]} vectors for {len(new_texts)} texts")
    fresh = {Chunk.text_sha256(t): i for i, t in enumerate(new_texts)}

    def vector(c: Chunk) -> np.ndarray:
        if c.sha256 in fresh:
            return new_vecs[fresh[c.sha256]]
        if plan.reuse_vectors and record is not None and c.sha256 in record.by_sha:
            return record.vectors[record.by_sha[c.sha256]]
        raise WoolocalError(f"{c.source or c.id} chunk {c.chunk}: no vector (embedding step incomplete)")

    skipped = list(plan.skipped)
    file_sha = {r: plan.file_sha[r] for r in plan.unchanged if r in plan.file_sha}
    prev_manifest = read_manifest(Path(plan.previous)) if plan.previous is not None else None
    prev_files = prev_manifest.source_files if prev_manifest is not None else {}
    for r in plan.unchanged:
        file_sha.setdefault(r, prev_files.get(r, ""))
    prev_ids = {c.id: c for c in prev_chunks}
    chunks: list[Chunk] = []
    unchanged_sources = set(plan.unchanged)
    for c in plan.kept:
        chunks.append(c)
        if c.id in plan.other_writers:
            continue
        old = prev_ids.get(c.id)
        if old is not None and old.sha256 == c.sha256 and old.metadata == c.metadata:
            summary.unchanged += 1
        else:
            summary.updated += 1
    loaded_sources: set[str] = set()
    redacted: dict[str, str] = {}
    for group in loaded:
        skipped += group.skipped
        redacted.update(group.redacted)
        file_sha.update(group.file_sha)
        loaded_sources.update(group.file_sha)
        for c in group.chunks:
            if c.sha256 not in fresh and plan.reuse_vectors and c.sha256 in plan.reusable:
                summary.reused += 1
            chunks.append(c)
            old = prev_ids.get(c.id)
            if old is None:
                summary.added += 1
            elif old.sha256 == c.sha256 and old.metadata == c.metadata:
                summary.unchanged += 1
            else:
                summary.updated += 1
    summary.embedded = len(new_texts)
    new_ids = {c.id for c in chunks}
    # Files that failed to load now but were in the previous store keep their chunks (nothing is lost).
    prev_by_source: dict[str, list[Chunk]] = {}
    for c in prev_chunks:
        prev_by_source.setdefault(c.source, []).append(c)
    for s in skipped:
        if (s.keeps_previous and plan.reuse_vectors and s.source in prev_by_source and s.source not in unchanged_sources
                and s.source not in loaded_sources):
            for c in prev_by_source[s.source]:
                if c.id not in new_ids:
                    chunks.append(c)
                    new_ids.add(c.id)
                    summary.unchanged += 1
            file_sha[s.source] = prev_files.get(s.source, "")
    # Rows of other writers go last, in their order; the folder's rows by file and position.
    ours = sorted((c for c in chunks if c.id not in plan.other_writers), key=lambda c: (c.source, c.chunk))
    chunks = ours + [c for c in chunks if c.id in plan.other_writers]
    summary.deleted = sum(1 for c in prev_chunks if c.id not in new_ids and c.id not in plan.other_writers
                          and c.source in prev_files)
    vectors = np.stack([vector(c) for c in chunks]) if chunks else np.zeros((0, embedder.dim), np.float32)
    summary.count = len(chunks)
    summary.skipped_files = [{"source": s.source, "reason": s.reason, "kind": s.kind, **({"rule": s.rule} if s.rule else {})}
                             for s in skipped]
    summary.redacted_files = [{"source": r, "lines": d} for r, d in sorted(redacted.items())]
    summary.duplicates = len(chunks) - len({c.sha256 for c in chunks})
    summary.files = {"found": len(plan.file_sha) + len({s.source for s in plan.skipped}),
                     "loaded": len(loaded_sources), "unchanged": len(plan.unchanged), "deleted": len(plan.deleted),
                     "skipped": len({s.source for s in skipped})}
    summary.adoption = plan.adoption.to_dict()
    layout_changed = prev_manifest is not None and ("langchain-python" in prev_manifest.layouts) != plan.python_layout
    moved = prev_manifest is not None and prev_manifest.source_root != str(plan.root)
    # a rebuild with other model files or another precision rewrites every vector even when no chunk changed
    remodelled = prev_manifest is not None and any(
        prev_manifest.model.get(k) != plan.model.get(k) for k in ("files_sha256", "quantization"))
    changed = (summary.added or summary.updated or summary.deleted or plan.previous is None or layout_changed
               or moved or remodelled or plan.adoption.outside or plan.adoption.restored or len(prev_chunks) != len(chunks))
    if changed:
        fingerprint = hashlib.sha256(json.dumps(sorted(file_sha.items())).encode()).hexdigest()
        manifest = {
            "project": plan.project,
            "model": plan.model,
            "chunking": plan.chunking,
            "source": {"root": str(plan.root), "fingerprint": fingerprint, "files": dict(sorted(file_sha.items()))},
            "migrated_from": None,
        }
        if plan.unreadable is not None and plan.target.exists():
            summary.backup = str(make_backup(plan.target))
        write_store(plan.target, chunks, vectors, manifest, python_layout=plan.python_layout,
                    expect=plan.snapshot if plan.previous is not None else None)
        summary.written = True
    summary.timings["write"] = round(time.perf_counter() - t0, 3)
    return summary


RACE_ATTEMPTS = 3  # runs in a row that find the store written by another program mid-run before giving up


def run_ingest(project: str, root: Path, stores_root: Path, embedder: Embedder, settings: ChunkSettings,
               include: Sequence[str], exclude: Sequence[str], python_layout: bool = False,
               rebuild: bool = False, cache: dict | None = None, sources: SourceOptions | None = None,
               move: bool = False, *, progress: ProgressFn | None = None) -> IngestSummary:
    """The whole ingest in this process, without Prefect: the same steps the flow runs as tasks (`run_request`
    runs an IngestRequest with them). `progress` gets ("total+", n) and ("embedded", n) as the embedding goes.

    With a FallbackEmbedder, a switch to the fallback mid-run re-embeds everything with it (into the fallback
    model's own store): a store never mixes two models. When another program (Wooster) writes into the store
    while the run works, the run starts again and adopts that write (the embedding cache keeps it cheap).
    """
    for attempt in range(1, RACE_ATTEMPTS + 1):
        try:
            return _run_ingest_once(project, root, stores_root, embedder, settings, include, exclude, python_layout,
                                    rebuild, cache, sources, move, progress)
        except StoreChangedError:
            if attempt == RACE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _run_ingest_once(project: str, root: Path, stores_root: Path, embedder: Embedder, settings: ChunkSettings,
                     include: Sequence[str], exclude: Sequence[str], python_layout: bool, rebuild: bool,
                     cache: dict | None, sources: SourceOptions | None, move: bool,
                     progress: ProgressFn | None) -> IngestSummary:
    embedder.ensure_ready()  # a primary that cannot load is replaced before anything is planned with it
    generation = embedder.generation
    t = time.perf_counter()
    plan = plan_ingest(project, root, stores_root, embedder, settings, include, exclude, python_layout, rebuild,
                       sources=sources, move=move)
    t_plan = time.perf_counter() - t
    t = time.perf_counter()
    loaded = [load_and_chunk(plan.root, g, embedder, settings, sources) for g in plan.load_groups()]
    t_chunk = time.perf_counter() - t
    t = time.perf_counter()
    seen: set[str] = set()
    texts = adopted_texts(plan, seen) + [x for group in loaded for x in texts_to_embed(plan, group, seen)]
    if progress:
        progress("total+", len(texts))
    emb = with_cache(embedder, stores_root, cache)
    vectors = [embed_texts(emb, b, progress) for b in batched(texts, EMBED_TASK_SIZE)]
    t_embed = time.perf_counter() - t
    if embedder.generation != generation:
        return run_ingest(project, root, stores_root, embedder, settings, include, exclude, python_layout, True, cache,
                          sources, move, progress=progress)
    summary = assemble_and_write(plan, loaded, texts, vectors, embedder)
    summary.cached = emb.hits
    summary.padding_waste = padding_waste(embedder)
    summary.timings.update(plan=round(t_plan, 3), load_chunk=round(t_chunk, 3), embed=round(t_embed, 3))
    return summary


def run_request(request: "IngestRequest", embedder: Embedder | None = None, *,
                progress: ProgressFn | None = None) -> IngestSummary:
    """`run_ingest` for an IngestRequest, with `embedder` or else the process's embedder for its spec."""
    if embedder is None:
        from woolocal_ingest import embedders

        embedder = embedders.get(request.embedder)
    r = request
    return run_ingest(r.project, r.root, r.stores_root, embedder, r.chunking, r.include, r.exclude, r.python_layout,
                      r.rebuild, r.cache, r.sources, r.move, progress=progress)
