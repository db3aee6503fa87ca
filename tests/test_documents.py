"""Tests for woolocal_ingest.documents: discovery, reading and parsing of real files in tmp_path."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pathlib
from pathlib import Path

import pytest
from pypdf import PdfReader, PdfWriter

from woolocal_ingest import documents
from woolocal_ingest.documents import (
    DEFAULT_INCLUDE,
    Document,
    Skipped,
    discover,
    load_documents,
    parse,
    read_source,
)
from woolocal_ingest.errors import DocumentError


def write(root: Path, rel: str, content: str | bytes = "hello\n") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def rels(root: Path, paths: list[Path]) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def make_pdf(*page_texts: str) -> bytes:
    """A minimal valid PDF, one page per text, drawn in Helvetica with Tj, with a correct xref table."""
    n = len(page_texts)
    font_id = 3 + 2 * n
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode()]
    for i, text in enumerate(page_texts):
        content = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode() if text else b""
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")

    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def load_one(root: Path, rel: str) -> tuple[list[Document], list[Skipped]]:
    return load_documents(root, [root / rel])


def only_skip(root: Path, rel: str) -> Skipped:
    docs, skipped = load_one(root, rel)
    assert docs == []
    assert len(skipped) == 1 and skipped[0].source == rel
    return skipped[0]


# ---------------------------------------------------------------------------- discovery


def test_discover_finds_each_supported_type_sorted(tmp_path: Path) -> None:
    wanted = [
        "a.md", "b.markdown", "c.txt", "d.rst", "e.html", "f.htm", "g.pdf", "h.csv",
        "src/main.py", "src/app.ts", "src/view.tsx", "src/lib.rs", "src/main.go", "cfg/settings.yaml",
        "cfg/pyproject.toml", "cfg/data.json", "db/schema.sql", "web/site.css", "web/app.js",
    ]
    for rel in wanted:
        write(tmp_path, rel)
    for rel in ["logo.png", "archive.zip", "bin/tool", "src/mod.pyc"]:
        write(tmp_path, rel, b"\x00\x01")

    paths, skipped = discover(tmp_path)

    # every file is found: whether it is text is decided by its content when it is loaded
    binaries = ["archive.zip", "bin/tool", "logo.png", "src/mod.pyc"]
    assert rels(tmp_path, paths) == sorted(wanted + binaries)
    assert all(p.is_absolute() for p in paths)
    assert skipped == []
    docs, bad = load_documents(tmp_path, paths)
    assert sorted(d.id for d in docs) == sorted(set(wanted) - {"g.pdf"})  # "hello" is no PDF
    assert [(s.source, s.kind) for s in bad] == [(b, "binary") for b in binaries[:2]] + [
        ("g.pdf", "unreadable"), ("logo.png", "binary"), ("src/mod.pyc", "binary")]


def test_double_star_matches_any_number_of_folders_including_none(tmp_path: Path) -> None:
    for rel in ["top.md", "docs/a.md", "docs/x/y/b.md", "docs/x/c.txt", "other/d.md"]:
        write(tmp_path, rel)

    assert rels(tmp_path, discover(tmp_path, include=["**/*.md"], exclude=[])[0]) == [
        "docs/a.md", "docs/x/y/b.md", "other/d.md", "top.md",
    ]
    assert rels(tmp_path, discover(tmp_path, include=["docs/**/*.md"], exclude=[])[0]) == [
        "docs/a.md", "docs/x/y/b.md",
    ]
    assert rels(tmp_path, discover(tmp_path, include=["docs/*.md"], exclude=[])[0]) == ["docs/a.md"]
    assert rels(tmp_path, discover(tmp_path, include=["docs/**"], exclude=["**/y/**"])[0]) == [
        "docs/a.md", "docs/x/c.txt",
    ]


def test_pattern_without_slash_matches_file_name_at_any_depth(tmp_path: Path) -> None:
    for rel in ["notes.txt", "a/b/c/deep.txt", "a/secret.txt", "a/b/secret.txt", "a/keep.md"]:
        write(tmp_path, rel)

    paths, _ = discover(tmp_path, include=["*.txt"], exclude=["secret.txt"])

    assert rels(tmp_path, paths) == ["a/b/c/deep.txt", "notes.txt"]


def test_default_exclude_drops_vendored_and_generated_files(tmp_path: Path) -> None:
    for rel in [
        "node_modules/lib/index.js", "web/node_modules/x.js", "pkg/__pycache__/m.py", "venv/lib/site.py",
        "web/app.min.js", "package-lock.json", "web/app.js", "pkg/m.py",
    ]:
        write(tmp_path, rel)

    paths, _ = discover(tmp_path)

    assert rels(tmp_path, paths) == ["pkg/m.py", "web/app.js"]


def test_hidden_entries_and_git_are_skipped_without_walking_into_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for rel in [".git/HEAD.txt", ".git/objects/readme.md", ".cache/a.md", "sub/.hidden/b.md", ".env.md", "ok.md"]:
        write(tmp_path, rel)
    walked: list[str] = []
    real_scandir = os.scandir

    def recording_scandir(path):  # type: ignore[no-untyped-def]
        walked.append(Path(path).relative_to(tmp_path).as_posix())
        return real_scandir(path)

    monkeypatch.setattr(documents.os, "scandir", recording_scandir)
    paths, skipped = discover(tmp_path, include=["**"], exclude=[])

    assert rels(tmp_path, paths) == ["ok.md"]
    # left out, but accounted for: each hidden entry once (a hidden folder is not walked)
    assert [(s.source, s.kind) for s in skipped] == [
        (".cache", "ignored"), (".env.md", "ignored"), (".git", "ignored"), ("sub/.hidden", "ignored")]
    assert all(s.rule == documents.HIDDEN_RULE for s in skipped)
    assert sorted(walked) == [".", "sub"]


def test_discover_rejects_a_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match="missing"):
        discover(tmp_path / "missing")


# ---------------------------------------------------------------------------- ids, hashes, text


def test_id_is_posix_rel_path_and_sha256_matches_raw_bytes(tmp_path: Path) -> None:
    raw = "# Title\r\n\r\nBody with ünïcode\r\n".encode()
    write(tmp_path, "docs/guide/Intro.md", raw)

    paths, _ = discover(tmp_path)
    source = read_source(tmp_path, paths[0])
    docs, skipped = load_documents(tmp_path, paths)

    assert skipped == []
    assert source.rel == "docs/guide/Intro.md"
    assert source.data == raw and source.size == len(raw)
    assert source.sha256 == hashlib.sha256(raw).hexdigest()
    (doc,) = docs
    assert doc.id == "docs/guide/Intro.md"
    assert doc.sha256 == hashlib.sha256(raw).hexdigest()
    assert doc.file_type == "md"
    assert doc.metadata == {"source": "docs/guide/Intro.md", "fileName": "Intro.md", "fileType": "md"}
    assert doc.text == "# Title\n\nBody with ünïcode\n"


def test_code_file_kind_and_extension(tmp_path: Path) -> None:
    write(tmp_path, "src/tool.py", "def f():\n    return 1\n")

    (doc,), _ = load_one(tmp_path, "src/tool.py")

    assert doc.file_type == "code"
    assert doc.metadata["fileType"] == "py"
    assert doc.text == "def f():\n    return 1\n"


def test_utf8_bom_is_stripped_and_utf16_with_bom_is_decoded(tmp_path: Path) -> None:
    write(tmp_path, "bom.txt", b"\xef\xbb\xbfhello bom")
    write(tmp_path, "wide.txt", "\ufeffwide text\r\nline two".encode("utf-16-le"))

    docs, skipped = load_documents(tmp_path, [tmp_path / "bom.txt", tmp_path / "wide.txt"])

    assert skipped == []
    assert [d.text for d in docs] == ["hello bom", "wide text\nline two"]


def test_binary_file_named_txt_is_skipped(tmp_path: Path) -> None:
    write(tmp_path, "image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")

    assert "binary" in only_skip(tmp_path, "image.txt").reason


def test_legacy_encodings_are_detected_and_recorded(tmp_path: Path) -> None:
    cp1252 = ("Caf\u00e9 minutes \u2014 the \u201cwinter\u201d plot fee is 12 \u20ac per bed; "
              "the na\u00efve r\u00e9sum\u00e9 of the d\u00e9bat follows.\n" * 3)
    write(tmp_path, "old.txt", cp1252.encode("cp1252"))
    write(tmp_path, "wide.txt", "Plot fee r\u00e9sum\u00e9\nSecond line of the file\n".encode("utf-16-le"))

    docs, skipped = load_documents(tmp_path, [tmp_path / "old.txt", tmp_path / "wide.txt"])

    assert skipped == []
    assert [d.text for d in docs] == [cp1252, "Plot fee r\u00e9sum\u00e9\nSecond line of the file\n"]
    assert docs[0].metadata["encoding"] == "cp1252"
    assert docs[1].metadata["encoding"].startswith("utf-16")


@pytest.mark.parametrize("content", [b"", b"  \n\t\r\n"])
def test_empty_and_whitespace_only_files_are_skipped(tmp_path: Path, content: bytes) -> None:
    write(tmp_path, "blank.md", content)

    assert only_skip(tmp_path, "blank.md").reason == "empty file"


# ---------------------------------------------------------------------------- HTML


def test_html_gives_text_without_tags_scripts_and_keeps_headings(tmp_path: Path) -> None:
    html = """<!DOCTYPE html>
