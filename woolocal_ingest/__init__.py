"""woolocal-ingest: local embeddings and dimension-tagged FAISS stores for Wooster (LangChain JS and Python)."""

from woolocal_ingest.errors import (
    ConfigError, DimensionMismatchError, DocumentError, ModelNotFoundError, StoreError, StoreNotFoundError, WoolocalError,
)

__version__ = "0.1.0"
__all__ = [
    "ConfigError", "DimensionMismatchError", "DocumentError", "ModelNotFoundError", "SearchHit", "Store",
    "StoreError", "StoreNotFoundError", "WoolocalError", "open_store",
]

_FROM_STORES = ("SearchHit", "Store")


def __getattr__(name: str):
    """`open_store`, `Store`, `SearchHit` on first use: importing the package (every `woolocal` command does) then
    costs no numpy, text splitters or LangChain until a store is really opened."""
    if name == "open_store":
        from woolocal_ingest.api import open_store

        return open_store
    if name in _FROM_STORES:
        from woolocal_ingest import stores

        return getattr(stores, name)
    raise AttributeError(f"module 'woolocal_ingest' has no attribute {name!r}")
