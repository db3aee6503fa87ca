"""Read existing vector stores safely: LangChain JS and LangChain Python FAISS stores, and this project's own stores.

`read_legacy_store(path)` returns a `LegacyStore`: the texts as `Chunk` records in the store's row order, plus a list
of `Problem`s (damage found, conversions made). Old vectors are never reused: of a flat FAISS index (what LangChain
writes) only the header is read, to learn the source dimension, the index type and the row count (`ntotal`); other
index types are parsed by faiss (memory-mapped) for the same three facts.

Formats (detected from the files present; `format=` forces one):

* ``woolocal``          ``manifest.json`` with ``"format": "woolocal-store"``: rows from ``chunks.parquet`` (via `Store`).
* ``langchain-js``      ``faiss.index`` + ``docstore.json`` = ``[[[id, {"pageContent", "metadata"}], ...], {"0": id}]``.
* ``langchain-python``  ``index.faiss`` + ``index.pkl`` = pickle of ``(InMemoryDocstore, {row: id})``.

Pickles are never loaded with `pickle.load`. `_RestrictedUnpickler` resolves only the LangChain docstore and Document
classes (current and older module names), each to an inert stand-in defined here that keeps whatever state the pickle
holds and runs no code of the real class, plus a short list of plain value types metadata is known to hold
(`datetime` types, `decimal.Decimal`, `pathlib` paths rebuilt as pure paths, numpy scalars of plain numeric dtypes,
`set`/`frozenset`/`bytearray`/`complex`, `collections.OrderedDict`). Any other global (``os.system``,
``builtins.eval``, ``subprocess.Popen``, ...) is refused *before* anything is called: `LegacyStoreError` names the
global (``module.name``) and the file. LangChain itself is never imported.

Metadata conversion rule (so every chunk's metadata is plain JSON); each kind of conversion is reported once per store
as a recoverable `Problem` (kind ``metadata_converted``, `detail` = the conversion, `ids` = the chunks affected):

==============================  ==============================================================  ==========
value                           becomes                                                         detail
==============================  ==============================================================  ==========
datetime / date / time          ISO 8601 string (``datetime.isoformat()``)                      datetime
timedelta                       seconds, a float (``total_seconds()``)                          timedelta
decimal.Decimal                 its exact string (``"1.10"``)                                   decimal
pathlib path                    POSIX string (``as_posix()``)                                   path
tuple                           list                                                            tuple
set / frozenset                 list, sorted when the items are sortable, else as iterated      set
bytes / bytearray               base64 string (standard alphabet, padded; noted in the report)  bytes
numpy scalar                    the Python number (``.item()``; a numpy bool becomes a bool)    numpy
float NaN / +-Infinity          null                                                            nonfinite
non-string dict key             its JSON spelling (``1`` -> ``"1"``, ``True`` -> ``"true"``)    key
complex                         ``[real, imag]``                                                complex
a pickled LangChain record      a dict of its fields                                            object
a container inside itself       null where it repeats (pickles can hold cycles)                 cycle
metadata nested too deep         ``{}`` (the only loss; reported)                                too_deep
==============================  ==============================================================  ==========

Strings are kept exactly as stored, lone surrogates included (reported as ``lone_surrogate``; the store writer
replaces them with U+FFFD). Text is never truncated or dropped: a text longer than `LONG_TEXT_CHARS` is returned whole
and reported (``long_text``) so that a migration re-chunks it to the new model's limit.

Problem kinds (`Problem.kind`), `recoverable` meaning "every text the old store could return is still in `chunks`":

=====================  ===========  =======================================================================
kind                   recoverable  what
=====================  ===========  =======================================================================
empty                  yes          the index holds no vectors (ntotal 0; its dim is still reported)
count_mismatch         yes          index ntotal, mapping size and docstore size disagree (details follow)
duplicate_id           yes          several rows map to one id: kept once (first row), later rows are stale
no_vector              yes          docstore entries no row maps to: returned as chunks after the mapped rows
missing_text           **no**       rows whose id has no docstore entry: no text to recover
unmapped_row           **no**       index rows no mapping entry names: a vector without id or text
row_out_of_range       yes          mapping rows at or beyond ntotal (or not integers): text still returned
duplicate_docstore_id  yes          one id listed twice in docstore.json: a differing text is kept too
bad_entry              no/yes       a docstore entry of the wrong shape (no usable text: not recoverable)
bad_mapping            yes          mapping values that are not strings (coerced)
empty_text             yes          an empty or whitespace-only text (kept)
long_text              yes          "long text: will be re-chunked to the new model's limit"
lone_surrogate         yes          ids, texts or metadata hold lone UTF-16 surrogates (kept as-is)
invalid_utf8           yes          docstore.json is not valid UTF-8 (bad bytes replaced by U+FFFD)
metadata_converted     yes          non-JSON metadata converted by the rule above (one per conversion)
inner_product          yes          IndexFlatIP: old scores were inner products, not L2 distances
unusual_index          yes          an index type other than IndexFlatL2/IndexFlatIP (vectors are not reused)
index_missing          yes          no index file (or unreadable): dim/ntotal unknown (None), texts returned
index_truncated        yes          the index file is shorter/longer than its header says
several_layouts        yes          both JS and Python files present; the one read is named
manifest_ignored       yes          a manifest.json beside LangChain files that is not readable JSON
store_verify           yes          a woolocal store failed `verify_store` (rows were still readable)
sha256_mismatch        yes          a woolocal row's sha256 differs from its text's (recomputed; rows whose
                                    text holds U+FFFD keep the writer's sha256 of the text before replacement)
=====================  ===========  =======================================================================
"""

