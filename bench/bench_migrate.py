"""Benchmark: `woolocal migrate` of legacy LangChain JS stores against bare `SentenceTransformer.encode` of their texts.

Stores:
  fixture  ../shared/fixtures/legacy-stores/js_openai1536_store (219 chunks, 1536-dim, LangChain JS layout)
  conda    a LangChain JS store built here from ../shared/corpora/conda-docs the way LangChain JS ingests a project
           (RecursiveCharacterTextSplitter 1000/200 over md/rst/txt, JS metadata), 1536-dim stand-in vectors
           (migration never reads the old vectors); `--limit` rows.

Arms, each in its own subprocess (clean peak RSS), alternating, `--repeat` times; medians reported:
  migrate  `woolocal migrate SRC --to projects --out TMP --json` (the embedded default model), in-process CLI through
           the Prefect flow (read, plan, embed, write, verify) with a cold embedding cache; wall time includes imports,
           Prefect start-up and model load
  encode   SentenceTransformer(<same packaged model>).encode(texts) of the texts the migration embedded (the rows of
           the migrated store: stored texts, long ones split to the model's limit), in order, default settings
  resume   a real `woolocal migrate` subprocess killed with SIGKILL at about half of the uninterrupted wall time,
           then run again to the end: the cost of resuming is (killed part + re-run) / uninterrupted

    .venv/bin/python bench/bench_migrate.py [--repeat 3] [--limit 1500] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import arm_encode, rss_mb, run_arm  # noqa: E402 (bench/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "fixtures" / "legacy-stores" / "js_openai1536_store"
CORPUS = SHARED / "corpora" / "conda-docs"
WOOLOCAL = [sys.executable, "-m", "woolocal_cli"]




def build_conda_store(dest: Path, limit: int) -> int:
    """A LangChain JS store (faiss.index + docstore.json) of conda-docs, as LangChain JS's FaissStore.save writes it."""
    import hashlib
    import uuid

    import faiss
    import numpy as np
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(chunk_size=1000, chunk_overlap=200)
    docs, mapping = [], {}
    for path in sorted(CORPUS.rglob("*")):
        if path.suffix.lower() not in (".md", ".rst", ".txt") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = f"conda-docs/{path.relative_to(CORPUS)}"
        pieces = splitter.split_text(text)
        for i, piece in enumerate(pieces):
            if len(docs) >= limit:
                break
            cid = str(uuid.UUID(bytes=hashlib.sha256(f"{rel}#{i}".encode()).digest()[:16], version=4))
            meta = {"source": rel, "fileName": path.name, "fileType": path.suffix.lstrip("."),
                    "loc": {"lines": {"from": 1, "to": 1}}, "chunk": i, "totalChunks": len(pieces)}
            mapping[str(len(docs))] = cid
            docs.append([cid, {"pageContent": piece, "metadata": meta}])
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((len(docs), 1536)).astype("float32")
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = faiss.IndexFlatL2(1536)
    index.add(vecs)
    dest.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(dest / "faiss.index"))
    (dest / "docstore.json").write_text(json.dumps([docs, mapping]), encoding="utf-8")
    return len(docs)


def arm_migrate(src: str, out: str) -> dict:
    os.environ["WOOLOCAL_STORES"] = out + "-root"  # a cold embedding cache: every text is really embedded
    t0 = time.perf_counter()
    from click.testing import CliRunner

    from woolocal_cli import main

    res = CliRunner().invoke(main, ["migrate", src, "--to", "projects", "--out", out, "--json"],
                             catch_exceptions=False)
    wall = time.perf_counter() - t0
    if res.exit_code != 0:
        raise SystemExit(f"migrate failed ({res.exit_code}): {res.output[-3000:]}")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    return {"arm": "migrate", "wall_s": round(wall, 2), "count": summary["count"], "summary": summary, **rss_mb()}






