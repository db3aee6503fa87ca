"""Tests for the `woolocal` command line contract (DESIGN.md "CLI"): --json objects, exit codes, Prefect runs.

Most tests run the click app in-process (CliRunner keeps stdout and stderr apart); two run the installed console
script in a subprocess, for real exit codes and a stdout that holds nothing but the JSON object.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from woolocal_ingest import ingest as ingest_mod
from woolocal_cli import main
from woolocal_ingest.stores import Store, verify_store
from store_copies import copy_stores
from woolocal_ingest import embedders
from woolocal_ingest.config import PurposeConfig

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample-project"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SUMMARY_KEYS = {"store", "model", "dim", "count", "added", "updated", "unchanged", "deleted", "skipped"}


def cli(*args: str, input: str | None = None, code: int | None = 0):
    r = CliRunner().invoke(main, list(args), input=input)
    if code is not None:
        assert r.exit_code == code, (args, r.exit_code, r.stdout, r.stderr, r.exception)
    return r


def one_json(stdout: str) -> dict:
    """stdout must be exactly one JSON object (one line)."""
    lines = [x for x in stdout.splitlines() if x.strip()]
    assert len(lines) == 1, stdout[:2000]
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def facts() -> list[dict]:
    path = SAMPLE.parent / "sample-facts.json"
    if not path.is_file():
        pytest.fail("data/sample-facts.json is missing")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(autouse=True)
def _no_repo_config(tmp_path, monkeypatch):
    """Run each command from an empty folder: no ./flows.yaml, no $WOOLOCAL_CONFIG or $WOOLOCAL_STORES."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("WOOLOCAL_CONFIG", raising=False)
    monkeypatch.delenv("WOOLOCAL_STORES", raising=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """`woolocal ingest garden --stores DIR --json --no-prefect` once: (project, stores, summary)."""
    facts()
    root = tmp_path_factory.mktemp("cli-base")
    proj = root / "garden"
    shutil.copytree(SAMPLE, proj)
    stores = root / "stores"
    old = os.getcwd()
    os.chdir(root)
    try:
        r = cli("ingest", str(proj), "--stores", str(stores), "--json", "--no-prefect")
    finally:
        os.chdir(old)
    return proj, stores, one_json(r.stdout)


@pytest.fixture
def copy(base, tmp_path):
    """A writable copy of the base project and stores: (project, stores, store folder)."""
    proj, stores, summary = base
    p, s = tmp_path / "garden", tmp_path / "stores"
    shutil.copytree(proj, p)
    copy_stores(stores, s, p)
    return p, s, s / Path(summary["store"]).relative_to(stores)


# ---------------------------------------------------------------------------------------------------------------
# ingest


def test_ingest_json_summary(base):
    proj, stores, s = base
    assert SUMMARY_KEYS <= set(s)
    target = stores / "garden" / "all-minilm-l6-v2-384d"
    assert s["store"] == str(target) and verify_store(target) == []
    assert s["model"] == MODEL and s["dim"] == 384 and s["project"] == "garden"
    store = Store(target)
    assert s["count"] == store.count == s["added"] > 0
    assert (s["updated"], s["unchanged"], s["deleted"]) == (0, 0, 0)
    assert s["skipped"] == 0 and s["skipped_files"] == []
    assert {c.source for c in store.chunks()} == {p.relative_to(proj).as_posix() for p in proj.rglob("*") if p.is_file()}


def test_ingest_again_is_incremental(copy):
    proj, stores, target = copy
    before = tree_digest(stores)
    s = one_json(cli("ingest", str(proj), "--stores", str(stores), "--json", "--no-prefect").stdout)
    assert (s["added"], s["updated"], s["deleted"], s["embedded"]) == (0, 0, 0, 0)
    assert s["unchanged"] == s["count"] == Store(target).count
    assert tree_digest(stores) == before

    (proj / "notes" / "2026-04-meeting.txt").unlink()
    (proj / "junk.txt").write_bytes(b"\x00\x01\x02")
    (proj / "new.md").write_text("# New\n\nThe wheelbarrow tyre was patched in June.\n", encoding="utf-8")
    s = one_json(cli("ingest", str(proj), "--stores", str(stores), "--json", "--no-prefect").stdout)
    assert s["deleted"] > 0 and s["added"] >= 1 and s["embedded"] >= 1
    assert [x["source"] for x in s["skipped_files"]] == ["junk.txt"] and "binary" in s["skipped_files"][0]["reason"] and s["skipped"] == 1
    assert s["count"] == Store(target).count
    assert {c.source for c in Store(target).chunks()} >= {"new.md"}


def test_ingest_human_output(copy):
    proj, stores, _ = copy
    (proj / "junk.pdf").write_bytes(b"not a pdf")
    r = cli("ingest", str(proj), "--stores", str(stores), "--no-prefect")
    assert "garden" in r.stdout and "chunks" in r.stdout and "unchanged" in r.stdout
    assert "junk.pdf" in r.stdout and "PDF" in r.stdout
    with pytest.raises(ValueError):
        json.loads(r.stdout)


def test_ingest_declared_project_uses_config(copy, tmp_path):
    proj, _, _ = copy
    cfg = tmp_path / "conf" / "flows.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"defaults:\n  stores_root: ../cfg-stores\nprojects:\n  - name: allotment\n    path: {proj}\n"
                   "    include: ['*.md']\n", encoding="utf-8")
    s = one_json(cli("--config", str(cfg), "ingest", "allotment", "--json", "--no-prefect").stdout)
    target = tmp_path / "cfg-stores" / "allotment" / "all-minilm-l6-v2-384d"
    assert s["store"] == str(target) and s["project"] == "allotment"
    assert {c.source.rsplit(".", 1)[1] for c in Store(target).chunks()} == {"md"}
    # the declared name also works for query and stores, resolved through the same flows.yaml
    q = one_json(cli("--config", str(cfg), "query", "allotment", "who holds the spare shed key", "-k", "2",
                     "--json").stdout)
    assert q["store"] == str(target) and len(q["results"]) == 2
    listed = one_json(cli("--config", str(cfg), "stores", "list", "--json").stdout)
    assert [x["store"] for x in listed["stores"]] == [str(target)]


