"""Copies of stores made for copies of a project: a store records the folder it was ingested from (one store per
source), so a test that copies a project and its stores to a new place points the copied stores at the copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def repoint(stores: Path, project_root: Path) -> None:
    """Make every store under `stores` (<stores>/<project>/<store>/manifest.json) record `project_root`."""
    for manifest in Path(stores).glob("*/*/manifest.json"):
        m = json.loads(manifest.read_text(encoding="utf-8"))
        if (m.get("source") or {}).get("root"):
            m["source"]["root"] = str(Path(project_root).resolve())
            manifest.write_text(json.dumps(m, indent=2, ensure_ascii=False), encoding="utf-8")


def copy_stores(src: Path, dst: Path, project_root: Path, **copytree_kwargs) -> Path:
    """`shutil.copytree(src, dst)` with the copied stores pointed at `project_root`; returns dst."""
    out = Path(shutil.copytree(src, dst, **copytree_kwargs))
    repoint(out, project_root)
    return out
