"""Which embedder a run uses, decided once (`EmbedderSpec`), and this process's one cache of built embedders
(`get`): flows, migrate and the service all obtain their embedders here, so a model loads once per process."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from woolocal_ingest.embedders.base import Embedder

if TYPE_CHECKING:  # pragma: no cover
    from woolocal_ingest.config import PurposeConfig


@dataclass(frozen=True)
class EmbedderSpec:
    """Everything that decides which embedder is built: the model (a name or folder; None = the registry's
    default), the backend, the precision and the batch settings. With `purpose` set, the embedder is that purpose
    of flows.yaml as configured (its endpoint, `dimensions` and fallback) and the other fields mirror it; without,
    it is a plain local embedder of the fields. Frozen and hashable: it is the key of `get`'s cache."""

    model: str | None = None
    backend: str = "auto"
    quantization: str | None = None  # "int8", "none" or None (float32)
    batch_size: int = 32
    token_budget: int | None = None  # None: the backend's default
    on_gate_failure: str = "refuse"
    purpose_name: str = "projects"  # names the purpose in messages (`purposes.<name>.fallbackToCloud`)
    purpose: "PurposeConfig | None" = None

    def __hash__(self) -> int:  # PurposeConfig holds lists (endpoint urls): hashed by its JSON
        return hash(tuple(getattr(self, f.name) for f in fields(self) if f.name != "purpose")
                    + (self.purpose.model_dump_json() if self.purpose is not None else None,))

    @classmethod
    def resolve(cls, purpose: "PurposeConfig", name: str = "projects", *, model: str | None = None,
                backend: str | None = None, quantization: str | None = None) -> "EmbedderSpec":
        """The embedder `purposes.<name>` configures; an explicit `model`, `backend` or `quantization` (a command
        line's flags) makes it a plain local embedder with the purpose's batch settings instead (no endpoint, no
        fallback). The one place such overrides are applied."""
        settings = cls(model=model or purpose.model, backend=backend or purpose.backend,
                       quantization=quantization if quantization is not None else purpose.quantization,
                       batch_size=purpose.batch_size, token_budget=purpose.token_budget,
                       on_gate_failure=purpose.on_gate_failure, purpose_name=name)
        if model is not None or backend is not None or quantization is not None:
            return settings
        return replace(settings, purpose=purpose)

    def build(self) -> Embedder:
        """A new embedder of this spec (`get` keeps one per spec)."""
        from woolocal_ingest.embedders.router import load_embedder

        if self.purpose is not None:
            from woolocal_ingest.embedders.fallback import embedder_for_purpose
            from woolocal_ingest.embedders.router import purpose_loader

            return embedder_for_purpose(self.purpose, self.purpose_name, load_local=purpose_loader)
        return load_embedder(self.model, backend=self.backend, batch_size=self.batch_size,
                             token_budget=self.token_budget, quantization=self.quantization,
                             on_gate_failure=self.on_gate_failure)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (a Prefect parameter); `from_dict` reads it back."""
        d = asdict(self)
        d["purpose"] = self.purpose.model_dump(mode="json") if self.purpose is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EmbedderSpec":
        from woolocal_ingest.config import PurposeConfig

        purpose = d.get("purpose")
        return cls(**{**d, "purpose": PurposeConfig(**purpose) if purpose is not None else None})


EMBEDDERS: dict[EmbedderSpec, Embedder] = {}  # this process's embedders, one per spec
_lock = threading.Lock()


def get(spec: EmbedderSpec) -> Embedder:
    """This process's embedder for `spec`, built on first use (loading a model costs seconds) and shared by every
    caller and thread after that: the flow's tasks, Dask workers' shard tasks, migrate and the service."""
    with _lock:
        emb = EMBEDDERS.get(spec)
        if emb is None:
            emb = EMBEDDERS[spec] = spec.build()
        return emb
