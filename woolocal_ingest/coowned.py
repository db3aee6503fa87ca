"""Co-owned stores: what a store holds now that Wooster (LangChain JS) or LangChain Python may have written into it,
reconciled with our record, so that every run that writes a store adopts their rows instead of losing them.

`read_current(folder)` reads the truth of both layouts (faiss.index + docstore.json, and index.faiss + index.pkl
through the restricted unpickler) and our record (manifest.json + chunks.parquet); the layouts that another writer
changed are applied to the record, older first, so a row added, deleted or rewritten in either is seen. Real damage
(unreadable files, dims or counts that disagree) raises StoreError: it is never taken for an adoption.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from woolocal_ingest.chunking import Chunk
from woolocal_ingest.errors import StoreError
from woolocal_ingest.fsutil import FileState, sha256_file
from woolocal_ingest.manifest import Manifest
from woolocal_ingest.stores import (
    INDEX_PY, PICKLE_PY, PY_FILES, Drift, Record, Store, drift_between, json_safe,
)

__all__ = ["Adoption", "CurrentStore", "read_current"]

# Problems of a LangChain Python layout that mean its files are damaged, not merely written by someone else.
_DAMAGE = ("count_mismatch", "index_truncated", "unmapped_row", "missing_text", "row_out_of_range", "bad_entry",
           "duplicate_id", "index_missing")


@dataclass
class Adoption:
    """What a run that writes a store did with another writer's changes (counts for the summary)."""

    outside: list[dict] = field(default_factory=list)  # Drift.to_dict() of each layout changed outside
    adopted: int = 0  # rows added or rewritten outside, kept in the new version
    reembedded: int = 0  # of those, rows embedded again from their text (the embedding cache may serve them)
    kept: int = 0  # rows of other writers kept in the new version (adopted now or earlier)
    restored: int = 0  # rows of the ingested folder's files deleted outside and written back (the folder is truth)
    stayed_deleted: int = 0  # rows deleted outside that stay deleted

    def to_dict(self) -> dict:
        return {"outside": self.outside, "adopted": self.adopted, "reembedded": self.reembedded, "kept": self.kept,
                "restored": self.restored, "stayed_deleted": self.stayed_deleted}

    def line(self) -> str:
        """One line for the CLI summary ('' when nobody else wrote)."""
        if not self.outside and not self.kept:
            return ""
        what = "; ".join(f"{d['layout']} +{d['added']} \u2212{d['deleted']} ~{d['rewritten']}" for d in self.outside)
        return (f"{what or 'no change outside'}: {self.adopted} adopted ({self.reembedded} re-embedded), "
                f"{self.kept} kept from other writers, {self.restored} restored, {self.stayed_deleted} stayed deleted")


@dataclass
class CurrentStore:
    """A store as a writing run finds it: the rows it holds now (both layouts applied), our record, what changed."""

    path: Path
    manifest: Manifest
    record: Record
    rows: list[Chunk]
    drifts: list[Drift]
    snapshot: dict[str, FileState | None]

    @property
    def changed_outside(self) -> bool:
        return any(d.changed for d in self.drifts)

    def trusted(self, c: Chunk) -> bool:
        """Whether our record holds a vector we computed for exactly this text (no need to embed it again)."""
        return c.sha256 in self.record.by_sha

    def vector(self, c: Chunk) -> np.ndarray:
        return self.record.vectors[self.record.by_sha[c.sha256]]

    def outside_ids(self) -> set[str]:
        """Ids of rows another writer added or rewrote (not as our record has them)."""
        return {i for d in self.drifts for i in (*d.added, *d.rewritten)}


def _python_truth(folder: Path, manifest: Manifest) -> tuple[list[tuple[str, str, dict]], float] | None:
    """Rows of the LangChain Python layout when another writer changed it (None: absent or as we wrote it)."""
    present = [(folder / n).is_file() for n in PY_FILES]
    if not any(present):
        return None
    listed = manifest.files
    if all(present) and all(listed.get(n) == sha256_file(folder / n) for n in PY_FILES):
        return None
    if not all(present):
        missing = next(n for n, p in zip(PY_FILES, present) if not p)
        raise StoreError(f"{folder / missing}: missing beside {next(n for n in PY_FILES if n != missing)} (a "
                         "LangChain Python save was interrupted?)")
    from woolocal_ingest.legacy import read_legacy_store

    lg = read_legacy_store(folder, format="langchain-python")
    damage = [p for p in lg.problems if p.kind in _DAMAGE]
    if damage:
        raise StoreError(f"{folder}: the LangChain Python layout ({INDEX_PY} + {PICKLE_PY}) is damaged: "
                         + "; ".join(p.message for p in damage[:3]))
    mtime = max(os.stat(folder / n).st_mtime_ns for n in PY_FILES)
    return [(json_safe(c.id), c.text, c.metadata) for c in lg.chunks], mtime


def _apply(base: list[Chunk], truth: list[tuple[str, str, dict]], d: Drift) -> list[Chunk]:
    """`base` with one layout's changes applied: its deleted ids removed, rewritten ones replaced, added appended."""
    by_id = {t[0]: t for t in truth}
    gone = set(d.deleted)
    out = []
    for c in base:
        if c.id in gone:
            continue
        out.append(_chunk(by_id[c.id], c.chunk) if c.id in d.rewritten else c)
    out += [_chunk(by_id[i], len(out) + n) for n, i in enumerate(d.added)]
    return out


def _chunk(t: tuple[str, str, dict], row: int) -> Chunk:
    id_, text, meta = t
    source, chunk = meta.get("source"), meta.get("chunk")
    return Chunk(id=id_, text=text, source=source if isinstance(source, str) else "",
                 chunk=chunk if isinstance(chunk, int) and not isinstance(chunk, bool) else row,
                 metadata=meta, sha256=Chunk.text_sha256(text))


def read_current(folder: Path) -> CurrentStore:
    """The store at `folder` as a writing run must see it (module docstring); StoreError on real damage."""
    store = Store(folder)  # faiss.index + docstore.json, checked against each other (damage raises)
    record = store.record
    js_changed = store.drift.changed
    drifts = [store.drift] if js_changed else []
    rows = store.chunks() if js_changed else list(record.chunks)
    py = _python_truth(store.path, store.manifest)
    if py is not None:
        py_rows, py_mtime = py
        py_drift = drift_between("langchain-python", py_rows, record)
        if py_drift.changed:
            js_mtime = max(os.stat(store.path / n).st_mtime_ns for n in ("faiss.index", "docstore.json"))
            if not js_changed:
                rows = _apply(list(record.chunks), py_rows, py_drift)
                drifts = [py_drift]
            elif py_mtime >= js_mtime:  # both changed: the newer layout's changes are applied last
                rows = _apply(rows, py_rows, py_drift)
                drifts = [store.drift, py_drift]
            else:
                js_rows = [(c.id, c.text, c.metadata) for c in rows]
                rows = _apply(_apply(list(record.chunks), py_rows, py_drift), js_rows,
                              drift_between("langchain-js", js_rows, record))
                drifts = [py_drift, store.drift]
    return CurrentStore(path=store.path, manifest=store.manifest, record=record, rows=rows, drifts=drifts,
                        snapshot=store.snapshot)
