"""Where woolocal keeps state that is not a store: Prefect's home (its database, logs, the schedule server's files).

Rule: state never lands in the current folder unless flows.yaml lives there. In order:

1. `PREFECT_HOME` from the environment, when set;
2. `.prefect/` beside the flows.yaml in use (`--config`, `$WOOLOCAL_CONFIG` or `./flows.yaml`): a project's own
   configuration keeps its own Prefect history;
3. with no flows.yaml at all: the user's state directory (platformdirs: `~/.local/state/woolocal/prefect` on Linux,
   `~/Library/Application Support/woolocal/prefect` on macOS), shared by every folder a user ingests from.

Caches and locks are elsewhere and already tied to what they protect: the embedding cache under
`<stores_root>/.cache/`, run locks beside the store or project they lock, ONNX exports beside the model (or under
`user_cache_dir()/onnx` when that folder is read-only), the model registry under `$WOOLOCAL_HOME`.
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "woolocal"


def user_state_dir() -> Path:
    """The user's state directory for woolocal (platformdirs; XDG_STATE_HOME is honoured on Linux)."""
    import platformdirs

    return Path(platformdirs.user_state_dir(APP, appauthor=False))


def user_cache_dir() -> Path:
    """The user's cache directory for woolocal (platformdirs; XDG_CACHE_HOME is honoured on Linux)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP, appauthor=False))


def prefect_home(config_file: Path | None) -> Path:
    """PREFECT_HOME for a run whose configuration was read from `config_file` (None: built-in defaults, no file)."""
    env = os.environ.get("PREFECT_HOME")
    if env:
        return Path(env).expanduser().resolve()
    if config_file is not None:
        return (Path(config_file).resolve().parent / ".prefect").resolve()
    return user_state_dir() / "prefect"