def test_unknown_project_is_bad_input(tmp_path):
    cfg = tmp_path / "flows.yaml"
    cfg.write_text("projects:\n  - {name: garden, path: somewhere}\n", encoding="utf-8")
    r = cli("--config", str(cfg), "ingest", "orchard", "--stores", str(tmp_path / "s"), "--json", code=2)
    assert "orchard" in r.stderr and "garden" in r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "s").exists()


def test_unknown_model_lists_available_models(copy):
    proj, stores, _ = copy
    before = tree_digest(stores)
    r = cli("ingest", str(proj), "--stores", str(stores), "--model", "acme/no-such-embedder", "--json",
            "--no-prefect", code=2)
    assert "acme/no-such-embedder" in r.stderr and "all-MiniLM-L6-v2" in r.stderr and "384" in r.stderr
    assert r.stdout == ""
    assert tree_digest(stores) == before
    r = cli("embed", "--model", "acme/no-such-embedder", "--json", input="hello\n", code=2)
    assert "all-MiniLM-L6-v2" in r.stderr and r.stdout == ""


def test_ingest_other_model_name_forms(copy):
    """The short name and the slug resolve to the same packaged model and the same store."""
    proj, stores, target = copy
    for name in ("all-MiniLM-L6-v2", "all-minilm-l6-v2"):
        s = one_json(cli("ingest", str(proj), "--stores", str(stores), "--model", name, "--json",
                         "--no-prefect").stdout)
        assert s["store"] == str(target) and s["embedded"] == 0


# ---------------------------------------------------------------------------------------------------------------
# ingest through Prefect (no --no-prefect)


@pytest.fixture
def flow_embedder(monkeypatch, embedder):
    """Give the flow's per-process model cache the session's model (what a long-lived process would hold)."""
    from pipelines.runtime import prepare_prefect_env

    prepare_prefect_env(Path(os.environ["PREFECT_HOME"]))
    from pipelines import ingest_flow as flow_mod

    spec = embedders.EmbedderSpec.resolve(PurposeConfig(model=MODEL), "projects")  # the default config's purpose
    monkeypatch.setitem(embedders.spec.EMBEDDERS, spec, embedder)
    return embedder


