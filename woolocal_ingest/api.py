"""The agent API: `open_store(path or project name)` finds a store and gives it the model that embedded it.

This is where a store name meets flows.yaml and the model registry; `stores.Store` itself never reads either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from woolocal_ingest.errors import StoreError, StoreNotFoundError
from woolocal_ingest.manifest import NAME_RE, Manifest
from woolocal_ingest.stores import DOCSTORE_JS, INDEX_JS, INDEX_PY, PARQUET, Store, is_store

if TYPE_CHECKING:
    from woolocal_ingest.embedders.base import Embedder

__all__ = ["find_store", "open_store", "store_embedder"]


def store_embedder(manifest: Manifest, path: Path, quantization: str | None = None) -> Callable[[], "Embedder"]:
    """A function that loads the model a store's manifest names (its folder first, then its name), offline, at the
    store's precision: an int8 (or OpenVINO bf16) store is queried with the same model by the same engine, unless
    `quantization` says otherwise ("none": float32, whose agreement with int8 `stores inspect` reports)."""

    def load() -> "Embedder":
        from woolocal_ingest.embedders import load_embedder

        model = manifest.model
        quant = model.get("quantization") if quantization is None else quantization
        # int8 and bf16 vectors are their engine's own (identity.precision_of): queried by the backend that made
        # them; MLX bits are the MLX backend's own setting
        backend = model.get("backend") if quantization is None and quant in ("int8", "bf16") else "auto"
        quant = quant if quant == "int8" else None
        last: Exception | None = None
        for cand in (model.get("path"), model.get("name")):
            if not cand:
                continue
            try:
                return load_embedder(cand, backend=backend or "auto", quantization=quant)
            except Exception as e:  # try the next way of naming it
                last = e
        raise StoreError(f"{path}: cannot load the store's model {model.get('name')!r}: {last}")

    return load


def find_store(path_or_name: str | os.PathLike, stores_root: str | os.PathLike | None = None,
               model: str | None = None) -> Path:
    """The store folder `path_or_name` names: a store folder; a project's folder under the stores root (its one
    store, or the one for `model`); or a project name, looked up under `stores_root` (default: flows.yaml's)."""
    p = Path(path_or_name).expanduser()
    if is_store(p):
        return p
    if p.is_dir() and any((p / n).is_file() for n in (INDEX_JS, INDEX_PY, DOCSTORE_JS, PARQUET)):
        return p  # a store's files without manifest.json: opening it raises, naming it
    if not p.is_dir():
        if stores_root is None:
            from woolocal_ingest.config import load_config

            cfg = load_config()
            proj = cfg.project(str(path_or_name))
            stores_root = cfg.stores_root(proj)
        p = Path(stores_root) / str(path_or_name)
        if is_store(p):
            return p
    if not p.is_dir():
        raise StoreNotFoundError(f"{path_or_name}: no store folder or project of that name (looked in {p.parent})")
    stores = sorted(d for d in p.iterdir() if is_store(d) and not d.name.startswith("."))
    if model is not None:
        from woolocal_ingest.embedders.registry import slugify

        stores = [d for d in stores if (m := NAME_RE.match(d.name)) and m.group("slug") == slugify(model)]
    if len(stores) == 1:
        return stores[0]
    if not stores:
        raise StoreNotFoundError(f"{p}: holds no store" + (f" for model {model!r}" if model else ""))
    raise StoreError(f"{p}: holds several stores ({', '.join(d.name for d in stores)}); name one")


def open_store(path_or_name: str | os.PathLike, stores_root: str | os.PathLike | None = None,
               model: str | None = None, embedder: "Embedder | None" = None,
               quantization: str | None = None) -> Store:
    """Open a store for search (see `find_store` for what names one). Text queries are embedded with `embedder`,
    or with the model the store's manifest names, loaded on the first text query, at the store's precision
    (`quantization="none"` queries an int8 store with float32)."""
    path = find_store(path_or_name, stores_root, model)
    if embedder is not None:
        return Store(path, embedder=embedder)
    from woolocal_ingest.manifest import read_manifest

    return Store(path, embedder=store_embedder(read_manifest(path), path, quantization))
