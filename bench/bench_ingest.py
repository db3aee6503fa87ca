"""Benchmark: whole `woolocal ingest` of a corpus against bare `SentenceTransformer.encode` of the same chunk texts.

Each arm runs in its own subprocess (clean peak RSS), alternating, `--repeat` times; medians are reported.

    .venv/bin/python bench/bench_ingest.py [--corpus ../shared/corpora/conda-docs] [--repeat 3] [--out bench/results]

Arms:
  ingest  `woolocal ingest CORPUS --stores TMP --json` in-process through the Prefect flow (discover, load+chunk,
          embed, write), from a cold stores root; PREFECT_HOME is warm (a user's second run, not the first-ever one).
  encode  SentenceTransformer(<same packaged model>).encode(texts) with its default settings over the chunk texts
          the ingest wrote, in the same order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import arm_encode, rss_mb, run_arm  # noqa: E402 (bench/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent




def arm_ingest(corpus: str, stores: str) -> dict:
    t0 = time.perf_counter()
    from click.testing import CliRunner

    from woolocal_cli import main

    res = CliRunner().invoke(main, ["ingest", corpus, "--stores", stores, "--json"], catch_exceptions=False)
    wall = time.perf_counter() - t0
    if res.exit_code != 0:
        raise SystemExit(f"ingest failed ({res.exit_code}): {res.output}")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    return {"arm": "ingest", "wall_s": round(wall, 2), "count": summary["count"], "embedded": summary["embedded"],
            "timings": summary["timings"], "store": summary["store"], **rss_mb()}






def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpora" / "conda-docs"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--arm", choices=["ingest", "encode"], help=argparse.SUPPRESS)
    ap.add_argument("--stores", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.arm == "ingest":
        print(json.dumps(arm_ingest(a.corpus, a.stores)))
        return
    if a.arm == "encode":
        print(json.dumps(arm_encode(a.store)))
        return

    work = Path(tempfile.mkdtemp(prefix="woolocal-bench-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    # Warm PREFECT_HOME once (its first start creates the database); not timed.
    run_arm(__file__, ["--arm", "ingest", "--corpus", str(REPO / "data" / "sample-project"), "--stores", str(work / "warm")], env)
    runs = []
    for i in range(a.repeat):
        stores = work / f"stores-{i}"
        ing = run_arm(__file__, ["--arm", "ingest", "--corpus", a.corpus, "--stores", str(stores)], env)
        enc = run_arm(__file__, ["--arm", "encode", "--store", ing["store"]], env)
        runs.append({"ingest": ing, "encode": enc})
        print(f"run {i + 1}/{a.repeat}: ingest {ing['wall_s']}s ({ing['count']} chunks), "
              f"encode {enc['encode_s']}s (+{enc['model_load_s']}s model load)", file=sys.stderr)
        shutil.rmtree(stores, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    n = runs[0]["ingest"]["count"]
    ing_wall = med(r["ingest"]["wall_s"] for r in runs)
    enc_s = med(r["encode"]["encode_s"] for r in runs)
    enc_wall = med(r["encode"]["wall_s"] for r in runs)
    stages = {k: med(r["ingest"]["timings"].get(k, 0.0) for r in runs)
              for k in ("plan", "load_chunk", "embed", "write", "total")}
    result = {
        "corpus": a.corpus, "chunks": n, "repeat": a.repeat, "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "median": {
            "ingest_wall_s": ing_wall, "ingest_chunks_per_s": round(n / ing_wall, 2),
            "ingest_embed_stage_s": stages["embed"], "ingest_embed_chunks_per_s": round(n / stages["embed"], 2),
            "encode_s": enc_s, "encode_chunks_per_s": round(n / enc_s, 2),
            "encode_process_wall_s": enc_wall,
            "ratio_ingest_wall_over_encode": round(ing_wall / enc_s, 3),
            "ratio_ingest_embed_stage_over_encode": round(stages["embed"] / enc_s, 3),
            "stages_s": stages,
            "prefect_and_startup_s": round(ing_wall - sum(stages[k] for k in ("plan", "load_chunk", "embed", "write")), 2),
            "ingest_peak_rss_mb": med(r["ingest"]["peak_rss_mb"] for r in runs),
            "ingest_peak_rss_children_mb": med(r["ingest"]["peak_rss_children_mb"] for r in runs),
            "encode_peak_rss_mb": med(r["encode"]["peak_rss_mb"] for r in runs),
        },
        "runs": runs,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["median"], indent=2))


if __name__ == "__main__":
    main()