from __future__ import annotations

import base64
import collections
import datetime as _dt
import decimal
import io
import json
import math
import os
import pathlib
import pickle
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from woolocal_ingest.chunking import Chunk
from woolocal_ingest.errors import StoreError, StoreNotFoundError
from woolocal_ingest.stores import DOCSTORE_JS, FORMAT, INDEX_JS, INDEX_PY, MANIFEST, PICKLE_PY

__all__ = [
    "FORMATS", "LONG_TEXT_CHARS", "DocumentRecord", "InMemoryDocstoreRecord", "LegacyStore", "LegacyStoreError",
    "Problem", "RefusedGlobalError", "UnknownStoreFormatError", "detect_format", "read_legacy_store", "safe_unpickle",
]

FORMATS = ("langchain-js", "langchain-python", "woolocal")
# Longer texts are flagged (never cut): no embedding model in use here takes ~10k characters in one input.
LONG_TEXT_CHARS = 10_000
_LIST_LIMIT = 10  # ids/rows named in one message


class LegacyStoreError(StoreError):
    """A store cannot be read at all (unsafe pickle, unparseable docstore, no texts); the message names the file."""


class UnknownStoreFormatError(LegacyStoreError, StoreNotFoundError):
    """The folder is missing or holds none of the files of a known store layout (bad input: exit 2)."""


@dataclass
class Problem:
    """One thing found while reading: `kind` is a fixed short code (see the module docstring), `message` names the
    rows/ids/file, `ids` the ids concerned, `rows` the faiss rows concerned, `detail` a sub-kind (for
    ``metadata_converted``: the conversion)."""

    kind: str
    message: str
    ids: list[str] = field(default_factory=list)
    recoverable: bool = True
    rows: list[int] = field(default_factory=list)
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LegacyStore:
    """What a store holds, read without trusting it: texts as `Chunk`s in row order, and the problems found."""

    format: str
    path: Path
    dim: int | None
    index_type: str | None
    ntotal: int | None
    chunks: list[Chunk]
    problems: list[Problem]
    model: str | None = None

    @property
    def unrecoverable(self) -> list[Problem]:
        return [p for p in self.problems if not p.recoverable]

    def problems_of(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]


# ---------------------------------------------------------------------------------------------------------------
# detection


def detect_format(path: str | os.PathLike) -> str:
    """The layout of a store folder, from the files it holds; `UnknownStoreFormatError` naming what was expected."""
    return _detect(Path(path))[0]


def _woolocal_manifest(p: Path) -> dict | None:
    mf = p / MANIFEST
    if not mf.is_file():
        return None
    try:
        m = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _detect(p: Path) -> tuple[str, list[Problem]]:
    if not p.is_dir():
        raise UnknownStoreFormatError(f"{p}: no such store folder")
    manifest = _woolocal_manifest(p)
    if manifest is not None and manifest.get("format") == FORMAT:
        return "woolocal", []
    js = (p / INDEX_JS).is_file() or (p / DOCSTORE_JS).is_file()
    py = (p / INDEX_PY).is_file() or (p / PICKLE_PY).is_file()
    js_text, py_text = (p / DOCSTORE_JS).is_file(), (p / PICKLE_PY).is_file()
    pre: list[Problem] = []
    if (js or py) and (p / MANIFEST).is_file() and manifest is None:
        pre.append(Problem("manifest_ignored", f"{p / MANIFEST}: unreadable or not a JSON object; ignored (the "
                           "LangChain files beside it are read)"))
    if js and py:
        chosen = "langchain-js" if js_text or not py_text else "langchain-python"
        other = "langchain-python" if chosen == "langchain-js" else "langchain-js"
        return chosen, pre + [Problem("several_layouts", f"{p}: holds both LangChain JS ({INDEX_JS}/{DOCSTORE_JS}) and "
                                f"Python ({INDEX_PY}/{PICKLE_PY}) files; read the {chosen} layout, not the {other} one "
                                "(pass format= to choose)")]
    if js:
        return "langchain-js", pre
    if py:
        return "langchain-python", pre
    if (p / MANIFEST).is_file():
        raise UnknownStoreFormatError(
            f"{p / MANIFEST}: not a woolocal store manifest (format {(manifest or {}).get('format')!r}, expected "
            f"{FORMAT!r}) and no LangChain store files beside it ({INDEX_JS} + {DOCSTORE_JS}, or {INDEX_PY} + {PICKLE_PY})")
    raise UnknownStoreFormatError(
        f"{p}: not a store folder: expected a LangChain JS store ({INDEX_JS} + {DOCSTORE_JS}), a LangChain Python store "
        f"({INDEX_PY} + {PICKLE_PY}) or a woolocal store ({MANIFEST} + chunks.parquet); found "
        + (", ".join(sorted(x.name for x in p.iterdir())[:10]) or "an empty folder"))