def test_prefect_ingest_through_cli(copy, flow_embedder):
    proj, stores, target = copy
    before = Store(target)
    prev_count = before.count
    (proj / "history.md").write_text((proj / "history.md").read_text(encoding="utf-8")
                                     + "\n## 2026\n\nThe co-op bought a second wheelbarrow with a red handle.\n")
    r = cli("ingest", str(proj), "--stores", str(stores), "--json")
    s = one_json(r.stdout)
    assert SUMMARY_KEYS <= set(s)
    assert s["written"] and 1 <= s["embedded"] <= 3 and s["count"] == Store(target).count >= prev_count
    assert verify_store(target) == []
    hits = Store(target, embedder=flow_embedder).search("what colour is the new wheelbarrow handle", k=1)
    assert hits[0].source == "history.md" and "red handle" in hits[0].text


@pytest.mark.parametrize("mode", ["prefect", "no-prefect"])
def test_failing_step_exits_1_and_keeps_store(copy, flow_embedder, monkeypatch, mode):
    proj, stores, target = copy
    (proj / "README.md").write_text("# Replaced\n\nEverything here was rewritten.\n", encoding="utf-8")
    before = tree_digest(stores)

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire while chunking")

    monkeypatch.setattr(ingest_mod, "load_and_chunk", boom)
    r = cli("ingest", str(proj), "--stores", str(stores), "--json", *(["--no-prefect"] if mode == "no-prefect" else []),
            code=1)
    assert r.stdout == "", "a failed run prints no summary"
    assert "disk on fire" in r.stderr  # one "error: ..." line, whichever way it ran
    assert tree_digest(stores) == before and verify_store(target) == []


# ---------------------------------------------------------------------------------------------------------------
# query, embed


def test_query_json_ranked_results(base, embedder):
    _, stores, s = base
    store_path = s["store"]
    fs = facts()
    hits_found = 0
    for fact in fs:
        q = one_json(cli("query", store_path, fact["query"], "-k", "3", "--json").stdout)
        res = q["results"]
        assert q["dim"] == 384 and q["model"] == MODEL and len(res) == 3
        for h in res:
            assert {"id", "text", "metadata", "score"} <= set(h)
            assert h["metadata"]["source"] and isinstance(h["score"], float)
        scores = [h["score"] for h in res]
        assert scores == sorted(scores, reverse=True)
        hits_found += fact["source"] in [h["metadata"]["source"] for h in res]
    assert hits_found >= len(fs) - 1
    # --mode dense: scores are cosine similarities of the query with the stored chunk; the default (hybrid) fuses
    # ranks and reports each hit's cosine in `scores`
    q = one_json(cli("query", store_path, fs[0]["query"], "-k", "1", "--mode", "dense", "--json").stdout)
    assert q["mode"] == "dense"
    q = q["results"][0]
    v = embedder.embed_query(fs[0]["query"])
    store = Store(Path(store_path))
    row = store.ids.index(q["id"])
    assert abs(float(store.vectors()[row] @ v) - q["score"]) < 1e-3
    assert q["text"] == store.chunks()[row].text
    h = one_json(cli("query", store_path, fs[0]["query"], "-k", "1", "--json").stdout)
    assert h["mode"] == "hybrid" and h["results"][0]["mode"] == "hybrid"
    assert abs(float(store.vectors()[store.ids.index(h["results"][0]["id"])] @ v)
               - h["results"][0]["scores"]["dense"]) < 1e-3


