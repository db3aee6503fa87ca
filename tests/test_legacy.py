"""Reading legacy stores (woolocal_ingest.legacy): the real LangChain JS/Python fixtures under
../shared/fixtures/legacy-stores, every edge store's documented damage, the restricted unpickler, and this project's
own stores. Fast: no models."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import pickle
import pickletools
import subprocess
import sys
import types
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from woolocal_ingest.chunking import Chunk
from woolocal_ingest.errors import StoreError, StoreNotFoundError
from woolocal_ingest.legacy import (
    DocumentRecord, InMemoryDocstoreRecord, LegacyStore, LegacyStoreError, UnknownStoreFormatError, detect_format,
    read_legacy_store, safe_unpickle,
)

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("WOOLOCAL_SHARED", REPO.parent / "shared"))
FIX = SHARED / "fixtures" / "legacy-stores"
needs_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason=f"shared fixtures not found at {FIX} (set WOOLOCAL_SHARED)")


def note(name: str) -> dict:
    return json.loads((FIX / "edge" / name / "NOTE.json").read_text(encoding="utf-8"))


def kinds(store: LegacyStore) -> list[str]:
    return [p.kind for p in store.problems]


def one(store: LegacyStore, kind: str):
    found = store.problems_of(kind)
    assert len(found) == 1, (kind, store.problems)
    return found[0]


def as_rows(store: LegacyStore) -> list[dict]:
    return [{"row": i, "id": c.id, "source": c.source, "chunk": c.chunk, "text": c.text, "metadata": c.metadata,
             "sha256": c.sha256} for i, c in enumerate(store.chunks)]


@pytest.fixture(scope="module")
def expected() -> list[dict]:
    if not FIX.is_dir():
        pytest.skip(f"shared fixtures not found at {FIX}")
    return [json.loads(line) for line in (FIX / "expected_chunks.jsonl").read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# the two real 1536-d stores


@needs_fixtures
@pytest.mark.parametrize("name,fmt", [("js_openai1536_store", "langchain-js"), ("py_openai1536_store", "langchain-python")])
def test_real_store_gives_exactly_the_expected_chunks(name, fmt, expected):
    store = read_legacy_store(FIX / name)
    assert store.format == fmt == detect_format(FIX / name)
    assert (store.dim, store.index_type, store.ntotal, store.model) == (1536, "IndexFlatL2", 219, None)
    assert len(expected) == 219
    assert as_rows(store) == expected  # ids, texts, metadata, source, chunk, sha256, in row order
    assert store.problems == []
    assert all(c.sha256 == Chunk.text_sha256(c.text) for c in store.chunks)


@needs_fixtures
def test_rows_follow_the_mapping_not_the_docstore_order(tmp_path, expected):
    """Shuffle docstore.json's entries: the chunks still come in the mapping's row order."""
    docs, mapping = json.loads((FIX / "js_openai1536_store" / "docstore.json").read_text(encoding="utf-8"))
    rng = np.random.default_rng(0)
    shuffled = [docs[i] for i in rng.permutation(len(docs))]
    (tmp_path / "faiss.index").write_bytes((FIX / "js_openai1536_store" / "faiss.index").read_bytes())
    (tmp_path / "docstore.json").write_text(json.dumps([shuffled, mapping]), encoding="utf-8")
    store = read_legacy_store(tmp_path)
    assert [c.id for c in store.chunks] == [e["id"] for e in expected]
    assert store.problems == []


@needs_fixtures
def test_python_pickle_is_read_as_inert_records_never_with_pickle_load(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("pickle.load/loads must not be used")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    docstore, mapping = safe_unpickle((FIX / "py_openai1536_store" / "index.pkl").read_bytes())
    assert type(docstore) is InMemoryDocstoreRecord
    assert len(docstore.docs) == 219 and all(type(d) is DocumentRecord for d in docstore.docs.values())
    assert mapping[0] == "b34262e6-4d2a-4a9b-99bd-56dca5727e1b"
    assert read_legacy_store(FIX / "py_openai1536_store").ntotal == 219


@needs_fixtures
def test_reader_needs_no_langchain():
    """In a fresh interpreter where langchain_community / langchain cannot be imported, the Python store reads."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('langchain_community', 'langchain'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from woolocal_ingest.legacy import read_legacy_store\n"
        f"s = read_legacy_store({str(FIX / 'py_openai1536_store')!r})\n"
        "assert len(s.chunks) == 219 and s.dim == 1536, s\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('langchain_community', 'langchain')]\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# edge stores: what each NOTE.json documents


