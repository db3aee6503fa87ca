"""What one ingest run is asked to do (`IngestRequest`): built once, from flows.yaml and the command line's flags, by
`woolocal ingest` or a scheduled run, and handed as it is to the in-process path and to the Prefect flow."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from woolocal_ingest.chunking import ChunkSettings
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, SourceOptions
from woolocal_ingest.embedders.spec import EmbedderSpec

if TYPE_CHECKING:  # pragma: no cover
    from woolocal_ingest.config import FlowsConfig, ProjectConfig


@dataclass(frozen=True)
class IngestRequest:
    """One project folder into its store under `stores_root`, embedded as `embedder` says. `rebuild`: re-embed
    everything (see `ingest.plan_ingest`); `move`: the folder moved (see `ingest.check_source_root`); `cache`: the
    embedding cache (`FlowsConfig.cache_settings()`; None: none). `to_dict()` is JSON (a Prefect parameter)."""

    project: str
    root: Path
    stores_root: Path
    embedder: EmbedderSpec = field(default_factory=EmbedderSpec)
    chunking: ChunkSettings = field(default_factory=ChunkSettings)
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    python_layout: bool = False
    rebuild: bool = False
    move: bool = False
    cache: dict | None = None
    sources: SourceOptions = field(default_factory=SourceOptions)

    @classmethod
    def from_config(cls, cfg: "FlowsConfig", proj: "ProjectConfig", *, stores: str | Path | None = None,
                    model: str | None = None, backend: str | None = None, python_layout: bool | None = None,
                    rebuild: bool = False, no_cache: bool = False, ignore_files: bool | None = None,
                    move: bool = False, quantization: str | None = None) -> "IngestRequest":
        """The request for a project of flows.yaml (what `woolocal ingest` and a scheduled run send); the keyword
        arguments are the command line's overrides. Checks the purpose's `dimensions` against its model (an
        explicit `model` makes its own store and skips it)."""
        purpose = cfg.purpose(proj.purpose)
        if quantization is not None:  # --quantization: the purpose's setting, overridden (and checked like it)
            from woolocal_ingest.config import with_quantization

            purpose = with_quantization(purpose, quantization, f"purposes.{proj.purpose}")
        spec = EmbedderSpec.resolve(purpose, proj.purpose, model=model, backend=backend)
        if purpose.dimensions is not None and model is None:
            from woolocal_ingest.embedders import resolve_model
            from woolocal_ingest.errors import ConfigError

            info = resolve_model(spec.model)
            if info.dim != purpose.dimensions:
                raise ConfigError(f"purposes.{proj.purpose}.dimensions is {purpose.dimensions} but model "
                                  f"{info.name} makes {info.dim}-dim vectors")
        chunking = cfg.chunking(proj)
        return cls(project=proj.name, root=Path(cfg.project_root(proj)),
                   stores_root=Path(stores).resolve() if stores else Path(cfg.stores_root(proj)), embedder=spec,
                   chunking=ChunkSettings(chunking.chunk_tokens, chunking.overlap_tokens),
                   include=tuple(proj.include), exclude=tuple(proj.exclude),
                   python_layout=cfg.python_layout(proj) if python_layout is None else python_layout,
                   rebuild=rebuild, move=move, cache=cfg.cache_settings(no_cache),
                   sources=cfg.sources(proj, ignore_files=ignore_files))

    def with_rebuild(self) -> "IngestRequest":
        return replace(self, rebuild=True)

    def to_dict(self) -> dict[str, Any]:
        return {"project": self.project, "root": str(self.root), "stores_root": str(self.stores_root),
                "embedder": self.embedder.to_dict(), "chunking": asdict(self.chunking), "include": list(self.include),
                "exclude": list(self.exclude), "python_layout": self.python_layout, "rebuild": self.rebuild,
                "move": self.move, "cache": self.cache, "sources": asdict(self.sources)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IngestRequest":
        return cls(**{**d, "root": Path(d["root"]), "stores_root": Path(d["stores_root"]),
                      "embedder": EmbedderSpec.from_dict(d.get("embedder") or {}),
                      "chunking": ChunkSettings(**(d.get("chunking") or {})),
                      "include": tuple(d.get("include") or DEFAULT_INCLUDE),
                      "exclude": tuple(d.get("exclude") or DEFAULT_EXCLUDE),
                      "sources": SourceOptions.from_dict(d.get("sources"))})
