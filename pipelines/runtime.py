"""Prefect's environment, set before `import prefect`: a local PREFECT_HOME, quiet logs, no telemetry."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def prepare_prefect_env(home: Path, verbose: bool = False) -> None:
    """Point Prefect at an ephemeral local API under `home` (unless PREFECT_API_URL is already set).

    Must run before the first `import prefect`: Prefect reads its settings from the environment at import time.
    """
    os.environ.setdefault("PREFECT_HOME", str(Path(home).resolve()))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    level = "INFO" if verbose else "ERROR"
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
