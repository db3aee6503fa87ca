"""What the benchmarks share: the bare-encode baseline arm, peak RSS, and running an arm in its own process."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def rss_mb() -> dict:
    """Peak resident memory of this process and of its finished children, in MB."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_mb": round(self_kb / 1024, 1), "peak_rss_children_mb": round(child_kb / 1024, 1)}


def arm_encode(store: str) -> dict:
    """The baseline: SentenceTransformer(<the packaged default model>).encode(texts) with its default settings over a
    store's chunk texts, in order (model load timed apart)."""
    t0 = time.perf_counter()
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    from woolocal_ingest.embedders import resolve_model

    texts = pq.read_table(Path(store) / "chunks.parquet", columns=["text"]).column("text").to_pylist()
    t_load = time.perf_counter()
    model = SentenceTransformer(str(resolve_model(None).path), device="cpu")
    t_enc = time.perf_counter()
    vecs = model.encode(texts)
    t_end = time.perf_counter()
    return {"arm": "encode", "wall_s": round(t_end - t0, 2), "encode_s": round(t_end - t_enc, 2),
            "model_load_s": round(t_enc - t_load, 2), "count": len(texts), "dim": int(vecs.shape[1]), **rss_mb()}


def run_arm(script: str, args: list[str], env: dict) -> dict:
    """`python script args` in its own process (clean peak RSS); its last stdout line is the arm's JSON."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"arm {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
