"""An already-migrated store costs nearly nothing: `woolocal migrate SRC --to projects --out DIR` the first time
(the whole process: start-up, model, embedding, verification, write) against the same command again (the look
first answers `unchanged` without the model), side by side in one run, medians of --repeat re-runs.

    .venv/bin/python bench/bench_migrate_noop.py --limit 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_migrate import build_conda_store  # noqa: E402


def run(args: list[str], cwd: Path) -> tuple[float, dict]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "woolocal_cli", *args, "--json"], cwd=cwd, capture_output=True,
                         text=True)
    dt = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{args} failed ({out.returncode}): {out.stderr[-3000:]}")
    return dt, json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=1000, help="rows of the conda-docs LangChain JS store")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-migrate-noop-"))
    try:
        src, out = work / "vectorStore", work / "out" / "all-minilm-l6-v2-384d"
        n = build_conda_store(src, a.limit)
        args = ["migrate", str(src), "--to", "projects", "--out", str(out)]
        first, s = run(args, work)
        assert s["status"] == "migrated", s
        again = []
        for _ in range(a.repeat):
            dt, s = run(args, work)
            assert s["status"] == "unchanged", s
            again.append(dt)
        med = statistics.median(again)
        print(json.dumps({"rows": n, "first_s": round(first, 2), "unchanged_s": [round(x, 2) for x in again],
                          "unchanged_median_s": round(med, 2), "ratio": round(med / first, 4), "target": 0.05}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