<html><head><title>My  Page</title><style>body { color: red }</style>
<script>var secretToken = 42;</script></head>
<body>
  <!-- a comment -->
  <h1>Main   Title</h1>
  <p>Hello <b>bold</b>
     world.</p>
  <h2>Sub <em>part</em></h2>
  <ul><li>one</li><li>two</li></ul>
  <noscript>Enable JavaScript</noscript>
  <template><p>hidden template</p></template>
  <div>line a<br>line b</div>
  <script>window.bodyScript = true;</script><style>.x { margin: 0 }</style>
</body></html>"""
    write(tmp_path, "page.html", html)

    (doc,), skipped = load_one(tmp_path, "page.html")

    assert skipped == []
    assert doc.file_type == "html"
    assert doc.metadata["title"] == "My Page"
    lines = doc.text.split("\n")
    assert "# Main Title" in lines
    assert "## Sub part" in lines
    assert "Hello bold world." in lines
    assert "line a" in lines and "line b" in lines
    assert "one" in lines and "two" in lines
    for absent in ("<", ">", "secretToken", "bodyScript", "color", "margin", "Enable JavaScript", "hidden template",
                   "a comment"):
        assert absent not in doc.text
    assert "\n\n\n" not in doc.text


# ---------------------------------------------------------------------------- PDF


def test_pdf_text_layer_is_extracted_page_by_page(tmp_path: Path) -> None:
    write(tmp_path, "report.pdf", make_pdf("Hello from page one", "Second page text"))

    (doc,), skipped = load_one(tmp_path, "report.pdf")

    assert skipped == []
    assert doc.file_type == "pdf"
    assert doc.metadata["pages"] == 2
    assert doc.text == "Hello from page one\n\nSecond page text"


def test_corrupt_pdf_is_skipped(tmp_path: Path) -> None:
    write(tmp_path, "broken.pdf", b"%PDF-1.4\nthis is not really a pdf\n%%EOF\n")
    write(tmp_path, "truncated.pdf", make_pdf("Hello")[:60])

    docs, skipped = load_documents(tmp_path, [tmp_path / "broken.pdf", tmp_path / "truncated.pdf"])

    assert docs == []
    assert [s.source for s in skipped] == ["broken.pdf", "truncated.pdf"]
    assert all("PDF" in s.reason for s in skipped)


def test_pdf_without_text_layer_is_skipped(tmp_path: Path) -> None:
    write(tmp_path, "scan.pdf", make_pdf(""))

    assert only_skip(tmp_path, "scan.pdf").reason.startswith("PDF has no text layer")


def test_encrypted_pdf_is_skipped(tmp_path: Path) -> None:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf("Top secret"))))
    writer.encrypt(user_password="pw", owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    write(tmp_path, "locked.pdf", buffer.getvalue())

    assert only_skip(tmp_path, "locked.pdf").reason == "encrypted PDF"


# ---------------------------------------------------------------------------- OS failures


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file_is_skipped_as_permission_denied(tmp_path: Path) -> None:
    path = write(tmp_path, "private.md", "secret")
    path.chmod(0)
    try:
        assert only_skip(tmp_path, "private.md").reason == "permission denied"
    finally:
        path.chmod(0o644)


def test_simulated_eacces_is_reported_as_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = write(tmp_path, "private.md", "secret")
    write(tmp_path, "public.md", "fine")
    real_read_bytes = pathlib.Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    with pytest.raises(DocumentError, match="^permission denied$"):
        read_source(tmp_path, target)
    docs, skipped = load_documents(tmp_path, discover(tmp_path)[0])

    assert [d.id for d in docs] == ["public.md"]
    assert skipped == [Skipped("private.md", "permission denied")]


def test_unreadable_folder_is_skipped_as_permission_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "locked/inside.md")
    write(tmp_path, "open/visible.md")
    real_scandir = os.scandir

    def scandir(path):  # type: ignore[no-untyped-def]
        if Path(path) == tmp_path / "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(documents.os, "scandir", scandir)
    paths, skipped = discover(tmp_path)

    assert rels(tmp_path, paths) == ["open/visible.md"]
    assert skipped == [Skipped("locked", "permission denied")]


def test_file_removed_after_discovery_is_reported_as_vanished(tmp_path: Path) -> None:
    write(tmp_path, "keep.md", "kept")
    gone = write(tmp_path, "gone.md", "soon gone")
    paths, _ = discover(tmp_path)
    gone.unlink()

    docs, skipped = load_documents(tmp_path, paths)

    assert [d.id for d in docs] == ["keep.md"]
    assert len(skipped) == 1
    assert skipped[0].source == "gone.md" and "vanished" in skipped[0].reason


# ---------------------------------------------------------------------------- symlinks


def test_symlink_loop_is_reported_once_and_walk_terminates(tmp_path: Path) -> None:
    write(tmp_path, "a/doc.md")
    write(tmp_path, "top.md")
    (tmp_path / "a" / "up").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "a" / "self").symlink_to(tmp_path / "a", target_is_directory=True)

    paths, skipped = discover(tmp_path)

    assert rels(tmp_path, paths) == ["a/doc.md", "top.md"]
    assert skipped == [Skipped("a/self", "symlink loop"), Skipped("a/up", "symlink loop")]


def test_symlinked_folder_is_followed_once(tmp_path: Path) -> None:
    write(tmp_path, "zdocs/guide.md")
    outside = tmp_path / "outside"
    write(outside, "extra.md")
    project = tmp_path / "project"
    write(project, "own.md")
    (project / "alias").symlink_to(tmp_path / "zdocs", target_is_directory=True)
    (project / "zdocs").symlink_to(tmp_path / "zdocs", target_is_directory=True)
    (project / "ext").symlink_to(outside, target_is_directory=True)

    paths, skipped = discover(project)

    assert rels(project, paths) == ["alias/guide.md", "ext/extra.md", "own.md"]
    assert [s.source for s in skipped] == ["zdocs"]
    (doc,), _ = load_one(project, "ext/extra.md")
    assert doc.id == "ext/extra.md"


def test_real_folder_wins_over_a_symlink_to_it(tmp_path: Path) -> None:
    write(tmp_path, "real/doc.md")
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)

    paths, skipped = discover(tmp_path)

    assert rels(tmp_path, paths) == ["real/doc.md"]
    assert [s.source for s in skipped] == ["alias"]


def test_broken_symlink_is_skipped(tmp_path: Path) -> None:
    write(tmp_path, "ok.md")
    (tmp_path / "dangling.md").symlink_to(tmp_path / "nowhere.md")

    paths, skipped = discover(tmp_path)

    assert rels(tmp_path, paths) == ["ok.md"]
    assert skipped == [Skipped("dangling.md", "broken symlink")]


def test_default_include_is_every_file() -> None:
    assert DEFAULT_INCLUDE == ("*",)


def test_parse_refuses_binary_directly() -> None:
    data = b"abc\x00def"
    source = documents.SourceFile(Path("/x/y.md"), "y.md", len(data), hashlib.sha256(data).hexdigest(), data)

    with pytest.raises(DocumentError, match="binary"):
        parse(source)
