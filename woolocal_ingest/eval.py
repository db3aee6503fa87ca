"""Retrieval evaluation: score a store's search modes on a labelled set of questions.

Two formats of labelled set:

- **BEIR** (a folder): `queries.jsonl` (`{"_id", "text"}` per line), `qrels/test.tsv` (`query-id  corpus-id  score`,
  with a header line) and, to build the store from, `corpus.jsonl` (`{"_id", "title", "text"}`).
  `write_beir_corpus` turns the corpus into one Markdown file per document (`# title`, then the text; file name: the
  document id, percent-encoded) for `woolocal ingest`.
- **Simple** (a `.tsv` file, or a folder holding `queries.tsv`): one question per line, `question<TAB>source` with
  more tab-separated sources when several files answer it; `#` lines are comments.

A store ranks chunks; a document's rank is the rank of its first chunk in the hits (the chunk's `source`
metadata names the document: the id itself, or the file the id was written to). Metrics, per mode, averaged over
the questions that have at least one relevant document: nDCG@10 (graded gains as in BEIR's pytrec_eval), Recall@10,
Recall@100 and MRR@10.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence
from urllib.parse import quote, unquote

from woolocal_ingest.errors import WoolocalError
from woolocal_ingest.retrieval import MODES

if TYPE_CHECKING:  # pragma: no cover
    from woolocal_ingest.stores import Store

__all__ = ["EvalError", "EvalReport", "EvalSet", "ModeScores", "evaluate", "load_eval_set", "write_beir_corpus"]

CHUNK_DEPTH = 1000  # chunks searched per question, enough for 100 distinct documents in practice


class EvalError(WoolocalError):
    """A labelled set that cannot be read: names the file, line and field."""

    exit_code = 2


@dataclass
class EvalSet:
    """Questions (id -> text) and what answers them (id -> {document id: grade > 0})."""

    path: Path
    format: str  # "beir" | "tsv"
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    @property
    def judged(self) -> list[str]:
        """Question ids with at least one relevant document, in file order."""
        return [q for q in self.queries if any(g > 0 for g in self.qrels.get(q, {}).values())]


def _jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    try:
        f = open(path, encoding="utf-8-sig")
    except OSError as e:
        raise EvalError(f"{path}: cannot read: {e}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise EvalError(f"{path}:{n}: not a JSON object ({e})") from None
            if not isinstance(obj, dict):
                raise EvalError(f"{path}:{n}: expected a JSON object, found {type(obj).__name__}")
            yield n, obj


def _field(path: Path, n: int, obj: Mapping, key: str) -> str:
    v = obj.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str) or (key == "_id" and not v):
        raise EvalError(f"{path}:{n}: field {key!r} is {v!r}, expected a string")
    return v


def _load_beir(folder: Path, split: str) -> EvalSet:
    qfile, rfile = folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"
    for f in (qfile, rfile):
        if not f.is_file():
            raise EvalError(f"{folder}: not a BEIR folder: {f.relative_to(folder)} is missing "
                            "(expected corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    queries = {_field(qfile, n, o, "_id"): _field(qfile, n, o, "text") for n, o in _jsonl(qfile)}
    qrels: dict[str, dict[str, int]] = {}
    with open(rfile, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if not line.strip() or (n == 1 and parts[0].strip().lower() in ("query-id", "query_id", "qid")):
                continue
            if len(parts) == 4:  # TREC style: qid 0 docid score
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise EvalError(f"{rfile}:{n}: expected query-id<TAB>corpus-id<TAB>score, found {len(parts)} "
                                f"field(s): {line.strip()[:80]!r}")
            try:
                grade = int(float(parts[2]))
            except ValueError:
                raise EvalError(f"{rfile}:{n}: score {parts[2]!r} is not a number") from None
            if parts[0] not in queries:
                raise EvalError(f"{rfile}:{n}: query-id {parts[0]!r} is not in {qfile.name}")
            qrels.setdefault(parts[0], {})[parts[1]] = grade
    return EvalSet(folder, "beir", {q: t for q, t in queries.items() if q in qrels}, qrels)


def _load_tsv(path: Path) -> EvalSet:
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as e:
        raise EvalError(f"{path}: cannot read: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) < 2 or not parts[0] or not all(parts[1:]):
            raise EvalError(f"{path}:{n}: expected question<TAB>source[<TAB>source...], found {line.strip()[:80]!r}")
        qid = f"q{n}"
        queries[qid] = parts[0]
        qrels[qid] = {s: 1 for s in parts[1:]}
    if not queries:
        raise EvalError(f"{path}: no questions (lines of question<TAB>source)")
    return EvalSet(path, "tsv", queries, qrels)


def load_eval_set(path: str | Path, split: str = "test") -> EvalSet:
    """A BEIR folder, a simple `.tsv` file or a folder holding `queries.tsv`; EvalError naming what is wrong."""
    p = Path(path)
    if p.is_file():
        return _load_tsv(p)
    if not p.is_dir():
        raise EvalError(f"{p}: no such file or folder (a BEIR folder or a queries.tsv)")
    if (p / "queries.jsonl").is_file() or (p / "qrels").is_dir():
        return _load_beir(p, split)
    if (p / "queries.tsv").is_file():
        return _load_tsv(p / "queries.tsv")
    raise EvalError(f"{p}: neither a BEIR folder (queries.jsonl, qrels/{split}.tsv) nor one holding queries.tsv")


def doc_file_name(doc_id: str) -> str:
    """The file a BEIR document is written to: its id, percent-encoded, `.md`."""
    return quote(doc_id, safe="") + ".md"


def write_beir_corpus(folder: str | Path, out: str | Path) -> int:
    """Write each document of `<folder>/corpus.jsonl` to `<out>/<id>.md` (`# title`, blank line, text) for
    `woolocal ingest`; returns the number written."""
    src, dst = Path(folder) / "corpus.jsonl", Path(out)
    if not src.is_file():
        raise EvalError(f"{folder}: corpus.jsonl is missing (a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/)")
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for line, obj in _jsonl(src):
        id_ = _field(src, line, obj, "_id")
        title = obj.get("title") or ""
        text = obj.get("text")
        if not isinstance(text, str) or not isinstance(title, str):
            raise EvalError(f"{src}:{line}: fields 'title' and 'text' must be strings (document {id_!r})")
        body = (f"# {' '.join(title.split())}\n\n" if title.strip() else "") + text.strip() + "\n"
        (dst / doc_file_name(id_)).write_text(body, encoding="utf-8")
        n += 1
    return n


def source_to_doc(source: str, known: set[str]) -> str:
    """The document id a chunk's `source` stands for: the source itself, or the id its file name encodes."""
    if source in known:
        return source
    name = source.rsplit("/", 1)[-1]
    stem = name[:-3] if name.endswith(".md") else name.rsplit(".", 1)[0] if "." in name else name
    for cand in (unquote(stem), stem, source.rsplit(".", 1)[0]):
        if cand in known:
            return cand
    return source


