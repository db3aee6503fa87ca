"""`woolocal schedule list | serve`: schedules declared in flows.yaml, run by Prefect.

`list` runs in-process (cron + timezone -> next runs). The serve test is end to end and slow (~1.5-3 min): it starts
`woolocal schedule serve` as a real subprocess (its own Prefect server child, an isolated PREFECT_HOME, a working
directory that is not the config's), lets per-minute schedules fire, checks that the migration and the ingest
happened and that a later run did nothing and said so, then SIGTERMs it and checks that nothing is left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from woolocal_cli import main
from woolocal_ingest.schedules import next_runs

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("WOOLOCAL_SHARED", REPO.parent / "shared"))
LEGACY = SHARED / "fixtures" / "legacy-stores" / "edge" / "js_dup_id"  # 6 docs: small, and it has known damage


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_schedule_list_shows_deployments_and_next_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    (tmp_path / "proj").mkdir()
    cfg = _write(tmp_path / "flows.yaml", """
version: 1
projects:
  - name: notes
    path: proj
    schedule: {cron: "0 3 * * *", timezone: Europe/Berlin}
  - name: adhoc
    path: proj
migrations:
  - name: wooster-projects
    source: legacy
    to: projects
    schedule: {cron: "30 2 * * 1", timezone: America/New_York}
""")
    r = CliRunner().invoke(main, ["--config", str(cfg), "schedule", "list", "-n", "2"])
    assert r.exit_code == 0, (r.output, r.exception)
    out = r.stdout
    assert "woolocal-scheduled-ingest/ingest-notes" in out and "woolocal-scheduled-migration/migrate-wooster-projects" in out
    assert "'0 3 * * *' Europe/Berlin" in out and "'30 2 * * 1' America/New_York" in out
    assert "adhoc" not in out  # not scheduled
    assert " 03:00 CE" in out and " 02:30 E" in out  # local wall-clock time, with the zone (CET/CEST, EST/EDT)
    assert "no `woolocal schedule serve` running" in r.stderr

    r = CliRunner().invoke(main, ["--config", str(cfg), "schedule", "list", "--json", "-n", "3"])
    assert r.exit_code == 0, (r.output, r.exception)
    doc = json.loads(r.stdout)
    assert doc["config"] == str(cfg) and doc["prefect_api"] is None
    rows = {s["name"]: s for s in doc["schedules"]}
    assert set(rows) == {"notes", "wooster-projects"}
    notes, mig = rows["notes"], rows["wooster-projects"]
    assert (notes["kind"], notes["deployment"], notes["cron"], notes["timezone"]) == (
        "ingest", "woolocal-scheduled-ingest/ingest-notes", "0 3 * * *", "Europe/Berlin")
    assert mig["kind"] == "migration" and mig["target"] == str(tmp_path / "legacy")
    now = datetime.now(ZoneInfo("UTC"))
    for row, hour, minute in ((notes, 3, 0), (mig, 2, 30)):
        tz = ZoneInfo(row["timezone"])
        times = [datetime.fromisoformat(t) for t in row["next_runs"]]
        assert len(times) == 3 and row["next_run"] == row["next_runs"][0] and times == sorted(times)
        assert times[0] > now
        for t in times:  # the offset in the JSON is the zone's own at that instant
            assert (t.hour, t.minute) == (hour, minute) and t.utcoffset() == t.astimezone(tz).utcoffset()
    assert all(datetime.fromisoformat(t).weekday() == 0 for t in mig["next_runs"])  # Mondays

    # Across a DST change the cron keeps its wall-clock time (EU summer time starts 2026-03-29).
    runs = next_runs("0 3 * * *", "Europe/Berlin", 3, after=datetime(2026, 3, 27, 12, tzinfo=ZoneInfo("UTC")))
    assert [(t.day, t.hour, t.utcoffset().total_seconds() / 3600) for t in runs] == [(28, 3, 1), (29, 3, 2), (30, 3, 2)]

    empty = _write(tmp_path / "none.yaml", "version: 1\nprojects:\n  - name: adhoc\n    path: proj\n")
    r = CliRunner().invoke(main, ["--config", str(empty), "schedule", "list"])
    assert r.exit_code == 0 and "no schedules declared" in r.stdout
    r = CliRunner().invoke(main, ["--config", str(empty), "schedule", "list", "--json"])
    assert json.loads(r.stdout)["schedules"] == []
    r = CliRunner().invoke(main, ["--config", str(empty), "schedule", "serve"])
    assert r.exit_code == 2 and "no schedules declared" in r.stderr


def test_scheduled_run_that_finds_its_store_locked_skips_without_touching_it(tmp_path):
    """Runs of one store never overlap: a run that finds another holding the store's lock ends, writing nothing."""
    from pipelines.schedules import LOCK_NAME, scheduled_ingest, scheduled_migration
    from woolocal_ingest.config import load_config
    from woolocal_ingest.locks import try_lock
    from woolocal_ingest.migrate.backup import target_lock

    if not LEGACY.is_dir():
        pytest.skip(f"shared fixtures not found at {LEGACY} (set WOOLOCAL_SHARED)")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("faiss.index", "docstore.json"):
        (legacy / name).write_bytes((LEGACY / name).read_bytes())
    _write(tmp_path / "proj" / "a.md", "# A\n\nsome text\n")
    cfg = _write(tmp_path / "flows.yaml", f"""
version: 1
defaults: {{stores_root: stores}}
projects: [{{name: tiny, path: proj, schedule: {{cron: "0 3 * * *"}}}}]
migrations: [{{name: legacy, source: legacy, to: projects, out: stores/m, schedule: {{cron: "0 4 * * *"}}}}]
""")
    lock = tmp_path / "stores" / "tiny" / LOCK_NAME
    with try_lock(lock) as first:
        assert first is None  # held by us
        with try_lock(lock) as second:  # flock is per open file: a second holder is refused even in this process
            assert second == str(os.getpid())  # the holder's pid, as it wrote it
        r = scheduled_ingest.fn(str(cfg), "tiny")
    assert r["status"] == "skipped" and "lock held" in r["reason"]
    assert not list((tmp_path / "stores" / "tiny").glob("*/manifest.json"))
    target = load_config(cfg).resolve_path(Path("stores/m"))
    with target_lock(target):
        r = scheduled_migration.fn(str(cfg), "legacy")
    assert r["status"] == "skipped" and not target.exists()


