"""Prefect's environment, set before `import prefect` (PREFECT_HOME, quiet logs, no telemetry), and the API a
command's runs use (`PrefectRuntime`: an existing server, or one of our own that ends with this process)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipelines.api_server import RunApi, healthy
from woolocal_ingest.errors import WoolocalError


def prepare_prefect_env(home: Path, verbose: bool = False) -> None:
    """Point Prefect at an ephemeral local API under `home` (unless PREFECT_API_URL is already set).

    Must run before the first `import prefect`: Prefect reads its settings from the environment at import time.
    """
    os.environ.setdefault("PREFECT_HOME", str(Path(home).resolve()))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    # Quiet unless -v: a failed run re-raises its task's error (one `error:` line); a Ctrl-C is one line too, not
    # Prefect's "Crash detected" records.
    level = "INFO" if verbose else "CRITICAL"
    os.environ["PREFECT_LOGGING_LEVEL"] = level
    os.environ["PREFECT_LOGGING_LOGGERS_PREFECT_LEVEL"] = level
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "ERROR" if not verbose else "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if not verbose:
        os.environ.setdefault("PREFECT_CLI_COLORS", "false")


@contextmanager
def flow_settings() -> Iterator[None]:
    """Settings for one in-process flow run: no flow heartbeat (a sync run otherwise waits ~1 s on it)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def flow_result(state, what: str):
    """The return value of a finished flow run; a failed run re-raises its task's own WoolocalError, or one naming
    `what` (e.g. "ingest flow") and the error."""
    from woolocal_ingest.errors import WoolocalError

    if not state.is_completed():
        try:
            state.result()  # re-raise the task's own error
        except WoolocalError:
            raise
        except Exception as e:
            raise WoolocalError(f"{what} {state.name.lower()}: {type(e).__name__}: {e}") from e
        raise WoolocalError(f"{what} ended {state.name}: {state.message}")
    return state.result()


@dataclass
class PrefectRuntime:
    """The Prefect API of one command: `url` of a server that was running already (PREFECT_API_URL, or a running
    `woolocal schedule serve`), or of `server`, started by `start_prefect` and stopped by `close()`."""

    url: str
    source: str  # where the URL came from: "PREFECT_API_URL", "schedule serve (pid N)", "started here"
    server: RunApi | None = None
    wait_s: float = 0.0  # how long `ready()` waited for the server
    _ready: bool = field(default=False, repr=False)

    def ready(self) -> str:
        """Block until the API answers; point this process (environment and, once imported, Prefect's settings) at
        it. Returns the URL."""
        if not self._ready:
            t = time.perf_counter()
            if self.server is not None:
                self.url = self.server.wait()
            elif not healthy(self.url, timeout=3.0):
                raise WoolocalError(f"the Prefect API at {self.url} ({self.source}) does not answer its health "
                                    "check; start that server, or unset PREFECT_API_URL to let woolocal start its "
                                    "own for the run")
            os.environ["PREFECT_API_URL"] = self.url
            self.wait_s = time.perf_counter() - t
            self._ready = True
        return self.url

    @contextmanager
    def settings(self) -> Iterator[None]:
        """Prefect's settings pointed at this API for the block (for a process that imported prefect before)."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.ready()}):
            yield

    def close(self) -> None:
        """Send what Prefect still holds for our server, then stop it (a server we did not start is left alone)."""
        if self.server is None:
            return
        if self._ready:
            import sys

            if "prefect" in sys.modules:
                from pipelines.dask_runner import drain_prefect_services

                drain_prefect_services(timeout=2.0)
            if os.environ.get("PREFECT_API_URL") == self.url:
                del os.environ["PREFECT_API_URL"]
        self.server.stop()


def start_prefect(home: Path, verbose: bool = False, attach: tuple[str | None, str] = (None, "")) -> PrefectRuntime:
    """Prepare Prefect's environment under `home` and get the run an API without waiting for it.

    `attach` (url, where it came from; `woolocal_ingest.schedules.api_url_for`): PREFECT_API_URL, or the server of a
    running `woolocal schedule serve`, is used as it is. Otherwise a server of our own starts now, in the background
    (`RunApi`: it ends with this process, also on `kill -9`); call `ready()` before the first flow.
    """
    prepare_prefect_env(home, verbose=verbose)
    url, source = attach
    if url:
        return PrefectRuntime(url=url.rstrip("/"), source=source)
    server = RunApi(Path(os.environ["PREFECT_HOME"]) / "api-server.log").start()
    return PrefectRuntime(url=server.url, source="started here", server=server)