@dataclass
class ModeScores:
    """One mode's averages over the judged questions."""

    ndcg_10: float
    recall_10: float
    recall_100: float
    mrr_10: float
    ms_per_query: float  # the search alone (query embedding apart: EvalReport.embed_ms), at depth CHUNK_DEPTH
    misses: list[str] = field(default_factory=list)  # questions with no relevant document in the top 10
    ndcg_by_question: dict[str, float] = field(default_factory=dict)  # question id -> nDCG@10 (paired comparisons)

    def row(self) -> list[str]:
        return [f"{self.ndcg_10:.4f}", f"{self.recall_10:.4f}", f"{self.recall_100:.4f}", f"{self.mrr_10:.4f}",
                f"{self.ms_per_query:.1f}"]


@dataclass
class EvalReport:
    store: str
    dataset: str
    format: str
    questions: int
    modes: dict[str, ModeScores]
    embed_ms: float = 0.0  # median time to embed one question

    def to_dict(self) -> dict:
        return {"store": self.store, "dataset": self.dataset, "format": self.format, "questions": self.questions,
                "embed_ms": self.embed_ms, "modes": {m: asdict(s) for m, s in self.modes.items()}}

    def table(self) -> str:
        head = ["mode", "nDCG@10", "Recall@10", "Recall@100", "MRR@10", f"search ms (top {CHUNK_DEPTH})"]
        rows = [[m, *s.row()] for m, s in self.modes.items()]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([f"{self.dataset}: {self.questions} questions, store {self.store}; embedding a question: "
                          f"{self.embed_ms:.1f} ms (median)", fmt(head),
                          *[fmt(r) for r in rows]])


