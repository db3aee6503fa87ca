"""Embedding backends behind one interface, and the offline model registry that feeds them."""

from __future__ import annotations

from woolocal_ingest.embedders.base import Embedder, TokenCounter, l2_normalise
from woolocal_ingest.embedders.registry import ModelInfo, available_models, read_model_info, resolve_model, slugify
from woolocal_ingest.errors import ConfigError

BACKENDS = ("auto", "sentence-transformers")


def load_embedder(model: str | None = None, backend: str = "auto", batch_size: int = 32) -> Embedder:
    """An embedder for `model` (a name or folder; None = the default) on `backend`."""
    info = resolve_model(model)
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    from woolocal_ingest.embedders.sentence_transformers import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(info, batch_size=batch_size)


__all__ = [
    "BACKENDS", "Embedder", "ModelInfo", "TokenCounter", "available_models", "l2_normalise", "load_embedder",
    "read_model_info", "resolve_model", "slugify",
]
