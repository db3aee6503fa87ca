"""The `woolocal` command: the application layer over the library (`woolocal_ingest`) and its orchestration
(`pipelines`). It builds the requests, runs them in-process or as Prefect flows, and turns results into text. It is
the only package that imports both; the library never imports `pipelines` or this package."""

from woolocal_cli.commands import main

__all__ = ["main"]
