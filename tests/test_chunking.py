"""Tests for woolocal_ingest.chunking: token-measured chunks that fit the model, and their LangChain-JS metadata.

Lengths are checked with the model's own Hugging Face tokenizer (special tokens included), independently of the
TokenCounter the chunker measures with; line ranges are checked against the files as they lie on disk.
"""

from __future__ import annotations

import base64
import random
import re
from pathlib import Path

import pytest

from woolocal_ingest.chunking import Chunk, ChunkSettings, chunk_document, chunk_id, effective_settings
from woolocal_ingest.documents import Document, discover, parse, read_source

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample-project"
WORDS = ("the garden soil compost water meter volunteers gather tomato seedling rake shovel blueberry north gate "
         "laundromat treasurer budget mulch drip line timer standpipe beds plot holders weeding").split()


@pytest.fixture(scope="module")
def hf_tokenizer(embedder):
    """The model's tokenizer as transformers loads it: what sentence-transformers really feeds the model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedder.info.path))


def model_len(tok, text: str) -> int:
    """Wordpieces the model sees for `text`, [CLS] and [SEP] included."""
    return len(tok(text, add_special_tokens=True, truncation=False)["input_ids"])


def make_doc(text: str, name: str = "doc.txt") -> Document:
    ext = name.rsplit(".", 1)[-1]
    kind = {"md": "md", "rst": "rst", "txt": "txt", "py": "code", "html": "html"}.get(ext, "txt")
    return Document(id=name, text=text, file_type=kind, sha256="0" * 64,
                    metadata={"source": name, "fileName": name.rsplit("/", 1)[-1], "fileType": ext})


def chunks_of(embedder, doc: Document, size: int = 200, overlap: int = 32) -> list[Chunk]:
    return chunk_document(doc, embedder.tokens, ChunkSettings(size, overlap), embedder.max_tokens)


def prose(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(n_words):
        w = rng.choice(WORDS)
        out.append(w + ("," if i % 11 == 5 else "") + ("." if i % 17 == 16 else ""))
    return " ".join(out)


def located(text: str, chunks: list[Chunk]) -> list[int]:
    """Start offset of each chunk in `text`, searched in order (each chunk starts after the previous one)."""
    starts, lo = [], 0
    for c in chunks:
        at = text.find(c.text, lo)
        assert at >= 0, f"chunk {c.chunk} is not a piece of the document text: {c.text[:80]!r}"
        starts.append(at)
        lo = at + 1
    return starts


def assert_covers(text: str, chunks: list[Chunk]) -> None:
    """Every non-whitespace character of `text` lies in some chunk: nothing was dropped."""
    covered = bytearray(len(text))
    for at, c in zip(located(text, chunks), chunks):
        covered[at : at + len(c.text)] = b"\1" * len(c.text)
    lost = [i for i, ch in enumerate(text) if not ch.isspace() and not covered[i]]
    assert not lost, f"{len(lost)} characters lost, first at {lost[0]}: {text[lost[0]:lost[0] + 40]!r}"


def assert_line_range(chunk: Chunk, file_text: str) -> None:
    """loc.lines.from/to are 1-based, the chunk's text lies within those lines, and the range is tight."""
    lines = file_text.split("\n")
    loc = chunk.metadata["loc"]["lines"]
    f, t = loc["from"], loc["to"]
    assert 1 <= f <= t <= len(lines), (chunk.source, chunk.chunk, loc, len(lines))
    body = chunk.text.strip()
    assert body in "\n".join(lines[f - 1 : t]), (chunk.source, chunk.chunk, loc, body[:80])
    if t > f:  # neither end line can be dropped
        assert body not in "\n".join(lines[f : t]), (chunk.source, chunk.chunk, loc, "first line not needed")
        assert body not in "\n".join(lines[f - 1 : t - 1]), (chunk.source, chunk.chunk, loc, "last line not needed")


# ---------------------------------------------------------------------------------------------------------------
# never longer than the model's max sequence length


def test_model_limits_are_read_from_model_files(embedder):
    assert embedder.max_tokens == 256
    assert embedder.tokens.special_tokens == 2
    eff = effective_settings(ChunkSettings(10_000, 5_000), embedder.tokens, embedder.max_tokens)
    assert eff.chunk_tokens == 254  # 256 less [CLS] and [SEP]
    assert eff.overlap_tokens < eff.chunk_tokens
    assert effective_settings(ChunkSettings(120, 20), embedder.tokens, embedder.max_tokens) == ChunkSettings(120, 20)


