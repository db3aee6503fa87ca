"""Retrieval quality on the labelled conda set (`bench/conda/queries.tsv`), scheme by scheme and mode by mode.

Builds one store of `../shared/corpora/conda-docs` per chunking scheme (with the packaged all-MiniLM-L6-v2):

- `v3`: chunker 3 (the splitter's separators: blank lines, line breaks, spaces; plain chunk text embedded),
- `sentences`: chunker 4 boundaries (sentence ends before line breaks; reST titles kept with their section),
- `sentences+context`: chunker 4 as shipped (the above, embedded with `Title > Section > Subsection`),

then scores every mode of each with `woolocal_ingest.eval` (what `woolocal eval` prints), plus the alternatives
the defaults were chosen against: fusion by a normalised score mix instead of RRF, and `bm25s` instead of SQLite
FTS5 for the lexical ranking (`pip install bm25s PyStemmer` for that arm). It also counts chunks that start
mid-sentence, and the rank of the issue's two newcomer questions.

    python bench/bench_retrieval.py [--stores /tmp/woolocal-bench-retrieval] [--json bench/results/retrieval.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from woolocal_ingest import stores as stores_mod  # noqa: E402
from woolocal_ingest.chunking import ChunkSettings  # noqa: E402
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE  # noqa: E402
from woolocal_ingest.eval import evaluate, load_eval_set  # noqa: E402
from woolocal_ingest.retrieval import fuse_mix  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpora" / "conda-docs"
QUESTIONS = REPO / "bench" / "conda" / "queries.tsv"
SCHEMES = {"v3": (False, False), "sentences": (True, False), "sentences+context": (True, True)}
# The newcomer questions, as asked, and the chunk that answers each: the reST section on pinning, the
# cheatsheet line on `conda clean` (additional-hints.csv, or the same line in a cheatsheet PDF).
NEWCOMER = {
    "how to pin a package version": lambda h: "pinning" in str(h.metadata.get("heading", "")).lower()
    or "pinned" in h.text,
    "what does conda clean do": lambda h: "conda clean" in h.text and "cheatsheets/" in str(h.metadata.get("source")),
}


def build(name: str, root: Path, embedder) -> Path:
    from woolocal_ingest.ingest import run_ingest

    sentences, context = SCHEMES[name]
    t = time.perf_counter()
    s = run_ingest("conda", CORPUS, root / name, embedder, ChunkSettings(200, 32, sentences=sentences, context=context),
                   include=DEFAULT_INCLUDE, exclude=DEFAULT_EXCLUDE)
    print(f"built {name}: {s.count} chunks, embedded {s.embedded} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    return Path(s.store)


def mid_sentence_share(store) -> float:
    """Share of chunks (not first of their file) whose start is not at a sentence, paragraph or line-item start:
    the text before it (in the file) does not end a sentence or a block."""
    texts: dict[str, str] = {}
    n = bad = 0
    for c in store.chunks():
        if c.chunk == 0 or c.metadata.get("fileType") not in ("rst", "md", "txt"):
            continue
        src = texts.setdefault(c.source, (CORPUS / c.source).read_text(encoding="utf-8", errors="replace"))
        start = src.find(c.text[:80])
        if start <= 0:
            continue
        before = src[:start]
        n += 1
        block = before.endswith("\n\n") or re.search(r"\n\s*\n\s*$", before) is not None
        if not (block or before.rstrip()[-1:] in ".!?:" or re.match(r"\s*([-*#=`|>]|\d+\.|\.\. )", c.text)):
            bad += 1
    return round(bad / n, 4) if n else 0.0


def newcomer_ranks(store) -> dict:
    """Rank (1-based) of the first chunk that answers each of the issue's questions, per mode (None: not in 100)."""
    out = {}
    for q, answers in NEWCOMER.items():
        out[q] = {}
        for mode in ("hybrid", "dense", "lexical"):
            hits = store.search(q, k=100, mode=mode)
            out[q][mode] = next((i for i, h in enumerate(hits, 1) if answers(h)), None)
    return out


