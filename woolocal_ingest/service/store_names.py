"""Store names from requests: a project name (its store for the project's configured model) or
`<project>/<store folder>`, checked against a strict pattern and resolved to a folder that never lies outside the
stores root (`resolve_store`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from woolocal_ingest.manifest import NAME_RE
from woolocal_ingest.service.errors import APIError
from woolocal_ingest.service.state import ServiceState
from woolocal_ingest.stores import is_store

# One path segment of a store name: what project names allow (config.NAME_RE), and store folders are made of.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def _bad_name(name: Any, why: str) -> APIError:
    return APIError(400, f"invalid store name {name!r}: {why}; use a project name or <project>/<store folder> "
                         "(letters, digits, '.', '_', '-')", param="store", code="invalid_store_name")


def store_not_found(name: str, detail: str = "") -> APIError:
    return APIError(404, f"store {name!r} not found{': ' + detail if detail else ''} (GET /v1/stores lists them)",
                    param="store", code="store_not_found")


def validate_store_name(name: Any) -> list[str]:
    """The segments of a store name from a request: one (project) or two (project/folder), each a plain name.
    Refuses path traversal in every spelling that reaches here decoded (`..`, absolute paths, backslashes, NUL,
    percent signs of double encoding, empty or hidden segments)."""
    if not isinstance(name, str) or not name:
        raise _bad_name(name, "must be a non-empty string")
    if len(name) > 401:
        raise _bad_name(name[:40] + "...", "too long")
    if "\x00" in name or "\\" in name or "%" in name:
        raise _bad_name(name, "NUL, backslashes and percent signs are not allowed")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise _bad_name(name, "absolute paths are not allowed")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise _bad_name(name, "empty, '.' or '..' path segments are not allowed")
    if len(parts) > 2:
        raise _bad_name(name, "at most two segments (<project>/<store folder>)")
    for p in parts:
        if not _SEGMENT_RE.fullmatch(p):
            raise _bad_name(name, f"segment {p!r} is not a plain name")
    return parts


def under_root(root: Path, p: Path) -> bool:
    try:
        return p.resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return False


def _project_default(state: ServiceState, project: str, candidates: list[Path]) -> list[Path]:
    """Of a project's several stores, the one(s) for the model its purpose configures (as `woolocal ingest` writes)."""
    from woolocal_ingest.embedders.registry import slugify

    cfg = state.config
    proj = cfg.project(project)
    purpose = cfg.purposes.get(proj.purpose if proj else "projects")
    if purpose is None:
        return candidates
    slug = slugify(purpose.model)
    out = []
    for d in candidates:
        m = NAME_RE.match(d.name)
        if m and m.group("slug") == slug and (purpose.dimensions is None or int(m.group("dim")) == purpose.dimensions):
            out.append(d)
    return out


def resolve_store(state: ServiceState, name: Any, *, trusted: bool = False) -> tuple[str, Path]:
    """(`<project>/<folder>`, absolute folder) for a store name from a request (validated, confined to the stores
    root). `trusted` (names from flows.yaml aliases) also admits an absolute path to a store folder."""
    root = Path(state.stores_root).resolve()
    if trusted and isinstance(name, str) and os.path.isabs(os.path.expanduser(name)):
        p = Path(os.path.expanduser(name)).resolve()
        if not is_store(p):
            raise store_not_found(name, "the alias names a folder that holds no store")
        return f"{p.parent.name}/{p.name}", p
    parts = validate_store_name(name)
    project_dir = root / parts[0]
    if not under_root(root, project_dir):
        raise _bad_name(name, "resolves outside the stores root")
    if len(parts) == 2:
        p = project_dir / parts[1]
        if not under_root(root, p):
            raise _bad_name(name, "resolves outside the stores root")
        if not is_store(p):
            raise store_not_found(name)
        return f"{parts[0]}/{parts[1]}", p
    if not project_dir.is_dir():
        raise store_not_found(name)
    stores = sorted(d for d in project_dir.iterdir() if not d.name.startswith(".") and is_store(d) and under_root(root, d))
    if len(stores) > 1:
        stores = _project_default(state, parts[0], stores) or stores
    if not stores:
        raise store_not_found(name, "the project holds no store")
    if len(stores) > 1:
        raise APIError(400, f"project {parts[0]!r} holds several stores ({', '.join(d.name for d in stores)}); "
                            f"name one as {parts[0]}/<store folder>", param="store", code="ambiguous_store")
    return f"{parts[0]}/{stores[0].name}", stores[0]