def read_legacy_store(path: str | os.PathLike, format: str | None = None,
                      long_text_chars: int = LONG_TEXT_CHARS) -> LegacyStore:
    """Read a LangChain JS, LangChain Python or woolocal store into `Chunk`s + `Problem`s, safely (see module doc).

    Raises `UnknownStoreFormatError` when the folder holds no known layout, `LegacyStoreError` when the texts cannot
    be read at all (refused pickle global, unparseable docstore, index without docstore). Everything short of that is
    returned as a `Problem`, never an exception, and no recoverable text is dropped.
    """
    p = Path(path).expanduser()
    if format is None:
        format, pre = _detect(p)
    else:
        if format not in FORMATS:
            raise LegacyStoreError(f"unknown store format {format!r}; one of {', '.join(FORMATS)}")
        if not p.is_dir():
            raise UnknownStoreFormatError(f"{p}: no such store folder")
        pre = []
    if format == "woolocal":
        store = _read_woolocal(p)
    elif format == "langchain-js":
        store = _read_js(p)
    else:
        store = _read_python(p)
    store.problems[:0] = pre
    _text_checks(store, long_text_chars)
    return store


# ---------------------------------------------------------------------------------------------------------------
# FAISS index header: dim, ntotal, type; the vectors themselves are not read


_FLAT = {b"IxF2": "IndexFlatL2", b"IxFI": "IndexFlatIP", b"IxFl": "IndexFlat"}
_HEADER = struct.Struct("<4siqqq?i")  # fourcc, d, ntotal, dummy, dummy, is_trained, metric_type (37 bytes)
_METRIC_INNER_PRODUCT, _METRIC_L2 = 0, 1


@dataclass
class _IndexInfo:
    dim: int | None = None
    ntotal: int | None = None
    index_type: str | None = None
    metric: int | None = None


def _read_index_info(path: Path, problems: list[Problem]) -> _IndexInfo:
    """Dim, ntotal, type and metric from the index file's header (faiss `write_index_header` layout)."""
    name = path.name
    if not path.is_file():
        problems.append(Problem("index_missing", f"{name}: missing; the source dimension and row count are unknown "
                                "(texts are still read; old vectors are never reused)"))
        return _IndexInfo()
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER.size + 12)
    if len(head) >= _HEADER.size and head[:4] in _FLAT:
        fourcc, d, ntotal, _, _, _, metric = _HEADER.unpack_from(head)
        if d > 0 and ntotal >= 0:
            info = _IndexInfo(d, ntotal, _FLAT[fourcc], metric)
            if fourcc == b"IxFl" and metric in (_METRIC_INNER_PRODUCT, _METRIC_L2):
                info.index_type = "IndexFlatIP" if metric == _METRIC_INNER_PRODUCT else "IndexFlatL2"
            off = _HEADER.size + (4 if metric > 1 else 0)
            expect = off + 8 + 4 * d * ntotal
            stored = struct.unpack_from("<Q", head, off)[0] if len(head) >= off + 8 else None
            if size != expect or stored != d * ntotal:
                problems.append(Problem(
                    "index_truncated", f"{name}: header says {ntotal} vectors of dim {d} ({expect} bytes) but the file "
                    f"has {size} bytes; a save was interrupted? (the texts come from the docstore; vectors are not reused)"))
            return info
    # Another index type (IVF, HNSW, PQ, an IDMap ...): let faiss parse it (memory-mapped, read-only).
    try:
        import faiss

        flags = getattr(faiss, "IO_FLAG_MMAP", 0) | getattr(faiss, "IO_FLAG_READ_ONLY", 0)
        try:
            index = faiss.read_index(str(path), flags)
        except Exception:
            index = faiss.read_index(str(path))
        index = faiss.downcast_index(index)
        return _IndexInfo(int(index.d), int(index.ntotal), type(index).__name__, int(index.metric_type))
    except Exception as e:
        problems.append(Problem("index_missing", f"{name}: unreadable FAISS index ({type(e).__name__}: {e}); the source "
                                "dimension and row count are unknown (texts are still read)"))
        return _IndexInfo()


def _index_problems(info: _IndexInfo, file: str, problems: list[Problem]) -> None:
    if info.index_type is None:
        return
    if info.metric == _METRIC_INNER_PRODUCT or info.index_type == "IndexFlatIP":
        problems.append(Problem(
            "inner_product", f"{file}: {info.index_type} - the old store's scores were inner products (higher = "
            "closer; LangChain Python's load_local() does not save the distance strategy and defaults to Euclidean); "
            "the new store ranks by L2 over normalised vectors (cosine)"))
    elif info.index_type not in ("IndexFlatL2", "IndexFlat"):
        problems.append(Problem("unusual_index", f"{file}: index type {info.index_type} (metric {info.metric}); the "
                                "new store is a flat L2 index (the old vectors are not reused)"))
    if info.ntotal == 0:
        problems.append(Problem("empty", f"{file}: the index is empty (ntotal 0, dim {info.dim}); nothing to search "
                                "(LangChain JS aborts searching it)"))


# ---------------------------------------------------------------------------------------------------------------
# metadata: JSON by the rule in the module docstring


