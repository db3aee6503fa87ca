"""The cost of adopting rows another writer (Wooster, LangChain JS) added to a store, per 1,000 rows.

One run, arms side by side, medians of --repeat:
  noop       re-ingest an unchanged folder into its untouched store (the baseline: nothing to do)
  adopt-cold the same, after a LangChain JS save added --outside rows: read both layouts, reconcile with our record,
             embed the new rows with the store's model (embedding cache empty), write the store
  adopt-warm the same write adopted again with the embedding cache holding those texts (what a re-run costs)
Adoption's own cost (reading, reconciling, writing, no model) is adopt-warm - noop; the model's part is
adopt-cold - adopt-warm. The outside rows are written in LangChain JS's own file format (FaissStore.save:
faiss.index + docstore.json), from Python so the benchmark needs no node.

    .venv/bin/python bench/bench_adopt.py --outside 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from woolocal_ingest.chunking import ChunkSettings  # noqa: E402
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE  # noqa: E402
from woolocal_ingest.embedders import load_embedder  # noqa: E402
from woolocal_ingest.ingest import run_ingest  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpora" / "conda-docs"


def js_append(store: Path, rows: list[tuple[str, str]], vectors: np.ndarray) -> None:
    """What LangChain JS FaissStore.addVectors + save writes: the index with the rows appended, the docstore's
    entries and row->id mapping extended."""
    import faiss

    index = faiss.read_index(str(store / "faiss.index"))
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    faiss.write_index(index, str(store / "faiss.index"))
    docs, mapping = json.loads((store / "docstore.json").read_text(encoding="utf-8"))
    n = len(mapping)
    for i, (id_, text) in enumerate(rows):
        docs.append([id_, {"pageContent": text, "metadata": {"source": "wooster:memory"}}])
        mapping[str(n + i)] = id_
    (store / "docstore.json").write_text(json.dumps([docs, mapping]), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outside", type=int, default=1000, help="rows the other writer adds")
    ap.add_argument("--files", type=int, default=20, help="conda-docs files in the ingested folder")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    emb = load_embedder(None)
    settings = ChunkSettings()
    work = Path(tempfile.mkdtemp(prefix="bench-adopt-"))
    try:
        folder = work / "docs"
        folder.mkdir()
        for p in sorted(CORPUS.glob("*.md"))[: args.files]:
            shutil.copy2(p, folder / p.name)
        first = run_ingest("docs", folder, work / "stores", emb, settings, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
        store = Path(first.store)
        pristine = work / "pristine"
        shutil.copytree(store, pristine)
        rng = np.random.default_rng(0)
        words = (folder / sorted(p.name for p in folder.iterdir())[0]).read_text(encoding="utf-8").split()
        texts = [" ".join(rng.choice(words, 40)) + f" (memory {i})" for i in range(args.outside)]
        rows = [(f"wooster-{i:06d}", t) for i, t in enumerate(texts)]
        vecs = rng.standard_normal((len(rows), emb.dim)).astype(np.float32)  # Wooster's vectors: never trusted
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)

        def run(arm: str, cache_dir: Path) -> float:
            shutil.rmtree(store)
            shutil.copytree(pristine, store)
            if arm != "noop":
                js_append(store, rows, vecs)
            cache = {"enabled": True, "path": str(cache_dir / "emb.sqlite"), "max_mb": 512}
            t = time.perf_counter()
            s = run_ingest("docs", folder, work / "stores", emb, settings, DEFAULT_INCLUDE, DEFAULT_EXCLUDE, cache=cache)
            dt = time.perf_counter() - t
            assert (s.adoption.get("adopted", 0) == args.outside) == (arm != "noop"), s.adoption
            return dt

        res: dict[str, list[float]] = {"noop": [], "adopt-cold": [], "adopt-warm": []}
        for r in range(args.repeat):
            cache_dir = work / f"cache-{r}"
            cache_dir.mkdir()
            for arm in ("noop", "adopt-cold", "adopt-warm"):  # warm follows cold: the cache holds those texts
                res[arm].append(run(arm, cache_dir))
        med = {k: statistics.median(v) for k, v in res.items()}
        per_k = 1000.0 / args.outside
        out = {"store_rows": first.count, "outside_rows": args.outside, "repeat": args.repeat,
               "median_s": {k: round(v, 3) for k, v in med.items()},
               "adoption_ms_per_1000_rows": round((med["adopt-warm"] - med["noop"]) * 1000 * per_k, 1),
               "embedding_ms_per_1000_rows": round((med["adopt-cold"] - med["adopt-warm"]) * 1000 * per_k, 1),
               "adopt_cold_over_noop": round(med["adopt-cold"] / med["noop"], 2),
               "adopt_warm_over_noop": round(med["adopt-warm"] / med["noop"], 2)}
        print(json.dumps(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
