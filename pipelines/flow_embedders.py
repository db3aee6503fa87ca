"""The process's embedders for flow tasks: one per (model, backend, batch size), shared by the tasks of a run
(loading a model costs seconds) and by the shard tasks on Dask workers."""

from __future__ import annotations

from woolocal_ingest.embedders import load_embedder

EMBEDDERS: dict = {}  # (model, backend, batch_size) -> embedder, for this process


def flow_embedder(model: str | None, backend: str, batch_size: int, source: dict | None = None):
    """The process's embedder for (model, backend, batch_size); `source` (the CLI's purpose from flows.yaml and its
    overrides) builds it the way `woolocal ingest --no-prefect` does (fallback, endpoint, token budget)."""
    key = (model, backend, batch_size)
    if key not in EMBEDDERS:
        if source and source.get("purpose") is not None:
            from woolocal_ingest.config import PurposeConfig
            from woolocal_ingest.embedders import embedder_for

            EMBEDDERS[key] = embedder_for(PurposeConfig(**source["purpose"]), source.get("name") or "projects",
                                          model=source.get("model"), backend=source.get("backend"))
        else:
            EMBEDDERS[key] = load_embedder(model, backend=backend, batch_size=batch_size)
    return EMBEDDERS[key]