@needs_fixtures
def test_edge_js_deleted_reads_cleanly():
    n = note("js_deleted")
    store = read_legacy_store(FIX / "edge" / "js_deleted")
    assert store.ntotal == n["ntotal"] == len(store.chunks) == n["docstore"]
    ids = [c.id for c in store.chunks]
    assert not set(ids) & set(n["deleted_ids"])
    _, mapping = json.loads((FIX / "edge" / "js_deleted" / "docstore.json").read_text(encoding="utf-8"))
    assert ids == [mapping[str(i)] for i in range(n["ntotal"])]
    assert store.problems == []


@needs_fixtures
def test_edge_js_dup_id_keeps_the_id_once_and_reports_the_stale_row():
    n = note("js_dup_id")
    store = read_legacy_store(FIX / "edge" / "js_dup_id")
    assert (store.ntotal, store.dim) == (n["ntotal"], 1536)
    stale, dup_id = n["stale_row"], n["stale_row_maps_to"]
    want = [n["mapping"][str(r)] for r in range(n["ntotal"]) if r != stale]
    assert [c.id for c in store.chunks] == want and len(want) == n["docstore"]
    assert [c.id for c in store.chunks].count(dup_id) == 1
    docs, _ = json.loads((FIX / "edge" / "js_dup_id" / "docstore.json").read_text(encoding="utf-8"))
    by_id = {i: d for i, d in docs}
    assert all(c.text == by_id[c.id]["pageContent"] and c.metadata == by_id[c.id]["metadata"] for c in store.chunks)
    assert n["stale_row_vector_is_for_text_of"] not in [c.id for c in store.chunks]
    p = one(store, "duplicate_id")
    assert p.ids == [dup_id] and p.rows == [stale] and p.recoverable
    assert f"row(s) {stale}" in p.message and dup_id in p.message
    mismatch = one(store, "count_mismatch")
    assert "ntotal 7" in mismatch.message and "6 entries" in mismatch.message
    assert not store.unrecoverable


@needs_fixtures
def test_edge_js_empty_keeps_dim_and_reports_empty():
    store = read_legacy_store(FIX / "edge" / "js_empty")
    assert (store.format, store.ntotal, store.dim, store.index_type, store.chunks) == ("langchain-js", 0, 1536,
                                                                                       "IndexFlatL2", [])
    assert kinds(store) == ["empty"] and "dim 1536" in one(store, "empty").message


@needs_fixtures
def test_edge_js_unicode_long_keeps_every_text_whole():
    n = note("js_unicode_long")
    path = FIX / "edge" / "js_unicode_long"
    store = read_legacy_store(path)
    docs, mapping = json.loads((path / "docstore.json").read_text(encoding="utf-8"))
    by_id = dict((i, d) for i, d in docs)
    assert [c.id for c in store.chunks] == [f"edge-{i}" for i in range(10)] == [mapping[str(i)] for i in range(10)]
    for c in store.chunks:  # text exactly as stored (nothing truncated, normalised or replaced)
        assert c.text == by_id[c.id]["pageContent"] and c.metadata == by_id[c.id]["metadata"]
        assert c.sha256 == Chunk.text_sha256(c.text)
        assert c.chunk == int(c.id.split("-")[1]) and c.source == ""
    chunk = {c.id: c for c in store.chunks}
    assert len(chunk["edge-8"].text) == n["long_text_chars"] == 123294
    assert "\ud800" in chunk["edge-6"].text and chunk["edge-6"].metadata["bad"] == "\udfff"
    assert "\x00" in chunk["edge-5"].text and chunk["edge-7"].text == ""
    assert chunk["edge-9"].metadata["nan"] is None and chunk["edge-9"].metadata["big"] == 9007199254740994
    long = one(store, "long_text")
    assert long.ids == ["edge-8"] and "will be re-chunked to the new model's limit" in long.message
    assert "123294" in long.message
    sur = one(store, "lone_surrogate")
    assert sur.ids == ["edge-6"] and "U+FFFD" in sur.message
    assert one(store, "empty_text").ids == ["edge-7"]
    assert sorted(kinds(store)) == ["empty_text", "lone_surrogate", "long_text"]
    assert not store.unrecoverable


