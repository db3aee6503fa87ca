"""Prefect flows and deployments: orchestration only; the work lives in `woolocal_ingest`."""
