"""A sample project and a flows.yaml whose purposes use one model folder, with the `woolocal` CLI run in-process
against that config (tests that drive the CLI end to end with a model copy of their own)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import yaml
from click.testing import CliRunner

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample-project"


def cli_project(tmp_path: Path, model: str) -> tuple[Path, Callable]:
    """(project folder, cli): `cli(*args, code=0, input=None)` runs `woolocal --config <flows.yaml> *args` and
    asserts the exit code (None: any)."""
    from woolocal_cli import main

    cfg = tmp_path / "flows.yaml"
    cfg.write_text(yaml.safe_dump({"version": 1, "defaults": {"stores_root": "stores"}, "cache": {"enabled": False},
                                   "purposes": {"projects": {"model": model}, "userProfile": {"model": model}}}))
    proj = tmp_path / "garden"
    shutil.copytree(SAMPLE, proj)

    def cli(*args, code=0, input=None):
        r = CliRunner().invoke(main, ["--config", str(cfg), *args], input=input)
        if code is not None:
            assert r.exit_code == code, (args, r.exit_code, r.stdout[-2000:], r.stderr[-2000:], r.exception)
        return r

    return proj, cli