@needs_fixtures
def test_edge_py_ip_reports_inner_product():
    n = note("py_ip")
    store = read_legacy_store(FIX / "edge" / "py_ip")
    assert store.format == "langchain-python" and store.index_type == n["index_type"] == "IndexFlatIP"
    assert (store.dim, store.ntotal, len(store.chunks)) == (1536, 8, 8)
    assert all(c.source == "source_docs/python-debugger.txt" for c in store.chunks)
    p = one(store, "inner_product")
    assert "inner product" in p.message and p.recoverable
    assert kinds(store) == ["inner_product"]


@needs_fixtures
def test_edge_py_nonjson_metadata_converted_by_the_rule():
    n = note("py_nonjson_metadata")
    store = read_legacy_store(FIX / "edge" / "py_nonjson_metadata")
    (c,) = store.chunks
    assert c.id == "nonjson-0" and c.text.startswith('Module "traceback"')
    assert c.metadata == {"when": "2024-01-02T03:04:05", "path": "/projects/demo/notes.md", "pair": [1, 2],
                          "tags": ["a"], "raw": "AAE=", "price": "1.10", "score": 0.5}
    json.dumps(c.metadata, allow_nan=False)  # plain JSON now
    conv = store.problems_of("metadata_converted")
    details = {p.detail: p for p in conv}
    assert sorted(details) == sorted(["datetime", "path", "tuple", "set", "bytes", "decimal", "numpy"])
    assert len(conv) == len(n["types"])  # once per kind
    assert all(p.recoverable and p.ids == ["nonjson-0"] for p in conv)
    assert "metadata.raw" in details["bytes"].message and "base64" in details["bytes"].message
    assert set(kinds(store)) == {"metadata_converted"}


# ---------------------------------------------------------------------------------------------------------------
# the restricted unpickler: payloads are refused, never run


class _Payload:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _globals_in(data: bytes) -> list[str]:
    """The `module.name` globals a pickle references (GLOBAL and STACK_GLOBAL)."""
    out, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            out.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            out.append(f"{strings[-2]}.{strings[-1]}")
        if isinstance(arg, str):
            strings.append(arg)
    return out


def _py_store(folder: Path, pkl: bytes) -> Path:
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    index = faiss.IndexFlatL2(4)
    index.add(np.eye(4, dtype=np.float32)[:1])
    faiss.write_index(index, str(folder / "index.faiss"))
    (folder / "index.pkl").write_bytes(pkl)
    return folder


def _payloads(marker: Path):
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').write('ran')"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
        "builtins.eval": _Payload(eval, f"open({str(marker)!r}, 'w').write('ran')"),
    }


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("which", ["os.system", "builtins.exec", "subprocess.Popen", "builtins.eval"])
def test_reduce_payload_is_refused_without_running(tmp_path, which, protocol):
    marker = tmp_path / "PWNED"
    payload = _payloads(marker)[which]
    data = pickle.dumps(({"doc": payload}, {0: "doc"}), protocol=protocol)
    (named,) = _globals_in(data)  # e.g. posix.system, __builtin__.exec (protocol < 3), builtins.eval
    assert named.split(".")[-1] == which.split(".")[-1]
    if protocol >= 4:
        assert any(op.name == "STACK_GLOBAL" for op, _, _ in pickletools.genops(data))
    store = _py_store(tmp_path / "store", data)
    with pytest.raises(LegacyStoreError) as err:
        read_legacy_store(store)
    msg = str(err.value)
    assert f"global {named}" in msg and str(store / "index.pkl") in msg
    assert not marker.exists()
    assert isinstance(err.value, StoreError)


