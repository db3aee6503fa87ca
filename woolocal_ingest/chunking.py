"""Cut Documents into Chunks measured in the embedding model's own tokens, with LangChain-JS-shaped metadata."""

from __future__ import annotations

import bisect
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

from woolocal_ingest.documents import Document, SourceOptions

if TYPE_CHECKING:
    from woolocal_ingest.embedders.base import TokenCounter

LANGUAGE_BY_TYPE: dict[str, Language] = {
    "md": Language.MARKDOWN, "markdown": Language.MARKDOWN, "html": Language.MARKDOWN, "htm": Language.MARKDOWN,
    "rst": Language.RST, "py": Language.PYTHON, "js": Language.JS, "mjs": Language.JS, "jsx": Language.JS,
    "ts": Language.TS, "tsx": Language.TS, "go": Language.GO, "rs": Language.RUST, "java": Language.JAVA,
    "c": Language.C, "h": Language.C, "cpp": Language.CPP, "hpp": Language.CPP, "cc": Language.CPP,
    "rb": Language.RUBY, "php": Language.PHP, "scala": Language.SCALA, "swift": Language.SWIFT,
    "kt": Language.KOTLIN, "cs": Language.CSHARP, "lua": Language.LUA,
    "docx": Language.MARKDOWN, "ipynb": Language.MARKDOWN,  # loaded as Markdown text (documents.py)
}
# Bump when chunk boundaries or metadata change: stores built by an older chunker are re-chunked on the next ingest.
# 3: heading-only and few-token pieces merged into a neighbour; secrets redacted before chunking.
CHUNKER_VERSION = 3
MIN_CHUNK_TOKENS = 16  # a piece with fewer tokens (or only headings) is merged into its neighbour
_HEADED = {"md", "markdown", "html", "htm", "xhtml", "rst", "docx", "ipynb"}
_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
_MD_FENCE = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+:.<>_])\1{2,}[ \t]*$")


@dataclass(frozen=True)
class ChunkSettings:
    """Chunk size and overlap in tokens; `limit` is the hard cap (the model's max sequence length less specials)."""

    chunk_tokens: int = 200
    overlap_tokens: int = 32


