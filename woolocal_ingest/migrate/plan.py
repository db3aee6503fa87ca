"""The plan of one migration: the source read (`source_fingerprint`, the target checked), the rows of the new store
after re-chunking, and what other writers (Wooster, LangChain) did to the target applied onto them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from woolocal_ingest.chunking import Chunk
from woolocal_ingest.coowned import Adoption, CurrentStore, read_current
from woolocal_ingest.errors import StoreError
from woolocal_ingest.fsutil import sha256_file
from woolocal_ingest.legacy import LegacyStore, Problem, read_legacy_store
from woolocal_ingest.manifest import NAME_RE, read_manifest
from woolocal_ingest.migrate.errors import MigrationError, MigrationInputError
from woolocal_ingest.migrate.layouts import default_project
from woolocal_ingest.migrate.model import same_model
from woolocal_ingest.migrate.rechunk import SPLIT_KEY, piece_metadata, split_text, token_limit
from woolocal_ingest.migrate.request import MigrateRequest
from woolocal_ingest.stores import is_store, json_safe, json_safe_value, truth_snapshot

if TYPE_CHECKING:
    from woolocal_ingest.config import FlowsConfig
    from woolocal_ingest.embedders.base import Embedder


def source_fingerprint(path: Path) -> tuple[str, dict[str, str]]:
    """(sha256 over the files, {file name: sha256}) of a store folder's top-level files (dot-files aside)."""
    files = {p.name: sha256_file(p) for p in sorted(Path(path).iterdir())
             if p.is_file() and not p.name.startswith(".")}
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest(), files


@dataclass
class Plan:
    """One migration's source, target and rows, filled in step by step (read, planned, adopted)."""

    source: Path
    target: Path
    in_place: bool
    project: str
    legacy: LegacyStore
    fingerprint: str
    files: dict[str, str]
    python_layout: bool
    limit: int = 0
    rows: list[Chunk] = field(default_factory=list)
    origin: list[int] = field(default_factory=list)  # source chunk index of each row
    tokens: list[int] = field(default_factory=list)  # tokens of each row, special tokens included
    source_texts: list[str] = field(default_factory=list)  # each source chunk's text as stored (valid UTF-8)
    split: dict[str, list[str]] = field(default_factory=dict)  # source id -> its pieces' ids
    problems: list[Problem] = field(default_factory=list)
    current: CurrentStore | None = None  # the target as found (a woolocal store), other writers' changes included
    snapshot: dict | None = None  # identity of the target's LangChain files when read (a racing write shows)
    trusted: dict[str, np.ndarray] = field(default_factory=dict)  # text sha256 -> our vector (same model files)
    dropped: set[int] = field(default_factory=set)  # source chunks whose rows another writer deleted in the target
    adoption: Adoption = field(default_factory=Adoption)


def read_plan(request: MigrateRequest, source: Path, target: Path, config: "FlowsConfig") -> Plan:
    """The source read (old vectors aside) and the target as found: a plan with no rows yet. When the source is
    the target, the rows other writers changed in it since our run are read with both layouts."""
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
    layout = request.python_layout if request.python_layout is not None else (
        True if lg.format == "langchain-python" else config.defaults.python_layout)
    return Plan(source=source, target=target, in_place=request.in_place,
                project=request.project or default_project(source), legacy=lg, fingerprint=fp, files=files,
                python_layout=layout, current=current, snapshot=snap)


def plan_rows(plan: Plan, emb: "Embedder") -> None:
    """Rows of the new store, in the source's order: each chunk as is, or its pieces when it exceeds the model."""
    counter = emb.tokens
    plan.limit = limit = token_limit(emb)
    special = counter.special_tokens
    chunks = plan.legacy.chunks
    plan.source_texts = texts = [json_safe(c.text) for c in chunks]
    counts = counter.count_many(texts) if texts else []
    used: set[str] = set()
    renamed: list[str] = []
    safe_ids = []
    for c in chunks:  # ids as written (lone surrogates replaced); a clash that makes gets a #dup suffix
        sid = json_safe(c.id)
        if sid in used:
            n = 1
            while f"{sid}#dup{n}" in used:
                n += 1
            renamed.append(f"{c.id!r} -> {sid}#dup{n}")
            sid = f"{sid}#dup{n}"
        used.add(sid)
        safe_ids.append(sid)
    if renamed:
        plan.problems.append(Problem("id_renamed", f"{len(renamed)} id(s) equal another once lone surrogates are "
                                     f"replaced (U+FFFD); renamed: {', '.join(renamed[:10])}"))
    for i, c in enumerate(chunks):
        text, cid = texts[i], safe_ids[i]
        meta = json_safe_value(c.metadata)
        if counts[i] <= limit:
            plan.rows.append(Chunk(cid, text, json_safe(c.source), c.chunk, meta, c.sha256))
            plan.origin.append(i)
            plan.tokens.append(counts[i] + special)
            continue
        pieces = split_text(counter, text, limit)
        ids, pos = [], 0
        for k, piece in enumerate(pieces):
            pid = cid if k == 0 else f"{cid}#{k}"
            while k and pid in used:
                pid += "~"
            used.add(pid)
            ids.append(pid)
            m = piece_metadata(meta, cid, k, len(pieces), pos, pos + len(piece), text)
            plan.rows.append(Chunk(pid, piece, json_safe(c.source), c.chunk, m, Chunk.text_sha256(piece)))
            plan.origin.append(i)
            plan.tokens.append(counter.count(piece) + special)
            pos += len(piece)
        plan.split[cid] = ids
    if plan.split:
        n_pieces = sum(len(v) for v in plan.split.values())
        plan.problems.append(Problem(
            "rechunked", f"{len(plan.split)} chunk(s) longer than {limit} tokens (what {emb.model_name} takes, less "
            f"special tokens) split into {n_pieces} pieces at paragraph/line/sentence/word boundaries (token "
            f"boundaries where a run has none); nothing truncated. The first piece keeps the chunk's id, the others "
            f"are <id>#1, <id>#2, ...; each carries metadata.{SPLIT_KEY}", ids=list(plan.split)))


