"""Text the CLI prints for migrations: one summary's lines (`format_summary`) and the table `woolocal migrate --all`
ends with (`format_table`), both from `MigrationSummary.to_dict()`."""

from __future__ import annotations

from typing import Sequence

from woolocal_ingest.coowned import Adoption
from woolocal_ingest.migrate.summary import problem_counts


def format_summary(s: dict) -> str:
    """A few lines for one migration summary (`MigrationSummary.to_dict()`)."""
    head = "migrate (dry run)" if s["status"] == "planned" else "migrate"
    lines = [f"{head} {s['source']} -> {s['store']}  [{s['status']}]"]
    fmt = s.get("source_format")
    if fmt:
        lines.append(f"  source   {fmt}, {s.get('source_dim')}d, {s.get('source_count')} chunks")
    counts = s.get("problem_counts") or problem_counts(s.get("problems") or [])
    if fmt:
        lines.append("  problems " + (", ".join(f"{k} x{v}" for k, v in counts.items()) or "none")
                     + (f"  ({s['unrecoverable']} unrecoverable: {s['skipped']} row(s) without text)"
                        if s.get("unrecoverable") else ""))
    if s.get("model"):
        lines.append(f"  model    {s['model']} ({s['dim']}d, {s['backend']})")
    if s["status"] in ("migrated", "planned"):
        split = f" ({s['rechunked']} re-chunked into {s['pieces']} pieces)" if s.get("rechunked") else ""
        lines.append(f"  rows     {s['count']}{split}")
    if s["status"] == "migrated":
        lines.append(f"  chunks   {s['added']} added, {s['updated']} updated, {s['deleted']} deleted, "
                     f"{s['skipped']} skipped; embedded {s['embedded']}"
                     + (f" ({s['cached']} from the cache)" if s.get("cached") else "")
                     + f", batches {s['batches']} ({s['resumed_batches']} resumed)")
    adoption = s.get("adoption") or {}
    if adoption.get("outside") or adoption.get("adopted"):
        lines.append("  others   " + Adoption(**adoption).line())
    plan = s.get("plan") or {}
    est = plan.get("estimate")
    if est:
        lines.append(f"  estimate {est['seconds']:.0f}s ({est['chunks_per_s']} chunks/s measured on {est['sample']} "
                     f"rows; model load {est['model_load_seconds']}s)")
    if plan:
        lines.append(f"  action   {plan['action']}" + (f": {plan['reason']}" if plan.get("reason") else ""))
    if s.get("backup"):
        lines.append(f"  backup   {s['backup']}  (woolocal migrate --rollback {s['source']})")
    if s.get("error"):
        lines.append(f"  error    {s['error']}")
    elif s.get("message") and s["status"] == "unchanged":
        lines.append(f"  {s['message']}")
    lines.append(f"  time     {s.get('seconds', 0):.1f}s")
    return "\n".join(lines)


def format_table(rows: Sequence[dict]) -> str:
    """One line per migration, then the totals: the summary `woolocal migrate --all` ends with."""
    head = ("name", "status", "model", "dim", "rows", "problems", "time", "store / error")
    table = [head]
    for s in rows:
        probs = sum((s.get("problem_counts") or problem_counts(s.get("problems") or [])).values())
        table.append((str(s.get("name") or s["source"]), s["status"], str(s.get("model") or "-"),
                      str(s.get("dim") or "-"), str(s.get("count") or 0), str(probs), f"{s.get('seconds', 0):.1f}s",
                      s["error"] if s.get("error") else str(s.get("store") or "")))
    widths = [max(len(r[i]) for r in table) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in table]
    by: dict[str, int] = {}
    for s in rows:
        by[s["status"]] = by.get(s["status"], 0) + 1
    lines.append(f"{len(rows)} store(s): " + (", ".join(f"{n} {k}" for k, n in sorted(by.items())) or "none"))
    return "\n".join(lines)