def test_stack_global_builtins_eval_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    data = pickle.dumps(_Payload(eval, f"open({str(marker)!r}, 'w').write('ran')"), protocol=4)
    ops = [op.name for op, _, _ in pickletools.genops(data)]
    assert "STACK_GLOBAL" in ops and "REDUCE" in ops and _globals_in(data) == ["builtins.eval"]
    with pytest.raises(LegacyStoreError, match=r"builtins\.eval"):
        safe_unpickle(data, "evil.pkl")
    assert not marker.exists()


def test_handwritten_protocol0_global_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    data = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(LegacyStoreError, match=r"global os\.system") as err:
        safe_unpickle(data, tmp_path / "index.pkl")
    assert "index.pkl" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("value,global_name", [
    (dt.datetime.now, "builtins.getattr"),  # a bound method pickles as getattr(datetime, 'now')
    (getattr, "builtins.getattr"),
    (np.array([1.0]), "numpy._core.multiarray._reconstruct"),  # arrays are not admitted (scalars are)
])
def test_other_globals_are_refused(value, global_name):
    data = pickle.dumps({"x": value}, protocol=4)
    with pytest.raises(LegacyStoreError) as err:
        safe_unpickle(data, "x.pkl")
    assert global_name in str(err.value)


def test_dotted_name_under_an_allowed_module_is_refused():
    # STACK_GLOBAL('datetime', 'datetime.now') then call it: protocol 4 allows dotted names; the allow-list does not.
    data = b"\x80\x04\x8c\x08datetime\x8c\x0cdatetime.now\x93)R."
    assert _globals_in(data) == ["datetime.datetime.now"]
    with pytest.raises(LegacyStoreError, match=r"global datetime\.datetime\.now"):
        safe_unpickle(data, "x.pkl")


def test_numpy_scalars_only_of_plain_numeric_dtypes():
    vals = safe_unpickle(pickle.dumps([np.float32(0.5), np.int64(-3), np.bool_(True), np.uint8(7)], protocol=4))
    assert [v.item() for v in vals] == [0.5, -3, True, 7]
    with pytest.raises(LegacyStoreError, match="plain numeric"):
        safe_unpickle(pickle.dumps(np.str_("abc"), protocol=4))


# ---------------------------------------------------------------------------------------------------------------
# synthetic damage: pickles written as LangChain does, without LangChain


@pytest.fixture
def fake_langchain(monkeypatch):
    """Classes pickled under LangChain's module names, state shaped as pydantic v2 writes it."""

    class Document:
        def __init__(self, page_content, metadata, id=None):
            self.page_content, self.metadata, self.id = page_content, metadata, id

        def __getstate__(self):
            d = {"id": self.id, "metadata": self.metadata, "page_content": self.page_content, "type": "Document"}
            return {"__dict__": d, "__pydantic_extra__": None, "__pydantic_fields_set__": {"page_content", "metadata"},
                    "__pydantic_private__": None}

    class InMemoryDocstore:
        def __init__(self, d):
            self._dict = d

    for mod, cls in (("langchain_core.documents.base", Document),
                     ("langchain_community.docstore.in_memory", InMemoryDocstore)):
        m = types.ModuleType(mod)
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(m, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, mod, m)
    return types.SimpleNamespace(Document=Document, InMemoryDocstore=InMemoryDocstore)