@pytest.mark.parametrize("size", [200, 5000])
@pytest.mark.parametrize("name", ["para.txt", "para.md"])
def test_long_line_free_paragraph_fits_the_model(embedder, hf_tokenizer, size, name):
    text = prose(4000, seed=1)
    assert "\n" not in text and model_len(hf_tokenizer, text) > 10 * 256
    chunks = chunks_of(embedder, make_doc(text, name), size=size, overlap=32)
    lens = [model_len(hf_tokenizer, c.text) for c in chunks]
    assert max(lens) <= 256, lens
    assert max(lens) <= min(size, 254) + 2
    assert max(lens) >= min(size, 254) - 20, "chunks should be filled up to the token budget, not cut tiny"
    assert len(chunks) > 10
    assert_covers(text, chunks)
    for c in chunks:
        assert c.metadata["loc"]["lines"] == {"from": 1, "to": 1}


def _cjk(n: int) -> str:
    rng = random.Random(3)
    return "".join(chr(rng.randrange(0x4E00, 0x4E00 + 2000)) for _ in range(n))


def _blob(n: int) -> str:
    rng = random.Random(4)
    return base64.b64encode(bytes(rng.randrange(256) for _ in range(n))).decode()[:n]


@pytest.mark.parametrize("make", [lambda: "a" * 5000, lambda: _blob(5000), lambda: _cjk(5000)],
                         ids=["one-letter", "base64", "cjk"])
def test_5000_chars_without_spaces_fit_the_model(embedder, hf_tokenizer, make):
    text = make()
    assert len(text) == 5000 and " " not in text and "\n" not in text
    for size in (200, 1000):
        chunks = chunks_of(embedder, make_doc(text, "blob.txt"), size=size, overlap=32)
        lens = [model_len(hf_tokenizer, c.text) for c in chunks]
        assert max(lens) <= 256, lens
        if len(set(text)) == 1:  # every piece looks alike: count characters instead of placing them
            assert all(set(c.text) == set(text) for c in chunks) and sum(len(c.text) for c in chunks) >= len(text)
        else:
            assert_covers(text, chunks)
        assert [c.chunk for c in chunks] == list(range(len(chunks)))
        assert all(c.metadata["totalChunks"] == len(chunks) for c in chunks)


def test_chunk_size_and_overlap_are_in_model_tokens(embedder):
    text = prose(1500, seed=2)
    tok = embedder.tokens
    small = chunks_of(embedder, make_doc(text), size=64, overlap=0)
    big = chunks_of(embedder, make_doc(text), size=160, overlap=0)
    assert max(tok.count(c.text) for c in small) <= 64
    assert max(tok.count(c.text) for c in big) <= 160
    assert len(small) > 2 * len(big)
    # overlap 0: consecutive chunks do not share text; overlap > 0: they do
    starts = located(text, small)
    assert all(starts[i] + len(small[i].text) <= starts[i + 1] for i in range(len(small) - 1))
    lapped = chunks_of(embedder, make_doc(text), size=64, overlap=24)
    starts = located(text, lapped)
    shared = [starts[i] + len(lapped[i].text) - starts[i + 1] for i in range(len(lapped) - 1)]
    # chunks start at sentence starts, so the overlap is whole sentences: there is one where a sentence fits in it
    assert sum(1 for s in shared if s > 0) >= len(shared) // 3, shared
    assert len(lapped) > len(small)


