"""woolocal-ingest: local embeddings and dimension-tagged FAISS stores for Wooster (LangChain JS and Python)."""

from woolocal_ingest.errors import (
    ConfigError, DimensionMismatchError, DocumentError, ModelNotFoundError, StoreError, StoreNotFoundError, WoolocalError,
)
from woolocal_ingest.api import open_store
from woolocal_ingest.stores import SearchHit, Store

__version__ = "0.1.0"
__all__ = [
    "ConfigError", "DimensionMismatchError", "DocumentError", "ModelNotFoundError", "SearchHit", "Store",
    "StoreError", "StoreNotFoundError", "WoolocalError", "open_store",
]