def test_query_by_project_name_filter_and_text_output(base):
    _, stores, s = base
    q = one_json(cli("query", "garden", "water meter", "--stores", str(stores), "-k", "4", "--json",
                     "--filter", "fileType=rst").stdout)
    assert q["store"] == s["store"] and len(q["results"]) >= 1
    assert all(h["metadata"]["source"].endswith(".rst") for h in q["results"])
    r = cli("query", s["store"], "annual fee for a half plot", "-k", "2")
    assert r.stdout.count("\n") >= 2 and "2026-04-meeting.txt" in r.stdout
    r = cli("query", str(stores / "nope"), "x", "--json", code=None)
    assert r.exit_code != 0 and r.stdout == "" and "nope" in r.stderr
    r = cli("query", s["store"], "x", "-k", "0", code=2)


def test_embed_json_from_stdin(embedder):
    texts = ["The compost bays are turned every Thursday.", "Blueberries like acid soil.", "x"]
    out = one_json(cli("embed", "--json", input="\n".join(texts) + "\n\n").stdout)
    assert out["model"] == MODEL and out["dim"] == 384
    vecs = np.array(out["embeddings"], dtype=np.float32)
    assert vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert np.allclose(vecs, embedder.embed_documents(texts), atol=1e-4)
    r = cli("embed", input="one\ntwo\n")
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and len(json.loads(lines[0])) == 384
    assert "2 texts" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# stores, models


def test_stores_list_inspect_verify(copy):
    proj, stores, target = copy
    listed = one_json(cli("stores", "list", "--stores", str(stores), "--json").stdout)
    assert [x["store"] for x in listed["stores"]] == [str(target)]
    row = listed["stores"][0]
    assert row["dim"] == 384 and row["count"] == Store(target).count and row["model"] == MODEL
    m = one_json(cli("stores", "inspect", str(target), "--json").stdout)["manifest"]
    assert m["count"] == row["count"] and m["dim"] == 384 and m["model"]["name"] == MODEL
    assert "faiss.index" in m["files"] and "docstore.json" in m["files"]
    assert "384d" in cli("stores", "inspect", str(target)).stdout
    v = one_json(cli("stores", "verify", str(target), "--json").stdout)
    assert v["ok"] is True and v["stores"] == {str(target): []}
    cli("stores", "verify", "--stores", str(stores))


