"""Find a project's files and turn each one into a text Document, or a Skipped entry that says why not."""

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
from typing import Any

from bs4 import BeautifulSoup, CData, NavigableString, Tag
from bs4.exceptions import ParserRejectedMarkup
from pypdf import PasswordType, PdfReader

from woolocal_ingest.errors import DocumentError

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_INCLUDE",
    "Document",
    "Skipped",
    "SourceFile",
    "discover",
    "load_documents",
    "parse",
    "read_source",
]


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
    metadata: dict[str, Any]  # {"source", "fileName", "fileType"} (+ "title" for HTML, "pages" for PDF)


@dataclass(frozen=True)
class Skipped:
    """A file or folder that was left out, and the human-readable reason."""

    source: str  # rel path (or the path as found)
    reason: str


_MARKDOWN_EXTENSIONS = ("md", "markdown")
_TEXT_EXTENSIONS = ("txt", "text")
_HTML_EXTENSIONS = ("html", "htm", "xhtml")
_CSV_EXTENSIONS = ("csv", "tsv")
_CODE_EXTENSIONS = (
    "py", "pyi", "js", "mjs", "cjs", "jsx", "ts", "tsx", "go", "rs", "java", "kt", "scala", "swift",
    "c", "h", "cc", "cpp", "hpp", "cs", "rb", "php", "lua", "r", "sh", "bash", "zsh", "ps1", "sql",
    "css", "scss", "vue", "svelte", "toml", "yaml", "yml", "json", "ini", "cfg", "xml", "proto",
)

DEFAULT_INCLUDE: tuple[str, ...] = tuple(
    f"*.{ext}"
    for ext in (
        *_MARKDOWN_EXTENSIONS, *_TEXT_EXTENSIONS, "rst", *_HTML_EXTENSIONS, "pdf", *_CSV_EXTENSIONS,
        *_CODE_EXTENSIONS,
    )
)
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "**/node_modules/**",
    "**/__pycache__/**",
    "**/venv/**",
    "**/site-packages/**",
    "**/dist/**",
    "**/build/**",
    "*.min.js",
    "*.min.css",
    "package-lock.json",
    "pnpm-lock.yaml",
)

