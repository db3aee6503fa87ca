"""Everyday runs leave nothing behind: no process outlives `woolocal` (also after `kill -9`), no state in the
current folder, no Prefect at all when there is nothing to do.

Each run here is a real `woolocal` process; every process it starts inherits the environment variable
WOOLOCAL_TEST_MARK, which is how the test finds them afterwards (reparented to pid 1 or a subreaper if leaked).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import SAMPLE
from store_copies import copy_stores

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

REPO = Path(__file__).resolve().parent.parent


def marked(mark: str) -> list[int]:
    """Live (not zombie) processes whose environment carries WOOLOCAL_TEST_MARK=mark."""
    needle = f"WOOLOCAL_TEST_MARK={mark}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(int(d.name))
    return out


def wait_gone(mark: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = marked(mark)
        if not left:
            return []
        time.sleep(0.2)
    return marked(mark)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def env_for(mark: str, **extra) -> dict:
    env = dict(os.environ, WOOLOCAL_TEST_MARK=mark, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    env.pop("PREFECT_API_URL", None)
    env.pop("WOOLOCAL_CONFIG", None)
    env.pop("WOOLOCAL_STORES", None)
    env.update(extra)
    return env


def woolocal(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from woolocal_cli import main; sys.exit(main(prog_name='woolocal'))",
            *args]


@pytest.fixture
def project(tmp_path) -> Path:
    dst = tmp_path / "garden"
    shutil.copytree(SAMPLE, dst)
    return dst


@pytest.mark.parametrize("delay", [0.0, 2.5])
def test_kill_9_leaves_no_process(project, tmp_path, delay):
    """kill -9 of `woolocal ingest` (Prefect flow) at several points: once the plan is printed (the API server is
    starting) and a little later (the model is loading beside it); the Dask test below kills a run whose workers are
    up: nothing of ours survives it."""
    mark = uuid.uuid4().hex
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.Popen(woolocal("ingest", str(project), "--stores", str(tmp_path / "stores"), "--json"),
                            cwd=cwd, env=env_for(mark), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = proc.stderr.readline().decode()
        assert "files found" in first, first
        time.sleep(delay)
        deadline = time.monotonic() + 5
        while not (children := [p for p in marked(mark) if p != proc.pid]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the kill: make the project bigger"
        assert children, "the run had started no child process yet: the test would prove nothing"
        proc.kill()
        proc.wait()
        left = wait_gone(mark)
    finally:
        proc.kill()
        proc.stderr.close()
        leftovers = marked(mark)
        kill_all(leftovers)
    assert left == [], f"processes outlived the killed run: {left}"


def test_run_from_empty_folder_leaves_it_empty(project, tmp_path):
    """No flows.yaml here: Prefect's home goes to the user's state directory, the run leaves the folder empty, and
    no process is left once the command has returned. A re-run with nothing to do starts no Prefect at all."""
    mark = uuid.uuid4().hex
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    state = tmp_path / "xdg-state"
    env = env_for(mark, XDG_STATE_HOME=str(state))
    env.pop("PREFECT_HOME", None)
    args = woolocal("ingest", str(project), "--stores", str(tmp_path / "stores"), "--json")
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["added"] > 0
    assert list(cwd.iterdir()) == []
    assert (state / "woolocal" / "prefect" / "prefect.db").is_file()
    assert wait_gone(mark, timeout=5) == []

    (state / "woolocal" / "prefect" / "prefect.db").unlink()
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["written"], s["embedded"], s["unchanged"]) == (False, 0, s["count"])
    assert "nothing to do" in r.stderr.splitlines()[0]
    assert not (state / "woolocal" / "prefect" / "prefect.db").exists()  # Prefect never started
    assert list(cwd.iterdir()) == []


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, embedder) -> tuple[Path, Path]:
    """The sample project and its stores, ingested once for this module (in-process, the session's model)."""
    from woolocal_ingest.chunking import ChunkSettings
    from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
    from woolocal_ingest.ingest import run_ingest

    root = tmp_path_factory.mktemp("ingested")
    shutil.copytree(SAMPLE, root / "garden")
    run_ingest("garden", root / "garden", root / "stores", embedder, ChunkSettings(200, 32), DEFAULT_INCLUDE,
               DEFAULT_EXCLUDE)
    return root / "garden", root / "stores"


@pytest.mark.parametrize("delay", [0.5, 5.0])
def test_ctrl_c_is_one_line_exit_130_and_the_store_intact(ingested, tmp_path, delay):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while Prefect starts and the model loads, and
    later while the flow runs: one line, exit 130, no traceback or Prefect crash record, the previous store
    byte-identical, no process left."""
    mark = uuid.uuid4().hex
    project, stores = tmp_path / "garden", tmp_path / "stores"
    shutil.copytree(ingested[0], project)
    copy_stores(ingested[1], stores, project)
    env = env_for(mark)
    def store_files() -> dict:  # the stores, not the embedding cache (an interrupted run may have filled it)
        return {p: p.read_bytes() for p in stores.rglob("*") if p.is_file() and ".cache" not in p.parts}

    before = store_files()
    # enough new text (~80 new chunks a file) that the flow is still embedding when the later Ctrl-C arrives
    words = ("soil", "compost", "water", "seed", "ledger", "shed", "harvest", "volunteer", "plot", "fee", "tomato")
    for n, f in enumerate(sorted(project.rglob("*.md"))):
        extra = "\n\n".join(f"Added note {n}.{i}: " + " ".join(words[(i * 7 + j * 3 + n) % len(words)]
                                                            for j in range(60)) + "." for i in range(160))
        f.write_text(f.read_text() + "\n\n" + extra + "\n")
    proc = subprocess.Popen(woolocal("ingest", str(project), "--stores", str(stores)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        first = proc.stderr.readline().decode()
        assert "files found" in first and "to load" in first, first
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before Ctrl-C"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted: nothing was written; the store is as it was before this run"], err
    assert out == b""
    assert store_files() == before
    left = wait_gone(mark)
    kill_all(left)
    assert left == []


def test_kill_9_with_dask_workers_leaves_no_process(project, tmp_path):
    """flows.yaml says `task_runner: {type: dask}`: the run starts a LocalCluster (worker processes) besides the API
    server; kill -9 of the run once the workers are up leaves none of them."""
    mark = uuid.uuid4().hex
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "flows.yaml").write_text("task_runner: {type: dask, workers: 1}\n")
    proc = subprocess.Popen(woolocal("ingest", str(project), "--stores", str(tmp_path / "stores"), "--json"),
                            cwd=cwd, env=env_for(mark), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert "files found" in proc.stderr.readline().decode()
        deadline = time.monotonic() + 120
        while len([p for p in marked(mark) if p != proc.pid]) < 3:  # API server, dask worker, its helpers
            assert proc.poll() is None, "the run ended before its workers were seen"
            assert time.monotonic() < deadline, f"no dask workers seen: {marked(mark)}"
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        left = wait_gone(mark, timeout=15)
    finally:
        proc.kill()
        proc.stderr.close()
        kill_all(marked(mark))
    assert left == [], f"processes outlived the killed run: {left}"
