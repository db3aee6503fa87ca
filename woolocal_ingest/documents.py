"""Find a project's files and turn each one into a text Document, or a Skipped entry that says why not.

Every entry the walk meets is accounted for: a file is either loaded, or Skipped with one reason and a `kind`
(ignored, secret, too-large, binary, empty, unreadable). What is left out by ignore rules is decided in
`woolocal_ingest.ignore`; secrets are found by `woolocal_ingest.secrets` before any text is chunked.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import json

from bs4 import BeautifulSoup, CData, NavigableString, Tag
from bs4.exceptions import ParserRejectedMarkup
from pypdf import PasswordType, PdfReader

from woolocal_ingest.errors import DocumentError
from woolocal_ingest.ignore import IgnoreRules, PatternFile, Rule
from woolocal_ingest.secrets import SECRETS_MODES, Finding, SecretsMode, is_key_file, redact, scan

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_INCLUDE",
    "Document",
    "describe_redactions",
    "SkipError",
    "Skipped",
    "SourceFile",
    "SourceOptions",
    "Survey",
    "discover",
    "hash_sources",
    "kept_files",
    "load_documents",
    "parse",
    "read_source",
    "survey",
]

HIDDEN_RULE = "hidden: name starts with '.'"


@dataclass(frozen=True)
class SourceOptions:
    """What is taken from a project folder besides include/exclude (flows.yaml keys of the same names)."""

    ignore_files: bool = True  # .gitignore (every level), .git/info/exclude, .woolocalignore
    secrets: SecretsMode = "redact"  # redact | skip-file | allow
    max_file_mb: float = 20.0  # larger files are reported as too large, never read

    def __post_init__(self) -> None:
        if self.secrets not in SECRETS_MODES:
            raise ValueError(f"secrets: {self.secrets!r} is not one of {', '.join(SECRETS_MODES)}")
        if not self.max_file_mb > 0:
            raise ValueError(f"max_file_mb: must be greater than 0 (got {self.max_file_mb!r})")

    @classmethod
    def from_dict(cls, d: dict | None) -> SourceOptions:
        return cls(**d) if d else cls()


@dataclass(frozen=True)
class SourceFile:
    """One file's raw bytes, read exactly once, with its stable id and hash."""

    path: Path  # absolute path
    rel: str  # posix path relative to the project root: the document's stable id
    size: int
    sha256: str  # sha256 hex of the raw bytes
    data: bytes


@dataclass(frozen=True)
class Document:
    """The text of one file, ready to be chunked."""

    id: str  # = SourceFile.rel
    text: str
    file_type: str  # kind derived from the extension: "md", "txt", "rst", "csv", "html", "pdf", "code"
    sha256: str  # sha256 of the raw file bytes
    metadata: dict[str, Any]  # {"source", "fileName", "fileType"} (+ "title", "pages", "encoding" when not UTF-8)
    redactions: tuple[Finding, ...] = ()  # secret lines replaced by a marker before chunking


# Kinds of Skipped whose file keeps the chunks a previous run stored (a failed read loses nothing); the others are
# decisions about the file itself (left out by a rule, a secret, too large): its old chunks leave the store.
_KEEPS_PREVIOUS = frozenset({"unreadable", "binary", "empty"})


@dataclass(frozen=True)
class Skipped:
    """A file or folder that was left out, the human-readable reason, and its kind."""

    source: str  # rel path (or the path as found)
    reason: str
    kind: str = "unreadable"  # ignored | secret | too-large | binary | empty | unreadable | linked
    rule: str = ""  # kind "ignored": the rule, e.g. "docs/.gitignore: *.log"

    @property
    def keeps_previous(self) -> bool:
        """True when a file that was indexed before keeps its chunks (it could not be read this time)."""
        return self.kind in _KEEPS_PREVIOUS

    @classmethod
    def from_error(cls, source: str, exc: DocumentError) -> Skipped:
        return cls(source, str(exc), kind=getattr(exc, "kind", "unreadable"))