def _wrapped(text: str, width: int = 72) -> str:
    """Hard-wrapped at `width` like reST/Markdown sources: line breaks fall mid-sentence."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


@pytest.mark.parametrize("name", ["notes.txt", "guide.rst", "readme.md"])
def test_chunks_start_at_sentence_starts_in_hard_wrapped_prose(embedder, name):
    text = "\n\n".join(_wrapped(prose(300, seed=s)) for s in (3, 4))
    chunks = chunks_of(embedder, make_doc(text, name), size=64, overlap=16)
    assert len(chunks) > 8
    for c, start in zip(chunks[1:], located(text, chunks)[1:]):
        before = text[:start].rstrip(" ")
        assert before.rstrip().endswith(".") or before.endswith("\n\n"), (name, c.chunk, before[-30:], c.text[:40])
    # the old scheme (spaces and line breaks) cuts mid-sentence on the same text
    old = chunk_document(make_doc(text, name), embedder.tokens, ChunkSettings(64, 16, sentences=False, context=False),
                         embedder.max_tokens)
    assert any(not text[:s].rstrip().endswith(".") for s in located(text, old)[1:])


def test_a_sentence_longer_than_the_limit_is_cut_at_words(embedder):
    text = "Start here. " + " ".join(["compost"] * 120) + ". End."
    chunks = chunks_of(embedder, make_doc(text), size=40, overlap=0)
    assert len(chunks) >= 3
    assert all(embedder.tokens.count(c.text) <= 40 for c in chunks if "Start" not in c.text and "End" not in c.text)  # thin: merged
    assert {w for c in chunks for w in c.text.split()} == {"Start", "here.", "compost", "compost.", "End."}


def test_embedded_text_carries_title_and_heading_path(embedder):
    text = ("# Garden handbook\n\nIntro words about the garden and its members.\n\n## Watering\n\n"
            + prose(60, seed=5) + "\n\n### The meter\n\n" + prose(60, seed=6) + "\n")
    chunks = chunks_of(embedder, make_doc(text, "docs/handbook.md"), size=64, overlap=0)
    by_ctx = {c.context for c in chunks}
    assert "Garden handbook > Watering > The meter" in by_ctx and "Garden handbook > Watering" in by_ctx
    limit = embedder.max_tokens - embedder.tokens.special_tokens
    for c in chunks:
        assert c.text in text  # what is stored and shown is the plain chunk
        assert c.embed_text == f"{c.context}\n\n{c.text}"
        assert c.sha256 == Chunk.text_sha256(c.embed_text)  # vectors are reused by what was embedded
        assert embedder.tokens.count(c.embed_text) <= limit
    # a document without headings is titled by its file name; the context never pushes a full chunk over the limit
    plain = chunks_of(embedder, make_doc(prose(400, seed=7), "notes/plot-rules.txt"), size=250, overlap=0)
    assert {c.context for c in plain} <= {"plot-rules.txt", ""}
    assert all(embedder.tokens.count(c.embed_text) <= limit for c in plain)
    off = chunk_document(make_doc(text, "docs/handbook.md"), embedder.tokens, ChunkSettings(64, 0, context=False),
                         embedder.max_tokens)
    assert all(c.context == "" and c.sha256 == Chunk.text_sha256(c.text) for c in off)


# ---------------------------------------------------------------------------------------------------------------
# Markdown-aware splitting


def _sections(n: int) -> str:
    parts = []
    for k in range(n):
        parts.append(f"## Bed {k} notes\n\n{prose(25, seed=10 + k)}\n\n{prose(12, seed=50 + k)}\n")
    return "# Garden beds\n\n" + "\n".join(parts)


def test_markdown_splits_at_headings(embedder):
    text = _sections(10)
    tok = embedder.tokens
    section_tokens = tok.count(text.split("\n## ")[1])
    size = int(section_tokens * 1.5)  # one section fits, two do not
    md = chunks_of(embedder, make_doc(text, "beds.md"), size=size, overlap=0)
    txt = chunks_of(embedder, make_doc(text, "beds.txt"), size=size, overlap=0)
    # Markdown: every chunk after the first starts at a heading; plain text happily runs across section breaks.
    assert all(c.text.startswith("## Bed ") for c in md[1:]), [c.text[:30] for c in md]
    assert not all(c.text.startswith("## Bed ") for c in txt[1:])
    for c in md[1:]:
        assert c.metadata["heading"] == c.text.split("\n", 1)[0].removeprefix("## ")


def _md_heading_before(lines: list[str], line_no: int) -> str | None:
    fence = False
    found = None
    for i, line in enumerate(lines[:line_no]):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            continue
        m = re.match(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", line)
        if m and not fence:
            found = m.group(1).strip()
    return found


def test_heading_is_nearest_preceding_markdown_heading(embedder):
    text = (
        "Intro text before any heading, " + prose(60, seed=5) + "\n\n"
        "# Watering\n\n" + prose(150, seed=6) + "\n\n"
        "## Timers ##\n\n" + prose(150, seed=7) + "\n\n"
        "```bash\n# not a heading: a shell comment\nmake water\n```\n\n" + prose(120, seed=8) + "\n\n"
        "### Leaks\n\n" + prose(40, seed=9) + "\n"
    )
    chunks = chunks_of(embedder, make_doc(text, "water.md"), size=60, overlap=10)
    lines = text.split("\n")
    assert len(chunks) > 8
    seen = set()
    for c in chunks:
        assert_line_range(c, text)
        want = _md_heading_before(lines, c.metadata["loc"]["lines"]["from"])
        assert c.metadata.get("heading") == want, (c.chunk, c.text[:60])
        seen.add(want)
    assert seen == {None, "Watering", "Timers", "Leaks"}


def test_rst_underlined_titles_are_headings(embedder):
    text = (
        "=================\nWatering Schedule\n=================\n\n" + prose(80, seed=11) + "\n\n"
        "Overview\n========\n\n" + prose(120, seed=12) + "\n\n"
        "The meter\n---------\n\n" + prose(120, seed=13) + "\n"
    )
    chunks = chunks_of(embedder, make_doc(text, "guide.rst"), size=50, overlap=8)
    assert len(chunks) > 6
    lines = text.split("\n")
    rule = re.compile(r"([=\-])\1{2,}")
    starts = []  # (1-based line where the title block starts: its overline if it has one, title)
    for i in range(1, len(lines)):
        if rule.fullmatch(lines[i]) and lines[i - 1].strip() and not rule.fullmatch(lines[i - 1]):
            over = i >= 2 and rule.fullmatch(lines[i - 2]) is not None
            starts.append((i - 1 if over else i, lines[i - 1]))
    assert [t for _, t in starts] == ["Watering Schedule", "Overview", "The meter"]
    for c in chunks:
        assert_line_range(c, text)
        first = c.metadata["loc"]["lines"]["from"]
        want = [t for line, t in starts if line <= first]
        assert c.metadata.get("heading") == (want[-1] if want else None), (c.chunk, c.text[:60])
    assert {c.metadata.get("heading") for c in chunks} == {"Watering Schedule", "Overview", "The meter"}
    # a chunk begins with its section's title, never with the title's underline; the path nests by adornment
    assert not any(rule.match(c.text.lstrip()) and c.chunk for c in chunks)
    assert {c.context for c in chunks} >= {"Watering Schedule > Overview", "Watering Schedule > Overview > The meter"}


# ---------------------------------------------------------------------------------------------------------------
# metadata, line ranges, ids


def test_repeated_lines_get_their_own_line_numbers(embedder):
    """Identical rows (logs, CSVs): each chunk's line range must be where that chunk is, in order, not the first
    place its text happens to occur."""
    rows = [f"row {i % 5}: watered, weeded and mulched the bed" for i in range(60)]
    text = "\n".join(rows) + "\n"
    for size, overlap in ((40, 20), (40, 0), (100, 30)):
        chunks = chunks_of(embedder, make_doc(text, "log.txt"), size=size, overlap=overlap)
        spans = [(c.metadata["loc"]["lines"]["from"], c.metadata["loc"]["lines"]["to"]) for c in chunks]
        for c in chunks:
            assert_line_range(c, text)
        assert spans == sorted(spans), spans
        assert spans[0][0] == 1 and spans[-1][1] == 60
        assert all(b[0] <= a[1] + 1 for a, b in zip(spans, spans[1:])), f"lines skipped: {spans}"
        if overlap == 0:
            assert all(b[0] == a[1] + 1 for a, b in zip(spans, spans[1:])), spans


def _sample_files() -> list[Path]:
    if not SAMPLE.is_dir():
        pytest.skip("data/sample-project missing")
    paths, _ = discover(SAMPLE)
    return paths


def test_sample_project_chunks(embedder, hf_tokenizer):
    """Every file of the sample project: metadata as LangChain JS writes it, lengths within the model, and line
    ranges that point into the file on disk (text formats) or into the extracted text (HTML, PDF)."""
    paths = _sample_files()
    assert len(paths) >= 8
    all_ids = set()
    for p in paths:
        doc = parse(read_source(SAMPLE, p))
        chunks = chunks_of(embedder, doc)
        assert chunks, doc.id
        ids = [c.id for c in chunks]
        assert len(set(ids)) == len(ids)
        all_ids.update(ids)
        on_disk = p.read_bytes().decode("utf-8-sig").replace("\r\n", "\n") if doc.file_type not in ("pdf", "html") \
            else doc.text
        for i, c in enumerate(chunks):
            m = c.metadata
            assert c.chunk == m["chunk"] == i
            assert m["totalChunks"] == len(chunks)
            assert c.source == m["source"] == doc.id == p.relative_to(SAMPLE).as_posix()
            assert c.id == chunk_id(doc.id, i)
            assert c.sha256 == Chunk.text_sha256(c.embed_text) and c.context
            assert c.text.strip() and c.text == c.text.strip()
            assert model_len(hf_tokenizer, c.embed_text) <= 256  # what is embedded fits: context included
            assert_line_range(c, on_disk)
        assert_covers(doc.text, chunks)
        if doc.file_type == "md":
            assert all("heading" in c.metadata for c in chunks if c.chunk > 0), doc.id
    assert len(all_ids) > 40


def test_chunking_is_deterministic(embedder):
    text = _sections(6)
    a = chunks_of(embedder, make_doc(text, "x.md"), size=80, overlap=16)
    b = chunks_of(embedder, make_doc(text, "x.md"), size=80, overlap=16)
    assert [(c.id, c.text, c.metadata) for c in a] == [(c.id, c.text, c.metadata) for c in b]
    other = chunks_of(embedder, make_doc(text, "y.md"), size=80, overlap=16)
    assert {c.id for c in a}.isdisjoint({c.id for c in other}), "ids must depend on the source"
