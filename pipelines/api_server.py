"""The run's own Prefect API: Prefect's ephemeral server app on uvicorn, in a child process that cannot outlive us.

Prefect's own ephemeral mode (`SubprocessASGIServer`) starts the same app in a child that is only stopped by an
`atexit` hook: after a `kill -9` of the parent it runs forever (reparented to pid 1, ~220 MB). `RunApi` starts that
app itself, the same way (`PREFECT__SERVER_EPHEMERAL=1`, no UI), but

- in its own session, so a Ctrl-C in the terminal reaches only our process (which then stops it, quietly);
- with a watchdog in the child: it ends itself as soon as its stdin (a pipe only the parent holds) reaches EOF or its
  parent pid changes, which is what a parent's death looks like from the child, whatever signal killed the parent
  (and whichever thread started the child: unlike PR_SET_PDEATHSIG, a pipe does not care).

`start()` returns at once (the server then starts while the caller imports Prefect and loads the model); `wait()`
blocks until `/api/health` answers. This module imports no Prefect: it must run before `import prefect` in the
parent, which then only needs PREFECT_API_URL set to the URL.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from woolocal_ingest.errors import WoolocalError

STARTUP_TIMEOUT_S = 90.0  # a first start creates and migrates the SQLite database, on a CPU shared with model loads

# Runs in the child: the watchdog, then uvicorn serving Prefect's app factory (what SubprocessASGIServer runs).
_CHILD = r"""
import os, select, sys, threading
parent = int(sys.argv[2])
def _watch():
    while True:
        try:
            ready, _, _ = select.select([0], [], [], 1.0)
            if ready and not os.read(0, 4096):
                break
        except OSError:
            break
        if os.getppid() != parent:
            break
    os._exit(0)
threading.Thread(target=_watch, name="woolocal-parent-watch", daemon=True).start()
import uvicorn
uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]),
            log_level="error", lifespan="on")
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str, timeout: float = 1.0) -> bool:
    """True when the Prefect API at `url` (…/api) answers its health check."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class RunApi:
    """One Prefect API server for this process's runs; `url` is known at once, `wait()` until it answers."""

    def __init__(self, log_path: os.PathLike | str, port: int | None = None):
        self.port = port or free_port()
        self.log_path = log_path  # the server's stderr (appended): read back when it fails to start
        self.proc: subprocess.Popen | None = None
        self._ready = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(PREFECT_UI_ENABLED="0", PREFECT_SERVER_UI_ENABLED="false", PREFECT__SERVER_EPHEMERAL="1",
                   PREFECT__SERVER_FINAL="1")
        return env

    def start(self) -> "RunApi":
        """Start the server process (returns at once)."""
        if self.proc is not None:
            return self
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(self.port), str(os.getpid())], env=self._env(),
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True,  # Ctrl-C in the terminal reaches us only; we stop it
            )
        atexit.register(self.stop)
        return self

    def wait(self, timeout: float = STARTUP_TIMEOUT_S) -> str:
        """Block until the server answers; returns its URL. A port lost to a race is retried on another one."""
        if self._ready:
            return self.url
        if self.proc is None:
            self.start()
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                err = self._log_tail()
                self.proc = None
                if "address already in use" in err.lower() and time.monotonic() < deadline:
                    self.port = free_port()
                    self.start()
                    continue
                raise WoolocalError(f"the run's Prefect API server exited with code {code} while starting (log: "
                                    f"{self.log_path}):\n" + "\n".join(err.strip().splitlines()[-15:]))
            if healthy(self.url, timeout=1.0):
                self._ready = True
                return self.url
            if time.monotonic() > deadline:
                self.stop()
                raise WoolocalError(f"the run's Prefect API server did not answer {self.url}/health within "
                                    f"{timeout:.0f}s")
            time.sleep(0.05)

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `grace` seconds) and reap it."""
        proc, self.proc = self.proc, None
        self._ready = False
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()  # the watchdog's cue, too
        except OSError:
            pass
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self) -> "RunApi":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