def test_python_counts_disagree_and_all_text_is_kept(tmp_path, fake_langchain):
    lc = fake_langchain
    docs = {i: lc.Document(f"text {i}", {"source": f"s/{i}.md", "chunk": n}, id=i)
            for n, i in enumerate(["a", "b", "c", "d"])}
    data = pickle.dumps((lc.InMemoryDocstore(docs), {0: "a", 1: "zz", 2: "c"}), protocol=5)
    import faiss

    store_dir = tmp_path / "py"
    store_dir.mkdir()
    index = faiss.IndexFlatL2(8)
    index.add(np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32))
    faiss.write_index(index, str(store_dir / "index.faiss"))
    (store_dir / "index.pkl").write_bytes(data)
    store = read_legacy_store(store_dir)
    assert (store.format, store.dim, store.ntotal) == ("langchain-python", 8, 4)
    assert [c.id for c in store.chunks] == ["a", "c", "b", "d"]  # mapped rows, then the texts without a vector
    assert [c.source for c in store.chunks] == ["s/a.md", "s/c.md", "s/b.md", "s/d.md"]
    assert [c.chunk for c in store.chunks] == [0, 2, 1, 3]
    assert "ntotal 4, row->id mapping 3, index.pkl 4 entries" in one(store, "count_mismatch").message
    missing = one(store, "missing_text")
    assert (missing.ids, missing.rows, missing.recoverable) == (["zz"], [1], False)
    assert "row 1 -> zz" in missing.message
    unmapped = one(store, "unmapped_row")
    assert (unmapped.rows, unmapped.recoverable) == ([3], False)
    no_vec = one(store, "no_vector")
    assert (no_vec.ids, no_vec.recoverable) == (["b", "d"], True)
    assert [p.kind for p in store.unrecoverable] == ["missing_text", "unmapped_row"]


def test_python_metadata_conversions_beyond_the_fixture(tmp_path, fake_langchain):
    lc = fake_langchain
    meta = {
        "aware": dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc), "day": dt.date(2024, 1, 2),
        "span": dt.timedelta(minutes=2), "mixed": frozenset({1, "a"}), "nums": {3, 1, 2}, "ba": bytearray(b"hi"),
        "i": np.int64(-4), "flag": np.bool_(False), "nan": float("nan"), "inf": np.float64("inf"), 7: "int key",
        "nested": ((1, PurePosixPath("a/b")), [decimal.Decimal("2.50")]), "c": 1 + 2j,
        "win": Path("rel/x.txt"),
    }
    data = pickle.dumps((lc.InMemoryDocstore({"m": lc.Document("t", meta)}), {0: "m"}), protocol=4)
    (c,) = read_legacy_store(_py_store(tmp_path / "s", data)).chunks
    m = c.metadata
    assert m["aware"] == "2024-05-06T07:08:09+00:00" and m["day"] == "2024-01-02" and m["span"] == 120.0
    assert sorted(map(str, m["mixed"])) == ["1", "a"] and m["nums"] == [1, 2, 3] and m["ba"] == "aGk="
    assert m["i"] == -4 and m["flag"] is False and m["nan"] is None and m["inf"] is None
    assert m["7"] == "int key" and m["nested"] == [[1, "a/b"], ["2.50"]] and m["c"] == [1.0, 2.0]
    assert m["win"] == "rel/x.txt"
    json.dumps(m, allow_nan=False)
    store = read_legacy_store(tmp_path / "s")
    details = sorted(p.detail for p in store.problems_of("metadata_converted"))
    assert details == sorted(["datetime", "timedelta", "set", "bytes", "numpy", "nonfinite", "key", "tuple", "path",
                              "decimal", "complex"])


def test_cyclic_metadata_and_sized_bytearray(tmp_path, fake_langchain):
    lc = fake_langchain
    loop: list = [1]
    loop.append(loop)
    data = pickle.dumps((lc.InMemoryDocstore({"m": lc.Document("t", {"loop": loop})}), {0: "m"}), protocol=4)
    store = read_legacy_store(_py_store(tmp_path / "s", data))
    assert store.chunks[0].metadata == {"loop": [1, None]}
    assert [p.detail for p in store.problems_of("metadata_converted")] == ["cycle"]
    # bytearray(10**12) would allocate a terabyte: only bytearray(bytes) is admitted
    bomb = b"\x80\x04\x8c\x08builtins\x8c\tbytearray\x93\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85R."
    assert _globals_in(bomb) == ["builtins.bytearray"]
    with pytest.raises(LegacyStoreError, match="bytearray only from bytes"):
        safe_unpickle(bomb)
    assert safe_unpickle(pickle.dumps(bytearray(b"ok"), protocol=2)) == bytearray(b"ok")


