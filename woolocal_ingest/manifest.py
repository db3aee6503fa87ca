"""`manifest.json`: our record of what we wrote into a store, read and validated in one place (`read_manifest`)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

from woolocal_ingest.errors import StoreError, StoreNotFoundError

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "NAME_RE", "Manifest", "folder_dim", "read_manifest"]

FORMAT = "woolocal-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NAME_RE = re.compile(r"^(?P<slug>.+)-(?P<dim>\d+)d$")  # a store folder's name: <model-slug>-<dim>d


def folder_dim(name: str) -> int | None:
    """The dimension a store folder's name carries (`all-minilm-l6-v2-384d` -> 384); None for other names
    (Wooster's in-place `vectorStore/`)."""
    m = NAME_RE.match(name)
    return int(m.group("dim")) if m else None


class Manifest(Mapping):
    """A parsed, validated manifest.json. Typed accessors for what the code uses; it is also the read-only mapping
    of the JSON itself (`store.manifest["model"]["name"]`, the agent API's contract)."""

    def __init__(self, data: Mapping[str, Any], path: Path | None = None):
        self._data = dict(data)
        self.path = path

    # -- Mapping ------------------------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def to_dict(self) -> dict:
        return dict(self._data)

    # -- typed fields -------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self._data["dim"])

    @property
    def count(self) -> int:
        return int(self._data.get("count") or 0)

    @property
    def project(self) -> str | None:
        return self._data.get("project")

    @property
    def model(self) -> dict:
        """The model that embedded the store: name, path, dim, pooling, files_sha256, quantization, backend, ..."""
        return dict(self._data.get("model") or {})

    @property
    def model_name(self) -> str | None:
        return self.model.get("name")

    @property
    def files(self) -> dict[str, str]:
        """sha256 of each file as we wrote it."""
        return dict(self._data.get("files") or {})

    @property
    def layouts(self) -> list[str]:
        return list(self._data.get("layouts") or ["langchain-js"])

    @property
    def chunking(self) -> dict:
        return dict(self._data.get("chunking") or {})

    @property
    def source_files(self) -> dict[str, str]:
        """An ingested store's project files (relative path -> sha256 of the bytes ingested)."""
        src = self._data.get("source") or {}
        return dict(src.get("files") or {}) if isinstance(src, Mapping) else {}

    @property
    def source_root(self) -> str | None:
        src = self._data.get("source") or {}
        return src.get("root") if isinstance(src, Mapping) else None

    @property
    def migrated_from(self) -> dict | None:
        mf = self._data.get("migrated_from")
        return dict(mf) if isinstance(mf, Mapping) else None

    @property
    def index_kind(self) -> str:
        """The index kind (`flat-l2`); manifests written before kinds existed hold a flat L2 index."""
        idx = self._data.get("index") or {}
        return str(idx.get("kind") or "flat-l2") if isinstance(idx, Mapping) else "flat-l2"

    @property
    def created(self) -> str | None:
        return self._data.get("created")

    def __repr__(self) -> str:
        return f"Manifest({self.path}, model={self.model_name!r}, dim={self._data.get('dim')}, count={self.count})"


def _expect(mf: Path, data: Mapping[str, Any], key: str, kind: type | tuple, what: str) -> None:
    if key in data and data[key] is not None and not isinstance(data[key], kind):
        raise StoreError(f"{mf}: field {key!r} is {type(data[key]).__name__} {data[key]!r:.60}, expected {what}")


def read_manifest(folder: Path) -> Manifest:
    """Read and validate `<folder>/manifest.json`; StoreNotFoundError / StoreError naming the file and field."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StoreNotFoundError(f"{folder}: no such store folder")
    mf = folder / MANIFEST
    try:
        data = json.loads(mf.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{mf}: missing; {folder} is not a woolocal store (use `woolocal migrate` for LangChain "
                         "stores)") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{mf}: unreadable: {e}") from None
    if not isinstance(data, dict):
        raise StoreError(f"{mf}: expected a JSON object, found a {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise StoreError(f"{mf}: format is {data.get('format')!r}, expected {FORMAT!r}")
    version = data.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(f"{mf}: format_version {version!r} is not one this library reads (up to {FORMAT_VERSION})")
    _expect(mf, data, "dim", int, "a whole number of dimensions")
    _expect(mf, data, "count", int, "a whole number of rows")
    _expect(mf, data, "model", dict, "an object (name, dim, files_sha256, ...)")
    _expect(mf, data, "files", dict, "an object {file name: sha256}")
    _expect(mf, data, "layouts", list, "a list of layout names")
    _expect(mf, data, "source", dict, "an object (root, fingerprint, files)")
    _expect(mf, data, "index", dict, "an object (kind, type)")
    return Manifest(data, mf)
