"""What gets indexed (issue 11): git's ignore rules, secrets, every real text file, no silent omission, chunks worth
retrieving, one store per source.

One project folder is built with a real `git init`, nested .gitignore files, a key file, a config with a token,
legacy encodings, extensionless files, a Word document and a notebook; it is ingested for real (the packaged
MiniLM, in-process) three times: as built, after un-ignoring a file, after ignoring an indexed one.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from woolocal_ingest import documents
from woolocal_ingest.chunking import ChunkSettings, chunk_document
from woolocal_ingest.config import load_config
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, SkipError, SourceFile, parse
from woolocal_ingest.errors import ConfigError, SourceMismatchError
from woolocal_ingest.ingest import run_ingest
from woolocal_ingest.secrets import scan
from woolocal_ingest.stores import Store, verify_store

SETTINGS = ChunkSettings(200, 32)
GH_TOKEN = "ghp_" + "R2d2C3poBb8EwokFinnRey0Kylo1Poe2Hux3Lk"
AWS_ID, AWS_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
DB_PASSWORD = "Tr0ub4dor&3xyz"
PEM_BODY = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"
SECRETS = (GH_TOKEN, AWS_ID, AWS_SECRET, DB_PASSWORD, PEM_BODY)
BLOB = "iVBORw0KGgoAAAANSUhEUgAA" + "QUJD" * 50_000  # a notebook output: a big base64 image
PARA = ("The seed catalogue lists every variety the co-op keeps, where its seeds were saved, how many packets are "
        "left and who grew it last. Members borrow packets in spring and return saved seed after the harvest, "
        "labelled with the bed number, the date and the variety, so the library grows a little every year. ")


def write(root: Path, rel: str, content: str | bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))


def make_docx(path: Path) -> None:
    import docx

    d = docx.Document()
    d.add_heading("Seed swap rules", level=1)
    d.add_paragraph("Bring seeds in labelled envelopes to the swap on the first Saturday of March.")
    table = d.add_table(rows=2, cols=2)
    for r, row in enumerate([("Crop", "Limit"), ("Runner beans", "3 packets each")]):
        for c, text in enumerate(row):
            table.cell(r, c).text = text
    d.save(str(path))


def make_notebook() -> str:
    return json.dumps({
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}},
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": ["# Plot yields\n", "\n", "Tomato yields per bed in 2025."]},
            {"cell_type": "code", "metadata": {}, "execution_count": 1,
             "source": ["import pandas as pd\n", "yields = pd.read_csv('yields.csv')"],
             "outputs": [{"output_type": "display_data", "metadata": {}, "data": {"image/png": BLOB}}]},
        ],
    })


INDEXED = {
    "important.log", "docs/sub/private.md", "docs/keep.log", "notes/real.md", "docs/guide.md",
    "config/settings.yaml", "aws-notes.txt", "legacy.txt", "wide.txt", "Makefile", "LICENSE", "docs/LICENSE",
    "CHANGES", "report.docx", "analysis.ipynb",
}
IGNORED = {  # entry -> rule
    ".git": documents.HIDDEN_RULE, ".gitignore": documents.HIDDEN_RULE, ".woolocalignore": documents.HIDDEN_RULE,
    "docs/.gitignore": documents.HIDDEN_RULE,
    "secret.md": ".gitignore: secret.md", "debug.log": ".gitignore: *.log", "out": ".gitignore: out/",
    "local-notes.md": ".git/info/exclude: local-notes.md", "docs/private.md": "docs/.gitignore: /private.md",
    "docs/drafts": "docs/.gitignore: drafts/", "notes/scratch.md": ".woolocalignore: notes/scratch.md",
    "node_modules": "exclude: node_modules/",
}
SKIPPED = {"keys/deploy_key": "secret", "blob": "binary", "empty.txt": "empty"}
LICENSE = "MIT License\n\nPermission is hereby granted, free of charge, to any person obtaining a copy of the garden software.\n"


def build_project(root: Path) -> Path:
    proj = root / "garden"
    proj.mkdir()
    subprocess.run(["git", "init", "-q", str(proj)], check=True)
    write(proj, ".git/info/exclude", "# personal\nlocal-notes.md\n")
    write(proj, ".gitignore", "secret.md\n*.log\n!important.log\nout/\n")
    write(proj, "docs/.gitignore", "/private.md\ndrafts/\n!keep.log\n")
    write(proj, ".woolocalignore", "notes/scratch.md\n")
    for rel in ("secret.md", "debug.log", "out/result.txt", "local-notes.md", "docs/private.md", "docs/drafts/idea.md",
                "notes/scratch.md", "node_modules/pkg/index.js"):
        write(proj, rel, f"IGNORED-TEXT of {rel}: the combination of the tool shed lock is 4-1-7.\n")
    write(proj, "important.log", "The important log says the pump was serviced in May.\n")
    write(proj, "docs/sub/private.md", "# Sub notes\n\nAnchored patterns only ignore docs/private.md, not this one.\n")
    write(proj, "docs/keep.log", "Re-included by a negation in a deeper .gitignore: the compost thermometer log.\n")
    write(proj, "notes/real.md", "# Real notes\n\nThe water butts are emptied before the first frost.\n")
    write(proj, "docs/guide.md", "# Conda Documentation\n\n## Installing the seed catalogue\n\n" + PARA * 2 + "\n\n"
          + PARA.replace("seed", "bulb") * 2 + "\n")
    write(proj, "config/settings.yaml", f"# Garden wiki settings\nsite_name: Garden co-op wiki\ntheme: meadow\n"
          f"github_token: {GH_TOKEN}\ndatabase:\n  host: localhost\n  password: \"{DB_PASSWORD}\"\nbackup_hour: 3\n")
    write(proj, "aws-notes.txt", "Notes on the offsite backup bucket for the garden photos.\n"
          "The bucket is in eu-west-1 and is synced every night at three.\n"
          f"aws_access_key_id = {AWS_ID}\naws_secret_access_key = {AWS_SECRET}\n"
          "Ask Priya before changing the lifecycle rules of the bucket.\n")
    write(proj, "keys/deploy_key", "-----BEGIN OPENSSH PRIVATE KEY-----\n" + (PEM_BODY + "\n") * 4
          + "-----END OPENSSH PRIVATE KEY-----\n")
    write(proj, "legacy.txt", ("Caf\u00e9 minutes \u2014 the \u201cwinter\u201d plot fee is 12 \u20ac per bed; "
                               "the na\u00efve r\u00e9sum\u00e9 of the d\u00e9bat follows.\n" * 3).encode("cp1252"))
    write(proj, "wide.txt", "\ufeffThe UTF-16 rota: Anja waters on Mondays.\n".encode("utf-16-le"))
    write(proj, "Makefile", "all:\n\tpython -m build --wheel\n")
    write(proj, "LICENSE", LICENSE)
    write(proj, "docs/LICENSE", LICENSE)
    write(proj, "CHANGES", "Changes\n\n- 2026-04: the rain barrels moved to the north fence.\n")
    write(proj, "blob", b"\x7fELF\x02\x01\x01\x00\x00\x00" * 40)
    write(proj, "empty.txt", "  \n")
    make_docx(proj / "report.docx")
    write(proj, "analysis.ipynb", make_notebook())
    return proj


def store_bytes(stores: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(stores.rglob("*")) if p.is_file())


def by_source(summary) -> dict[str, dict]:
    return {x["source"]: x for x in summary.skipped_files}


@pytest.fixture(scope="module")
def garden(tmp_path_factory):
    return build_project(tmp_path_factory.mktemp("sources"))


def test_git_agrees_with_our_ignore_decisions(garden):
    """Our rules leave out exactly what git itself ignores (plus .woolocalignore, hidden entries, excludes)."""
    out = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--directory"],
                         cwd=garden, check=True, capture_output=True, text=True).stdout.split()
    _, skipped = documents.discover(garden)
    ours = {s.source + ("/" if (garden / s.source).is_dir() else "") for s in skipped
            if s.kind == "ignored" and ".git" in s.rule.split(":")[0]}
    assert ours == set(out)


def test_dry_run_lists_what_would_be_indexed_without_a_model(garden, monkeypatch):
    from click.testing import CliRunner

    from woolocal_ingest import embedders
    from woolocal_cli import main

    def no_model(*a, **k):
        raise AssertionError("--dry-run must not load a model")

    monkeypatch.setattr(embedders, "load_embedder", no_model)
    monkeypatch.setattr(embedders, "get", no_model)
    r = CliRunner().invoke(main, ["ingest", str(garden), "--dry-run", "--json"])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    d = json.loads(r.stdout)
    assert set(d["indexed"]) == INDEXED
    kinds = {x["source"]: x["kind"] for x in d["skipped_files"]}
    assert kinds == {**{k: "ignored" for k in IGNORED}, **SKIPPED}
    assert {x["source"] for x in d["redacted_files"]} == {"config/settings.yaml", "aws-notes.txt"}
    assert d["files"]["found"] == len(INDEXED) + len(IGNORED) + len(SKIPPED)
    r = CliRunner().invoke(main, ["ingest", str(garden), "--dry-run", "-v"])
    assert "ignored  1 by .gitignore: secret.md" in r.stdout and "ignored  secret.md (.gitignore: secret.md)" in r.stdout
    assert "skipped  keys/deploy_key: secret: key file (private key)" in r.stdout
    r = CliRunner().invoke(main, ["ingest", str(garden), "--dry-run", "--json", "--no-ignore-files"])
    d = json.loads(r.stdout)
    assert set(d["indexed"]) - INDEXED == {"secret.md", "debug.log", "out/result.txt", "local-notes.md",
                                           "docs/private.md", "docs/drafts/idea.md", "notes/scratch.md"}
    assert set(d["ignored"]) == {documents.HIDDEN_RULE, "exclude: node_modules/"}


def test_project_inside_a_work_tree_follows_the_ignore_files_above_it(tmp_path):
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    write(repo, ".gitignore", "*.tmp\n/docs/generated/\n")
    write(repo, "docs/.gitignore", "!keep.tmp\n")
    for rel in ("docs/a.md", "docs/x.tmp", "docs/keep.tmp", "docs/generated/api.md", "docs/sub/generated/b.md"):
        write(repo, rel, "text\n")
    out = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--directory"],
                         cwd=repo, check=True, capture_output=True, text=True).stdout.split()
    assert set(out) == {"docs/x.tmp", "docs/generated/"}
    paths, skipped = documents.discover(repo / "docs")
    assert sorted(p.relative_to(repo / "docs").as_posix() for p in paths) == ["a.md", "keep.tmp", "sub/generated/b.md"]
    assert {(s.source, s.rule) for s in skipped} == {
        (".gitignore", documents.HIDDEN_RULE), ("x.tmp", "../.gitignore: *.tmp"),
        ("generated", "../.gitignore: /docs/generated/")}


def test_ingest_indexes_every_text_file_and_nothing_private(garden, tmp_path, embedder):
    import shutil

    proj = tmp_path / "garden"
    shutil.copytree(garden, proj, symlinks=True)
    stores = tmp_path / "stores"
    s = run_ingest("garden", proj, stores, embedder, SETTINGS, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    store = Store(Path(s.store))
    chunks = store.chunks()
    assert {c.source for c in chunks} == INDEXED
    assert verify_store(Path(s.store)) == []
    # every file found is accounted for, with one reason each
    skipped = by_source(s)
    assert {k: v["kind"] for k, v in skipped.items()} == {**{k: "ignored" for k in IGNORED}, **SKIPPED}
    assert {k: skipped[k]["rule"] for k in IGNORED} == IGNORED
    assert s.to_dict()["ignored"][".gitignore: *.log"] == 1
    assert skipped["keys/deploy_key"]["reason"] == "secret: key file (private key)"
    assert s.files["found"] == len(INDEXED) + len(IGNORED) + len(SKIPPED)
    # secrets: never in any file of any store; redacted lines keep their line numbers and are named
    raw = store_bytes(stores)
    for secret in SECRETS:
        assert secret.encode() not in raw and secret.encode() not in json.dumps(s.to_dict()).encode()
    assert b"IGNORED-TEXT" not in raw and BLOB[:40].encode() not in raw
    assert s.redacted_files == [
        {"source": "aws-notes.txt", "lines": "lines 3-4 (AWS access key id, AWS secret access key)"},
        {"source": "config/settings.yaml", "lines": "lines 4, 7 (GitHub token, password or token assignment)"}]
    text = {src: "\n".join(c.text for c in chunks if c.source == src) for src in INDEXED}
    assert "  [redacted: password or token assignment]" in text["config/settings.yaml"]
    assert "backup_hour: 3" in text["config/settings.yaml"] and "lifecycle rules" in text["aws-notes.txt"]
    # encodings, extensionless files, Word, notebooks
    meta = {c.source: c.metadata for c in chunks}
    assert meta["legacy.txt"]["encoding"] == "cp1252" and "12 \u20ac per bed; the na\u00efve" in text["legacy.txt"]
    assert meta["wide.txt"]["encoding"] == "utf-16" and "Anja waters on Mondays" in text["wide.txt"]
    assert "encoding" not in meta["notes/real.md"]
    assert "python -m build" in text["Makefile"] and "Permission is hereby granted" in text["LICENSE"]
    assert "# Seed swap rules" in text["report.docx"] and "Runner beans | 3 packets each" in text["report.docx"]
    assert meta["report.docx"]["heading"] == "Seed swap rules"
    assert "Tomato yields per bed" in text["analysis.ipynb"] and "```python\nimport pandas" in text["analysis.ipynb"]
    # chunks worth retrieving: no heading stands alone; LangChain JS metadata as before
    guide = [c for c in chunks if c.source == "docs/guide.md"]
    assert guide[0].text.startswith("# Conda Documentation\n\n## Installing the seed catalogue\n\nThe seed catalogue")
    assert guide[0].metadata["loc"]["lines"]["from"] == 1
    assert all(not documents_heading_only(c.text) for c in chunks)
    assert s.duplicates == sum(1 for c in chunks if c.source == "LICENSE") > 0

    # un-ignoring a file adds it, embedding only its text
    (proj / ".gitignore").write_text("*.log\n!important.log\nout/\n", encoding="utf-8")
    s2 = run_ingest("garden", proj, stores, embedder, SETTINGS, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    assert "secret.md" in {c.source for c in Store(Path(s2.store)).chunks()}
    assert s2.added == 1 and s2.deleted == 0 and s2.embedded == 1

    # ignoring an indexed file removes its chunks
    (proj / ".woolocalignore").write_text("notes/scratch.md\ndocs/guide.md\n", encoding="utf-8")
    s3 = run_ingest("garden", proj, stores, embedder, SETTINGS, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    assert "docs/guide.md" not in {c.source for c in Store(Path(s3.store)).chunks()}
    assert s3.deleted == len(guide) and s3.embedded == 0
    assert by_source(s3)["docs/guide.md"]["rule"] == ".woolocalignore: docs/guide.md"

    # --no-ignore-files (here: the option) takes everything but hidden entries, excludes and secrets
    s4 = run_ingest("garden", proj, stores, embedder, SETTINGS, DEFAULT_INCLUDE, DEFAULT_EXCLUDE,
                    sources=documents.SourceOptions(ignore_files=False))
    assert {"debug.log", "out/result.txt", "docs/guide.md"} <= {c.source for c in Store(Path(s4.store)).chunks()}
    assert "node_modules" in by_source(s4) and AWS_SECRET.encode() not in store_bytes(stores)


def documents_heading_only(text: str) -> bool:
    lines = [x for x in text.split("\n") if x.strip()]
    return bool(lines) and all(x.lstrip().startswith("#") for x in lines)


def test_same_name_from_another_folder_is_refused_unless_moved(tmp_path, embedder):
    a, b = tmp_path / "a" / "notes", tmp_path / "b" / "notes"
    for d, text in ((a, "Folder A: the shed key hangs by the door."), (b, "Folder B: bees arrive in April.")):
        write(d, "n.md", text + "\n")
    stores = tmp_path / "stores"
    run_ingest("notes", a, stores, embedder, SETTINGS, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    with pytest.raises(SourceMismatchError) as e:
        run_ingest("notes", b, stores, embedder, SETTINGS, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    msg = str(e.value)
    assert str(a.resolve()) in msg and str(b.resolve()) in msg and "--name" in msg and "--move" in msg
    assert e.value.exit_code == 2
    s = run_ingest("notes", b, stores, embedder, SETTINGS, DEFAULT_INCLUDE, DEFAULT_EXCLUDE, move=True)
    store = Store(Path(s.store))
    assert store.manifest["source"]["root"] == str(b.resolve())
    assert [c.text for c in store.chunks()] == ["Folder B: bees arrive in April."]
    # the folder moved: an unchanged re-run from there needs no --move and writes nothing
    assert not run_ingest("notes", b, stores, embedder, SETTINGS, DEFAULT_INCLUDE, DEFAULT_EXCLUDE).written


# ---------------------------------------------------------------------------------------------------------------
# units: secrets, modes, chunk merging, config keys


def src(rel: str, text: str | bytes) -> SourceFile:
    data = text if isinstance(text, bytes) else text.encode()
    return SourceFile(Path("/p") / rel, rel, len(data), "0" * 64, data)


def test_scanner_leaves_ordinary_config_and_code_alone():
    text = "\n".join([
        "chunk_tokens: 200", "token_budget: 8192", "max_tokens: 256", "password: str", "api_key: Optional[str]",
        "api_key_env: WOOLOCAL_API_KEY", 'password = os.environ["DB_PASSWORD"]', "token: ${GITHUB_TOKEN}",
        "url: https://${USER}:${PASSWORD}@host/simple", 'api_key = "YOUR_API_KEY"', "The password: see the admin.",
        "secretary: Roberta Mills",
    ])
    assert scan(text) == []


def test_secrets_modes(tmp_path):
    text = f"Deploy notes for the wiki.\nexport GITHUB_TOKEN={GH_TOKEN}\nRun make deploy afterwards.\n"
    with pytest.raises(SkipError) as e:
        parse(src("deploy.sh", text), documents.SourceOptions(secrets="skip-file"))
    assert e.value.kind == "secret" and "GitHub token (line 2" in str(e.value) and GH_TOKEN not in str(e.value)
    assert parse(src("deploy.sh", text), documents.SourceOptions(secrets="allow")).text == text
    doc = parse(src("deploy.sh", text))
    assert doc.text.split("\n")[1] == "[redacted: GitHub token]" and len(doc.text.split("\n")) == 4


def test_heading_only_piece_joins_the_text_after_it(embedder):
    body = PARA * 2
    doc = parse(src("g.md", f"# Conda Documentation\n\n## Getting started\n\n{body}\n\n## Next\n\n{body}\n"))
    chunks = chunk_document(doc, embedder.tokens, SETTINGS, embedder.max_tokens)
    assert not any(documents_heading_only(c.text) for c in chunks)
    assert chunks[0].text.startswith("# Conda Documentation\n\n## Getting started\n\nThe seed")
    assert all(embedder.tokens.count(c.text) <= embedder.max_tokens - embedder.tokens.special_tokens for c in chunks)


def test_config_keys_for_sources(tmp_path):
    cfg_path = tmp_path / "flows.yaml"
    cfg_path.write_text("defaults: {secrets: skip-file, max_file_mb: 5}\n"
                        "projects:\n  - {name: p, path: ., ignore_files: false}\n", encoding="utf-8")
    cfg = load_config(cfg_path)
    opts = cfg.sources(cfg.project("p"))
    assert (opts.ignore_files, opts.secrets, opts.max_file_mb) == (False, "skip-file", 5)
    cfg_path.write_text("projects:\n  - {name: p, path: ., secrets: hide}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"projects\[0\]\.secrets: .*'redact'.*\(got 'hide'\)"):
        load_config(cfg_path)
    cfg_path.write_text("defaults: {max_file_mb: 0}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"defaults\.max_file_mb"):
        load_config(cfg_path)


def test_too_large_files_are_reported_unread(tmp_path):
    write(tmp_path, "big.txt", "x" * (2 * 1024 * 1024))
    write(tmp_path, "small.txt", "fine\n")
    paths, skipped = documents.discover(tmp_path, options=documents.SourceOptions(max_file_mb=1))
    assert [p.name for p in paths] == ["small.txt"]
    assert [(s.source, s.kind) for s in skipped] == [("big.txt", "too-large")]
    assert "max_file_mb 1" in skipped[0].reason
