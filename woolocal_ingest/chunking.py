"""Cut Documents into Chunks measured in the embedding model's own tokens, with LangChain-JS-shaped metadata."""

from __future__ import annotations

import bisect
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
# 4: boundaries at sentence ends before line breaks and spaces; the embedded text is the chunk prefixed by its
#    document's title and heading path (`Chunk.context`), while the stored text stays the plain chunk.
CHUNKER_VERSION = 4
MAX_CONTEXT_TOKENS = 48  # the title/heading prefix is cut to this many tokens (and never pushes a chunk past the limit)
# A sentence ends at . ! ? (optionally closed by a quote or bracket) followed by whitespace; "e.g." and "i.e." do not
# end one. A zero-width-then-space separator, so the splitter cuts between sentences and keeps both intact.
# Before a reST section title (optionally overlined): LangChain's reST separators cut at the underline, which leaves
# the title at the end of one chunk and its underline at the start of the next.
_ADORN = r"[=\-~^\"'`#*+:.<>_]{3,}[ \t]*"
RST_SECTION = rf"\n\n+(?=(?:{_ADORN}\n)?[^\n]+\n{_ADORN}(?:\n|$))"
SENTENCE_END = r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))(?<!\be\.g\.)(?<!\bi\.e\.)\s+"
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
    sentences: bool = True  # cut at sentence ends before line breaks and spaces (CHUNKER_VERSION 4)
    context: bool = True  # embed each chunk with its title > heading path prefix (CHUNKER_VERSION 4)

    def scheme(self) -> str:
        """The boundary and embedded-text scheme these settings chunk by (recorded in the manifest)."""
        return "+".join(["sentences" if self.sentences else "spaces"] + (["context"] if self.context else []))