def _ndcg(ranked: Sequence[str], rel: Mapping[str, int], k: int = 10) -> float:
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((g for g in rel.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def rank_documents(hits: Iterable, known: set[str], limit: int = 100) -> list[str]:
    """Document ids in the order their first chunk appears in `hits`."""
    out: list[str] = []
    seen: set[str] = set()
    for h in hits:
        doc = source_to_doc(str(h.metadata.get("source") or h.id), known)
        if doc not in seen:
            seen.add(doc)
            out.append(doc)
            if len(out) >= limit:
                break
    return out


def evaluate(store: "Store", data: EvalSet, modes: Sequence[str] = MODES, depth: int = CHUNK_DEPTH) -> EvalReport:
    """Score each of `modes` of `store` on `data`'s judged questions."""
    for m in modes:
        if m not in MODES:
            raise EvalError(f"mode {m!r} is not one of {', '.join(MODES)}")
    known = {d for rel in data.qrels.values() for d in rel}
    sources = {str(meta.get("source")) for _, _, meta in store.rows}
    qids = data.judged
    if not qids:
        raise EvalError(f"{data.path}: no question has a relevant document")
    mapped = {source_to_doc(s, known) for s in sources}
    if sources and not (mapped & known):
        raise EvalError(f"{data.path}: none of its documents is a source of store {store.path} (e.g. "
                        f"{sorted(known)[0]!r} vs {sorted(sources)[0]!r}); was the store ingested from this corpus?")
    depth = min(depth, store.count)
    vectors = {}
    embedder = store.embedder  # loads the model (not timed)
    embedder.embed_query("warm up")
    embed_times = []
    for q in qids:
        t0 = time.perf_counter()
        vectors[q] = embedder.embed_query(data.queries[q])
        embed_times.append((time.perf_counter() - t0) * 1000)
    out: dict[str, ModeScores] = {}
    for m in modes:
        sums = [0.0, 0.0, 0.0, 0.0]
        misses = []
        per_q: dict[str, float] = {}
        t = time.perf_counter()
        for q in qids:
            rel = {d: g for d, g in data.qrels[q].items() if g > 0}
            hits = store.search(data.queries[q], k=depth, mode=m, vector=None if m == "lexical" else vectors[q])
            ranked = rank_documents(hits, known)
            top10 = ranked[:10]
            per_q[q] = _ndcg(ranked, data.qrels[q])
            sums[0] += per_q[q]
            sums[1] += len(rel.keys() & set(top10)) / len(rel)
            sums[2] += len(rel.keys() & set(ranked[:100])) / len(rel)
            first = next((i for i, d in enumerate(top10, 1) if d in rel), None)
            sums[3] += 1.0 / first if first else 0.0
            if first is None:
                misses.append(data.queries[q])
        ms = (time.perf_counter() - t) * 1000 / len(qids)
        n = len(qids)
        out[m] = ModeScores(*(round(x / n, 4) for x in sums), ms_per_query=round(ms, 2), misses=misses,
                            ndcg_by_question={q: round(v, 4) for q, v in per_q.items()})
    return EvalReport(str(store.path), str(data.path), data.format, len(qids), out,
                      embed_ms=round(statistics.median(embed_times), 2))