# ---------------------------------------------------------------------------- globs


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob over posix paths: `*` and `?` stay inside one folder name, `**/` is any number of folders."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern.startswith("**", i):
            i += 2
            if i < n and pattern[i] == "/":
                out.append("(?:[^/]+/)*")
                i += 1
            else:
                out.append(".*")
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end].replace("\\", "\\\\").replace("[", "\\[")
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith("^"):
                body = "\\" + body
            out.append(f"[{body}]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


@dataclass(frozen=True)
class _Globs:
    """Compiled patterns; a pattern without '/' is matched against the bare file name."""

    patterns: tuple[tuple[re.Pattern[str], bool], ...]  # (regex, name_only)
    folder_prefixes: tuple[re.Pattern[str], ...]  # "x/**" patterns: a folder matching x is pruned whole

    @classmethod
    def compile(cls, globs: Iterable[str]) -> _Globs:
        globs = tuple(globs)
        return cls(
            patterns=tuple((_glob_to_regex(g), "/" not in g) for g in globs),
            folder_prefixes=tuple(_glob_to_regex(g[:-3]) for g in globs if g.endswith("/**") and len(g) > 3),
        )

    def match_file(self, rel: str) -> bool:
        name = rel.rpartition("/")[2]
        return any(rx.fullmatch(name if name_only else rel) for rx, name_only in self.patterns)

    def match_folder(self, rel: str) -> bool:
        return self.match_file(rel) or any(rx.fullmatch(rel) for rx in self.folder_prefixes)


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
_Folder = tuple[Path, str, _FolderKey, frozenset[_FolderKey]]  # (path, rel, its key, its ancestors' keys)


def _join(base: str, name: str) -> str:
    return f"{base}/{name}" if base else name


def discover(
    root: Path,
    include: Iterable[str] = DEFAULT_INCLUDE,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
) -> tuple[list[Path], list[Skipped]]:
    """Files under root matching include and not exclude, sorted by their posix path relative to root.

    Globs match that relative path; `**/` stands for any number of folders and a pattern without '/'
    matches the file name at any depth. Hidden entries (name starting with '.', so .git too) are
    skipped without being walked. Symlinked folders are followed, each folder is walked only once
    (real folders win over symlinks to them); a link back to an ancestor is reported as 'symlink loop'.
    Broken symlinks and unreadable folders are reported in the Skipped list. Raises DocumentError
    only when root itself is not a readable folder.
    """
    root = Path(root).absolute()
    try:
        root_stat = root.stat()
    except OSError as exc:
        raise DocumentError(f"project folder {root}: {_os_reason(exc)}") from exc
    if not stat.S_ISDIR(root_stat.st_mode):
        raise DocumentError(f"project folder {root}: not a folder")

    included, excluded = _Globs.compile(include), _Globs.compile(exclude)
    found: list[tuple[str, Path]] = []
    skipped: list[Skipped] = []
    seen: set[_FolderKey] = set()
    # Symlinked folders wait in `linked` until every real folder is walked, so a real folder keeps its own path.
    real: list[_Folder] = [(root, "", (root_stat.st_dev, root_stat.st_ino), frozenset())]
    linked: list[_Folder] = []

    while real or linked:
        folder, base, key, ancestors = real.pop() if real else linked.pop(0)
        if key in ancestors:
            skipped.append(Skipped(base, "symlink loop"))
            continue
        if key in seen:
            skipped.append(Skipped(base, "folder already walked through another path"))
            continue
        seen.add(key)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append(Skipped(base or ".", _os_reason(exc)))
            continue

        chain = ancestors | {key}
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = _join(base, entry.name)
            path = folder / entry.name
            is_link = False
            try:
                is_link = entry.is_symlink()
                st = path.stat() if is_link else entry.stat(follow_symlinks=False)
            except OSError as exc:
                if included.match_file(rel) and not excluded.match_file(rel):
                    reason = "broken symlink" if exc.errno == errno.ENOENT and is_link else _os_reason(exc)
                    skipped.append(Skipped(rel, reason))
                continue
            if stat.S_ISDIR(st.st_mode):
                if not excluded.match_folder(rel):
                    (linked if is_link else real).append((path, rel, (st.st_dev, st.st_ino), chain))
            elif stat.S_ISREG(st.st_mode) and included.match_file(rel) and not excluded.match_file(rel):
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
    if ext in _CODE_EXTENSIONS:
        return "code"
    return "txt"


def _decode_text(data: bytes) -> str:
    """UTF-8 (BOM stripped), or UTF-16 when it carries a BOM; anything else is refused."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise DocumentError(f"not UTF-16 text (bad bytes at offset {exc.start})") from exc
        if "\x00" in text:
            raise DocumentError("binary file (NUL bytes)")
        return text
    if b"\x00" in data:
        raise DocumentError("binary file (NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from exc


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
        raise DocumentError("binary file (NUL bytes)")
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


def parse(source: SourceFile) -> Document:
    """Turn a SourceFile into a Document by its extension; raises DocumentError with the reason it can't."""
    name = PurePosixPath(source.rel).name
    ext = PurePosixPath(name).suffix.lower().lstrip(".")
    kind = _kind(ext)
    if not source.data.strip():
        raise DocumentError("empty file")

    extra: dict[str, Any] = {}
    if kind == "pdf":
        text, extra = _pdf_text(source.data)
    elif kind == "html":
        text, extra = _html_text(source.data)
    else:
        text = _decode_text(source.data)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise DocumentError("empty file")

    metadata: dict[str, Any] = {"source": source.rel, "fileName": name, "fileType": ext, **extra}
    return Document(id=source.rel, text=text, file_type=kind, sha256=source.sha256, metadata=metadata)


def load_documents(root: Path, paths: Iterable[Path]) -> tuple[list[Document], list[Skipped]]:
    """Read and parse each path; a file that fails becomes a Skipped entry instead of an exception."""
    documents: list[Document] = []
    skipped: list[Skipped] = []
    for path in paths:
        try:
            documents.append(parse(read_source(root, path)))
        except DocumentError as exc:
            skipped.append(Skipped(_rel(root, path), str(exc)))
    return documents, skipped