class SkipError(DocumentError):
    """Why one file is not indexed, with the kind of reason (binary, empty, secret, unreadable)."""

    def __init__(self, reason: str, kind: str = "unreadable") -> None:
        super().__init__(reason)
        self.kind = kind


_MARKDOWN_EXTENSIONS = ("md", "markdown")
_TEXT_EXTENSIONS = ("txt", "text")
_HTML_EXTENSIONS = ("html", "htm", "xhtml")
_CSV_EXTENSIONS = ("csv", "tsv")
_CODE_EXTENSIONS = (
    "py", "pyi", "js", "mjs", "cjs", "jsx", "ts", "tsx", "go", "rs", "java", "kt", "scala", "swift",
    "c", "h", "cc", "cpp", "hpp", "cs", "rb", "php", "lua", "r", "sh", "bash", "zsh", "ps1", "sql",
    "css", "scss", "vue", "svelte", "toml", "yaml", "yml", "json", "ini", "cfg", "xml", "proto",
)

_WORD_EXTENSIONS = ("docx",)
_NOTEBOOK_EXTENSIONS = ("ipynb",)

# Every file: whether it is text is decided by its content (Makefile, LICENSE, CHANGES, news/*), and a file that
# is not is reported (binary), never silently passed over.
DEFAULT_INCLUDE: tuple[str, ...] = ("*",)
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "node_modules/",
    "__pycache__/",
    "venv/",
    "site-packages/",
    "dist/",
    "build/",
    "*.min.js",
    "*.min.css",
    "package-lock.json",
    "pnpm-lock.yaml",
)

# ---------------------------------------------------------------------------- discovery

_ERRNO_REASONS = {
    errno.ENOENT: "file vanished during the run",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ELOOP: "symlink loop",
}


def _os_reason(exc: OSError) -> str:
    return _ERRNO_REASONS.get(exc.errno or 0) or exc.strerror or str(exc)


_FolderKey = tuple[int, int]  # (st_dev, st_ino)


@dataclass(frozen=True)
class _Folder:
    path: Path
    rel: str
    key: _FolderKey
    ancestors: frozenset[_FolderKey]
    rules: IgnoreRules


def _join(base: str, name: str) -> str:
    return f"{base}/{name}" if base else name


def _ignored(rel: str, rule: Rule | str) -> Skipped:
    text = str(rule)
    return Skipped(rel, f"ignored by {text}", kind="ignored", rule=text)