def resume_run(src: Path, out: Path, kill_after_s: float, env: dict) -> dict:
    """Kill a real migrate run with SIGKILL after `kill_after_s`, then re-run it to the end."""
    cmd = [*WOOLOCAL, "migrate", str(src), "--to", "projects", "--out", str(out), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=kill_after_s)
        finished_early = True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        finished_early = False
    killed_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rerun_s = time.perf_counter() - t1
    if res.returncode != 0:
        raise SystemExit(f"resumed migrate failed ({res.returncode}): {res.stderr[-3000:]}")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    return {"killed_after_s": round(killed_s, 2), "finished_before_kill": finished_early,
            "rerun_s": round(rerun_s, 2), "resumed_batches": summary.get("resumed_batches"),
            "count": summary.get("count")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--limit", type=int, default=1500, help="rows of the conda-docs store")
    ap.add_argument("--stores", default="fixture,conda", help="comma list of fixture, conda")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--arm", choices=["migrate", "encode"], help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dest", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.arm == "migrate":
        print(json.dumps(arm_migrate(a.src, a.dest)))
        return
    if a.arm == "encode":
        print(json.dumps(arm_encode(a.src)))
        return

    work = Path(tempfile.mkdtemp(prefix="woolocal-bench-migrate-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WOOLOCAL_HOME": str(work / "home"),
           "WOOLOCAL_CONFIG": str(REPO / "flows.yaml")}
    env.pop("PREFECT_API_URL", None)
    sources: dict[str, Path] = {}
    for name in a.stores.split(","):
        if name == "fixture":
            sources[name] = work / "fixture"
            shutil.copytree(FIXTURE, sources[name])
        elif name == "conda":
            sources[name] = work / "conda"
            n = build_conda_store(sources[name], a.limit)
            print(f"built conda-docs LangChain JS store: {n} rows", file=sys.stderr)
    # Warm start (Prefect's database, the model's page cache); not timed.
    run_arm(__file__, ["--arm", "migrate", "--src", str(sources[next(iter(sources))]), "--dest", str(work / "warm")], env)

    result = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "repeat": a.repeat, "stores": {}}
    med = statistics.median
    for name, src in sources.items():
        runs = []
        for i in range(a.repeat):
            dest = work / f"out-{name}-{i}"
            mig = run_arm(__file__, ["--arm", "migrate", "--src", str(src), "--dest", str(dest)], env)
            enc = run_arm(__file__, ["--arm", "encode", "--src", str(dest)], env)
            runs.append({"migrate": mig, "encode": enc})
            print(f"{name} run {i + 1}/{a.repeat}: migrate {mig['wall_s']}s ({mig['count']} rows), "
                  f"encode {enc['encode_s']}s (+{enc['model_load_s']}s model load)", file=sys.stderr)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.rmtree(str(dest) + "-root", ignore_errors=True)
        n_src = runs[0]["migrate"]["summary"]["source_count"]
        n = runs[0]["migrate"]["count"]
        mig_wall = med(r["migrate"]["wall_s"] for r in runs)
        enc_s = med(r["encode"]["encode_s"] for r in runs)
        stages = {k: med(r["migrate"]["summary"]["timings"].get(k, 0.0) for r in runs)
                  for k in ("read", "plan", "embed", "write")}
        res = resume_run(src, work / f"resume-{name}", mig_wall / 2, {**env, "WOOLOCAL_STORES": str(work / "rs")})
        shutil.rmtree(work / f"resume-{name}", ignore_errors=True)
        shutil.rmtree(work / "rs", ignore_errors=True)
        print(f"{name} resume: killed at {res['killed_after_s']}s, re-run {res['rerun_s']}s", file=sys.stderr)
        result["stores"][name] = {
            "source_rows": n_src, "migrated_rows": n,
            "median": {
                "migrate_wall_s": mig_wall, "migrate_rows_per_s": round(n / mig_wall, 2),
                "encode_s": enc_s, "encode_rows_per_s": round(n / enc_s, 2),
                "ratio_migrate_wall_over_encode": round(mig_wall / enc_s, 3),
                "migrate_stages_s": stages,
                "ratio_migrate_embed_stage_over_encode": round(stages["embed"] / enc_s, 3),
                "migrate_peak_rss_mb": med(r["migrate"]["peak_rss_mb"] for r in runs),
                "encode_peak_rss_mb": med(r["encode"]["peak_rss_mb"] for r in runs),
            },
            "resume": {**res, "uninterrupted_s": mig_wall,
                       "cost_ratio": round((res["killed_after_s"] + res["rerun_s"]) / mig_wall, 3)},
            "runs": runs,
        }
    shutil.rmtree(work, ignore_errors=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "migrate.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: {"median": v["median"], "resume": v["resume"]} for k, v in result["stores"].items()},
                     indent=2))


if __name__ == "__main__":
    main()
