"""Where migrations come from when none is named: flows.yaml's `migrations:`, else Wooster's layout under
`wooster.root` (`projects/*/vectorStore`, `vector_data/*`), and the project a migrated store is filed under."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from woolocal_ingest.errors import StoreError
from woolocal_ingest.fsutil import BACKUP_TAG
from woolocal_ingest.manifest import NAME_RE, read_manifest
from woolocal_ingest.migrate.backup import ROLLED_BACK_TAG
from woolocal_ingest.migrate.errors import MigrationInputError
from woolocal_ingest.stores import MANIFEST

if TYPE_CHECKING:
    from woolocal_ingest.config import FlowsConfig, MigrationConfig


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:100] or "store"


def default_project(source: Path) -> str:
    """The project a migrated store is filed under: Wooster's `<name>` for `projects/<name>/vectorStore`, a woolocal
    store's manifest `project` (else its parent folder's name), else the source folder's own name."""
    source = Path(source)
    if source.name == "vectorStore" and source.parent.name:
        return _safe_name(source.parent.name)
    if (source / MANIFEST).is_file():
        try:
            project = read_manifest(source).project
            if isinstance(project, str) and project:
                return _safe_name(project)
        except StoreError:
            pass
        if NAME_RE.match(source.name):
            return _safe_name(source.parent.name)
    return _safe_name(source.name)


def _looks_like_store(p: Path) -> bool:
    names = ("faiss.index", "docstore.json", "index.faiss", "index.pkl", MANIFEST)
    return p.is_dir() and any((p / n).is_file() for n in names)


def declared_migrations(config: "FlowsConfig") -> list["MigrationConfig"]:
    """flows.yaml's `migrations:`; when there are none, one per store under `wooster.root`:
    `projects/*/vectorStore` to `wooster.projects_purpose`, `vector_data/*` to `wooster.user_profile_purpose`, in
    place unless `wooster.in_place` is false (backups, hidden folders and non-store folders are passed over)."""
    from woolocal_ingest.config import MigrationConfig

    if config.migrations:
        return list(config.migrations)
    if config.wooster.root is None:
        raise MigrationInputError("nothing to migrate: flows.yaml declares no migrations and no wooster.root")
    root = config.resolve_path(config.wooster.root)
    if not root.is_dir():
        raise MigrationInputError(f"wooster.root: {root} is not a folder")
    w = config.wooster
    found: list[tuple[str, Path, str]] = []
    projects = root / "projects"
    if projects.is_dir():
        for d in sorted(projects.iterdir()):
            vs = d / "vectorStore"
            if not d.name.startswith(".") and _looks_like_store(vs):
                found.append((f"projects-{d.name}", vs, w.projects_purpose))
    vdata = root / "vector_data"
    if vdata.is_dir():
        for d in sorted(vdata.iterdir()):
            if d.name.startswith(".") or BACKUP_TAG in d.name or ROLLED_BACK_TAG in d.name:
                continue
            if _looks_like_store(d):
                found.append((f"vector_data-{d.name}", d, w.user_profile_purpose))
    out, names = [], set()
    for raw, path, purpose in found:
        name = _safe_name(raw)
        n, base = 1, name
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.add(name)
        out.append(MigrationConfig(name=name, source=path, to=purpose, in_place=w.in_place))
    return out
