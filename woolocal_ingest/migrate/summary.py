"""The record of one migration: `MigrationSummary`, what it did (or, for a dry run, would do)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from woolocal_ingest.legacy import Problem


@dataclass
class MigrationSummary:
    """What one migration did (or, for a dry run, would do); `to_dict()` is the CLI's `--json` object."""

    status: str  # "migrated" | "unchanged" | "failed" | "planned"
    source: str
    store: str = ""
    name: str | None = None  # the flows.yaml migration's name, when declared
    source_format: str | None = None
    source_dim: int | None = None
    source_count: int = 0  # chunks read from the source
    model: str = ""
    backend: str = ""
    dim: int = 0
    count: int = 0  # rows in the new store
    added: int = 0  # ids new to the target (for a first migration: every row)
    updated: int = 0  # ids the target held before, re-embedded
    unchanged: int = 0  # rows left as they were (status unchanged: all of them)
    deleted: int = 0  # ids the target held before and no longer holds
    skipped: int = 0  # source rows with no recoverable text (unrecoverable problems)
    embedded: int = 0  # rows embedded by this run
    cached: int = 0  # of `embedded`: served by the embedding cache
    batches: int = 0
    resumed_batches: int = 0  # batches loaded from checkpoints of an interrupted run
    rechunked: int = 0  # source chunks split to fit the model
    pieces: int = 0  # rows those chunks became
    problems: list[dict] = field(default_factory=list)
    unrecoverable: int = 0
    in_place: bool = False
    python_layout: bool = False
    backup: str | None = None  # in place: where the previous store was kept
    written: bool = False
    message: str = ""
    error: str | None = None
    exit_code: int = 0
    plan: dict | None = None  # dry run: estimate and action
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    adoption: dict = field(default_factory=dict)  # rows other writers (Wooster, LangChain) added, deleted, rewrote

    def to_dict(self) -> dict:
        d = asdict(self)
        d["problem_counts"] = problem_counts(self.problems)
        return d


def problem_counts(problems: Sequence[dict | Problem]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in problems:
        kind = p["kind"] if isinstance(p, dict) else p.kind
        out[kind] = out.get(kind, 0) + 1
    return out
