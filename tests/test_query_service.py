"""`woolocal query` asks a running `woolocal serve` for the same stores root (announced in
`<stores_root>/.woolocal-serve.json`) and gets the very results the in-process search gives; without a live service
(none, stopped, a stale file of a dead process) it searches in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from woolocal_ingest.chunking import ChunkSettings
from woolocal_cli import main
from woolocal_ingest.config import Defaults, FlowsConfig
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from woolocal_ingest.ingest import run_ingest
from woolocal_ingest.service.discovery import ANNOUNCE_FILE, announce
from servers import running

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample-project"


def query(*args: str) -> dict:
    r = CliRunner().invoke(main, ["query", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_query_uses_a_running_service_and_falls_back(tmp_path, embedder):
    from woolocal_ingest.service.app import create_app

    proj, stores = tmp_path / "garden", tmp_path / "stores"
    shutil.copytree(SAMPLE, proj)
    summary = run_ingest("garden", proj, stores, embedder, ChunkSettings(200, 32), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    store = summary.store
    local = query(store, "who keeps the key to the tool shed?", "-k", "4")
    assert local["via"] == "in-process"

    cfg = FlowsConfig(base_dir=tmp_path, defaults=Defaults(stores_root=stores))
    app = create_app(cfg, api_key="", load_in_background=False, loader=lambda spec: embedder)
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with announce(stores, "127.0.0.1", port, None) as path:
            assert path == stores / ANNOUNCE_FILE
            for target in (store, "garden"):
                remote = query(target, "who keeps the key to the tool shed?", "-k", "4", "--stores", str(stores))
                assert remote["via"] == "service"
                assert remote["store"] == local["store"] and remote["model"] == local["model"]
                assert [h["id"] for h in remote["results"]] == [h["id"] for h in local["results"]]
                assert [round(h["score"], 5) for h in remote["results"]] == [
                    round(h["score"], 5) for h in local["results"]]
                assert remote["results"][0]["metadata"] == local["results"][0]["metadata"]
            assert query(store, "shed key", "--no-service")["via"] == "in-process"
        assert not (stores / ANNOUNCE_FILE).exists()  # removed when the service stops
    # a file left by a service that died (kill -9): its pid is gone, the query searches here
    (stores / ANNOUNCE_FILE).write_text(json.dumps({"url": url, "pid": 2 ** 22 + 12345, "api_key_env": None}))
    assert query(store, "who keeps the key to the tool shed?", "-k", "4") == local
