"""Tests for woolocal_ingest.config (flows.yaml -> typed settings) and for how the CLI treats a bad flows.yaml:
an error that names the YAML key path and the expected value, exit code 2, and the previous store untouched."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from woolocal_ingest.chunking import Chunk, chunk_id
from woolocal_cli import main
from woolocal_ingest.config import ChunkingConfig, load_config
from woolocal_ingest.errors import ConfigError, WoolocalError
from woolocal_ingest.stores import store_dir, verify_store, write_store

REPO = Path(__file__).resolve().parent.parent


def write_yaml(folder: Path, text: str, name: str = "flows.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# valid files


def test_repository_flows_yaml_loads():
    cfg = load_config(REPO / "flows.yaml")
    sample = cfg.project("sample")
    assert sample is not None
    assert cfg.project_root(sample) == (REPO / "data" / "sample-project").resolve()
    assert cfg.purpose(sample.purpose).dimensions == 384
    assert "all-MiniLM-L6-v2" in cfg.purpose(sample.purpose).model
    assert cfg.chunking(sample).overlap_tokens < cfg.chunking(sample).chunk_tokens
    assert cfg.project("no-such-project") is None


def test_relative_paths_resolve_against_the_file_not_the_cwd(tmp_path, monkeypatch):
    cfg_path = write_yaml(tmp_path / "conf", """\
        version: 1
        defaults:
          stores_root: ../my-stores
          chunking: {chunk_tokens: 120, overlap_tokens: 10}
        projects:
          - name: garden
            path: ../garden
          - name: notes
            path: ~/notes
            stores_root: /abs/stores
            chunking: {chunk_tokens: 64, overlap_tokens: 0}
            python_layout: true
        """)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("WOOLOCAL_STORES", raising=False)
    cfg = load_config(cfg_path)
    garden, notes = cfg.project("garden"), cfg.project("notes")
    assert cfg.project_root(garden) == (tmp_path / "garden").resolve()
    assert cfg.stores_root(garden) == (tmp_path / "my-stores").resolve()
    assert cfg.stores_root(notes) == Path("/abs/stores")
    assert cfg.project_root(notes) == Path("~/notes").expanduser()
    assert cfg.chunking(garden) == ChunkingConfig(chunk_tokens=120, overlap_tokens=10)
    assert cfg.chunking(notes).chunk_tokens == 64
    assert (cfg.python_layout(garden), cfg.python_layout(notes)) == (False, True)
    # the environment overrides the default stores root, but not a project's own
    monkeypatch.setenv("WOOLOCAL_STORES", str(tmp_path / "env-stores"))
    assert cfg.stores_root(garden) == (tmp_path / "env-stores").resolve()
    assert cfg.stores_root(notes) == Path("/abs/stores")


def test_config_from_environment_and_defaults(tmp_path, monkeypatch):
    p = write_yaml(tmp_path, "projects: [{name: envproj, path: data}]\n", name="custom.yaml")
    monkeypatch.setenv("WOOLOCAL_CONFIG", str(p))
    assert load_config().project("envproj") is not None
    monkeypatch.delenv("WOOLOCAL_CONFIG")
    monkeypatch.chdir(tmp_path)  # no flows.yaml here: built-in defaults
    cfg = load_config()
    assert cfg.projects == [] and set(cfg.purposes) == {"projects", "userProfile"}
    assert write_yaml(tmp_path, "", name="flows.yaml") and load_config().projects == []  # empty file = defaults
    missing = tmp_path / "nope.yaml"
    assert "not found" in config_error(missing)


def test_adhoc_project_name_is_safe(tmp_path):
    cfg = load_config(write_yaml(tmp_path, "version: 1\n"))
    odd = tmp_path / "My Notes (2026)!"
    odd.mkdir()
    proj = cfg.adhoc_project(odd)
    assert proj.name == "My-Notes-2026"
    assert proj.path == odd.resolve()


# ---------------------------------------------------------------------------------------------------------------
# malformed files: the error names the YAML key path and what was expected


BAD = [
    pytest.param("defaults:\n  chunking:\n    chunk_tokens: lots\n",
                 ["defaults.chunking.chunk_tokens", "integer", "'lots'"], id="not-an-int"),
    pytest.param("defaults:\n  chunking: {chunk_tokens: 4}\n",
                 ["defaults.chunking.chunk_tokens", "greater than or equal to 16", "4"], id="too-small"),
    pytest.param("defaults:\n  chunking: {chunk_tokens: 100, overlap_tokens: 100}\n",
                 ["defaults.chunking", "overlap_tokens", "smaller than chunk_tokens"], id="overlap-too-big"),
    pytest.param("defaults:\n  chunk_size: 300\n", ["defaults.chunk_size", "unknown key"], id="unknown-key"),
    pytest.param("purposes:\n  projects:\n    backend: tensorflow\n",
                 ["purposes.projects.backend", "'auto', 'sentence-transformers', 'onnx', 'openvino', 'mlx' or 'openai-compatible'",
                  "'tensorflow'"], id="bad-backend"),
    pytest.param("purposes:\n  projects:\n    backend: openai-compatible\n",
                 ["purposes.projects", "endpoint: required"], id="remote-without-endpoint"),
    pytest.param("task_runner:\n  type: ray\n", ["task_runner.type", "'thread' or 'dask'", "'ray'"], id="bad-runner"),
    pytest.param("purposes:\n  projects: {dimensions: 0}\n",
                 ["purposes.projects.dimensions", "greater than or equal to 1"], id="bad-dim"),
    pytest.param("projects:\n  - name: a\n    path: x\n  - name: b\n", ["projects[1].path", "required"],
                 id="missing-path"),
    pytest.param("projects:\n  - {name: a, path: x, purpose: nope}\n",
                 ["projects[0].purpose", "'nope'", "declared purposes", "projects", "userProfile"], id="bad-purpose"),
    pytest.param("projects:\n  - {name: a, path: x}\n  - {name: a, path: y}\n",
                 ["projects[1].name", "duplicate", "'a'"], id="duplicate-name"),
    pytest.param("projects:\n  - {name: ../escape, path: x}\n", ["projects[0].name", "valid project name"],
                 id="unsafe-name"),
    pytest.param("projects:\n  - {name: a, path: x, chunking: {chunk_tokens: 64, overlap_tokens: -1}}\n",
                 ["projects[0].chunking.overlap_tokens", "greater than or equal to 0"], id="nested-project"),
    pytest.param("projects: {name: a, path: x}\n", ["projects", "valid list"], id="not-a-list"),
    pytest.param("projects:\n  - {name: a, path: x, schedule: {cron: '0 25 * * *'}}\n",
                 ["projects[0].schedule.cron", "'0 25 * * *'", "5-field cron"], id="bad-cron"),
    pytest.param("migrations:\n  - {name: m, source: s, to: projects, schedule: {cron: '0 3 * * *', timezone: Mars/Base}}\n",
                 ["migrations[0].schedule.timezone", "'Mars/Base'", "IANA timezone"], id="bad-timezone"),
    pytest.param("migrations:\n  - {name: m, source: s, to: projects, out: o, in_place: true}\n",
                 ["migrations[0]", "either out or in_place"], id="out-and-in-place"),
    pytest.param("migrations:\n  - {name: m, source: s, to: projects}\n  - {name: m, source: t, to: projects}\n",
                 ["migrations[1].name", "duplicate", "'m'"], id="duplicate-migration"),
    pytest.param("migrations:\n  - {name: m, source: s}\n", ["migrations[0].to", "required"], id="migration-no-target"),
    pytest.param("wooster: {root: w, projects_purpose: docs}\n",
                 ["wooster.projects_purpose", "'docs'", "declared purposes"], id="wooster-purpose"),
    pytest.param("service: {port: 70000}\n", ["service.port", "less than or equal to 65535"], id="service-port"),
    pytest.param("service: {chat: {temperature: 3}}\n", ["service.chat.temperature", "less than or equal to 2"],
                 id="chat-temperature"),
    pytest.param("service: {api_key: secret}\n", ["service.api_key", "unknown key"], id="service-unknown-key"),
    pytest.param("version: 2\n", ["version", "1", "(got 2)"], id="version"),
    pytest.param("- just\n- a list\n", ["top level must be a mapping"], id="top-level-list"),
    pytest.param("defaults: [1, 2\n", ["not valid YAML", "line"], id="yaml-syntax"),
]


@pytest.mark.parametrize("text,expect", BAD)
def test_malformed_config_names_key_path_and_expected_value(tmp_path, text, expect):
    msg = config_error(write_yaml(tmp_path, text))
    assert str(tmp_path / "flows.yaml") in msg
    for part in expect:
        assert part in msg, f"{part!r} not in error:\n{msg}"
    assert "(top level):" not in msg


def test_every_problem_is_reported_at_once(tmp_path):
    msg = config_error(write_yaml(tmp_path, """\
        defaults:
          chunking: {chunk_tokens: lots}
          stores_rot: x
        purposes:
          projects: {backend: cuda}
        """))
    for path in ("defaults.chunking.chunk_tokens", "defaults.stores_rot", "purposes.projects.backend"):
        assert path in msg
    assert msg.count("\n") >= 3


def test_config_error_is_bad_input():
    assert issubclass(ConfigError, WoolocalError) and ConfigError.exit_code == 2


# ---------------------------------------------------------------------------------------------------------------
# the CLI with a bad flows.yaml: exit 2, nothing written, the previous store intact


def _tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def project_with_store(tmp_path):
    """A project folder and a small, valid store for it, written directly (no model needed)."""
    proj = tmp_path / "garden"
    proj.mkdir()
    (proj / "notes.md").write_text("# Notes\n\nThe shed key is under the blue pot.\n", encoding="utf-8")
    stores = tmp_path / "stores"
    target = store_dir(stores, "garden", "all-minilm-l6-v2", 384)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(3, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    chunks = [Chunk(id=chunk_id("notes.md", i), text=f"text {i}", source="notes.md", chunk=i,
                    metadata={"source": "notes.md", "chunk": i, "totalChunks": 3}, sha256=Chunk.text_sha256(f"text {i}"))
              for i in range(3)]
    write_store(target, chunks, vecs, {"project": "garden", "model": {"name": "sentence-transformers/all-MiniLM-L6-v2",
                                                                       "dim": 384}})
    assert verify_store(target) == []
    return proj, stores, target


@pytest.mark.parametrize("text,key", [
    ("defaults:\n  chunking:\n    chunk_tokens: lots\n", "defaults.chunking.chunk_tokens"),
    ("purposes:\n  projects: {dimensions: 768}\nprojects:\n  - {name: garden, path: garden}\n",
     "purposes.projects.dimensions"),
    ("projects:\n  - {name: garden, path: garden, purpose: nope}\n", "projects[0].purpose"),
    ("projects:\n  - {name: garden, path: garden, include: 3}\n", "projects[0].include"),
])
def test_cli_bad_config_exits_2_and_leaves_store(project_with_store, text, key):
    proj, stores, target = project_with_store
    cfg = write_yaml(proj.parent, text)
    before = _tree_digest(stores)
    for target_arg in ("garden", str(proj)):
        r = CliRunner().invoke(main, ["--config", str(cfg), "ingest", target_arg, "--stores", str(stores), "--json",
                                      "--no-prefect"])
        assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
        assert key in r.stderr, r.stderr
        assert r.stdout == ""  # nothing on stdout: a script reading --json gets no half object
    assert _tree_digest(stores) == before
    assert verify_store(target) == []


def test_cli_query_and_stores_with_bad_config_exit_2(project_with_store):
    proj, stores, target = project_with_store
    cfg = write_yaml(proj.parent, "defaults: {chunk_size: 3}\n")
    for args in (["query", "garden", "shed key"], ["stores", "list"], ["stores", "verify"]):
        r = CliRunner().invoke(main, ["--config", str(cfg), *args])
        assert r.exit_code == 2, (args, r.exit_code, r.output)
        assert "defaults.chunk_size" in r.stderr
    # an explicit store path needs no configuration at all
    r = CliRunner().invoke(main, ["--config", str(cfg), "stores", "verify", str(target), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ok"] is True