# ---------------------------------------------------------------------------------------------------------------
# end to end


def _procs_with_env(key: str, value: str) -> list[int]:
    """Live processes (this user's) whose environment holds key=value."""
    needle = f"{key}={value}".encode() + b"\0"
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env and state != "Z":
            found.append(int(d.name))
    return found


def _woolocal() -> list[str]:
    exe = Path(sys.executable).parent / "woolocal"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "woolocal_cli"]


@pytest.mark.slow  # waits for real cron minutes (~100 s): CI runs it (scripts/test.sh), a plain `pytest` does not
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks leftover processes through /proc")
def test_schedule_serve_fires_migration_and_ingest_then_stops_cleanly(tmp_path):
    if not LEGACY.is_dir():
        pytest.skip(f"shared fixtures not found at {LEGACY} (set WOOLOCAL_SHARED)")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("faiss.index", "docstore.json"):
        (legacy / name).write_bytes((LEGACY / name).read_bytes())
    empty = tmp_path / "empty"  # a store with no text: its migration fails, every time
    empty.mkdir()
    for name in ("faiss.index", "docstore.json"):
        (empty / name).write_bytes((LEGACY.parent / "js_empty" / name).read_bytes())
    _write(tmp_path / "proj" / "a.md", "# Night shift\n\nThe scheduler wakes at night and re-embeds what changed.\n")
    _write(tmp_path / "proj" / "b.txt", "FAISS keeps vectors in a flat index; L2 on unit vectors ranks like cosine.\n")
    cfg = _write(tmp_path / "conf" / "flows.yaml", f"""
version: 1
defaults:
  stores_root: {tmp_path / 'stores'}
projects:
  - name: tiny
    path: {tmp_path / 'proj'}
    schedule: {{cron: "* * * * *", timezone: Europe/Berlin}}
migrations:
  - name: legacy
    source: {legacy}
    to: projects
    out: {tmp_path / 'stores' / 'legacy-migrated'}
    schedule: {{cron: "* * * * *", timezone: UTC}}
  - name: broken
    source: {empty}
    to: projects
    out: {tmp_path / 'stores' / 'broken-migrated'}
    schedule: {{cron: "* * * * *", timezone: UTC}}
""")
    home = tmp_path / "prefect-home"
    elsewhere = tmp_path / "elsewhere"  # the working directory: nothing may depend on it
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "WOOLOCAL_STORES"}
    env.update(PREFECT_HOME=str(home), PREFECT_RUNNER_POLL_FREQUENCY="2", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    log_path = tmp_path / "serve.log"
    migrated = tmp_path / "stores" / "legacy-migrated" / "manifest.json"
    ingested = tmp_path / "stores" / "tiny"
    state_file = home / "schedule-server" / "server.json"

    def log() -> str:
        return log_path.read_text(errors="replace")

    t0 = time.monotonic()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(_woolocal() + ["--config", str(cfg), "schedule", "serve"], cwd=elsewhere, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server_pid = None
    try:
        # The server answers, the deployments are registered, and `schedule list` finds them through the state file.
        while "Your deployments are being served" not in log():  # Prefect's own line, once they are registered
            assert proc.poll() is None, log()
            assert time.monotonic() - t0 < 120, log()
            time.sleep(0.5)
        server_pid = json.loads(state_file.read_text())["pid"]
        lst = subprocess.run(_woolocal() + ["--config", str(cfg), "schedule", "list", "--json"], cwd=elsewhere,
                             env=env, capture_output=True, text=True, timeout=60)
        assert lst.returncode == 0, lst.stderr
        doc = json.loads(lst.stdout)
        assert doc["prefect_api"] and doc["prefect_error"] is None, doc
        assert {s["name"]: s["prefect"]["exists"] for s in doc["schedules"]} == {"tiny": True, "legacy": True,
                                                                                "broken": True}
        assert all(s["prefect"]["concurrency_limit"] == 1 and not s["prefect"]["paused"] for s in doc["schedules"])

        # A real per-minute schedule fires: the migration and the ingest happen (bounded wait) ...
        def done() -> bool:
            return migrated.is_file() and any(ingested.glob("*/manifest.json"))

        while not done():
            assert proc.poll() is None, log()
            assert time.monotonic() - t0 < 150, f"no scheduled run completed within 150 s:\n{log()}"
            time.sleep(1)
        manifest = json.loads(migrated.read_text())
        assert manifest["migrated_from"]["path"] == str(legacy) and manifest["count"] == 6
        assert manifest["migrated_from"]["format"] == "langchain-js" and manifest["migrated_from"]["dim"] == 1536
        # ... and a later run of each finds nothing changed and says so (idempotent nightly runs).
        while not ("ingest tiny: nothing changed" in log() and "migration legacy: nothing changed" in log()):
            assert proc.poll() is None, log()
            assert time.monotonic() - t0 < 240, f"no second (no-op) run within 240 s:\n{log()}"
            time.sleep(1)
        assert json.loads(migrated.read_text())["created"] == manifest["created"]  # not rewritten
        # The failing migration ended its flow runs Failed; the server, the runner and the other schedules carried on.
        assert f"{empty}: nothing to migrate" in log() and "Finished in state Failed" in log()
        assert proc.poll() is None
        assert not (tmp_path / "stores" / "broken-migrated").exists()
        lst = subprocess.run(_woolocal() + ["--config", str(cfg), "schedule", "list", "--json"], cwd=elsewhere,
                             env=env, capture_output=True, text=True, timeout=60)
        last = {s["name"]: (s["prefect"]["last_run"] or {}).get("state") for s in json.loads(lst.stdout)["schedules"]}
        assert last["broken"] == "Failed" and last["tiny"] in ("Completed", "Running", "Pending"), last
    finally:
        t_stop = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            rc = None
        stop_s = time.monotonic() - t_stop
        leftovers = _procs_with_env("PREFECT_HOME", str(home))
        for _ in range(30):  # flow-run children may need a moment after the runner cancelled them
            if not leftovers:
                break
            time.sleep(0.2)
            leftovers = _procs_with_env("PREFECT_HOME", str(home))
        if rc is None or leftovers:  # never leave anything behind, even when the test fails
            groups = [proc.pid] + ([server_pid] if server_pid and Path(f"/proc/{server_pid}").exists() else [])
            for kill, pid in [(os.killpg, g) for g in groups] + [(os.kill, p) for p in leftovers]:
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    assert rc == 0, (rc, log())
    assert stop_s < 15, f"SIGTERM took {stop_s:.1f}s"
    assert not leftovers, f"processes left running: {leftovers}\n{log()}"
    assert server_pid is not None and not Path(f"/proc/{server_pid}").exists()
    assert not state_file.exists()
    assert "stopped" in log().splitlines()[-1]
