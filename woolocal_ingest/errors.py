"""The few named exceptions the library raises; every message names the file, field or value at fault."""

from __future__ import annotations


class WoolocalError(Exception):
    """Base class: anything this library raises on purpose."""

    exit_code = 1


class ConfigError(WoolocalError):
    """flows.yaml or the environment holds a bad value (the message names its YAML key path)."""

    exit_code = 2


class ModelNotFoundError(WoolocalError):
    """A model name or path does not resolve to a model available offline."""

    exit_code = 2


class DocumentError(WoolocalError):
    """One file could not be read; ingest skips it and reports the reason."""


class StoreError(WoolocalError):
    """A store folder is missing, damaged or inconsistent."""


class StoreNotFoundError(StoreError):
    """No store at that path or under that project name (bad input: exit 2)."""

    exit_code = 2


class DimensionMismatchError(StoreError):
    """Two dimensions that must agree do not (store name, manifest, index, embedder)."""


class ModelChangedError(StoreError):
    """A store would be appended to with model files other than those that embedded it (exit 2: use --rebuild)."""

    exit_code = 2


class SourceMismatchError(StoreError):
    """A store holds another folder's project of the same name (exit 2: choose a name, or say it moved)."""

    exit_code = 2