class _Converter:
    """Turns metadata into plain JSON, recording (once per conversion kind) which chunk ids and keys needed it."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[list[str], list[str]]] = {}  # detail -> (ids, key paths)
        self._id = ""
        self._path: set[int] = set()  # containers being converted (a pickle can hold cycles)

    def note(self, detail: str, where: str) -> None:
        ids, keys = self.seen.setdefault(detail, ([], []))
        if not ids or ids[-1] != self._id:
            ids.append(self._id)
        if where not in keys:
            keys.append(where)

    def metadata(self, value: Any, chunk_id: str) -> dict:
        self._id = chunk_id
        self._path.clear()
        try:
            out = self.convert(value, "metadata")
        except RecursionError:
            self.note("too_deep", "metadata")
            return {}
        return out if isinstance(out, dict) else {"value": out}

    def convert(self, v: Any, where: str) -> Any:
        if isinstance(v, (dict, list, tuple, set, frozenset, _Inert)):
            if id(v) in self._path:
                self.note("cycle", where)
                return None
            self._path.add(id(v))
            try:
                return self._convert(v, where)
            finally:
                self._path.discard(id(v))
        return self._convert(v, where)

    def _convert(self, v: Any, where: str) -> Any:  # noqa: C901 - one branch per rule
        if v is None or isinstance(v, str) or type(v) is bool:
            return v
        if type(v).__module__ == "numpy" or type(v).__module__.startswith("numpy."):
            item = getattr(v, "item", None)
            if callable(item) and getattr(v, "ndim", None) == 0:
                self.note("numpy", where)
                x = item()
                if isinstance(x, float) and not math.isfinite(x):
                    self.note("nonfinite", where)
                    return None
                return x if isinstance(x, (bool, int, float)) else self.convert(x, where)
        if isinstance(v, bool):
            return bool(v)
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            if math.isfinite(v):
                return float(v)
            self.note("nonfinite", where)
            return None
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    self.note("key", where)
                    k = _json_key(k)
                out[k] = self.convert(x, f"{where}.{k}")
            return out
        if isinstance(v, list):
            return [self.convert(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, tuple):
            self.note("tuple", where)
            return [self.convert(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, (set, frozenset)):
            self.note("set", where)
            items = [self.convert(x, f"{where}[]") for x in v]
            try:
                return sorted(items)
            except TypeError:
                return items
        if isinstance(v, (bytes, bytearray)):
            self.note("bytes", where)
            return base64.b64encode(bytes(v)).decode("ascii")
        if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
            self.note("datetime", where)
            return v.isoformat()
        if isinstance(v, _dt.timedelta):
            self.note("timedelta", where)
            return v.total_seconds()
        if isinstance(v, decimal.Decimal):
            self.note("decimal", where)
            return str(v)
        if isinstance(v, pathlib.PurePath):
            self.note("path", where)
            return v.as_posix()
        if isinstance(v, complex):
            self.note("complex", where)
            return [self.convert(v.real, where), self.convert(v.imag, where)]
        if isinstance(v, _Inert):
            self.note("object", where)
            return self.convert(dict(v.fields), where)
        self.note("other", where)  # not reachable from the pickles this module admits
        return str(v)

    def problems(self) -> list[Problem]:
        rule = {
            "datetime": "datetime/date/time -> ISO 8601 string",
            "timedelta": "timedelta -> seconds (float)",
            "decimal": "Decimal -> its exact string",
            "path": "path -> POSIX string",
            "tuple": "tuple -> list",
            "set": "set -> list (sorted when sortable)",
            "bytes": "bytes -> base64 string (standard alphabet, padded): decode with base64.b64decode",
            "numpy": "numpy scalar -> Python number",
            "nonfinite": "NaN/Infinity -> null",
            "key": "non-string dict key -> its JSON spelling",
            "complex": "complex -> [real, imag]",
            "object": "pickled record -> dict of its fields",
            "cycle": "a container holding itself -> null at the repeat",
            "too_deep": "metadata nested too deeply to convert -> {} (dropped)",
            "other": "unknown value -> str()",
        }
        out = []
        for detail, (ids, keys) in self.seen.items():
            out.append(Problem(
                "metadata_converted",
                f"non-JSON metadata converted: {rule.get(detail, detail)} in {_names(keys)} of {len(ids)} chunk(s) "
                f"({_names(ids)})", ids=list(ids), detail=detail))
        return out


def _json_key(k: Any) -> str:
    if k is None or isinstance(k, bool):
        return json.dumps(k)
    if isinstance(k, (int, float)):
        return json.dumps(k) if not isinstance(k, float) or math.isfinite(k) else str(k)
    return str(k)


def _names(items: Iterable[Any], limit: int = _LIST_LIMIT) -> str:
    items = list(items)
    head = ", ".join(str(x) for x in items[:limit])
    return head + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------------------------
# rows: the mapping decides the order; docstore entries give the texts


@dataclass
class _Entry:
    id: str
    text: Any
    metadata: Any


def _assemble(fmt: str, p: Path, index_file: str, text_file: str, info: _IndexInfo, entries: list[_Entry],
              mapping: dict[int, str], problems: list[Problem], model: str | None = None) -> LegacyStore:
    """Chunks in mapping row order (ids kept once), then docstore entries no row maps to; every damage reported."""
    conv = _Converter()
    ntotal = info.ntotal
    # -- docstore entries by id (first wins; a differing later text is kept too, under a suffixed id)
    by_id: dict[str, _Entry] = {}
    for e in entries:
        if e.id not in by_id:
            by_id[e.id] = e
            continue
        same = e.text == by_id[e.id].text and e.metadata == by_id[e.id].metadata
        if not same:
            n = 1
            while f"{e.id}#dup{n}" in by_id:
                n += 1
            new = _Entry(f"{e.id}#dup{n}", e.text, e.metadata)
            by_id[new.id] = new
        problems.append(Problem(
            "duplicate_docstore_id",
            f"{text_file}: id {e.id} is listed more than once; "
            + ("the copies are identical (kept once)" if same else f"the later, different text is kept as id {new.id}"),
            ids=[e.id]))
    # -- counts
    if ntotal is not None and not (ntotal == len(mapping) == len(entries)):
        problems.append(Problem(
            "count_mismatch", f"counts disagree: {index_file} ntotal {ntotal}, row->id mapping {len(mapping)}, "
            f"{text_file} {len(entries)} entries (a non-atomic save or a failed add/delete)"))
    elif ntotal is None and len(mapping) != len(entries):
        problems.append(Problem("count_mismatch", f"counts disagree: row->id mapping {len(mapping)}, {text_file} "
                                f"{len(entries)} entries"))

    chunks: list[Chunk] = []
    used: dict[str, int] = {}  # id -> first row
    stale: dict[str, list[int]] = {}
    missing: list[tuple[int, str]] = []
    out_of_range: list[tuple[int, str]] = []
    for row in sorted(mapping):
        id_ = mapping[row]
        if id_ in used:
            stale.setdefault(id_, []).append(row)
            continue
        used[id_] = row
        if ntotal is not None and not (0 <= row < ntotal):
            out_of_range.append((row, id_))
        e = by_id.get(id_)
        if e is None:
            missing.append((row, id_))
            continue
        ch = _chunk(e, row, conv, problems, text_file)
        if ch is not None:
            chunks.append(ch)
    for id_, rows in stale.items():
        problems.append(Problem(
            "duplicate_id",
            f"rows {used[id_]} and {_names(rows)} of the mapping all map to id {id_}: kept once (row {used[id_]}, with "
            f"its {text_file} text); stale row(s) {_names(rows)} dropped (their vectors belong to text the store does "
            "not hold, e.g. an add that failed on the duplicate id)", ids=[id_], rows=list(rows)))
    if missing:
        problems.append(Problem(
            "missing_text", f"{len(missing)} row(s) map to ids with no {text_file} entry, so no text to recover: "
            + _names(f"row {r} -> {i}" for r, i in missing), ids=[i for _, i in missing],
            recoverable=False, rows=[r for r, _ in missing]))
    if out_of_range:
        problems.append(Problem(
            "row_out_of_range", f"{len(out_of_range)} mapping row(s) lie beyond {index_file}'s {ntotal} vectors (their "
            "texts are returned): " + _names(f"row {r} -> {i}" for r, i in out_of_range),
            ids=[i for _, i in out_of_range], rows=[r for r, _ in out_of_range]))
    if ntotal is not None and ntotal > 0:
        mapped = {r for r in mapping if 0 <= r < ntotal}
        if len(mapped) < ntotal:
            unmapped = [r for r in range(ntotal) if r not in mapped]
            problems.append(Problem(
                "unmapped_row", f"{len(unmapped)} {index_file} row(s) have no mapping entry (a vector with no id or "
                f"text): rows {_names(unmapped)}", recoverable=False, rows=unmapped))
    # -- docstore entries no row maps to: text recoverable, returned after the mapped rows
    orphans = [e for e in list(by_id.values()) if e.id not in used]
    if orphans:
        for e in orphans:
            ch = _chunk(e, len(chunks), conv, problems, text_file)
            if ch is not None:
                chunks.append(ch)
        problems.append(Problem(
            "no_vector", f"{len(orphans)} {text_file} entr{'y has' if len(orphans) == 1 else 'ies have'} no row in the "
            f"mapping (no vector); their text is returned and will be embedded: {_names(e.id for e in orphans)}",
            ids=[e.id for e in orphans]))
    problems.extend(conv.problems())
    _index_problems(info, index_file, problems)
    return LegacyStore(format=fmt, path=p, dim=info.dim, index_type=info.index_type, ntotal=ntotal, chunks=chunks,
                       problems=problems, model=model)


def _chunk(e: _Entry, row: int, conv: _Converter, problems: list[Problem], text_file: str) -> Chunk | None:
    text = e.text
    if not isinstance(text, str):
        if text is None:
            problems.append(Problem("bad_entry", f"{text_file}: entry {e.id} has no text", ids=[e.id],
                                    recoverable=False))
            return None
        problems.append(Problem("bad_entry", f"{text_file}: entry {e.id} text is a {type(text).__name__}, not a "
                                "string (converted with str())", ids=[e.id]))
        text = str(text)
    raw = e.metadata if e.metadata is not None else {}
    if not isinstance(raw, dict):
        problems.append(Problem("bad_entry", f"{text_file}: entry {e.id} metadata is a {type(raw).__name__}, not an "
                                "object (kept under 'value')", ids=[e.id]))
    meta = conv.metadata(raw, e.id)
    source = meta.get("source")
    chunk = meta.get("chunk")
    return Chunk(id=e.id, text=text, source=source if isinstance(source, str) else "",
                 chunk=chunk if isinstance(chunk, int) and not isinstance(chunk, bool) else row,
                 metadata=meta, sha256=Chunk.text_sha256(text))


def _has_lone_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _any_surrogate(v: Any) -> bool:
    if isinstance(v, str):
        return _has_lone_surrogate(v)
    if isinstance(v, dict):
        return any(_any_surrogate(k) or _any_surrogate(x) for k, x in v.items())
    if isinstance(v, list):
        return any(_any_surrogate(x) for x in v)
    return False


def _text_checks(store: LegacyStore, long_text_chars: int) -> None:
    """Per-chunk checks common to every format: lone surrogates, long and empty texts."""
    sur, long, empty = [], [], []
    for c in store.chunks:
        where = [n for n, bad in (("id", _has_lone_surrogate(c.id)), ("text", _has_lone_surrogate(c.text)),
                                  ("metadata", _any_surrogate(c.metadata))) if bad]
        if where:
            sur.append((c.id, where))
        if len(c.text) > long_text_chars:
            long.append((c.id, len(c.text)))
        if not c.text.strip():
            empty.append(c.id)
    if sur:
        store.problems.append(Problem(
            "lone_surrogate", f"{len(sur)} chunk(s) hold lone UTF-16 surrogates (not valid UTF-8; kept as-is here, the "
            "store writer replaces them with U+FFFD): " + _names(f"{i} ({'/'.join(w)})" for i, w in sur),
            ids=[i for i, _ in sur]))
    if long:
        store.problems.append(Problem(
            "long_text", f"long text: will be re-chunked to the new model's limit ({len(long)} chunk(s) over "
            f"{long_text_chars} characters, returned whole: " + _names(f"{i} ({n} chars)" for i, n in long) + ")",
            ids=[i for i, _ in long]))
    if empty:
        store.problems.append(Problem("empty_text", f"{len(empty)} chunk(s) have empty or whitespace-only text (kept): "
                                      + _names(empty), ids=empty))


def _legacy_model(p: Path) -> str | None:
    """A model name from a manifest beside a LangChain store, when one says which model made it."""
    m = _woolocal_manifest(p)
    if not m:
        return None
    for key in ("model", "embeddingModel", "embedding_model", "modelName", "model_name"):
        v = m.get(key)
        if isinstance(v, str) and v:
            return v
        if isinstance(v, dict):
            for k in ("name", "model", "modelName"):
                if isinstance(v.get(k), str) and v[k]:
                    return v[k]
    return None


# ---------------------------------------------------------------------------------------------------------------
# LangChain JS: faiss.index + docstore.json


def _read_js(p: Path) -> LegacyStore:
    problems: list[Problem] = []
    doc_path = p / DOCSTORE_JS
    if not doc_path.is_file():
        raise LegacyStoreError(f"{doc_path}: missing: the {INDEX_JS} beside it holds only vectors, no texts to migrate")
    info = _read_index_info(p / INDEX_JS, problems)
    raw = doc_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8-sig", errors="replace")
        problems.append(Problem("invalid_utf8", f"{DOCSTORE_JS}: not valid UTF-8 (first bad byte at offset {e.start}); "
                                "bad bytes replaced by U+FFFD"))
    try:
        data = json.loads(text)
    except ValueError as e:
        raise LegacyStoreError(f"{doc_path}: not valid JSON ({e}); a save was interrupted?") from None
    if not (isinstance(data, list) and len(data) == 2 and isinstance(data[0], list) and isinstance(data[1], dict)):
        raise LegacyStoreError(f"{doc_path}: expected [[[id, {{pageContent, metadata}}], ...], {{\"0\": id, ...}}], "
                               f"found a {type(data).__name__}" + (f" of {len(data)} items" if isinstance(data, list) else ""))
    docs, raw_map = data
    entries: list[_Entry] = []
    for i, d in enumerate(docs):
        if isinstance(d, list) and len(d) == 2 and isinstance(d[1], dict):
            id_, doc = d
            text_v = doc.get("pageContent", doc.get("page_content"))
            entries.append(_Entry(id_ if isinstance(id_, str) else str(id_), text_v, doc.get("metadata")))
            if not isinstance(id_, str):
                problems.append(Problem("bad_entry", f"{DOCSTORE_JS}: entry {i} id {id_!r} is not a string (kept as "
                                        f"{str(id_)!r})", ids=[str(id_)]))
        else:
            problems.append(Problem("bad_entry", f"{DOCSTORE_JS}: entry {i} is not [id, {{pageContent, metadata}}]: "
                                    f"{json.dumps(d, ensure_ascii=True)[:200]}", recoverable=False))
    mapping = _normalise_mapping(raw_map, DOCSTORE_JS, problems)
    return _assemble("langchain-js", p, INDEX_JS, DOCSTORE_JS, info, entries, mapping, problems, _legacy_model(p))


def _normalise_mapping(raw_map: Any, file: str, problems: list[Problem]) -> dict[int, str]:
    mapping: dict[int, str] = {}
    bad_keys, bad_vals = [], []
    for k, v in raw_map.items():
        if isinstance(k, int) and not isinstance(k, bool):
            row = int(k)
        elif isinstance(k, str) and re.fullmatch(r"-?[0-9]+", k.strip()):
            row = int(k)
        else:
            bad_keys.append((k, v))
            continue
        if not isinstance(v, str):
            bad_vals.append((row, v))
            v = str(v)
        mapping[row] = v
    if bad_vals:
        problems.append(Problem("bad_mapping", f"{file}: mapping values that are not string ids (coerced with str()): "
                                + _names(f"row {r} -> {v!r}" for r, v in bad_vals), ids=[str(v) for _, v in bad_vals],
                                rows=[r for r, _ in bad_vals]))
    if bad_keys:
        # Their ids are still looked up: a docstore entry no row maps to is returned as a "no_vector" chunk.
        problems.append(Problem("row_out_of_range", f"{file}: mapping keys that are not row numbers (ignored; their "
                                "texts are returned as entries without a vector): "
                                + _names(f"{k!r} -> {v!r}" for k, v in bad_keys), ids=[str(v) for _, v in bad_keys]))
    return mapping


# ---------------------------------------------------------------------------------------------------------------
# LangChain Python: index.faiss + index.pkl, through a restricted unpickler


class _Inert:
    """A stand-in for a pickled class: keeps the state the pickle gives, runs no code of the real class."""

    _real = "?"
    fields: dict[str, Any] = {}  # read-only default for an object the pickle built without state (never mutated)
    args: tuple = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE / INST: arguments are kept, nothing is run
        self.fields: dict[str, Any] = {}
        self.args = args
        if kwargs:
            self.fields.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if "fields" not in self.__dict__:
            self.fields, self.args = {}, ()
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        if isinstance(state, dict):
            inner = state.get("__dict__")
            if isinstance(inner, dict):  # pydantic: {'__dict__', '__pydantic_extra__', '__pydantic_fields_set__', ...}
                self.fields.update({k: v for k, v in inner.items() if isinstance(k, str)})
                extra = state.get("__pydantic_extra__")
                if isinstance(extra, dict):
                    for k, v in extra.items():
                        self.fields.setdefault(str(k), v)
            else:
                self.fields.update({k: v for k, v in state.items() if isinstance(k, str)})
        if isinstance(slots, dict):
            self.fields.update({k: v for k, v in slots.items() if isinstance(k, str)})

    def __repr__(self) -> str:
        return f"<inert {self._real} {sorted(self.fields)}>"


class InMemoryDocstoreRecord(_Inert):
    """Stand-in for LangChain's `InMemoryDocstore`: `.docs` is its `_dict` ({id: Document})."""

    _real = "InMemoryDocstore"

    @property
    def docs(self) -> Any:
        return self.fields.get("_dict")


