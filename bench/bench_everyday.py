"""Benchmark: what everyday runs cost against the first ingest, on a folder of ~600 documents.

    .venv/bin/python bench/bench_everyday.py [--corpus ../shared/corpora/conda-docs] [--docs 600] [--repeat 3]
                                             [--out bench/results]

The folder: every file of the corpus cut at blank lines into parts of about (corpus bytes / --docs) each, so the
~600 documents hold the corpus's text once (nothing deduplicates away). Each repeat, from a cold stores root, runs the
real `woolocal ingest FOLDER --stores TMP --json` command (a fresh process each time, through the Prefect flow):

  first     the first ingest (Prefect's API server started, model loaded, everything embedded, store written);
  noop      the same command again, nothing changed (the look finds nothing to do: no Prefect, no model);
  changed   one paragraph appended to one document, then the command again (one file re-chunked, its new chunk(s)
            embedded, the store rewritten);
  noop_nop  the unchanged re-run with --no-prefect, for reference.

Wall times are the process's, measured here; medians over the repeats. Targets (issue 10): noop / first <= 0.05,
changed / first <= 0.08. PREFECT_HOME is a temp folder, warm after the first run (a user's usual state).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _parts(text: str, target: int) -> list[str]:
    parts, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur.encode()) >= target:
            parts.append(cur)
            cur = ""
    if cur.strip() or not parts:
        parts.append(cur)
    return parts


def make_folder(corpus: Path, dst: Path, docs: int) -> int:
    """Cut the corpus's documents (md, rst, txt, html: what ingest reads) at blank lines into parts of one size,
    chosen so that about `docs` documents come out; returns how many were written."""
    files = sorted(p for p in corpus.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.parts)
                   and p.suffix.lower() in (".md", ".rst", ".txt", ".html"))
    texts = {p: p.read_text(encoding="utf-8", errors="replace") for p in files}
    target = max(1, sum(len(t.encode()) for t in texts.values()) // docs)
    while target > 256 and sum(len(_parts(t, target)) for t in texts.values()) < docs:
        target = int(target * 0.85)
    n = 0
    for p, text in texts.items():
        rel = p.relative_to(corpus)
        for i, part in enumerate(_parts(text, target)):
            out = dst / rel.parent / f"{rel.stem}-part{i:02d}{rel.suffix}"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(part, encoding="utf-8")
            n += 1
    return n


def run(args: list[str], env: dict, cwd: Path) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", "import sys; from woolocal_cli import main; "
                        "sys.exit(main(prog_name='woolocal'))", *args], env=env, cwd=cwd, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{args} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    s = json.loads(r.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 3), "embedded": s["embedded"], "count": s["count"], "written": s["written"],
            "files_found": s["files"]["found"], "files_loaded": s["files"]["loaded"],
            "timings": s["timings"], "first_line": r.stderr.splitlines()[0] if r.stderr else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpora" / "conda-docs"))
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="woolocal-everyday-"))
    try:
        folder = tmp / "docs600"
        n_docs = make_folder(Path(a.corpus), folder, a.docs)
        cwd = tmp / "cwd"
        cwd.mkdir()
        env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp / "prefect-home"), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1")
        for k in ("PREFECT_API_URL", "WOOLOCAL_CONFIG", "WOOLOCAL_STORES"):
            env.pop(k, None)
        victim = sorted(folder.rglob("*.md"))[len(list(folder.rglob("*.md"))) // 2]
        original = victim.read_bytes()
        runs = []
        for i in range(a.repeat):
            stores = tmp / f"stores-{i}"
            base = ["ingest", str(folder), "--stores", str(stores), "--json"]
            r = {"first": run(base, env, cwd), "noop": run(base, env, cwd)}
            victim.write_bytes(original + f"\n\nA paragraph appended in repeat {i}: the allotment gate code changed."
                               .encode())
            r["changed"] = run(base, env, cwd)
            victim.write_bytes(original)
            r["revert"] = run(base, env, cwd)  # back to the store's first state (not timed against targets)
            r["noop_nop"] = run(base + ["--no-prefect"], env, cwd)
            runs.append(r)
            print(json.dumps({k: v["wall_s"] for k, v in r.items()}), file=sys.stderr)
            shutil.rmtree(stores)
        med = {k: statistics.median(r[k]["wall_s"] for r in runs) for k in runs[0]}
        result = {
            "corpus": a.corpus, "documents_written": n_docs, "documents_ingested": runs[0]["first"]["files_found"],
            "chunks": runs[0]["first"]["count"], "repeat": a.repeat,
            "python": platform.python_version(), "cpus": os.cpu_count(), "cwd_left_empty": not any(cwd.iterdir()),
            "median_wall_s": med,
            "ratio_noop_over_first": round(med["noop"] / med["first"], 4),
            "ratio_changed_over_first": round(med["changed"] / med["first"], 4),
            "ratio_noop_no_prefect_over_first": round(med["noop_nop"] / med["first"], 4),
            "targets": {"noop_over_first": 0.05, "changed_over_first": 0.08},
            "runs": runs,
        }
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "everyday.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
