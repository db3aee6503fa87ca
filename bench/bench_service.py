"""Benchmark: bounded load test of `woolocal serve` on loopback, side by side with `infinity_emb` on the same model.

For each concurrency level (default 1, 8, 32) a fixed number of requests is sent by that many concurrent clients
(httpx, keep-alive, one text per request, texts drawn from ../shared/corpora/conda-docs); p50/p99 latency and
requests/s are measured, every level `--repeat` times, and the medians reported. Arms:
  woolocal-embed   POST /v1/embeddings {"input": "<one text>"} against `woolocal serve` (dynamic batching)
  infinity-embed   the same request against `infinity_emb v2` serving the same packaged model files
                   (infinity-emb from PyPI in its own throwaway virtualenv under .cache/bench-infinity: its pins,
                   numpy<2 and sentence-transformers<4, clash with ours; it is not a project dependency)
  woolocal-search  POST /v1/stores/<store>/search {"query": "<one text>", "k": 10} on a store of the sample project

Both servers run on the same machine, one at a time, after a warm-up; the load generator shares the CPUs with them
(same for both). The run is bounded: every level sends `--requests` requests and stops.

    .venv/bin/python bench/bench_service.py [--requests 400] [--repeat 3] [--levels 1,8,32] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpora" / "conda-docs"
INFINITY_VENV = REPO / ".cache" / "bench-infinity"
INFINITY_SPEC = ["infinity-emb[server,torch]==0.0.78", "torch==2.13.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def texts(n: int) -> list[str]:
    out: list[str] = []
    for path in sorted(CORPUS.rglob("*.md")):
        for para in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            para = " ".join(para.split())
            if 40 <= len(para) <= 400:
                out.append(para)
            if len(out) >= n:
                return out
    return out


def ensure_infinity() -> Path:
    exe = INFINITY_VENV / "bin" / "infinity_emb"
    if exe.exists():
        return exe
    print(f"installing infinity-emb into {INFINITY_VENV} (throwaway virtualenv)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(INFINITY_VENV)], check=True)
    subprocess.run([str(INFINITY_VENV / "bin" / "pip"), "install", "-q", *INFINITY_SPEC], check=True)
    return exe


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready ({url})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout}s: {url}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def load(url: str, bodies: list[dict], concurrency: int, headers: dict | None = None) -> dict:
    import httpx

    lat: list[float] = []
    errors: dict[int, int] = {}
    queue = list(reversed(bodies))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as client:
        async def worker() -> None:
            while queue:
                body = queue.pop()
                t = time.perf_counter()
                r = await client.post(url, json=body)
                lat.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors[r.status_code] = errors.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": len(lat), "errors": errors, "wall_s": round(wall, 3), "rps": round(len(lat) / wall, 2),
            "p50_ms": round(statistics.median(lat) * 1000, 2),
            "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, 2)}


def run_levels(name: str, url: str, make_body, sample: list[str], levels: list[int], n: int, repeat: int) -> dict:
    """Each level `repeat` times (levels interleaved); per level the median of requests/s, p50 and p99."""
    asyncio.run(load(url, [make_body(t) for t in sample[:32]], 4))  # warm-up, not counted
    runs: dict[str, list[dict]] = {str(c): [] for c in levels}
    for _ in range(repeat):
        for c in levels:
            bodies = [make_body(sample[i % len(sample)]) for i in range(n)]
            runs[str(c)].append(asyncio.run(load(url, bodies, c)))
    out = {}
    for c, rs in runs.items():
        errors: dict[int, int] = {}
        for r in rs:
            for code, k in r["errors"].items():
                errors[code] = errors.get(code, 0) + k
        out[c] = {"requests": sum(r["requests"] for r in rs), "errors": errors,
                  **{k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms")}, "runs": rs}
        r = out[c]
        print(f"{name:16s} c={c:<3s} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms"
              f"  errors {r['errors']}  (median of {repeat})", file=sys.stderr)
    return out


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, levels in result["arms"].items():
        xs = [int(c) for c in levels]
        a1.plot(xs, [levels[c]["rps"] for c in levels], marker="o", label=arm)
        a2.plot(xs, [levels[c]["p99_ms"] for c in levels], marker="o", label=arm)
    a1.set(xscale="log", xlabel="concurrency", ylabel="requests/s", title="throughput (one text per request)")
    a2.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="p99 latency (ms)", title="p99 latency")
    for ax in (a1, a2):
        ax.set_xticks([int(c) for c in next(iter(result["arms"].values()))])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="requests per level, arm and repeat")
    ap.add_argument("--repeat", type=int, default=3, help="runs of every level; medians are reported")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--skip-infinity", action="store_true")
    ap.add_argument("--config", default=str(REPO / "flows.yaml"), help="flows.yaml for woolocal (service settings)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    sample = texts(max(a.requests, 64))

    from woolocal_ingest.embedders import resolve_model

    model_path = resolve_model(None).path
    work = Path(tempfile.mkdtemp(prefix="woolocal-bench-service-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WOOLOCAL_CONFIG": str(Path(a.config).resolve())}
    env.pop("PREFECT_API_URL", None)
    stores = work / "stores"
    subprocess.run([sys.executable, "-m", "woolocal_cli", "ingest", "sample", "--stores", str(stores),
                    "--json"], env=env, check=True, capture_output=True, cwd=REPO)
    result: dict = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "requests_per_level": a.requests,
                    "repeat": a.repeat,
                    "model": str(model_path), "arms": {}}
    try:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "woolocal_cli", "serve", "--port", str(port),
                                 "--stores", str(stores)], env=env, cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base + "/health", proc)
            result["arms"]["woolocal-embed"] = run_levels(
                "woolocal-embed", base + "/v1/embeddings", lambda t: {"model": "projects", "input": t, "encoding_format": "float"},
                sample, levels, a.requests, a.repeat)
            result["arms"]["woolocal-search"] = run_levels(
                "woolocal-search", base + "/v1/stores/sample/search", lambda t: {"query": t, "k": 10},
                sample, levels, a.requests, a.repeat)
        finally:
            stop(proc)
        if not a.skip_infinity:
            exe = ensure_infinity()
            port = free_port()
            ienv = {**env, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
            proc = subprocess.Popen([str(exe), "v2", "--model-id", str(model_path), "--served-model-name", "minilm",
                                     "--engine", "torch", "--device", "cpu", "--no-bettertransformer",
                                     "--host", "127.0.0.1", "--port", str(port)], env=ienv,
                                    start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                base = f"http://127.0.0.1:{port}"
                wait_ready(base + "/health", proc)
                result["arms"]["infinity-embed"] = run_levels(
                    "infinity-embed", base + "/embeddings", lambda t: {"model": "minilm", "input": [t],
                                                                      "encoding_format": "float"},
                    sample, levels, a.requests, a.repeat)
            finally:
                stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "infinity-embed" in result["arms"]:
        ours, theirs = result["arms"]["woolocal-embed"], result["arms"]["infinity-embed"]
        result["ratios_woolocal_over_infinity"] = {
            c: {"rps": round(ours[c]["rps"] / theirs[c]["rps"], 3),
                "p50": round(ours[c]["p50_ms"] / theirs[c]["p50_ms"], 3),
                "p99": round(ours[c]["p99_ms"] / theirs[c]["p99_ms"], 3)} for c in ours}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "service.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "service.png")
    print(json.dumps({k: v for k, v in result.items() if k != "arms"} | {"arms": result["arms"]}, indent=2))


if __name__ == "__main__":
    main()
