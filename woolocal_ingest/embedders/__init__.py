"""Embedding backends behind one interface, the router that picks one, and the offline model registry."""

from __future__ import annotations

from woolocal_ingest.embedders.base import Embedder, TokenCounter, TransformerEmbedder, l2_normalise
from woolocal_ingest.embedders.registry import (
    ModelInfo, available_models, pull_model, read_model_info, register_model, resolve_model, slugify,
)
from woolocal_ingest.embedders.router import (  # noqa: F401 - the package's interface
    BACKENDS, DEFAULT_CPU_BACKEND, DEFAULT_CPU_REASON, LOCAL_BACKENDS, BackendChoice, backends_for, load_embedder,
    pick_backend, purpose_loader,
)


def embedder_for(purpose, name: str = "projects", model: str | None = None, backend: str | None = None,
                 quantization: str | None = None) -> Embedder:
    """The embedder a purpose of flows.yaml configures (its backend, quantization, endpoint and fallback); an
    explicit `model`, `backend` or `quantization` (CLI flags) overrides it with a plain local embedder."""
    quant = quantization if quantization is not None else purpose.quantization
    if model is not None or backend is not None or quantization is not None:
        return load_embedder(model or purpose.model, backend=backend or purpose.backend,
                             batch_size=purpose.batch_size, token_budget=purpose.token_budget, quantization=quant,
                             on_gate_failure=purpose.on_gate_failure)
    from woolocal_ingest.embedders.fallback import embedder_for_purpose

    return embedder_for_purpose(purpose, name, load_local=purpose_loader)


__all__ = [
    "BACKENDS", "BackendChoice", "Embedder", "LOCAL_BACKENDS", "ModelInfo", "TokenCounter", "TransformerEmbedder",
    "available_models", "backends_for", "embedder_for", "l2_normalise", "load_embedder", "pick_backend", "pull_model",
    "purpose_loader", "read_model_info", "register_model", "resolve_model", "slugify",
]
