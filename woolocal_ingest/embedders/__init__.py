"""Embedding backends behind one interface, the router that picks one, the offline model registry, and the one way
to obtain an embedder (`get(EmbedderSpec)`)."""

from __future__ import annotations

from woolocal_ingest.embedders.base import (
    Embedder, EmbedderBase, TokenCounter, TransformerEmbedder, l2_normalise,
)
from woolocal_ingest.embedders.identity import model_identity
from woolocal_ingest.embedders.registry import (
    ModelInfo, available_models, pull_model, read_model_info, register_model, resolve_model, slugify,
)
from woolocal_ingest.embedders.router import (  # noqa: F401 - the package's interface
    BACKENDS, DEFAULT_CPU_BACKEND, DEFAULT_CPU_REASON, LOCAL_BACKENDS, BackendChoice, backends_for, load_embedder,
    pick_backend, purpose_loader,
)
from woolocal_ingest.embedders.spec import EmbedderSpec, get

__all__ = [
    "BACKENDS", "BackendChoice", "Embedder", "EmbedderBase", "EmbedderSpec", "LOCAL_BACKENDS", "ModelInfo",
    "TokenCounter", "TransformerEmbedder", "available_models", "backends_for", "get", "l2_normalise", "load_embedder",
    "model_identity", "pick_backend", "pull_model", "purpose_loader", "read_model_info", "register_model",
    "resolve_model", "slugify",
]
