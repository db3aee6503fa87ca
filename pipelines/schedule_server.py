"""`woolocal schedule serve`: a Prefect server as a child process, and the serve loop around it.

Prefect's ephemeral API does not run the scheduler ("Cannot schedule flows on an ephemeral server"), so scheduled
deployments need a real server. Unless PREFECT_API_URL names one, `serve_schedules` starts
`prefect server start --host 127.0.0.1 --port <free port>` in its own process group (and session, so a Ctrl-C in
the terminal reaches only this process), with its own PREFECT_HOME (`<PREFECT_HOME>/schedule-server/`: database,
log, state file), waits for `/api/health`, points this process (and the flow runs it spawns) at it, serves the
deployments, and on SIGTERM / Ctrl-C / any error stops the whole group: SIGTERM, then SIGKILL after a grace period.
On Linux the child also gets PR_SET_PDEATHSIG, so a `kill -9` of this process does not orphan the server.

This module imports no Prefect at import time: Prefect reads its settings from the environment when first imported,
and the API URL is only known once the server answers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from woolocal_ingest.errors import ConfigError, WoolocalError
from woolocal_ingest.schedules import STATE_FILE, declared_jobs, prefect_home, server_dir

DEFAULT_STARTUP_TIMEOUT = 120.0  # a cold first start creates and migrates the SQLite database
STOP_GRACE = 8.0                 # seconds between SIGTERM and SIGKILL of the server's process group


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def health(url: str, timeout: float = 2.0) -> bool:
    """True when the Prefect API at `url` (…/api) answers its health check."""
    import httpx

    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class PrefectServer:
    """`prefect server start` as a child process group with its own PREFECT_HOME; a context manager."""

    def __init__(self, home: Path, host: str = "127.0.0.1", port: int | None = None, ui: bool = False,
                 verbose: bool = False):
        self.home = Path(home)
        self.host = host
        self.port = port
        self.ui = ui
        self.verbose = verbose
        self.proc: subprocess.Popen | None = None
        self.log_path = self.home / "server.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    def _env(self) -> dict:
        env = dict(os.environ)
        env.pop("PREFECT_API_URL", None)
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="true" if self.ui else "false",
            PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="true",
            PREFECT_SERVER_LOGGING_LEVEL="INFO" if self.verbose else "WARNING",
            PREFECT_LOGGING_LEVEL="INFO" if self.verbose else "WARNING",
            PREFECT_CLI_COLORS="false",
            DO_NOT_TRACK="1",
        )
        return env

    def start(self, timeout: float = DEFAULT_STARTUP_TIMEOUT) -> str:
        """Start the server and wait until it answers; returns its API URL. Raises WoolocalError (after stopping
        what was started) when it exits or does not answer within `timeout` seconds."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", self.host, "--port", str(self.port)]
        log = open(self.log_path, "ab")
        try:
            log.write(f"\n--- {datetime.now(timezone.utc).isoformat()} {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd, env=self._env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # own session and process group: killpg reaches uvicorn and all it starts
                preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise WoolocalError(f"the Prefect server exited with code {self.proc.returncode} while starting "
                                        f"(log: {self.log_path}):\n{self.log_tail()}")
                if health(self.url, timeout=1.0):
                    return self.url
                if time.monotonic() > deadline:
                    raise WoolocalError(f"the Prefect server did not answer {self.url}/health within {timeout:.0f}s "
                                        f"(log: {self.log_path}):\n{self.log_tail()}")
                time.sleep(0.25)
        except BaseException:
            self.stop()
            raise

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the server's process group, SIGKILL whatever is left after `grace` seconds; reap the child."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # the session leader: its pid is the group id
        _killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader as soon as it exits, so only live members keep the group alive
            if proc.returncode is not None and not _group_alive(pgid):
                return
            time.sleep(0.1)
        _killpg(pgid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            pass
        for _ in range(50):
            if not _group_alive(pgid):
                break
            time.sleep(0.1)

    def __enter__(self) -> "PrefectServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _single_serve_lock(sdir: Path) -> Iterator[None]:
    """One `schedule serve` per PREFECT_HOME: a second one would run every schedule twice."""
    from woolocal_ingest.locks import try_lock

    with try_lock(sdir / "serve.lock") as holder:
        if holder is not None:
            raise WoolocalError(f"another `woolocal schedule serve` is already running with PREFECT_HOME "
                                f"{sdir.parent} (pid {holder}); stop it first")
        yield


class _Stop(Exception):
    """SIGTERM before the Prefect runner took over the signal."""


def _raise_stop(signum, frame) -> None:
    raise _Stop(signal.Signals(signum).name)


def serve_schedules(cfg, config_file: Path, *, host: str = "127.0.0.1", port: int | None = None, ui: bool = False,
                    verbose: bool = False, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT, limit: int | None = None,
                    echo: Callable[[str], None] = print) -> None:
    """Serve every schedule in `cfg` (read from `config_file`) until SIGTERM or Ctrl-C.

    Raises ConfigError when nothing is scheduled, WoolocalError when the server cannot start or be reached.
    """
    from pipelines.runtime import prepare_prefect_env

    jobs = declared_jobs(cfg)
    if not jobs:
        raise ConfigError(f"{config_file}: no schedules declared (add `schedule: {{cron: '0 3 * * *', timezone: "
                          "UTC}` to a project or a migration)")
    home = prefect_home(cfg)
    prepare_prefect_env(home, verbose=verbose)
    # A long-running server: the runner's and the runs' INFO lines (run started, "nothing changed", ...) are the log.
    os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
    os.environ["PREFECT_LOGGING_LOGGERS_PREFECT_LEVEL"] = "INFO"
    sdir = server_dir(home)
    state_path = sdir / STATE_FILE
    server: PrefectServer | None = None
    old_term = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with _single_serve_lock(sdir):
            url = os.environ.get("PREFECT_API_URL")
            if url:
                if not any(health(url) or time.sleep(1) for _ in range(10)):
                    raise WoolocalError(f"PREFECT_API_URL={url} does not answer its health check; start that server "
                                        "or unset PREFECT_API_URL to let `schedule serve` start its own")
                echo(f"using the Prefect server at {url} (PREFECT_API_URL)")
            else:
                server = PrefectServer(sdir, host=host, port=port, ui=ui, verbose=verbose)
                echo(f"starting a Prefect server on {host} (PREFECT_HOME {sdir}, log {server.log_path}) ...")
                url = server.start(timeout=startup_timeout)
                os.environ["PREFECT_API_URL"] = url
                state_path.write_text(json.dumps({"url": url, "pid": server.proc.pid, "serve_pid": os.getpid(),
                                                  "started": datetime.now(timezone.utc).isoformat()}))
                echo(f"Prefect server ready at {url}" + (f" (UI: {url[:-4]})" if ui else ""))
            from pipelines.schedules import build_deployments, serve_deployments

            deployments = build_deployments(cfg, config_file)
            for j in jobs:
                nxt = j.next_runs(1)[0]
                echo(f"  {j.deployment}  cron '{j.cron}' ({j.timezone})  next {nxt.isoformat()}")
            echo(f"registering {len(jobs)} deployment(s); SIGTERM or Ctrl-C stops")
            serve_deployments(deployments, url, limit=limit)  # returns on SIGTERM / Ctrl-C (the runner's handler)
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the teardown short
        try:
            if server is not None:
                echo("stopping the Prefect server ...")
                server.stop()
                state_path.unlink(missing_ok=True)
        finally:
            signal.signal(signal.SIGTERM, old_term)
    echo("stopped")
