"""Schedules declared in flows.yaml (projects and migrations with `schedule: {cron, timezone}`), without Prefect.

What `woolocal schedule list` shows and what `woolocal schedule serve` turns into Prefect deployments: one job per
scheduled project (an ingest) and per scheduled migration, its deployment name, and its next run times computed
here with croniter in the schedule's own timezone.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from woolocal_ingest.locks import pid_alive

INGEST_FLOW = "woolocal-scheduled-ingest"
MIGRATE_FLOW = "woolocal-scheduled-migration"
SERVER_DIR = "schedule-server"  # under PREFECT_HOME: the child server's database, log and state file
STATE_FILE = "server.json"      # {"url", "pid", "serve_pid", "started"} while `schedule serve` runs its own server


@dataclass(frozen=True)
class ScheduledJob:
    """One scheduled ingest or migration and the Prefect deployment that runs it."""

    kind: Literal["ingest", "migration"]
    name: str          # the project's or migration's name in flows.yaml
    cron: str
    timezone: str
    target: str        # ingest: the project folder; migration: the source store

    @property
    def flow_name(self) -> str:
        return INGEST_FLOW if self.kind == "ingest" else MIGRATE_FLOW

    @property
    def deployment_name(self) -> str:
        return f"{'ingest' if self.kind == 'ingest' else 'migrate'}-{self.name}"

    @property
    def deployment(self) -> str:
        """Prefect's full name, `flow/deployment` (what `prefect deployment run` takes)."""
        return f"{self.flow_name}/{self.deployment_name}"

    def next_runs(self, n: int = 1, after: datetime | None = None) -> list[datetime]:
        return next_runs(self.cron, self.timezone, n, after)

    def to_dict(self, n: int = 1, after: datetime | None = None) -> dict:
        d = asdict(self)
        d.update(deployment=self.deployment, flow=self.flow_name,
                 next_runs=[t.isoformat() for t in self.next_runs(n, after)])
        d["next_run"] = d["next_runs"][0] if d["next_runs"] else None
        return d


def next_runs(cron: str, timezone: str = "UTC", n: int = 1, after: datetime | None = None) -> list[datetime]:
    """The next `n` times `cron` fires after `after` (default: now), as aware datetimes in `timezone`.

    The cron is read in local wall-clock time of `timezone` (03:00 Europe/Berlin stays 03:00 across DST), as
    Prefect's own Cron schedule does.
    """
    from croniter import croniter

    tz = ZoneInfo(timezone)
    start = (after or datetime.now(tz)).astimezone(tz)
    it = croniter(cron, start)
    return [it.get_next(datetime).astimezone(tz) for _ in range(max(0, n))]


def declared_jobs(cfg) -> list[ScheduledJob]:
    """Every scheduled project and migration in a FlowsConfig, projects first, in file order."""
    jobs: list[ScheduledJob] = []
    for p in cfg.projects:
        if p.schedule is not None:
            jobs.append(ScheduledJob("ingest", p.name, p.schedule.cron, p.schedule.timezone,
                                     str(cfg.project_root(p))))
    for m in cfg.migrations:
        if m.schedule is not None:
            jobs.append(ScheduledJob("migration", m.name, m.schedule.cron, m.schedule.timezone,
                                     str(cfg.resolve_path(m.source))))
    return jobs


def prefect_home(cfg) -> Path:
    """PREFECT_HOME as the CLI sets it for `cfg` (see `woolocal_ingest.state_dirs`): the environment's, else
    .prefect/ beside flows.yaml, else the user's state directory."""
    return cfg.prefect_home()


def server_dir(home: Path) -> Path:
    return Path(home) / SERVER_DIR


def read_server_state(home: Path) -> dict | None:
    """The state file of a running `schedule serve` (its server's URL), or None when there is none or its process
    is gone."""
    path = server_dir(home) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pid = state.get("serve_pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return None
    return state


def api_url_for(cfg) -> tuple[str | None, str]:
    """(Prefect API URL to ask, where it came from): PREFECT_API_URL, else a running `schedule serve`'s own server,
    else (None, reason)."""
    env = os.environ.get("PREFECT_API_URL")
    if env:
        return env.rstrip("/"), "PREFECT_API_URL"
    state = read_server_state(prefect_home(cfg))
    if state and state.get("url"):
        return str(state["url"]).rstrip("/"), f"`woolocal schedule serve` (pid {state['serve_pid']})"
    return None, "no PREFECT_API_URL and no `woolocal schedule serve` running"


def prefect_view(api_url: str, jobs: list[ScheduledJob], timeout: float = 3.0) -> dict:
    """What the Prefect server at `api_url` knows of each job's deployment (REST, no Prefect import):
    {deployment: {"exists", "paused", "next_scheduled", "last_run": {"state", "start_time", "name"}}}.

    Raises OSError-like httpx errors when the server cannot be reached.
    """
    import httpx

    out: dict[str, dict] = {}
    with httpx.Client(base_url=api_url, timeout=timeout) as c:
        c.get("/health").raise_for_status()
        for j in jobs:
            r = c.get(f"/deployments/name/{j.flow_name}/{j.deployment_name}")
            if r.status_code == 404:
                out[j.deployment] = {"exists": False}
                continue
            r.raise_for_status()
            dep = r.json()
            flt = {"deployments": {"id": {"any_": [dep["id"]]}}}
            nxt = c.post("/flow_runs/filter", json={
                **flt, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                "sort": "EXPECTED_START_TIME_ASC", "limit": 1}).json()
            last = c.post("/flow_runs/filter", json={
                **flt, "flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED"]}}},
                "sort": "EXPECTED_START_TIME_DESC", "limit": 1}).json()
            out[j.deployment] = {
                "exists": True,
                "paused": bool(dep.get("paused")),
                "concurrency_limit": dep.get("concurrency_limit")
                or (dep.get("global_concurrency_limit") or {}).get("limit"),
                "next_scheduled": nxt[0].get("expected_start_time") if nxt else None,
                "last_run": ({"name": last[0].get("name"), "state": (last[0].get("state") or {}).get("name"),
                              "start_time": last[0].get("start_time") or last[0].get("expected_start_time")}
                             if last else None),
            }
    return out