class DocumentRecord(_Inert):
    """Stand-in for LangChain's `Document`: `.page_content`, `.metadata`, `.id`."""

    _real = "Document"

    @property
    def page_content(self) -> Any:
        return self.fields.get("page_content", self.fields.get("pageContent"))

    @property
    def metadata(self) -> Any:
        return self.fields.get("metadata")

    @property
    def id(self) -> Any:
        return self.fields.get("id")


class _DTypeSpec:
    """Stand-in for `numpy.dtype(...)` while unpickling: records its arguments, builds nothing until validated."""

    def __init__(self, *args: Any) -> None:
        self.args, self.state = args, None

    def __setstate__(self, state: Any) -> None:
        self.state = state


_PLAIN_DTYPE = re.compile(r"^[biufc][0-9]{1,2}$")  # bool/int/uint/float/complex: no objects, strings, records


def _numpy_scalar(spec: Any, data: Any = None) -> Any:
    """`numpy._core.multiarray.scalar(dtype, bytes)` for plain numeric dtypes only."""
    import numpy as np

    code = spec.args[0] if isinstance(spec, _DTypeSpec) and spec.args else None
    if not isinstance(code, str) or not _PLAIN_DTYPE.match(code) or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"numpy scalar of dtype {code!r}: only plain numeric dtypes are read")
    order = spec.state[1] if isinstance(spec.state, tuple) and len(spec.state) > 1 else "|"
    if order not in ("<", ">", "=", "|"):
        raise pickle.UnpicklingError(f"numpy scalar: bad byte order {order!r}")
    dtype = np.dtype(code).newbyteorder(order if order in "<>" else "=")
    if dtype.itemsize != len(data):
        raise pickle.UnpicklingError(f"numpy scalar of dtype {code}: {len(data)} bytes, expected {dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype)[0]


def _pure_path(kind: type) -> Any:
    def make(*parts: Any) -> pathlib.PurePath:
        if not all(isinstance(x, str) for x in parts):
            raise pickle.UnpicklingError("path parts must be strings")
        return kind(*parts)

    make.__name__ = kind.__name__
    return make


def _codecs_encode(obj: Any, encoding: str = "utf-8", *_: Any) -> bytes:
    """Protocol-2 pickles spell bytes as `_codecs.encode(str, 'latin1')`; nothing else is accepted."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError(f"_codecs.encode only for latin1 bytes, not {encoding!r}")
    return obj.encode(encoding)


def _bytearray(*args: Any) -> bytearray:
    """`bytearray(bytes)` or `bytearray(str, encoding)` as pickles spell it; never `bytearray(size)`."""
    if not args:
        return bytearray()
    if isinstance(args[0], (bytes, bytearray)) and len(args) == 1:
        return bytearray(args[0])
    if isinstance(args[0], str) and len(args) == 2 and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0], args[1])
    raise pickle.UnpicklingError("bytearray only from bytes or a latin-1 string")


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """Protocol 0/1 objects (`copyreg._reconstructor`): only for this module's inert stand-ins."""
    if isinstance(cls, type) and issubclass(cls, _Inert) and base is object and state is None:
        return cls.__new__(cls)
    raise pickle.UnpicklingError(f"copyreg._reconstructor only rebuilds LangChain records, not {cls!r}")


_DOCSTORE_NAMES = [
    ("langchain_community.docstore.in_memory", "InMemoryDocstore"),
    ("langchain.docstore.in_memory", "InMemoryDocstore"),
]
_DOCUMENT_NAMES = [
    ("langchain_core.documents.base", "Document"),
    ("langchain_core.documents", "Document"),
    ("langchain.schema.document", "Document"),
    ("langchain.schema", "Document"),
    ("langchain.docstore.document", "Document"),
    ("langchain_community.docstore.document", "Document"),
]
_ALLOWED: dict[tuple[str, str], Any] = {
    **{k: InMemoryDocstoreRecord for k in _DOCSTORE_NAMES},
    **{k: DocumentRecord for k in _DOCUMENT_NAMES},
    ("datetime", "datetime"): _dt.datetime,
    ("datetime", "date"): _dt.date,
    ("datetime", "time"): _dt.time,
    ("datetime", "timedelta"): _dt.timedelta,
    ("datetime", "timezone"): _dt.timezone,
    ("decimal", "Decimal"): decimal.Decimal,
    ("numpy", "dtype"): _DTypeSpec,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
}
for _mod in ("pathlib", "pathlib._local"):
    for _name in ("PurePath", "PurePosixPath", "Path", "PosixPath"):
        _ALLOWED[(_mod, _name)] = _pure_path(pathlib.PurePosixPath)
    for _name in ("PureWindowsPath", "WindowsPath"):
        _ALLOWED[(_mod, _name)] = _pure_path(pathlib.PureWindowsPath)
for _mod in ("builtins", "__builtin__"):
    for _name, _obj in (("set", set), ("frozenset", frozenset), ("bytearray", _bytearray), ("complex", complex),
                        ("object", object)):
        _ALLOWED[(_mod, _name)] = _obj
del _mod, _name, _obj


class RefusedGlobalError(pickle.UnpicklingError):
    """The pickle names a global that is not on the allow-list (raised before anything is called)."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED` globals; LangChain classes become inert stand-ins. Never imports anything."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise RefusedGlobalError(str(module), str(name)) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"persistent id {pid!r} is not supported")


def safe_unpickle(data: bytes, file: str | os.PathLike = "<bytes>") -> Any:
    """Unpickle `data` with the restricted unpickler; `LegacyStoreError` names a refused global and the file."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except RefusedGlobalError as e:
        raise LegacyStoreError(
            f"{file}: refused to unpickle global {e.module}.{e.name}: only LangChain's InMemoryDocstore and Document "
            "(read as inert records) and plain metadata value types are allowed; nothing in the file was run"
        ) from None
    except LegacyStoreError:
        raise
    except Exception as e:  # malformed or truncated pickle, a rejected value type
        raise LegacyStoreError(f"{file}: not a readable LangChain docstore pickle ({type(e).__name__}: {e})") from None


def _read_python(p: Path) -> LegacyStore:
    problems: list[Problem] = []
    pkl = p / PICKLE_PY
    if not pkl.is_file():
        raise LegacyStoreError(f"{pkl}: missing: the {INDEX_PY} beside it holds only vectors, no texts to migrate")
    info = _read_index_info(p / INDEX_PY, problems)
    obj = safe_unpickle(pkl.read_bytes(), pkl)
    if not (isinstance(obj, tuple) and len(obj) == 2):
        raise LegacyStoreError(f"{pkl}: expected a pickled (InMemoryDocstore, {{row: id}}) pair, found "
                               f"{type(obj).__name__}")
    docstore, raw_map = obj
    docs = docstore.docs if isinstance(docstore, InMemoryDocstoreRecord) else docstore
    if not isinstance(docs, dict):
        raise LegacyStoreError(f"{pkl}: the docstore holds no {{id: Document}} dict (found {type(docs).__name__})")
    if not isinstance(raw_map, dict):
        raise LegacyStoreError(f"{pkl}: the row->id mapping is a {type(raw_map).__name__}, not a dict")
    entries: list[_Entry] = []
    for key, doc in docs.items():
        id_ = key if isinstance(key, str) else str(key)
        if isinstance(doc, DocumentRecord):
            entries.append(_Entry(id_, doc.page_content, doc.metadata))
        elif isinstance(doc, dict):
            entries.append(_Entry(id_, doc.get("page_content", doc.get("pageContent")), doc.get("metadata")))
        elif isinstance(doc, str):
            entries.append(_Entry(id_, doc, {}))
        else:
            problems.append(Problem("bad_entry", f"{PICKLE_PY}: docstore entry {id_} is a {type(doc).__name__}, not a "
                                    "Document", ids=[id_], recoverable=False))
    mapping = _normalise_mapping(raw_map, PICKLE_PY, problems)
    return _assemble("langchain-python", p, INDEX_PY, PICKLE_PY, info, entries, mapping, problems, _legacy_model(p))


# ---------------------------------------------------------------------------------------------------------------
# this project's own stores (local -> local migrations)


def _read_woolocal(p: Path) -> LegacyStore:
    from woolocal_ingest.stores import Store, verify_store

    try:
        store = Store(p)
        chunks = store.chunks()
    except StoreError as e:
        raise LegacyStoreError(f"{p}: woolocal store unreadable: {e}") from None
    problems = [Problem("store_verify", f"{p.name}: {msg}") for msg in verify_store(p)]
    bad_sha = []
    fixed = []
    for c in chunks:
        # The writer keeps the sha256 of the text as chunked, before lone surrogates became U+FFFD (ingest's change
        # detection compares it with freshly chunked text): such a row keeps its stored sha256.
        sha = Chunk.text_sha256(c.embed_text)  # of the text as embedded: with its title > heading context
        if c.sha256 != sha and "\ufffd" not in c.embed_text:
            bad_sha.append(c.id)
            c = Chunk(c.id, c.text, c.source, c.chunk, c.metadata, sha, c.context)
        fixed.append(c)
    if bad_sha:
        problems.append(Problem("sha256_mismatch", f"chunks.parquet: sha256 differs from the text's for "
                                f"{len(bad_sha)} row(s) (recomputed): {_names(bad_sha)}", ids=bad_sha))
    model = store.manifest.get("model")
    name = model.get("name") if isinstance(model, dict) else model if isinstance(model, str) else None
    info = _IndexInfo(store.dim, store.count, type(store.index).__name__, int(store.index.metric_type))
    _index_problems(info, INDEX_JS, problems)
    return LegacyStore(format="woolocal", path=p, dim=store.dim, index_type=info.index_type, ntotal=store.count,
                       chunks=fixed, problems=problems, model=name)
