"""Verification of a migrated store before it is swapped in: the rows written are the planned rows, every source
text is present in full, dims match the model, and a sample of rows re-embedded finds itself first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from woolocal_ingest.migrate.model import uncached
from woolocal_ingest.migrate.plan import Plan
from woolocal_ingest.stores import INDEX_JS, PARQUET

if TYPE_CHECKING:
    from woolocal_ingest.embedders.base import Embedder

VERIFY_SAMPLE = 24  # rows re-embedded to check that each finds itself first


def verify_written(folder: Path, plan: Plan, emb: "Embedder") -> list[str]:
    """Migration-specific checks of a written store folder (verify_store has checked its integrity)."""
    import faiss
    import pyarrow.parquet as pq

    problems: list[str] = []
    index = faiss.read_index(str(folder / INDEX_JS))
    t = pq.read_table(folder / PARQUET, columns=["id", "text", "metadata"])
    ids, texts = t.column("id").to_pylist(), t.column("text").to_pylist()
    metas = [json.loads(m) for m in t.column("metadata").to_pylist()]
    n = len(plan.rows)
    if index.d != emb.dim:
        problems.append(f"index dim {index.d}, model {emb.model_name} makes {emb.dim}")
    if index.ntotal != n or len(ids) != n:
        problems.append(f"{n} rows planned, index holds {index.ntotal}, {PARQUET} {len(ids)}")
        return problems
    diff = [i for i in range(n) if ids[i] != plan.rows[i].id]
    if diff:
        problems.append(f"{len(diff)} row id(s) differ from the source's (first: row {diff[0]})")
    diff = [i for i in range(n) if texts[i] != plan.rows[i].text]
    if diff:
        problems.append(f"{len(diff)} row text(s) differ from the source's (first: row {diff[0]})")
    diff = [i for i in range(n) if metas[i] != plan.rows[i].metadata]
    if diff:
        problems.append(f"{len(diff)} row metadata differ from the source's (first: row {diff[0]})")
    joined: list[list[str]] = [[] for _ in plan.source_texts]
    for i, o in enumerate(plan.origin):
        if o >= 0:
            joined[o].append(texts[i])
    lost = [plan.legacy.chunks[j].id for j, parts in enumerate(joined)
            if j not in plan.dropped and "".join(parts) != plan.source_texts[j]]
    if lost:
        problems.append(f"{len(lost)} source text(s) not present in full (first: id {lost[0]})")
    problems += _self_retrieval(index, texts, emb)
    return problems


def _self_retrieval(index: Any, texts: list[str], emb: "Embedder") -> list[str]:
    """A sample of rows, embedded afresh from their text, must each find themselves first (rows of identical text,
    or within 1e-5 of the best distance, count as themselves)."""
    seen: dict[str, int] = {}
    for i, x in enumerate(texts):
        if x.strip():
            seen[x] = -1 if x in seen else i
    candidates = [i for i in seen.values() if i >= 0]
    if not candidates:
        return []
    step = max(1, len(candidates) // VERIFY_SAMPLE)
    sample = candidates[::step][:VERIFY_SAMPLE]
    q = np.ascontiguousarray(uncached(emb).embed_documents([texts[i] for i in sample]), dtype=np.float32)
    k = min(10, index.ntotal)
    dist, labels = index.search(q, k)
    missed = []
    for row, d, lab in zip(sample, dist, labels):
        near = [int(r) for r, x in zip(lab, d) if x <= d[0] + 1e-5]
        if row not in near:
            missed.append(row)
    if missed:
        return [f"self-retrieval: {len(missed)} of {len(sample)} sampled rows did not find themselves first "
                f"(rows {missed[:10]}): vectors do not belong to their texts"]
    return []