# ---------------------------------------------------------------------------------------------------------------
# synthetic damage in JS stores


def _js_store(folder: Path, n_vectors: int, docs: list, mapping: dict, dim: int = 4) -> Path:
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    index = faiss.IndexFlatL2(dim)
    if n_vectors:
        index.add(np.random.default_rng(1).standard_normal((n_vectors, dim)).astype(np.float32))
    faiss.write_index(index, str(folder / "faiss.index"))
    (folder / "docstore.json").write_text(json.dumps([docs, mapping]), encoding="utf-8")
    return folder


def _doc(i, text=None, **meta):
    return [i, {"pageContent": text if text is not None else f"text of {i}", "metadata": meta}]


def test_js_counts_disagree_every_text_kept(tmp_path):
    docs = [_doc("a", source="x.md", chunk=0), _doc("b"), _doc("c"), _doc("e"), _doc("a", "other text for a")]
    store = read_legacy_store(_js_store(tmp_path / "s", 4, docs, {"0": "a", "1": "b", "2": "d", "5": "c"}))
    assert [c.id for c in store.chunks] == ["a", "b", "c", "e", "a#dup1"]
    assert store.chunks[0].source == "x.md" and store.chunks[1].source == "" and store.chunks[1].chunk == 1
    assert one(store, "missing_text").rows == [2] and one(store, "missing_text").ids == ["d"]
    assert one(store, "row_out_of_range").rows == [5] and one(store, "row_out_of_range").ids == ["c"]
    assert one(store, "unmapped_row").rows == [3]
    assert one(store, "no_vector").ids == ["e", "a#dup1"]
    assert "a#dup1" in one(store, "duplicate_docstore_id").message
    assert "ntotal 4, row->id mapping 4, docstore.json 5 entries" in one(store, "count_mismatch").message


def test_js_nan_literals_become_null(tmp_path):
    folder = _js_store(tmp_path / "s", 1, [], {})
    (folder / "docstore.json").write_text('[[["a", {"pageContent": "t", "metadata": {"x": NaN, "y": [Infinity]}}]], '
                                          '{"0": "a"}]', encoding="utf-8")
    store = read_legacy_store(folder)
    assert store.chunks[0].metadata == {"x": None, "y": [None]}
    p = one(store, "metadata_converted")
    assert p.detail == "nonfinite" and p.ids == ["a"] and "metadata.x" in p.message


def test_docstore_without_index_still_gives_texts(tmp_path):
    folder = _js_store(tmp_path / "s", 1, [_doc("a")], {"0": "a"})
    (folder / "faiss.index").unlink()
    store = read_legacy_store(folder)
    assert store.format == "langchain-js" and store.dim is None and store.ntotal is None
    assert [c.text for c in store.chunks] == ["text of a"]
    assert "index_missing" in kinds(store)


def test_truncated_index_is_reported_with_its_header_dim(tmp_path):
    folder = _js_store(tmp_path / "s", 3, [_doc(i) for i in "abc"], {str(n): i for n, i in enumerate("abc")}, dim=16)
    data = (folder / "faiss.index").read_bytes()
    (folder / "faiss.index").write_bytes(data[:-20])
    store = read_legacy_store(folder)
    assert (store.dim, store.ntotal, len(store.chunks)) == (16, 3, 3)
    assert kinds(store) == ["index_truncated"]


def test_index_without_texts_is_an_error(tmp_path):
    folder = _js_store(tmp_path / "s", 1, [], {})
    (folder / "docstore.json").unlink()
    with pytest.raises(LegacyStoreError, match="docstore.json"):
        read_legacy_store(folder)


