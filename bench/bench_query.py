"""Benchmark: `woolocal query` in-process against the same query answered by a running `woolocal serve`.

    .venv/bin/python bench/bench_query.py [--project data/sample-project] [--repeat 5] [--out bench/results]

The sample project is ingested once (--no-prefect) into a temp stores root. Then, alternating, `--repeat` times:

  in-process  `woolocal query STORE TEXT --json --no-service` (a fresh process: imports, model load, search);
  service     the same command without --no-service while `woolocal serve --stores ROOT` runs (it announces itself
              in ROOT/.woolocal-serve.json; the command finds it and lets it answer).

Wall times of the whole command process, medians; the two must return the same ids.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CMD = [sys.executable, "-c", "import sys; from woolocal_cli import main; sys.exit(main(prog_name='woolocal'))"]


def run(args: list[str], env: dict, cwd: Path) -> tuple[float, dict]:
    t = time.perf_counter()
    r = subprocess.run([*CMD, *args], env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{args} failed:\n{r.stderr[-2000:]}")
    return wall, json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default=str(REPO / "data" / "sample-project"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="woolocal-query-"))
    serve = None
    try:
        cwd, stores = tmp / "cwd", tmp / "stores"
        cwd.mkdir()
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        for k in ("PREFECT_API_URL", "WOOLOCAL_CONFIG", "WOOLOCAL_STORES"):
            env.pop(k, None)
        _, s = run(["ingest", a.project, "--stores", str(stores), "--json", "--no-prefect"], env, cwd)
        q = ["query", s["store"], "who keeps the key to the tool shed?", "-k", "5", "--json"]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        serve = subprocess.Popen([*CMD, "serve", "--stores", str(stores), "--port", str(port), "--log-level",
                                  "warning"], env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or serve.poll() is not None:
                raise SystemExit("woolocal serve did not become healthy")
            time.sleep(0.2)
        walls: dict[str, list[float]] = {"in_process": [], "service": []}
        for _ in range(a.repeat):
            w, local = run([*q, "--no-service"], env, cwd)
            walls["in_process"].append(round(w, 3))
            w, remote = run(q, env, cwd)
            walls["service"].append(round(w, 3))
            assert local["via"] == "in-process" and remote["via"] == "service", (local["via"], remote["via"])
            assert [h["id"] for h in local["results"]] == [h["id"] for h in remote["results"]]
        med = {k: statistics.median(v) for k, v in walls.items()}
        result = {"project": a.project, "repeat": a.repeat, "cpus": os.cpu_count(), "median_wall_s": med,
                  "ratio_service_over_in_process": round(med["service"] / med["in_process"], 4), "runs": walls}
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "query.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        if serve is not None:
            serve.terminate()
            try:
                serve.wait(timeout=15)
            except subprocess.TimeoutExpired:
                serve.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
