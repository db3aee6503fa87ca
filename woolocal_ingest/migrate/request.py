"""`MigrateRequest`: one migration as asked for (by the CLI, a schedule, or flows.yaml's `migrations:`), built once
and passed as it is to the in-process run and to the Prefect flow (`to_dict`/`from_dict`: JSON parameters)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from woolocal_ingest.config import FlowsConfig, MigrationConfig


@dataclass(frozen=True)
class MigrateRequest:
    """What to migrate, to what, and where. `to`: a purpose of flows.yaml or a model name/folder. `out`: the store
    folder to write (None: `<stores_root>/<project>/<model-slug>-<dim>d`, or the source itself when `in_place`).
    `python_layout` None: the source's own layout decides for a LangChain Python store, else flows.yaml's
    `defaults.python_layout`. `project`: the project of the default target (None: from the source). `name`: the
    flows.yaml migration's name, when declared."""

    source: Path
    to: str
    out: Path | None = None
    in_place: bool = False
    backend: str | None = None
    python_layout: bool | None = None
    quantization: str | None = None
    dry_run: bool = False
    project: str | None = None
    name: str | None = None

    @classmethod
    def declared(cls, m: "MigrationConfig", config: "FlowsConfig", *, dry_run: bool = False) -> MigrateRequest:
        """A flows.yaml `migrations:` entry (or one found under `wooster.root`), its paths resolved against the
        folder flows.yaml lives in."""
        return cls(source=config.resolve_path(m.source), to=m.to,
                   out=config.resolve_path(m.out) if m.out is not None else None, in_place=m.in_place,
                   python_layout=m.python_layout, dry_run=dry_run, name=m.name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (paths as strings): a Prefect flow's parameter."""
        return {**asdict(self), "source": str(self.source), "out": str(self.out) if self.out is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MigrateRequest:
        out = d.get("out")
        return cls(**{**d, "source": Path(d["source"]), "out": Path(out) if out is not None else None})