def adopt_target(plan: Plan, emb: "Embedder") -> None:
    """Apply what other writers did to the target since we wrote it onto the planned rows: rows they deleted stay
    deleted, rows they rewrote keep their text, rows they added are kept (and embedded with our model unless we
    already hold a vector of that text)."""
    cur = plan.current
    if cur is None:
        return
    if same_model(cur.manifest, emb):
        for c in cur.record.chunks:
            plan.trusted.setdefault(c.sha256, cur.record.vectors[cur.record.by_id[c.id]])
    if plan.in_place:  # the source is the target: its rows (read with both layouts) already are what it holds now
        plan.adoption.outside = [d.to_dict() for d in cur.drifts if d.changed]
        changed = cur.outside_ids()
        plan.adoption.adopted = sum(1 for c in plan.rows if c.id in changed)
        plan.adoption.reembedded = sum(1 for c in plan.rows if c.id in changed and c.sha256 not in plan.trusted)
        return
    drifts = [d for d in cur.drifts if d.changed]
    if not drifts:
        return
    plan.adoption.outside = [d.to_dict() for d in drifts]
    now = {c.id: c for c in cur.rows}
    deleted = {i for d in drifts for i in d.deleted}
    rewritten = {i for d in drifts for i in d.rewritten}
    rows, origin, tokens = [], [], []
    for c, o, t in zip(plan.rows, plan.origin, plan.tokens):
        if c.id in deleted:
            plan.dropped.add(o)
            plan.adoption.stayed_deleted += 1
            continue
        if c.id in rewritten and c.id in now:
            c = now[c.id]
            plan.dropped.add(o)  # its text is another writer's now
            plan.adoption.adopted += 1
            t = emb.tokens.count(c.text) + emb.tokens.special_tokens
        rows.append(c)
        origin.append(o)
        tokens.append(t)
    have = {c.id for c in rows}
    for i in (i for d in drifts for i in d.added):
        if i in now and i not in have:
            c = now[i]
            rows.append(c)
            origin.append(-1)
            tokens.append(emb.tokens.count(c.text) + emb.tokens.special_tokens)
            have.add(i)
            plan.adoption.adopted += 1
    plan.adoption.kept = sum(1 for o in origin if o < 0)
    planned = {r.id for r in plan.rows}  # rows another writer added or rewrote: embedded unless we know the text
    plan.adoption.reembedded = sum(1 for c in rows if (c.id in rewritten or c.id not in planned)
                                   and c.sha256 not in plan.trusted)
    plan.rows, plan.origin, plan.tokens = rows, origin, tokens


def rows_digest(rows: Sequence[Chunk]) -> str:
    h = hashlib.sha256()
    for c in rows:
        h.update(c.id.encode("utf-8", "surrogatepass") + b"\0" + Chunk.text_sha256(c.text).encode() + b"\n")
    return h.hexdigest()


def check_target(plan: Plan, emb: "Embedder") -> None:
    src, target = plan.source, plan.target
    m = NAME_RE.match(target.name)
    if m and int(m.group("dim")) != emb.dim:
        hint = " in place" if plan.in_place else ""
        raise MigrationInputError(f"{target}: the folder name says {m.group('dim')}d but {emb.model_name} makes "
                                  f"{emb.dim}-dim vectors; cannot migrate{hint} into it (give --out, or no --out for "
                                  f"the default <stores_root>/<project>/{emb.info.slug}-{emb.dim}d)")
    if plan.in_place:
        if m and m.group("slug") != emb.info.slug:
            raise MigrationInputError(f"{target}: the folder name says model {m.group('slug')}; migrating it in place "
                                      f"to {emb.model_name} would mislabel it (give --out, or no --out for the "
                                      f"default <stores_root>/<project>/{emb.info.slug}-{emb.dim}d)")
        return
    if target == src:
        if plan.legacy.format == "woolocal" and same_model(read_manifest(src), emb):
            return  # the same model again: `unchanged`
        raise MigrationInputError(f"{target}: is the source; use --in-place to replace it (it is kept as a backup)")
    if target.is_relative_to(src):
        raise MigrationInputError(f"{target}: lies inside the source {src}; the source is never modified")
    if target.exists() and not is_store(target) and (not target.is_dir() or any(target.iterdir())):
        raise MigrationInputError(f"{target}: exists and is not a woolocal store; refusing to replace it")
