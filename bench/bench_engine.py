"""Benchmark the embedding engine on the same chunks of a corpus, in one run.

    .venv/bin/python bench/bench_engine.py [--corpus ../shared/corpora/conda-docs] [--limit 1024] [--repeat 3]
                                           [--mlx-limit 48] [--out bench/results]

For each backend (sentence-transformers on torch, ONNX Runtime, MLX) and each batching (token-budget: sorted by
token length, cut by padded tokens; fixed: N texts in input order): chunks/s, tokens/s and padding waste, median of
`--repeat` timed passes after one warm-up pass. The texts are the chunks `woolocal ingest` makes of the corpus with
the default model (all-MiniLM-L6-v2). MLX on Linux runs on mlx-cpu's reference BLAS and gets `--mlx-limit` chunks.
Also bare `SentenceTransformer.encode(texts)` (its defaults) as the baseline. Writes engine.json and engine.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def corpus_chunks(corpus: Path, embedder) -> list[str]:
    from woolocal_ingest.chunking import ChunkSettings
    from woolocal_ingest.documents import discover
    from woolocal_ingest.ingest import load_and_chunk

    paths, _ = discover(corpus)
    loaded = load_and_chunk(corpus, [p.relative_to(corpus).as_posix() for p in paths], embedder, ChunkSettings())
    return [c.text for c in loaded.chunks]


def timed(fn, repeat: int) -> list[float]:
    fn()  # warm-up (also loads the model / builds the ONNX export)
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpora" / "conda-docs"))
    ap.add_argument("--limit", type=int, default=1024, help="chunks per timed pass (a spread sample of the corpus)")
    ap.add_argument("--mlx-limit", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fixed-batch", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--backends", default="sentence-transformers,onnx,mlx")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from woolocal_ingest.embedders import resolve_model
    from woolocal_ingest.embedders.sentence_transformers import SentenceTransformerEmbedder

    info = resolve_model(None)
    st = SentenceTransformerEmbedder(info)
    texts = corpus_chunks(Path(a.corpus), st)
    step = max(1, len(texts) // a.limit)
    sample = texts[::step][: a.limit]
    lengths = [min(n + 2, info.max_tokens) for n in st.tokens.count_many(sample)]
    tokens = sum(lengths)
    print(f"{len(texts)} chunks in corpus; timing {len(sample)} ({tokens} tokens), repeat {a.repeat}", file=sys.stderr)

    rows = []

    def record(backend: str, batching: str, n: int, tok: int, times: list[float], waste: float | None) -> None:
        med = statistics.median(times)
        rows.append({"backend": backend, "batching": batching, "chunks": n, "median_s": round(med, 3),
                     "chunks_per_s": round(n / med, 2), "tokens_per_s": round(tok / med, 1),
                     "padding_waste": None if waste is None else round(waste, 4), "times_s": [round(t, 3) for t in times]})
        print(f"{backend:22s} {batching:13s} {n / med:8.2f} chunks/s  waste {waste}", file=sys.stderr)

    # the baseline: bare sentence-transformers with its defaults
    from sentence_transformers import SentenceTransformer

    bare = SentenceTransformer(str(info.path), device="cpu")
    record("bare SentenceTransformer.encode", "its default", len(sample), tokens,
           timed(lambda: bare.encode(sample), a.repeat), None)
    del bare

    def make(backend: str):
        if backend == "sentence-transformers":
            return st
        if backend == "onnx":
            from woolocal_ingest.embedders.onnx import OnnxEmbedder

            return OnnxEmbedder(info)
        from woolocal_ingest.embedders.mlx import MLXEmbedder

        return MLXEmbedder(info)

    for backend in a.backends.split(","):
        try:
            emb = make(backend)
        except Exception as e:  # a backend this machine cannot run is reported, not fatal
            print(f"{backend}: unavailable: {e}", file=sys.stderr)
            continue
        texts_b = sample if backend != "mlx" else sample[:: max(1, len(sample) // a.mlx_limit)][: a.mlx_limit]
        tok_b = sum(min(n + 2, info.max_tokens) for n in st.tokens.count_many(texts_b))
        for batching in ("token-budget", "fixed"):
            emb.batching = batching
            if batching == "fixed":
                if hasattr(emb, "max_batch"):
                    emb.max_batch = a.fixed_batch
                else:
                    emb.batch_size = a.fixed_batch
            times = timed(lambda: emb.embed_documents(texts_b), a.repeat if backend != "mlx" else 1)
            record(backend, batching, len(texts_b), tok_b, times, emb.last_plan.padding_waste)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"corpus": a.corpus, "corpus_chunks": len(texts), "timed_chunks": len(sample), "tokens": tokens,
              "repeat": a.repeat, "model": info.name, "cpus": os.cpu_count(), "rows": rows}
    (out / "engine.json").write_text(json.dumps(result, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{r['backend']}\n{r['batching']}" for r in rows]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        ax.barh(labels, [r["chunks_per_s"] for r in rows], color="#4a7ab5")
        for i, r in enumerate(rows):
            ax.text(r["chunks_per_s"], i, f" {r['chunks_per_s']:.1f}", va="center")
        ax.set_xlabel("chunks/s (median; higher is better)")
        ax.set_title(f"{info.name} on {os.cpu_count()} CPU cores, {len(sample)} chunks of conda-docs")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / "engine.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