def test_unparseable_docstore_names_the_file(tmp_path):
    folder = _js_store(tmp_path / "s", 1, [_doc("a")], {"0": "a"})
    (folder / "docstore.json").write_text('[[["a", {"pageContent": "t', encoding="utf-8")
    with pytest.raises(LegacyStoreError, match="docstore.json: not valid JSON"):
        read_legacy_store(folder)


# ---------------------------------------------------------------------------------------------------------------
# format detection and this project's own stores


def test_unknown_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UnknownStoreFormatError) as err:
        read_legacy_store(tmp_path)
    msg = str(err.value)
    for name in ("faiss.index", "docstore.json", "index.faiss", "index.pkl", "manifest.json", "notes.txt"):
        assert name in msg
    assert isinstance(err.value, LegacyStoreError) and isinstance(err.value, StoreNotFoundError)
    assert err.value.exit_code == 2
    with pytest.raises(UnknownStoreFormatError, match="no such store folder"):
        read_legacy_store(tmp_path / "nowhere")
    with pytest.raises(LegacyStoreError, match="unknown store format"):
        read_legacy_store(tmp_path, format="chroma")


def test_model_named_by_a_manifest_beside_a_langchain_store(tmp_path):
    folder = _js_store(tmp_path / "s", 1, [_doc("a")], {"0": "a"})
    (folder / "manifest.json").write_text(json.dumps({"embeddingModel": "text-embedding-3-small"}), encoding="utf-8")
    store = read_legacy_store(folder)
    assert (store.format, store.model, store.problems) == ("langchain-js", "text-embedding-3-small", [])
    (folder / "manifest.json").write_text("{not json", encoding="utf-8")
    store = read_legacy_store(folder)
    assert store.model is None and kinds(store) == ["manifest_ignored"]


def test_both_layouts_present_reads_js_and_says_so(tmp_path):
    folder = _js_store(tmp_path / "s", 1, [_doc("a")], {"0": "a"})
    (folder / "index.pkl").write_bytes(b"\x80\x04N.")
    store = read_legacy_store(folder)
    assert store.format == "langchain-js" and kinds(store) == ["several_layouts"]
    with pytest.raises(LegacyStoreError, match="expected a pickled"):
        read_legacy_store(folder, format="langchain-python")


def test_woolocal_store_reads_back_for_local_to_local_migration(tmp_path):
    from woolocal_ingest.stores import is_store, write_store

    texts = ["alpha one", "beta two", "gamma \ud800 three"]
    chunks = [Chunk(id=f"id-{i}", text=t, source=f"docs/{i}.md", chunk=i, metadata={"source": f"docs/{i}.md", "k": i},
                    sha256=Chunk.text_sha256(t)) for i, t in enumerate(texts)]
    vecs = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    target = tmp_path / "proj" / "test-model-8d"
    write_store(target, chunks, vecs, {"model": {"name": "test/model", "dim": 8}})
    assert is_store(target) and detect_format(target) == "woolocal"
    store = read_legacy_store(target)
    assert (store.format, store.dim, store.ntotal, store.index_type, store.model) == ("woolocal", 8, 3, "IndexFlatL2",
                                                                                      "test/model")
    assert [c.id for c in store.chunks] == ["id-0", "id-1", "id-2"]
    assert store.chunks[0] == chunks[0] and store.chunks[1] == chunks[1]
    assert store.chunks[2].text == "gamma \ufffd three"  # the writer replaced the lone surrogate ...
    assert store.chunks[2].sha256 == chunks[2].sha256  # ... and kept the sha256 of the text as chunked
    assert store.problems == []
    # Its LangChain JS files read the same when asked for that layout.
    js = read_legacy_store(target, format="langchain-js")
    assert [(c.id, c.text, c.metadata) for c in js.chunks] == [(c.id, c.text, c.metadata) for c in store.chunks]