def discover(
    root: Path,
    include: Iterable[str] = DEFAULT_INCLUDE,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    options: SourceOptions | None = None,
) -> tuple[list[Path], list[Skipped]]:
    """Files under root to index, sorted by their posix path relative to root, and every entry left out, with why.

    `include` and `exclude` are gitignore-style patterns (pathspec): a pattern without '/' matches a name at any
    depth, one with '/' is anchored at the root, `**` is any number of folders, a trailing '/' matches folders only.
    With `options.ignore_files` (default) the `.gitignore` files of every folder, `.git/info/exclude` when root is in
    a git work tree, and `.woolocalignore` files apply as git applies them (see woolocal_ingest.ignore). Hidden
    entries (name starting with '.', so .git too) are left out without being walked. A folder that is left out is
    reported once, not walked. Files over `options.max_file_mb` are reported as too large without being read.
    Symlinked folders are followed, each folder is walked only once (real folders win over symlinks to them); a link
    back to an ancestor is reported as 'symlink loop'. Broken symlinks and unreadable folders are reported too.
    Raises DocumentError only when root itself is not a readable folder.
    """
    options = options or SourceOptions()
    root = Path(root).absolute()
    try:
        root_stat = root.stat()
    except OSError as exc:
        raise DocumentError(f"project folder {root}: {_os_reason(exc)}") from exc
    if not stat.S_ISDIR(root_stat.st_mode):
        raise DocumentError(f"project folder {root}: not a folder")

    included = PatternFile.from_lines("include", "", list(include))
    rules = IgnoreRules.for_root(root, exclude=tuple(exclude), use_files=options.ignore_files)
    max_bytes = int(options.max_file_mb * 1024 * 1024)
    found: list[tuple[str, Path]] = []
    skipped: list[Skipped] = []
    seen: set[_FolderKey] = set()
    # Symlinked folders wait in `linked` until every real folder is walked, so a real folder keeps its own path.
    real: list[_Folder] = [_Folder(root, "", (root_stat.st_dev, root_stat.st_ino), frozenset(), rules)]
    linked: list[_Folder] = []

    while real or linked:
        fold = real.pop() if real else linked.pop(0)
        base, key = fold.rel, fold.key
        if key in fold.ancestors:
            skipped.append(Skipped(base, "symlink loop"))
            continue
        if key in seen:
            skipped.append(Skipped(base, "folder already walked through another path", kind="linked"))
            continue
        seen.add(key)
        try:
            with os.scandir(fold.path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append(Skipped(base or ".", _os_reason(exc)))
            continue
        here = fold.rules if not base else fold.rules.enter(fold.path, base)

        chain = fold.ancestors | {key}
        for entry in entries:
            rel = _join(base, entry.name)
            if entry.name.startswith("."):
                skipped.append(_ignored(rel, HIDDEN_RULE))
                continue
            path = fold.path / entry.name
            is_link = False
            try:
                is_link = entry.is_symlink()
                st = path.stat() if is_link else entry.stat(follow_symlinks=False)
            except OSError as exc:
                if here.ignored(rel, False) is None and included.decide(rel, False)[0]:
                    reason = "broken symlink" if exc.errno == errno.ENOENT and is_link else _os_reason(exc)
                    skipped.append(Skipped(rel, reason))
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if not is_dir and not stat.S_ISREG(st.st_mode):
                continue  # sockets, fifos, devices: not files a user keeps
            rule = here.ignored(rel, is_dir)
            if rule is not None:
                skipped.append(_ignored(rel, rule))
            elif is_dir:
                (linked if is_link else real).append(_Folder(path, rel, (st.st_dev, st.st_ino), chain, here))
            elif not included.decide(rel, False)[0]:
                skipped.append(_ignored(rel, "include: no pattern matches"))
            elif st.st_size > max_bytes:
                skipped.append(Skipped(rel, f"too large ({st.st_size / 1048576:.1f} MB > max_file_mb "
                                            f"{options.max_file_mb:g})", kind="too-large"))
            else:
                found.append((rel, path))

    found.sort(key=lambda item: item[0])
    skipped.sort(key=lambda s: s.source)
    return [path for _, path in found], skipped

# ---------------------------------------------------------------------------- reading


def _rel(root: Path, path: Path) -> str:
    try:
        return Path(path).absolute().relative_to(Path(root).absolute()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def read_source(root: Path, path: Path) -> SourceFile:
    """Read one file's bytes once; raises DocumentError with a human reason on any OSError."""
    path = Path(path).absolute()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentError(_os_reason(exc)) from exc
    return SourceFile(
        path=path, rel=_rel(root, path), size=len(data), sha256=hashlib.sha256(data).hexdigest(), data=data
    )


# ---------------------------------------------------------------------------- parsing


def _kind(ext: str) -> str:
    if ext in _MARKDOWN_EXTENSIONS:
        return "md"
    if ext in _HTML_EXTENSIONS:
        return "html"
    if ext in _CSV_EXTENSIONS:
        return "csv"
    if ext in ("rst", "pdf"):
        return ext
    if ext in _WORD_EXTENSIONS:
        return "docx"
    if ext in _NOTEBOOK_EXTENSIONS:
        return "ipynb"
    if ext in _CODE_EXTENSIONS:
        return "code"
    return "txt"  # no extension or an unknown one: text if its content is


_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def _looks_binary(text: str) -> bool:
    """NUL or more than 1% other control characters (tab, newlines and form feed are text)."""
    return "\x00" in text or len(_CONTROL.findall(text[:65536])) > 0.01 * min(len(text), 65536)


def _decode_text(data: bytes) -> tuple[str, str]:
    """(text, encoding): a BOM decides; else UTF-8; else the encoding charset-normalizer detects. Binary data
    (NUL bytes outside UTF-16/32, control characters, no encoding that fits) raises SkipError kind 'binary'."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError as exc:
                raise SkipError(f"not {encoding.upper()} text (bad bytes at offset {exc.start})") from exc
            if _looks_binary(text):
                raise SkipError("binary file (NUL bytes)", kind="binary")
            return text.removeprefix("\ufeff"), "utf-8" if encoding == "utf-8-sig" else encoding
    if b"\x00" in data:
        # UTF-16 without a BOM: ASCII-range text has a NUL in every other byte, at odd offsets (LE) or even (BE)
        for encoding, zeros, chars in (("utf-16-le", data[1::2], data[0::2]), ("utf-16-be", data[0::2], data[1::2])):
            if len(data) >= 8 and zeros.count(0) > 0.6 * len(zeros) and chars.count(0) < 0.05 * len(chars):
                try:
                    text = data.decode(encoding)
                except UnicodeDecodeError:
                    break
                if not _looks_binary(text):
                    return text, encoding
        raise SkipError("binary file (NUL bytes)", kind="binary")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    import charset_normalizer

    matches = list(charset_normalizer.from_bytes(data))
    if not matches:
        raise SkipError("binary file (no text encoding fits)", kind="binary")
    best = matches[0]
    # Single-byte code pages that read the bytes equally well tie; Windows-1252 is by far the most common of them.
    ties = [m for m in matches if (m.chaos, m.coherence) == (best.chaos, best.coherence)]
    best = next((m for m in ties if m.encoding == "cp1252"), best)
    text = str(best)
    if _looks_binary(text):
        raise SkipError("binary file (control characters)", kind="binary")
    return text, best.encoding.replace("_", "-")


def _docx_text(data: bytes) -> tuple[str, dict[str, Any]]:
    """A Word document as Markdown-ish text: headings as '#' lines, paragraphs, list items, tables row by row."""
    import docx
    from docx.table import Table

    try:
        doc = docx.Document(io.BytesIO(data))
    except Exception as exc:  # python-docx raises zipfile, KeyError, lxml errors on damaged files
        raise SkipError(f"corrupt Word document: {exc or type(exc).__name__}") from exc
    parts: list[str] = []
    for block in doc.iter_inner_content():
        if isinstance(block, Table):
            rows = []
            for row in block.rows:
                cells = [_collapse(cell.text) for cell in row.cells]
                rows.append(" | ".join(cells))
            if any(r.strip(" |") for r in rows):
                parts.append("\n".join(rows))
            continue
        text = block.text.strip()
        if not text:
            continue
        style = (block.style.name if block.style is not None else "") or ""
        if style == "Title":
            parts.append(f"# {_collapse(text)}")
        elif style.startswith("Heading") and style[7:].strip().isdigit():
            parts.append(f"{'#' * min(int(style[7:]), 6)} {_collapse(text)}")
        elif style.startswith("List"):
            parts.append(f"- {text}")
        else:
            parts.append(text)
    meta: dict[str, Any] = {}
    if doc.core_properties.title:
        meta["title"] = doc.core_properties.title
    return "\n\n".join(parts), meta


def _notebook_text(data: bytes) -> tuple[str, dict[str, Any]]:
    """A Jupyter notebook's markdown and code cells (code fenced with the kernel's language); outputs are left out."""
    text, _ = _decode_text(data)
    try:
        nb = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SkipError(f"not a Jupyter notebook (invalid JSON at line {exc.lineno})") from exc
    cells = nb.get("cells") if isinstance(nb, dict) else None
    if not isinstance(cells, list):
        raise SkipError("not a Jupyter notebook (no 'cells' list; nbformat 4 expected)")
    meta = nb.get("metadata") if isinstance(nb.get("metadata"), dict) else {}
    lang = (meta.get("kernelspec") or {}).get("language") or (meta.get("language_info") or {}).get("name") or ""
    parts: list[str] = []
    for cell in cells:
        if not isinstance(cell, dict):
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else str(src)
        if not src.strip():
            continue
        if cell.get("cell_type") == "code":
            parts.append(f"```{lang}\n{src.rstrip()}\n```")
        else:  # markdown and raw cells
            parts.append(src.strip())
    return "\n\n".join(parts), {"cells": len(cells)}


_HTML_DROPPED = frozenset({"script", "style", "noscript", "template", "head", "title"})
_HTML_HEADINGS = {f"h{level}": level for level in range(1, 7)}
_HTML_BLOCKS = frozenset({
    "address", "article", "aside", "blockquote", "body", "caption", "dd", "details", "div", "dl", "dt",
    "fieldset", "figcaption", "figure", "footer", "form", "header", "hr", "li", "main", "nav", "ol", "p",
    "pre", "section", "summary", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "ul",
})
_WHITESPACE = re.compile(r"\s+")


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _html_text(data: bytes) -> tuple[str, dict[str, Any]]:
    """Visible text of an HTML page: one paragraph per block, headings as '# Title' lines."""
    if b"\x00" in data and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SkipError("binary file (NUL bytes)", kind="binary")
    try:
        soup = BeautifulSoup(data, "html.parser")
    except ParserRejectedMarkup as exc:
        raise DocumentError(f"unreadable HTML: {exc}") from exc

    metadata: dict[str, Any] = {}
    if soup.title is not None and (title := _collapse(soup.title.get_text(" "))):
        metadata["title"] = title

    parts: list[str] = []
    stack: list[Any] = list(reversed(soup.contents))  # plain str items are our own line-break markers
    while stack:
        item = stack.pop()
        if type(item) is str:
            parts.append(item)
        elif isinstance(item, NavigableString):
            if type(item) is NavigableString or isinstance(item, CData):  # not comments, doctypes, ...
                parts.append(_WHITESPACE.sub(" ", item))
        elif isinstance(item, Tag) and item.name not in _HTML_DROPPED:
            if item.name == "br":
                parts.append("\n")
            elif item.name in _HTML_HEADINGS:
                if heading := _collapse(item.get_text(" ")):
                    parts.append(f"\n\n{'#' * _HTML_HEADINGS[item.name]} {heading}\n\n")
            elif item.name in _HTML_BLOCKS:
                stack.append("\n\n")
                stack.extend(reversed(item.contents))
                stack.append("\n\n")
            else:
                stack.extend(reversed(item.contents))

    lines = (" ".join(line.split()) for line in "".join(parts).split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return text, metadata


def _pdf_text(data: bytes) -> tuple[str, dict[str, Any]]:
    """Text layer of a PDF, pages joined by blank lines."""
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            reader = PdfReader(io.BytesIO(data))
            locked = reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED
        except Exception as exc:  # pypdf raises many kinds on damaged files
            raise DocumentError(f"corrupt PDF: {exc or type(exc).__name__}") from exc
        if locked:
            raise DocumentError("encrypted PDF")
        try:
            pages = [page.extract_text() or "" for page in reader.pages]
        except Exception as exc:
            raise DocumentError(f"corrupt PDF: {exc or type(exc).__name__}") from exc

    text = "\n\n".join(page.strip() for page in pages if page.strip())
    if not text:
        raise DocumentError("PDF has no text layer (scanned?)")
    return text, {"pages": len(pages)}


def parse(source: SourceFile, options: SourceOptions | None = None) -> Document:
    """Turn a SourceFile into a Document by its extension and content; secrets are handled as `options.secrets`
    says. Raises SkipError (a DocumentError) with the reason it can't."""
    options = options or SourceOptions()
    name = PurePosixPath(source.rel).name
    ext = PurePosixPath(name).suffix.lower().lstrip(".")
    kind = _kind(ext)
    if not source.data.strip():
        raise SkipError("empty file", kind="empty")

    extra: dict[str, Any] = {}
    if kind == "pdf":
        text, extra = _pdf_text(source.data)
    elif kind == "html":
        text, extra = _html_text(source.data)
    elif kind == "docx":
        text, extra = _docx_text(source.data)
    elif kind == "ipynb":
        text, extra = _notebook_text(source.data)
    else:
        text, encoding = _decode_text(source.data)
        if encoding != "utf-8":
            extra["encoding"] = encoding
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise SkipError("empty file", kind="empty")

    findings: tuple[Finding, ...] = ()
    if options.secrets != "allow":
        found = scan(text)
        if found:
            kinds = ", ".join(sorted({f.kind for f in found}))
            lines = _line_list([f.line for f in found])
            if options.secrets == "skip-file":
                raise SkipError(f"secret: {kinds} (line {lines}; secrets: skip-file)", kind="secret")
            if is_key_file(text, found):
                raise SkipError(f"secret: key file ({kinds})", kind="secret")
            text, findings = redact(text, found), tuple(found)

    file_type = "md" if kind in ("docx", "ipynb") else kind
    metadata: dict[str, Any] = {"source": source.rel, "fileName": name, "fileType": ext, **extra}
    return Document(id=source.rel, text=text, file_type=file_type, sha256=source.sha256, metadata=metadata,
                    redactions=findings)


def _line_list(lines: list[int]) -> str:
    """'3', '3, 7' or '3-40' style list of line numbers (runs collapsed)."""
    runs: list[list[int]] = []
    for n in sorted(set(lines)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def describe_redactions(findings: Iterable[Finding]) -> str:
    """'lines 3, 7 (GitHub token, password or token assignment)' for a summary; never the secret itself."""
    findings = list(findings)
    kinds = ", ".join(sorted({f.kind for f in findings}))
    lines = _line_list([f.line for f in findings])
    return f"line{'s' if len(findings) > 1 else ''} {lines} ({kinds})"


def load_documents(root: Path, paths: Iterable[Path],
                   options: SourceOptions | None = None) -> tuple[list[Document], list[Skipped]]:
    """Read and parse each path; a file that fails becomes a Skipped entry instead of an exception."""
    documents: list[Document] = []
    skipped: list[Skipped] = []
    for path in paths:
        try:
            documents.append(parse(read_source(root, path), options))
        except DocumentError as exc:
            skipped.append(Skipped.from_error(_rel(root, path), exc))
    return documents, skipped


@dataclass(frozen=True)
class Survey:
    """What an ingest of a folder would index (with redactions) and what it would leave out, and why."""

    indexed: list[Document]
    skipped: list[Skipped]


def survey(root: Path, include: Iterable[str] = DEFAULT_INCLUDE, exclude: Iterable[str] = DEFAULT_EXCLUDE,
           options: SourceOptions | None = None) -> Survey:
    """Discover, read and parse every file as an ingest would, without chunking or a model (`ingest --dry-run`)."""
    paths, skipped = discover(root, include, exclude, options)
    docs, bad = load_documents(root, paths, options)
    return Survey(indexed=docs, skipped=sorted(skipped + bad, key=lambda s: s.source))


def hash_sources(root: Path, include: Sequence[str], exclude: Sequence[str],
                 sources: SourceOptions) -> tuple[dict[str, str], list[Skipped]]:
    """{relative path: sha256 of the raw bytes} of every file discovery keeps, and the entries it left out (with
    the files that could not be read)."""
    paths, skipped = discover(root, include=include, exclude=exclude, options=sources)
    file_sha: dict[str, str] = {}
    for p in paths:
        try:
            src = read_source(root, p)
        except DocumentError as e:
            skipped.append(Skipped.from_error(p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p), e))
            continue
        file_sha[src.rel] = src.sha256
    return file_sha, skipped


def kept_files(prev_files: dict[str, str], file_sha: dict[str, str], skipped: Sequence[Skipped]) -> list[str]:
    """Files of the previous store that are still there but could not be read this time (or sit in a folder that
    could not be listed): they keep their chunks, a failed read loses nothing."""
    unreadable = {s.source for s in skipped if s.keeps_previous}
    dirs = tuple("" if u in ("", ".") else u + "/" for u in unreadable)
    return [r for r in prev_files if r not in file_sha and (r in unreadable or r.startswith(dirs))]
