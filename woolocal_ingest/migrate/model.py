"""The target model: the embedder `--to` names (`resolve_embedder`, from the process's one cache) and what of it
decides the vectors (`vector_identity`, `ModelFacts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from woolocal_ingest.errors import ModelNotFoundError

if TYPE_CHECKING:
    from woolocal_ingest.config import FlowsConfig
    from woolocal_ingest.embedders.base import Embedder


def resolve_embedder(to: str, config: "FlowsConfig", backend: str | None = None,
                     quantization: str | None = None) -> "Embedder":
    """The embedder `to` names (from the process's one cache, `embedders.get`): a purpose of flows.yaml (its model,
    backend, quantization, batch settings and fallback; its `dimensions` checked), else a model name or folder (the
    registry's resolution, default batch settings). `quantization` ("int8" or "none") overrides the purpose's."""
    from woolocal_ingest import embedders
    from woolocal_ingest.config import PurposeConfig
    from woolocal_ingest.errors import ConfigError

    if to in config.purposes:
        purpose = config.purposes[to]
        emb = embedders.get(embedders.EmbedderSpec.resolve(purpose, to, backend=backend, quantization=quantization))
        if purpose.dimensions is not None and emb.dim != purpose.dimensions:
            raise ConfigError(f"purposes.{to}.dimensions is {purpose.dimensions} but model {emb.model_name} makes "
                              f"{emb.dim}-dim vectors")
        return emb
    try:
        return embedders.get(embedders.EmbedderSpec.resolve(PurposeConfig(), "migrate", model=to, backend=backend,
                                                            quantization=quantization))
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"--to {to!r} is neither a purpose of flows.yaml (declared: "
                                 f"{', '.join(sorted(config.purposes)) or 'none'}) nor a model available offline: "
                                 f"{e}") from None


def vector_identity(emb: "Embedder") -> dict:
    """What decides the vectors (the part of `embedders.model_identity` that keys resumable work): the model's
    files, pooling, prefix, limits, quantization, and the backend."""
    from woolocal_ingest.embedders import model_identity

    m = model_identity(emb)
    return {k: m.get(k) for k in ("name", "dim", "files_sha256", "quantization", "pooling", "normalize",
                                  "doc_prefix", "max_tokens", "backend")}


def uncached(emb: "Embedder") -> "Embedder":
    """The embedder without the embedding cache (verification and estimates must really embed)."""
    return emb.uncached


@dataclass(frozen=True)
class ModelFacts:
    """What decides a migration's vectors and target, known from the registry without loading the model."""

    name: str
    dim: int
    files_sha256: str | None
    quantization: str | None
    backend: str | None = None  # what made quantized vectors (ONNX Runtime and OpenVINO int8 differ)

    def precision(self) -> tuple[str | None, str | None]:
        from woolocal_ingest.embedders.identity import precision_of

        return precision_of({"quantization": self.quantization, "backend": self.backend})


def model_facts(emb: "Embedder") -> ModelFacts:
    ident = vector_identity(emb)
    return ModelFacts(emb.model_name, emb.dim, ident.get("files_sha256"), ident.get("quantization"),
                      ident.get("backend"))


def same_model(manifest: dict, emb: "Embedder") -> bool:
    ident = vector_identity(emb)
    model = manifest.get("model") or {}
    from woolocal_ingest.embedders.identity import precision_of

    return (model.get("files_sha256") == ident["files_sha256"] and precision_of(model) == precision_of(ident)
            and manifest.get("dim") == emb.dim)