def test_stores_verify_damaged_store_exits_1(copy):
    _, stores, target = copy
    doc = target / "docstore.json"
    data = doc.read_bytes()
    doc.write_bytes(data[: len(data) // 2])  # a save cut short (a changed text would be another writer's edit)
    r = cli("stores", "verify", str(target), "--json", code=1)
    v = one_json(r.stdout)
    assert v["ok"] is False and any("docstore.json" in p for p in v["stores"][str(target)])
    r = cli("stores", "verify", "--stores", str(stores), code=1)
    assert "FAIL" in r.stdout and "docstore.json" in r.stdout
    cli("stores", "verify", "--stores", str(stores / "empty-root"), code=1)  # nothing to verify is no success


def test_models_list_json():
    out = one_json(cli("models", "list", "--json").stdout)
    mini = [m for m in out["models"] if m["name"].endswith("all-MiniLM-L6-v2")]
    assert mini and mini[0]["dim"] == 384 and mini[0]["max_tokens"] == 256
    assert Path(mini[0]["path"], "config.json").is_file()
    assert "all-MiniLM-L6-v2" in cli("models", "list").stdout


# ---------------------------------------------------------------------------------------------------------------
# the installed console script: real exit codes, stdout that is only the JSON object


def _woolocal() -> list[str]:
    exe = Path(sys.executable).with_name("woolocal")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "woolocal_cli"]


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WOOLOCAL_", "PREFECT_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _obey_file_modes() -> None:
    """preexec_fn: a root child drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its bounding set, so after exec
    it is refused a chmod 000 file exactly as any other user is (root otherwise reads it regardless)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _modes_are_obeyed(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        p = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}).read()"], capture_output=True,
                           preexec_fn=_obey_file_modes if os.geteuid() == 0 else None, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return p.returncode != 0 and b"PermissionError" in p.stderr


def test_console_script_ingest_json(copy, tmp_path):
    """The installed script: stdout is exactly one JSON object; a file really refused by the OS (permission
    denied) is skipped with that reason, and one that was indexed before keeps its chunks."""
    proj, stores, target = copy
    notes = proj / "notes" / "2026-04-meeting.txt"
    notes.write_text(notes.read_text(encoding="utf-8") + "\nLate addition: the half-plot fee is now 52 dollars.\n",
                     encoding="utf-8")
    real_modes = _modes_are_obeyed(tmp_path)
    kept = {c.id: c.text for c in Store(target).chunks() if c.source == "history.md"}
    if real_modes:
        (proj / "history.md").chmod(0)
        (proj / "secret.md").write_text("# Secret\n\nThe shed code is 4-1-7.\n", encoding="utf-8")
        (proj / "secret.md").chmod(0)
    p = subprocess.run([*_woolocal(), "ingest", str(proj), "--stores", str(stores), "--json", "--no-prefect"],
                       capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=300,
                       preexec_fn=_obey_file_modes if real_modes and os.geteuid() == 0 else None)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)  # the whole of stdout is one JSON object
    assert p.stdout.strip().count("\n") == 0
    assert SUMMARY_KEYS <= set(s) and s["store"] == str(target) and s["embedded"] >= 1 and s["updated"] >= 1
    assert s["deleted"] == 0 and verify_store(target) == [], s
    chunks = Store(target).chunks()
    assert {c.id: c.text for c in chunks if c.source == "history.md"} == kept
    if not real_modes:
        pytest.skip("cannot make this process obey file modes: permission-denied part not exercised")
    reasons = {x["source"]: x["reason"] for x in s["skipped_files"]}
    assert "permission denied" in reasons.get("history.md", "") and "permission denied" in reasons.get("secret.md", "")
    assert not any(c.source == "secret.md" for c in chunks)


def test_console_script_exit_codes(copy, tmp_path):
    proj, stores, target = copy
    env = _env(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  chunking:\n    overlap_tokens: many\n", encoding="utf-8")
    before = tree_digest(stores)
    runs = {
        "bad config": ([*_woolocal(), "--config", str(bad), "ingest", str(proj), "--stores", str(stores), "--json"], 2),
        "unknown project": ([*_woolocal(), "ingest", "no-such-project", "--stores", str(stores), "--json"], 2),
        "bad option": ([*_woolocal(), "query", str(target), "x", "-k", "zero"], 2),
    }
    for what, (cmd, code) in runs.items():
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert p.returncode == code, (what, p.returncode, p.stderr)
        assert p.stdout == "", (what, p.stdout)
        assert p.stderr.strip(), what
    assert "defaults.chunking.overlap_tokens" in subprocess.run(runs["bad config"][0], capture_output=True, text=True,
                                                                env=env, cwd=tmp_path).stderr
    assert tree_digest(stores) == before
    (target / "faiss.index").write_bytes(b"\x00" * 64)
    p = subprocess.run([*_woolocal(), "stores", "verify", str(target)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 1 and "faiss.index" in p.stdout


def test_ctrl_c_after_the_swap_says_the_store_was_written(tmp_path, monkeypatch, embedder):
    """A Ctrl-C that lands after the new store was swapped in (while the run finishes up) exits 130 and says the
    store holds the run's result, not that nothing was written; one before the swap says nothing was written."""
    import woolocal_ingest.ingest as ingest_mod
    from woolocal_ingest.api import open_store

    proj = tmp_path / "garden"
    shutil.copytree(SAMPLE, proj)
    stores = tmp_path / "stores"
    real = ingest_mod.run_request

    def then_interrupted(request, emb, progress=None):
        real(request, emb, progress=progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_mod, "run_request", then_interrupted)
    r = cli("ingest", str(proj), "--stores", str(stores), "--no-prefect", code=130)
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert line.startswith("interrupted: after the store was written: ") and "complete result" in line
    assert open_store(next((stores / "garden").iterdir())).count > 0

    def interrupted_first(request, emb, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_mod, "run_request", interrupted_first)
    (proj / "new.md").write_text("# New\n\nA new note about the tool shed key.\n")
    r = cli("ingest", str(proj), "--stores", str(stores), "--no-prefect", code=130)
    assert r.stderr.strip().splitlines()[-1] == ("interrupted: nothing was written; the store is as it was before "
                                                 "this run")