def latency_ms(store, data, mode: str, k: int = 10) -> float:
    """Median wall time of one `store.search(question, k)` (query embedding included), over the questions."""
    times = []
    for q in data.judged:
        t = time.perf_counter()
        store.search(data.queries[q], k=k, mode=mode)
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 2)


class Bm25sLexical:
    """The alternative lexical ranking: bm25s (stemmed, English stop words) over the same indexed texts."""

    def __init__(self, store):
        import bm25s
        import Stemmer

        rec = {c.id: c for c in store.chunks()}
        self.stemmer = Stemmer.Stemmer("english")
        corpus = [rec[i].embed_text for i in store.ids]
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(corpus, stopwords="en", stemmer=self.stemmer, show_progress=False),
                             show_progress=False)
        self.n = len(corpus)

    def search(self, query: str, k: int, rows=None) -> list[tuple[int, float]]:
        import bm25s

        q = bm25s.tokenize([query], stopwords="en", stemmer=self.stemmer, show_progress=False)
        if not q.vocab:
            return []
        docs, scores = self.retriever.retrieve(q, k=min(k, self.n), show_progress=False)
        return [(int(d), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stores", default="/tmp/woolocal-bench-retrieval")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "retrieval.json"))
    args = ap.parse_args()
    from woolocal_ingest.embedders import load_embedder
    from woolocal_ingest.stores import Store

    embedder = load_embedder(None)
    data = load_eval_set(QUESTIONS)
    root = Path(args.stores)
    results: dict = {"questions": len(data.judged), "schemes": {}}
    for name in SCHEMES:
        folder = root / name / "conda" / f"{embedder.info.slug}-{embedder.dim}d"
        if not (folder / "manifest.json").is_file():
            folder = build(name, root, embedder)
        store = Store(folder, embedder=embedder)
        rep = evaluate(store, data)
        entry = {"chunks": store.count, "mid_sentence_starts": mid_sentence_share(store),
                 "modes": {m: {k: v for k, v in vars(s).items() if k != "misses"} for m, s in rep.modes.items()},
                 "newcomer_chunk_ranks": newcomer_ranks(store),
                 "median_ms_k10": {m: latency_ms(store, data, m) for m in ("hybrid", "dense", "lexical")}}
        print(f"\n== {name}: {store.count} chunks, {entry['mid_sentence_starts']:.1%} start mid-sentence")
        print(rep.table())
        if name == "sentences+context":
            alts = {}
            orig = stores_mod.fuse_rrf
            try:
                for alpha in (0.3, 0.5, 0.7):
                    stores_mod.fuse_rrf = lambda d, l, k, a=alpha: fuse_mix(d, l, k, alpha=a)
                    alts[f"hybrid, normalised mix alpha={alpha}"] = evaluate(store, data, modes=("hybrid",)).modes["hybrid"]
                stores_mod.fuse_rrf = orig
                try:
                    bm = Bm25sLexical(store)
                    store.__dict__["lexical"] = bm
                    alts["lexical, bm25s"] = evaluate(store, data, modes=("lexical",)).modes["lexical"]
                    alts["hybrid (RRF), bm25s"] = evaluate(store, data, modes=("hybrid",)).modes["hybrid"]
                except ImportError:
                    print("(bm25s not installed: pip install bm25s PyStemmer for that arm)", file=sys.stderr)
            finally:
                stores_mod.fuse_rrf = orig
            entry["alternatives"] = {k: {f: v for f, v in vars(s).items() if f != "misses"} for k, s in alts.items()}
            for k, s in alts.items():
                print(f"{k:<40} " + "  ".join(s.row()))
        results["schemes"][name] = entry
        print("median ms per search at k=10:", json.dumps(entry["median_ms_k10"]))
        print("newcomer questions (rank of the first answering chunk):", json.dumps(entry["newcomer_chunk_ranks"]))
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
