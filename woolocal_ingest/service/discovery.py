"""How a command finds a running `woolocal serve` for its stores root, and asks it to search.

`woolocal serve` writes `<stores_root>/.woolocal-serve.json` (its URL, pid, and the environment variable that holds
its API key) once it listens, and removes it when it stops. `woolocal query` reads it: when the pid is alive and
`/health` answers ok, the search goes to the service, whose model is already loaded (tens of milliseconds instead of
seconds of imports and model load). Anything else (no file, a dead pid, a stale or slow service, an error reply)
means: search in-process, as before. The file holds no secret.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from woolocal_ingest.fsutil import write_text_atomic
from woolocal_ingest.locks import pid_alive

ANNOUNCE_FILE = ".woolocal-serve.json"


@dataclass(frozen=True)
class RunningService:
    """A `woolocal serve` found for a stores root."""

    url: str  # http://127.0.0.1:8001 (no /v1)
    pid: int
    api_key_env: str | None  # the variable clients read the key from, when the service requires one


class ServiceUnavailable(Exception):
    """The service did not answer a search as expected (the caller falls back to searching in-process)."""


def _local_url(host: str, port: int) -> str:
    """The URL a process on this machine reaches a service bound to `host` at."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextmanager
def announce(stores_root: Path, host: str, port: int, api_key_env: str | None) -> Iterator[Path | None]:
    """Write the announce file for the block (atomically); remove it after, if it is still ours. Yields its path, or
    None when the stores root does not exist or is not writable (the service then just is not discoverable)."""
    path = Path(stores_root) / ANNOUNCE_FILE
    body = json.dumps({"url": _local_url(host, port), "pid": os.getpid(), "api_key_env": api_key_env})
    try:
        write_text_atomic(path, body)
    except OSError:
        yield None
        return
    try:
        yield path
    finally:
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass


def find_service(stores_root: Path, timeout: float = 0.5) -> RunningService | None:
    """The running service announced for `stores_root` whose /health answers ok, or None."""
    try:
        data = json.loads((Path(stores_root) / ANNOUNCE_FILE).read_text(encoding="utf-8"))
        svc = RunningService(url=str(data["url"]).rstrip("/"), pid=int(data["pid"]),
                             api_key_env=data.get("api_key_env"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not pid_alive(svc.pid):
        return None
    try:
        with urllib.request.urlopen(f"{svc.url}/health", timeout=timeout) as r:
            if r.status != 200 or json.loads(r.read()).get("status") != "ok":
                return None
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return svc


def search(svc: RunningService, store: str, text: str, k: int, filter: dict | None = None, mode: str = "hybrid",
           timeout: float = 30.0) -> dict:
    """POST /v1/stores/{store}/search; the service's reply (`data`: rank, id, text, metadata, score; `store`,
    `model`, `dim`, `count`). ServiceUnavailable on any failure."""
    body = json.dumps({"query": text, "k": k, "mode": mode, **({"filter": filter} if filter else {})}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(svc.api_key_env) if svc.api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = f"{svc.url}/v1/stores/{urllib.parse.quote(store, safe='/')}/search"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=timeout) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ServiceUnavailable(f"{url}: {e}") from None