@dataclass(frozen=True)
class Chunk:
    """One row of a store: its text (what LangChain's `pageContent` holds, shown and cited), where it came from, its
    JSON metadata, and the `context` (document title > heading path) embedded in front of the text. `sha256` is of
    the embedded text (`embed_text`): vectors are reused and cached by what was really embedded."""

    id: str
    text: str
    source: str
    chunk: int
    metadata: dict = field(hash=False, compare=True)
    sha256: str = ""
    context: str = ""

    @property
    def embed_text(self) -> str:
        """What the model embeds: `context` and a blank line before the text (the text alone without context)."""
        return embed_text(self.context, self.text)

    @staticmethod
    def text_sha256(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def embed_text(context: str, text: str) -> str:
    """The text a chunk is embedded (and lexically indexed) as: its context, a blank line, its text."""
    return f"{context}\n\n{text}" if context else text


def chunk_id(source: str, index: int) -> str:
    """A stable UUID-shaped id for chunk `index` of `source` (the same scheme as LangChain JS fixtures here)."""
    return str(uuid.UUID(bytes=hashlib.sha256(f"{source}#{index}".encode("utf-8", "surrogatepass")).digest()[:16],
                          version=4))


def _headings(doc: Document) -> list[tuple[int, int, str]]:
    """(offset, level, heading text) for each heading of a Markdown/HTML or reStructuredText document (reST levels in
    the order its adornment styles first appear, as docutils assigns them)."""
    text = doc.text
    kind = str(doc.metadata.get("fileType", doc.file_type)).lower()
    if kind not in _HEADED:
        return []  # code comments and CSV rows are not headings
    if kind == "rst":
        out, lines, pos = [], text.split("\n"), 0
        offsets, styles = [], {}
        for line in lines:
            offsets.append(pos)
            pos += len(line) + 1
        for i in range(1, len(lines)):
            title, under = lines[i - 1].strip(), lines[i]
            if title and _RST_UNDERLINE.match(under) and len(under.rstrip()) >= len(title) and not _RST_UNDERLINE.match(title):
                over = i >= 2 and _RST_UNDERLINE.match(lines[i - 2]) is not None  # over- and underlined title
                level = styles.setdefault((under.strip()[0], over), len(styles) + 1)
                out.append((offsets[i - 2] if over else offsets[i - 1], level, title))
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
                out.append((pos, len(m.group(1)), m.group(2).strip()))
        pos += len(line) + 1
    return out


def separators(file_type: str, sentences: bool = True) -> list[str]:
    """The splitter's separators (regexes), coarsest first: LangChain's for the file's language, with sentence ends
    tried before line breaks and spaces. For prose (Markdown, reST, plain text) sentence ends come right after
    blank lines: hard-wrapped paragraphs break lines mid-sentence. For code and CSV (a line is a row) they come
    after line breaks."""
    lang = LANGUAGE_BY_TYPE.get(file_type)
    if lang is None:
        seps = [re.escape(x) for x in ("\n\n", "\n", " ")] + [""]
    elif lang == Language.RST and sentences:
        seps = [RST_SECTION, "\n\n.. *\n\n", "\n\n", "\n", " ", ""]
    else:
        seps = list(RecursiveCharacterTextSplitter.get_separators_for_language(lang))
    if not sentences:
        return seps
    prose = lang in (Language.MARKDOWN, Language.RST) or (lang is None and file_type not in ("csv", "tsv"))
    at = seps.index(re.escape("\n") if lang is None else "\n") + (0 if prose else 1)
    return seps[:at] + [SENTENCE_END] + seps[at:]


def _splitter(file_type: str, settings: ChunkSettings, counter: "TokenCounter") -> RecursiveCharacterTextSplitter:
    return RecursiveCharacterTextSplitter(
        separators=separators(file_type, settings.sentences), is_separator_regex=True,
        chunk_size=settings.chunk_tokens, chunk_overlap=settings.overlap_tokens,
        length_function=counter.count, add_start_index=True, strip_whitespace=True)


def effective_settings(settings: ChunkSettings, counter: "TokenCounter", max_tokens: int) -> ChunkSettings:
    """Settings capped so that no chunk (plus the model's special tokens) exceeds its max sequence length."""
    limit = max_tokens - counter.special_tokens
    size = min(settings.chunk_tokens, limit)
    return ChunkSettings(chunk_tokens=size, overlap_tokens=min(settings.overlap_tokens, size // 2),
                         sentences=settings.sentences, context=settings.context)


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
    paths = _heading_paths(heads)
    title = _title(doc, heads)
    total = len(pieces)
    chunks = []
    for i, (start, piece) in enumerate(pieces):
        end = start + len(piece)
        line_from = bisect.bisect_right(line_starts, start)
        line_to = bisect.bisect_right(line_starts, max(start, end - 1))
        meta = {**doc.metadata, "loc": {"lines": {"from": line_from, "to": line_to}}, "chunk": i, "totalChunks": total}
        h = bisect.bisect_right(head_pos, start + (len(piece) - len(piece.lstrip())))
        if h:
            meta["heading"] = heads[h - 1][2]
        ctx = _context(title, paths[h - 1] if h else [], piece, counter, limit) if eff.context else ""
        chunks.append(Chunk(id=chunk_id(doc.id, i), text=piece, source=doc.id, chunk=i, metadata=meta,
                            sha256=Chunk.text_sha256(embed_text(ctx, piece)), context=ctx))
    return chunks


def _heading_paths(heads: list[tuple[int, int, str]]) -> list[list[str]]:
    """For each heading, the titles from the outermost section down to it."""
    stack: list[tuple[int, str]] = []
    out = []
    for _, level, title in heads:
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        out.append([t for _, t in stack])
    return out


def _title(doc: Document, heads: list[tuple[int, int, str]]) -> str:
    """A document's title: its first outermost heading, else its file name."""
    if heads:
        top = min(h[1] for h in heads)
        return next(h[2] for h in heads if h[1] == top)
    return str(doc.metadata.get("fileName") or doc.id.rsplit("/", 1)[-1])


def _context(title: str, path: list[str], piece: str, counter: "TokenCounter", limit: int) -> str:
    """`Title > Section > Subsection` for a chunk, cut to MAX_CONTEXT_TOKENS and to what the model's limit leaves
    beside the chunk (outer sections go first, then the title; no context when nothing fits)."""
    parts = path if path and path[0] == title else [title, *path]
    parts = [" ".join(p.split()) for p in parts if p.strip()]
    room = min(MAX_CONTEXT_TOKENS, limit - counter.count(piece) - 2)  # 2: the blank line's tokens, to be safe
    while parts:
        ctx = " > ".join(parts)
        if counter.count(ctx) <= room:
            return ctx
        parts = parts[:1] + parts[2:] if len(parts) > 2 else parts[1:]  # drop the outermost section below the title
    return ""


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


def chunking_record(eff: ChunkSettings, tokenizer: str, sources: SourceOptions) -> dict:
    """The manifest's `chunking`: what decides the chunks (a change re-chunks the whole project)."""
    return {"chunker_version": CHUNKER_VERSION, "chunk_tokens": eff.chunk_tokens, "overlap_tokens": eff.overlap_tokens,
            "tokenizer": tokenizer, "scheme": eff.scheme(),
            "splitter": "langchain-text-splitters recursive (by file type), sentence ends before line breaks",
            "secrets": sources.secrets}