@dataclass(frozen=True)
class Chunk:
    """One row of a store: the text to embed, where it came from, and its JSON metadata."""

    id: str
    text: str
    source: str
    chunk: int
    metadata: dict = field(hash=False, compare=True)
    sha256: str = ""

    @staticmethod
    def text_sha256(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def chunk_id(source: str, index: int) -> str:
    """A stable UUID-shaped id for chunk `index` of `source` (the same scheme as LangChain JS fixtures here)."""
    return str(uuid.UUID(bytes=hashlib.sha256(f"{source}#{index}".encode("utf-8", "surrogatepass")).digest()[:16],
                          version=4))


def _headings(doc: Document) -> list[tuple[int, str]]:
    """(offset, heading text) for each heading of a Markdown/HTML or reStructuredText document."""
    text = doc.text
    kind = str(doc.metadata.get("fileType", doc.file_type)).lower()
    if kind not in _HEADED:
        return []  # code comments and CSV rows are not headings
    if kind == "rst":
        out, lines, pos = [], text.split("\n"), 0
        offsets = []
        for line in lines:
            offsets.append(pos)
            pos += len(line) + 1
        for i in range(1, len(lines)):
            title, under = lines[i - 1].strip(), lines[i]
            if title and _RST_UNDERLINE.match(under) and len(under.rstrip()) >= len(title) and not _RST_UNDERLINE.match(title):
                over = i >= 2 and _RST_UNDERLINE.match(lines[i - 2]) is not None  # over- and underlined title
                out.append((offsets[i - 2] if over else offsets[i - 1], title))
        return out
    # Markdown: '#' lines inside fenced code blocks (shell or Python comments) are not headings.
    out, pos, fence = [], 0, ""
    for line in text.split("\n"):
        f = _MD_FENCE.match(line)
        if fence:
            if f and f.group(1)[0] == fence[0] and len(f.group(1)) >= len(fence) and not line[f.end():].strip():
                fence = ""
        elif f:
            fence = f.group(1)
        else:
            m = _MD_HEADING.match(line)
            if m:
                out.append((pos, m.group(2).strip()))
        pos += len(line) + 1
    return out


def _splitter(file_type: str, settings: ChunkSettings, counter: "TokenCounter") -> RecursiveCharacterTextSplitter:
    kwargs = dict(chunk_size=settings.chunk_tokens, chunk_overlap=settings.overlap_tokens,
                  length_function=counter.count, add_start_index=True, strip_whitespace=True)
    lang = LANGUAGE_BY_TYPE.get(file_type)
    if lang is not None:
        return RecursiveCharacterTextSplitter.from_language(lang, **kwargs)
    return RecursiveCharacterTextSplitter(**kwargs)


def effective_settings(settings: ChunkSettings, counter: "TokenCounter", max_tokens: int) -> ChunkSettings:
    """Settings capped so that no chunk (plus the model's special tokens) exceeds its max sequence length."""
    limit = max_tokens - counter.special_tokens
    size = min(settings.chunk_tokens, limit)
    return ChunkSettings(chunk_tokens=size, overlap_tokens=min(settings.overlap_tokens, size // 2))


def chunk_document(doc: Document, counter: "TokenCounter", settings: ChunkSettings, max_tokens: int) -> list[Chunk]:
    """Split one document; every chunk fits the model (no silent truncation), line ranges as LangChain JS writes them."""
    eff = effective_settings(settings, counter, max_tokens)
    limit = max_tokens - counter.special_tokens
    text = doc.text
    pieces: list[tuple[int, str]] = []
    kind = LANGUAGE_BY_TYPE.get(str(doc.metadata.get("fileType", "")).lower()) and str(doc.metadata["fileType"]).lower()
    # LangChain's own start_index assumes the overlap is counted in characters (it is in tokens here) and then
    # finds a later copy of a repeated chunk, or none. Chunks come in text order, each starting after the previous
    # one, so the first occurrence after the previous start is the chunk's own place.
    prev_start = -1
    for d in _splitter(kind or doc.file_type, eff, counter).create_documents([text]):
        start = text.find(d.page_content, prev_start + 1)
        if start < 0:
            start = text.find(d.page_content)
        prev_start = max(start, prev_start)
        # A separator-free run longer than the limit can survive the recursive splitter: cut it at token boundaries.
        offset = 0
        for part in counter.split(d.page_content, limit):
            if part.strip():
                pieces.append((max(start, 0) + offset, part))
            offset += len(part)
    pieces = _merge_thin(pieces, text, counter, limit)
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    heads = _headings(doc)
    head_pos = [h[0] for h in heads]
    total = len(pieces)
    chunks = []
    for i, (start, piece) in enumerate(pieces):
        end = start + len(piece)
        line_from = bisect.bisect_right(line_starts, start)
        line_to = bisect.bisect_right(line_starts, max(start, end - 1))
        meta = {**doc.metadata, "loc": {"lines": {"from": line_from, "to": line_to}}, "chunk": i, "totalChunks": total}
        h = bisect.bisect_right(head_pos, start + (len(piece) - len(piece.lstrip())))
        if h:
            meta["heading"] = heads[h - 1][1]
        chunks.append(Chunk(id=chunk_id(doc.id, i), text=piece, source=doc.id, chunk=i, metadata=meta,
                            sha256=Chunk.text_sha256(piece)))
    return chunks


def _heading_only(piece: str) -> bool:
    """Every non-blank line is a Markdown heading, a reST title or its under/overline."""
    lines = [line for line in piece.split("\n") if line.strip()]
    for i, line in enumerate(lines):
        if _MD_HEADING.match(line) or _RST_UNDERLINE.match(line):
            continue
        if i + 1 < len(lines) and _RST_UNDERLINE.match(lines[i + 1]):
            continue
        return False
    return bool(lines)


def _merge_thin(pieces: list[tuple[int, str]], text: str, counter: "TokenCounter",
                limit: int) -> list[tuple[int, str]]:
    """Pieces where one that is only a heading, or has fewer than MIN_CHUNK_TOKENS tokens, is joined with the piece
    after it (a heading belongs to what follows) or, for the last one, the piece before, as one span of the text;
    never past the model's limit. A heading alone ranks high for its words and answers nothing."""
    out = list(pieces)

    def thin(p: tuple[int, str]) -> bool:
        # few tokens *and* few characters: a long run the tokenizer maps to one [UNK] is not a small piece
        return _heading_only(p[1]) or (len(p[1]) < 8 * MIN_CHUNK_TOKENS and counter.count(p[1]) < MIN_CHUNK_TOKENS)

    def joined(a: tuple[int, str], b: tuple[int, str]) -> tuple[int, str] | None:
        if text[a[0]:a[0] + len(a[1])] != a[1] or text[b[0]:b[0] + len(b[1])] != b[1] or b[0] < a[0]:
            return None  # not located in the text: leave as is
        span = text[a[0]:max(a[0] + len(a[1]), b[0] + len(b[1]))]
        return (a[0], span) if counter.count(span) <= limit else None

    i = 0
    while i < len(out) and len(out) > 1:
        if not thin(out[i]):
            i += 1
            continue
        if i + 1 < len(out) and (m := joined(out[i], out[i + 1])) is not None:
            out[i : i + 2] = [m]
        elif i > 0 and (m := joined(out[i - 1], out[i])) is not None:
            out[i - 1 : i + 1] = [m]
            i -= 1
            if not thin(out[i]):
                i += 1
        else:
            i += 1
    return out


def chunk_documents(docs: Iterable[Document], counter: "TokenCounter", settings: ChunkSettings,
                    max_tokens: int) -> list[Chunk]:
    return [c for d in docs for c in chunk_document(d, counter, settings, max_tokens)]


def chunking_record(eff: ChunkSettings, tokenizer: str, sources: SourceOptions) -> dict:
    """The manifest's `chunking`: what decides the chunks (a change re-chunks the whole project)."""
    return {"chunker_version": CHUNKER_VERSION, "chunk_tokens": eff.chunk_tokens, "overlap_tokens": eff.overlap_tokens,
            "tokenizer": tokenizer, "splitter": "langchain-text-splitters recursive (by file type)",
            "secrets": sources.secrets}
